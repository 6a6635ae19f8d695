//! The test as a virtio-blk driver and DMA-engine programmer of a running VM: it writes
//! descriptors and the avail ring into guest RAM and reaches the devices' registers through
//! the VM's MMIO bus, the way a guest driver's accesses would arrive (the vCPUs keep running
//! their own guest meanwhile). The rings and buffers live in RAM the `spin` guest never uses.

use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress};
use vmm::layout::{DMA_ENGINE_MMIO_ADDR, VIRTIO_BLK_MMIO_ADDR};
use vmm::Vmm;

pub const DESC_TABLE: u64 = 0x40_0000;
pub const AVAIL_RING: u64 = 0x40_1000;
pub const USED_RING: u64 = 0x40_2000;
pub const QUEUE_SIZE: u16 = 16;
/// Request headers and status bytes: one 64-byte slot per descriptor triple.
pub const HEADERS: u64 = 0x40_3000;
/// Free guest RAM for data buffers (up to 0x100_0000, where `spin`'s touch area starts).
pub const DATA: u64 = 0x50_0000;

/// Descriptors per request: header, one data buffer, status.
const DESCS_PER_REQUEST: u16 = 3;
const REQUEST_SLOTS: u16 = QUEUE_SIZE / DESCS_PER_REQUEST;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;

fn mmio_write(vmm: &Vmm, addr: u64, value: u32) {
    vmm.buses().1.write(addr, &value.to_le_bytes()).expect("a device at this MMIO address");
}

fn mmio_read(vmm: &Vmm, addr: u64) -> u32 {
    let mut data = [0u8; 4];
    assert!(vmm.buses().1.read(addr, &mut data), "a device at {addr:#x}");
    u32::from_le_bytes(data)
}

/// A submitted request: where its status byte is.
#[derive(Clone, Copy, Debug)]
pub struct Submitted {
    pub status: u64,
    /// The avail index after this request: done once the used index reaches it.
    pub avail_idx: u16,
}

/// The driver's position in its rings; copy it at a clone instant for the clone's driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlkDriver {
    requests: u16,
    avail_idx: u16,
}

impl BlkDriver {
    /// Negotiates VERSION_1 and sets up queue 0 of the VM's virtio-blk through its registers.
    pub fn setup(vmm: &Vmm) -> BlkDriver {
        let reg = |offset: u64, value: u32| mmio_write(vmm, VIRTIO_BLK_MMIO_ADDR + offset, value);
        assert_eq!(mmio_read(vmm, VIRTIO_BLK_MMIO_ADDR + 8), 2, "a block device");
        // As a driver does: reset whatever an earlier driver (the guest's) left, on zeroed rings.
        reg(0x70, 0);
        for ring in [DESC_TABLE, AVAIL_RING, USED_RING] {
            vmm.ram().write_slice(&[0u8; 0x1000], GuestAddress(ring)).unwrap();
        }
        reg(0x70, 1);
        reg(0x70, 3);
        reg(0x24, 1);
        reg(0x20, 1); // VERSION_1
        reg(0x70, 3 | 8);
        reg(0x30, 0);
        reg(0x38, u32::from(QUEUE_SIZE));
        for (offset, addr) in [(0x80, DESC_TABLE), (0x90, AVAIL_RING), (0xa0, USED_RING)] {
            reg(offset, addr as u32);
            reg(offset + 4, (addr >> 32) as u32);
        }
        reg(0x44, 1);
        reg(0x70, 3 | 8 | 4);
        assert_eq!(mmio_read(vmm, VIRTIO_BLK_MMIO_ADDR + 0x70), 15, "the device took the driver's setup");
        BlkDriver::default()
    }

    /// Offers a request of `kind` for `len` bytes at `sector` with data buffer `buf`, and
    /// notifies the queue.
    fn submit(&mut self, vmm: &Vmm, kind: u32, sector: u64, buf: u64, len: u32) -> Submitted {
        let request = self.offer(vmm, kind, sector, buf, len);
        mmio_write(vmm, VIRTIO_BLK_MMIO_ADDR + 0x50, 0);
        request
    }

    /// Puts a read of `len` bytes at `sector` into guest `buf` in the avail ring without
    /// notifying the queue (as if the notification were still on its way).
    pub fn offer_read(&mut self, vmm: &Vmm, sector: u64, buf: u64, len: u32) -> Submitted {
        self.offer(vmm, VIRTIO_BLK_T_IN, sector, buf, len)
    }

    /// Writes a request's descriptors and makes it available, without notifying.
    fn offer(&mut self, vmm: &Vmm, kind: u32, sector: u64, buf: u64, len: u32) -> Submitted {
        let ram = vmm.ram();
        let slot = self.requests % REQUEST_SLOTS;
        self.requests = self.requests.wrapping_add(1);
        let first = slot * DESCS_PER_REQUEST;
        let header = HEADERS + 64 * u64::from(slot);
        let status = header + 16;
        ram.write_obj(kind, GuestAddress(header)).unwrap();
        ram.write_obj(0u32, GuestAddress(header + 4)).unwrap();
        ram.write_obj(sector, GuestAddress(header + 8)).unwrap();
        ram.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let data_flags: u16 = if kind == VIRTIO_BLK_T_IN { 2 } else { 0 };
        let descs: [(u64, u32, u16); 3] = [(header, 16, 1), (buf, len, 1 | data_flags), (status, 1, 2)];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let index = first + i as u16;
            let at = DESC_TABLE + 16 * u64::from(index);
            ram.write_obj(addr, GuestAddress(at)).unwrap();
            ram.write_obj(len, GuestAddress(at + 8)).unwrap();
            ram.write_obj(flags, GuestAddress(at + 12)).unwrap();
            ram.write_obj(index + 1, GuestAddress(at + 14)).unwrap();
        }
        let avail_slot = u64::from(self.avail_idx % QUEUE_SIZE);
        ram.write_obj(first, GuestAddress(AVAIL_RING + 4 + 2 * avail_slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
        Submitted { status, avail_idx: self.avail_idx }
    }

    /// Submits a read of `len` bytes at `sector` into guest `buf`.
    pub fn submit_read(&mut self, vmm: &Vmm, sector: u64, buf: u64, len: u32) -> Submitted {
        self.submit(vmm, VIRTIO_BLK_T_IN, sector, buf, len)
    }

    /// Waits (10 s at most) until `request` is in the used ring of `vmm`; returns its status.
    pub fn wait(vmm: &Vmm, request: Submitted) -> u8 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used: u16 = vmm.ram().read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if used.wrapping_sub(request.avail_idx) < 0x8000 {
                return vmm.ram().read_obj(GuestAddress(request.status)).unwrap();
            }
            assert!(Instant::now() < deadline, "VM {}: request never completed (used {used})", vmm.id());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads `len` bytes at `sector` through the device, synchronously.
    pub fn read(&mut self, vmm: &Vmm, sector: u64, len: usize) -> Vec<u8> {
        let buf = DATA + 0x10_0000;
        let request = self.submit_read(vmm, sector, buf, len as u32);
        assert_eq!(Self::wait(vmm, request), 0, "read status");
        read_bytes(vmm, buf, len)
    }

    /// Writes `data` at `sector` through the device, synchronously.
    pub fn write(&mut self, vmm: &Vmm, sector: u64, data: &[u8]) {
        let buf = DATA + 0x20_0000;
        vmm.ram().write_slice(data, GuestAddress(buf)).unwrap();
        let request = self.submit(vmm, VIRTIO_BLK_T_OUT, sector, buf, data.len() as u32);
        assert_eq!(Self::wait(vmm, request), 0, "write status");
    }
}

/// `len` bytes of guest RAM at `addr`.
pub fn read_bytes(vmm: &Vmm, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    vmm.ram().read_slice(&mut out, GuestAddress(addr)).unwrap();
    out
}

/// Programs the VM's DMA engine through its registers with a pattern transfer and starts it.
pub fn start_dma_pattern(vmm: &Vmm, pattern: u64, dst: u64, len: u32, chunk: u32, pacing_us: u32) {
    let reg = |offset: u64, value: u32| mmio_write(vmm, DMA_ENGINE_MMIO_ADDR + offset, value);
    reg(0x2c, 0); // pattern mode
    reg(0x10, pattern as u32);
    reg(0x14, (pattern >> 32) as u32);
    reg(0x18, dst as u32);
    reg(0x1c, (dst >> 32) as u32);
    reg(0x20, len);
    reg(0x24, chunk);
    reg(0x28, pacing_us);
    reg(0x30, 1);
    assert_eq!(dma_register(vmm, 0x44), 0, "the DMA engine took the transfer");
}

/// A DMA engine register: 0x34 status (1 busy, 2 done, 4 error), 0x38 progress, 0x44 error.
pub fn dma_register(vmm: &Vmm, offset: u64) -> u32 {
    mmio_read(vmm, DMA_ENGINE_MMIO_ADDR + offset)
}

/// Waits (20 s at most) until the DMA engine of `vmm` is idle; returns its status register.
pub fn wait_dma_idle(vmm: &Vmm) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = dma_register(vmm, 0x34);
        if status & 1 == 0 {
            return status;
        }
        assert!(Instant::now() < deadline, "VM {}: DMA transfer never finished", vmm.id());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// While held, virtio-blk pins and queues requests but does not hand them to the kernel: a
/// page-cache read would otherwise finish in microseconds, before any clone or snapshot could
/// catch it in flight.
pub fn hold_blk_submissions(vmm: &Vmm, held: bool) {
    let block = vmm.devices().block().expect("a virtio-blk device");
    block.lock().unwrap().device().hold_submissions(held);
}

/// Requests the VM's virtio-blk has between submission and completion.
pub fn blk_in_flight(vmm: &Vmm) -> usize {
    let block = vmm.devices().block().expect("a virtio-blk device");
    block.lock().unwrap().device().in_flight()
}

/// With `true`, `vmm`'s DMA engine moves only when `step_dma` moves it (a clone, snapshot or
/// reset keeps that); with `false` its runner takes the transfer over. A test that needs a
/// transfer in flight at some instant holds it this way instead of racing the runner.
pub fn hold_dma(vmm: &Vmm, held: bool) {
    vmm.devices().dma().expect("a DMA engine").lock().unwrap().set_host_stepped(held);
}

/// Moves `vmm`'s held DMA transfer `chunks` chunks on; returns its progress then.
pub fn step_dma(vmm: &Vmm, chunks: u64) -> u64 {
    let mut engine = vmm.devices().dma().expect("a DMA engine").lock().unwrap();
    for _ in 0..chunks {
        assert!(engine.step(), "VM {}: the DMA transfer ended early", vmm.id());
    }
    engine.progress()
}

/// Whether `vmm`'s DMA engine has a transfer in flight.
pub fn dma_busy(vmm: &Vmm) -> bool {
    vmm.devices().dma().expect("a DMA engine").lock().unwrap().busy()
}
