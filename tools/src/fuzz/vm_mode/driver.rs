//! How the fuzzer drives a VM: commands to the `mailbox` guest (it runs exactly one, then the
//! VM is paused again), and the VMM as the virtio-blk driver and DMA-engine programmer,
//! writing rings into guest RAM and registers through the VM's MMIO bus, the way a guest
//! driver's accesses would arrive.

use std::time::{Duration, Instant};

use devices::dma::DmaSource;
use memory::{Bytes, GuestAddress};

use super::Violation;
use vmm::layout::{DMA_ENGINE_MMIO_ADDR, MAILBOX_ADDR, VIRTIO_BLK_MMIO_ADDR};
use vmm::machine::{Paused, Vmm};

/// The virtio-blk queue (in RAM the oracle does not model byte by byte).
pub const DESC_TABLE: u64 = 0x32_0000;
pub const AVAIL_RING: u64 = 0x32_1000;
pub const USED_RING: u64 = 0x32_2000;
/// Request headers and status bytes: one 64-byte slot per descriptor triple.
pub const HEADERS: u64 = 0x32_3000;
pub const QUEUE_SIZE: u16 = 16;
const DESCS_PER_REQUEST: u16 = 3;
/// Requests that fit in the queue at once.
pub const REQUEST_SLOTS: u16 = QUEUE_SIZE / DESCS_PER_REQUEST;

const OP_FILL: u64 = 1;
const OP_DMA: u64 = 2;
const OP_COPY: u64 = 3;
const MB_SEQ: u64 = 0;
const MB_OP: u64 = 8;
const MB_ADDR: u64 = 16;
const MB_LEN: u64 = 24;
const MB_VALUE: u64 = 32;
const MB_CHUNK: u64 = 40;
const MB_ACK: u64 = 64;
/// How long a guest gets for one command. Generous: two cores may be busy with other VMs'
/// device threads, and nested virtualization is slow to schedule a vCPU.
const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn ram_err(what: &str, e: impl std::fmt::Display) -> Violation {
    Violation(format!("{what}: {e}"))
}

fn write_u64(vmm: &Vmm, addr: u64, value: u64) -> Result<(), Violation> {
    vmm.ram().write_obj(value, GuestAddress(addr)).map_err(|e| ram_err("host write to guest RAM failed", e))
}

fn read_u64(vmm: &Vmm, addr: u64) -> Result<u64, Violation> {
    vmm.ram().read_obj(GuestAddress(addr)).map_err(|e| ram_err("host read of guest RAM failed", e))
}

/// A guest command: what the mailbox guest does with it.
#[derive(Clone, Copy, Debug)]
pub enum GuestCommand {
    Fill { addr: u64, len: u64, byte: u8 },
    Dma { source: DmaSource, dst: u64, len: u64, chunk: u64 },
}

/// Leaves `command` in the mailbox of paused `vmm`, lets the guest run until it acknowledged
/// it, and pauses the VM again: the guest wrote exactly the command's bytes meanwhile.
pub fn run_guest_command(vmm: &mut Vmm, token: Paused, command: GuestCommand) -> Result<Paused, Violation> {
    let seq = read_u64(vmm, MAILBOX_ADDR + MB_ACK)? + 1;
    let (op, addr, len, value, chunk) = match command {
        GuestCommand::Fill { addr, len, byte } => (OP_FILL, addr, len, u64::from(byte), 0),
        GuestCommand::Dma { source: DmaSource::Pattern(pattern), dst, len, chunk } => {
            (OP_DMA, dst, len, pattern, chunk)
        }
        GuestCommand::Dma { source: DmaSource::Guest(src), dst, len, chunk } => (OP_COPY, dst, len, src, chunk),
    };
    for (field, value) in
        [(MB_OP, op), (MB_ADDR, addr), (MB_LEN, len), (MB_VALUE, value), (MB_CHUNK, chunk), (MB_SEQ, seq)]
    {
        write_u64(vmm, MAILBOX_ADDR + field, value)?;
    }
    vmm.resume(token);
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut polls = 0u32;
    while read_u64(vmm, MAILBOX_ADDR + MB_ACK)? != seq {
        if let Some(outcome) = vmm.outcome() {
            return Err(Violation(format!("VM {} ended during a guest command: {outcome:?}", vmm.id())));
        }
        if Instant::now() > deadline {
            return Err(Violation(format!(
                "VM {}: the guest did not run command {seq} within {GUEST_TIMEOUT:?}",
                vmm.id()
            )));
        }
        polls += 1;
        match polls < 200 {
            true => std::thread::yield_now(),
            false => std::thread::sleep(Duration::from_micros(50)),
        }
    }
    vmm.pause().map_err(|e| Violation(format!("VM {}: cannot pause after a guest command: {e}", vmm.id())))
}

fn mmio_write(vmm: &Vmm, addr: u64, value: u32) -> Result<(), Violation> {
    vmm.buses()
        .1
        .write(addr, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|_| Violation(format!("no device at MMIO {addr:#x}")))
}

fn mmio_read(vmm: &Vmm, addr: u64) -> Result<u32, Violation> {
    let mut data = [0u8; 4];
    match vmm.buses().1.read(addr, &mut data) {
        true => Ok(u32::from_le_bytes(data)),
        false => Err(Violation(format!("no device at MMIO {addr:#x}"))),
    }
}

/// Programs the DMA engine of `vmm` through its registers, as a driver would, and starts it.
#[allow(clippy::cast_possible_truncation)] // the registers are 32-bit halves
pub fn host_dma(vmm: &Vmm, source: DmaSource, dst: u64, len: u32, chunk: u32) -> Result<(), Violation> {
    let select = match source {
        // Mode first, then the value: writing PATTERN selects the pattern source, SRC the copy.
        DmaSource::Pattern(p) => [(0x2c, 0), (0x10, p as u32), (0x14, (p >> 32) as u32)],
        DmaSource::Guest(a) => [(0x2c, 1), (0x08, a as u32), (0x0c, (a >> 32) as u32)],
    };
    for (offset, value) in select {
        mmio_write(vmm, DMA_ENGINE_MMIO_ADDR + offset, value)?;
    }
    let writes = [(0x18, dst as u32), (0x1c, (dst >> 32) as u32), (0x20, len), (0x24, chunk), (0x28, 0), (0x30, 1)];
    for (offset, value) in writes {
        mmio_write(vmm, DMA_ENGINE_MMIO_ADDR + offset, value)?;
    }
    Ok(())
}

/// A submitted virtio-blk request: where its status byte is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub status: u64,
}

/// The driver's position in its rings; a clone's driver starts from a copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkQueue {
    requests: u16,
    avail_idx: u16,
}

/// virtio-blk request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;

impl BlkQueue {
    /// Resets the VM's virtio-blk, clears the queue's memory, negotiates VERSION_1 and sets up
    /// queue 0: what a driver does at boot, and again after the VM was reset to a snapshot
    /// (its RAM rings went back, the device's queue position did not).
    pub fn setup(vmm: &Vmm) -> Result<BlkQueue, Violation> {
        let ring_bytes = (HEADERS + 0x1000 - DESC_TABLE) as usize;
        vmm.ram()
            .write_slice(&vec![0; ring_bytes], GuestAddress(DESC_TABLE))
            .map_err(|e| ram_err("clearing the virtio queue", e))?;
        let reg = |offset: u64, value: u32| mmio_write(vmm, VIRTIO_BLK_MMIO_ADDR + offset, value);
        for (offset, value) in [
            (0x70, 0),
            (0x70, 1),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 11),
            (0x30, 0),
            (0x38, u32::from(QUEUE_SIZE)),
        ] {
            reg(offset, value)?;
        }
        #[allow(clippy::cast_possible_truncation)]
        for (offset, addr) in [(0x80, DESC_TABLE), (0x90, AVAIL_RING), (0xa0, USED_RING)] {
            reg(offset, addr as u32)?;
            reg(offset + 4, (addr >> 32) as u32)?;
        }
        reg(0x44, 1)?;
        reg(0x70, 15)?;
        match mmio_read(vmm, VIRTIO_BLK_MMIO_ADDR + 0x70)? {
            15 => Ok(BlkQueue::default()),
            status => Err(Violation(format!("virtio-blk refused the driver's set-up: status {status:#x}"))),
        }
    }

    /// Offers a request of `kind` for `len` bytes at `sector` with data buffer `buf`, and
    /// notifies the queue.
    pub fn submit(&mut self, vmm: &Vmm, kind: u32, sector: u64, buf: u64, len: u32) -> Result<Submitted, Violation> {
        let ram = vmm.ram();
        let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(|e| ram_err("writing the virtio queue", e));
        let slot = self.requests % REQUEST_SLOTS;
        self.requests = self.requests.wrapping_add(1);
        let first = slot * DESCS_PER_REQUEST;
        let header = HEADERS + 64 * u64::from(slot);
        let status = header + 16;
        w(ram.write_obj(kind, GuestAddress(header)))?;
        w(ram.write_obj(0u32, GuestAddress(header + 4)))?;
        w(ram.write_obj(sector, GuestAddress(header + 8)))?;
        w(ram.write_obj(0xffu8, GuestAddress(status)))?;
        let data_flags: u16 = if kind == VIRTIO_BLK_T_IN { 2 } else { 0 };
        let descs: [(u64, u32, u16); 3] = [(header, 16, 1), (buf, len, 1 | data_flags), (status, 1, 2)];
        for (i, (addr, len, flags)) in (0u16..).zip(descs) {
            let index = first + i;
            let at = DESC_TABLE + 16 * u64::from(index);
            w(ram.write_obj(addr, GuestAddress(at)))?;
            w(ram.write_obj(len, GuestAddress(at + 8)))?;
            w(ram.write_obj(flags, GuestAddress(at + 12)))?;
            w(ram.write_obj(index + 1, GuestAddress(at + 14)))?;
        }
        let avail_slot = u64::from(self.avail_idx % QUEUE_SIZE);
        w(ram.write_obj(first, GuestAddress(AVAIL_RING + 4 + 2 * avail_slot)))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w(ram.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)))?;
        mmio_write(vmm, VIRTIO_BLK_MMIO_ADDR + 0x50, 0)?;
        Ok(Submitted { status })
    }

    /// Checks that every offered request is in the used ring of `vmm`.
    pub fn check_all_used(&self, vmm: &Vmm) -> Result<(), Violation> {
        let used: u16 =
            vmm.ram().read_obj(GuestAddress(USED_RING + 2)).map_err(|e| ram_err("reading the used ring", e))?;
        match used == self.avail_idx {
            true => Ok(()),
            false => Err(Violation(format!(
                "VM {}: used index {used} after completion, {} requests offered",
                vmm.id(),
                self.avail_idx
            ))),
        }
    }
}

/// The status byte of a completed request.
pub fn request_status(vmm: &Vmm, request: Submitted) -> Result<u8, Violation> {
    vmm.ram().read_obj(GuestAddress(request.status)).map_err(|e| ram_err("reading a request status", e))
}
