//! The MMIO devices a VM gets: virtio-blk (with `--disk`) and the DMA test engine, each at a
//! fixed address from `layout`, and the kernel command-line fragment that tells Linux where.
//!
//! How they reach the guest depends on the VM (`Wiring`). Tiny guests run without an in-kernel
//! irqchip: interrupts are polled (the guest reads the interrupt-status register) and
//! QueueNotify writes are MMIO exits served on the vCPU thread. A VM with an irqchip (Linux,
//! and its clones) gets each device interrupt as an irqfd on the device's GSI and virtio-blk's
//! QueueNotify as an ioeventfd (datamatch = queue index) served by the disk's event loop,
//! which also reaps its io_uring completions in both cases.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::block::{BlockDevice, BlockError, BlockState, CowDisk, FrozenDisk};
use devices::dma::{DmaEngine, DmaRunner, DmaState, DMA_REGION_SIZE};
use devices::virtio::{MmioTransport, MmioTransportState, QueueNotifier, VirtioDevice, MMIO_REGION_SIZE, REG_QUEUE_NOTIFY};
use devices::DeviceInterrupt;
use kvm_ioctls::{IoEventAddress, VmFd};
use memory::{GuestRam, MemoryError};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::{DeviceEventLoop, Subscriber};
use super::DeviceError;
use crate::bus::Bus;
use crate::layout::{DMA_ENGINE_IRQ, DMA_ENGINE_MMIO_ADDR, VIRTIO_BLK_IRQ, VIRTIO_BLK_MMIO_ADDR};

/// How a VM's MMIO devices interrupt the guest and hear its queue notifications.
#[derive(Clone, Copy)]
pub enum Wiring<'a> {
    /// No in-kernel irqchip (tiny guests): polled interrupt status, QueueNotify as MMIO exits.
    Polled,
    /// The VM has an in-kernel irqchip: irqfds on the devices' GSIs, ioeventfds on QueueNotify.
    Irqchip(&'a VmFd),
}

impl std::fmt::Debug for Wiring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wiring::Polled => "Polled",
            Wiring::Irqchip(_) => "Irqchip",
        })
    }
}

type BlockTransport = Arc<Mutex<MmioTransport<BlockDevice>>>;

/// The virtio-blk device on the bus, and the event loop serving it.
pub struct BlockSlot {
    pub transport: BlockTransport,
    // Declared after `transport`; stops before the device goes (the loop holds its own Arcs).
    _events: DeviceEventLoop,
}

/// The MMIO devices of a VM, kept so the VMM (and the clone path) can reach them.
pub struct MmioDevices {
    pub block: Option<BlockSlot>,
    pub dma: Arc<Mutex<DmaEngine>>,
    _dma_runner: DmaRunner,
}

/// virtio-blk's state: the transport's registers and the device's queue and requests in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSlotState {
    pub transport: MmioTransportState,
    pub device: BlockState,
}

/// The MMIO devices' state as plain data (guest physical addresses only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioDevicesState {
    /// Present when the VM has a disk.
    pub block: Option<BlockSlotState>,
    pub dma: DmaState,
}

/// `virtio_mmio.device=SIZE@ADDR:IRQ` for one device: how a Linux guest without ACPI or a
/// device tree finds a virtio-mmio device.
pub fn virtio_mmio_cmdline(addr: u64, size: u64, irq: u32) -> String {
    format!("virtio_mmio.device={}K@{addr:#x}:{irq}", size >> 10)
}

impl MmioDevices {
    /// The command-line fragments for the virtio devices present (empty without a disk).
    pub fn kernel_cmdline(&self) -> String {
        match self.block {
            Some(_) => virtio_mmio_cmdline(VIRTIO_BLK_MMIO_ADDR, MMIO_REGION_SIZE, VIRTIO_BLK_IRQ),
            None => String::new(),
        }
    }
}

/// What happens to the disk at a capture instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCapture {
    /// Nothing (state only).
    Leave,
    /// A copy-on-write clone for a new VM (`CowDisk::clone_cow`).
    Clone,
    /// A frozen copy for a snapshot (`CowDisk::freeze`).
    Freeze,
}

/// The disk a capture took, if the VM has one and it was asked for.
#[derive(Debug)]
pub enum CapturedDisk {
    Clone(CowDisk),
    Frozen(FrozenDisk),
}

impl MmioDevices {
    /// Saves every MMIO device and runs `freeze_ram` at one instant with respect to them: the
    /// DMA engine's lock and virtio-blk's device lock are held across the state capture, the
    /// disk capture asked for and `freeze_ram`, so no chunk and no completion lands in between.
    pub fn save_state_with<R>(
        &self,
        disk: DiskCapture,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(MmioDevicesState, Option<CapturedDisk>, R), BlockError> {
        let dma = self.dma.lock().unwrap_or_else(|e| e.into_inner());
        let dma_state = dma.state();
        let Some(slot) = &self.block else {
            return Ok((MmioDevicesState { block: None, dma: dma_state }, None, freeze_ram()));
        };
        let transport = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
        // The transport's registers are read inside the device lock: its interrupt status
        // then matches the used ring the frozen RAM holds.
        let at_instant = || (transport.state(), freeze_ram());
        let device = transport.device();
        let (device, disk, (transport_state, frozen)) = match disk {
            DiskCapture::Clone => {
                let (state, disk, rest) = device.capture_and_clone(at_instant)?;
                (state, Some(CapturedDisk::Clone(disk)), rest)
            }
            DiskCapture::Freeze => {
                let (state, disk, rest) = device.capture_and_freeze(at_instant)?;
                (state, Some(CapturedDisk::Frozen(disk)), rest)
            }
            DiskCapture::Leave => {
                let (state, rest) = device.capture_with(at_instant);
                (state, None, rest)
            }
        };
        let block = Some(BlockSlotState { transport: transport_state, device });
        Ok((MmioDevicesState { block, dma: dma_state }, disk, frozen))
    }

    /// Brings every MMIO device back to `state` and the disk to `disk` (a VM reset) at one
    /// instant with `reset_ram`: with the DMA engine and virtio-blk locked, runs `reset_ram`
    /// (refused while anything is pinned, which covers every DMA transfer and data request in
    /// flight); if it fails nothing has changed and `DeviceError::Ram` says why. Then restores
    /// the registers and re-executes what was in flight in `state`. A state for other devices
    /// is refused before anything changes.
    pub fn reset_with(
        &self,
        state: &MmioDevicesState,
        disk: Option<&FrozenDisk>,
        reset_ram: impl FnOnce() -> Result<(), MemoryError>,
    ) -> Result<(), DeviceError> {
        let mut dma = self.dma.lock().unwrap_or_else(|e| e.into_inner());
        let reset_ram = || reset_ram().map_err(DeviceError::Ram);
        match (&self.block, &state.block, disk) {
            (None, None, None) => reset_ram()?,
            (Some(slot), Some(saved), Some(disk)) => {
                let mut transport = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
                let interrupt = std::sync::Arc::clone(transport.device().interrupt());
                transport.device_mut().reset_with(disk, &saved.device, || {
                    reset_ram()?;
                    // Before any re-executed request can complete and raise its bit.
                    interrupt.set_status(saved.transport.interrupt_status);
                    Ok::<(), DeviceError>(())
                })?;
                transport.restore_registers(&saved.transport).map_err(DeviceError::Transport)?;
            }
            (vm, saved, disk) => return Err(DeviceError::Mismatch(blk_mismatch(Some(vm.is_some()), saved.is_some(), disk.is_some()))),
        }
        dma.reset_to(&state.dma).map_err(DeviceError::Dma)
    }
}

/// A device's interrupt as `wiring` makes it: polled, or an irqfd on `gsi`.
fn device_interrupt(wiring: Wiring, gsi: u32) -> Result<Arc<DeviceInterrupt>, DeviceError> {
    match wiring {
        Wiring::Polled => Ok(DeviceInterrupt::polled()),
        Wiring::Irqchip(vm) => {
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            vm.register_irqfd(&irqfd, gsi).map_err(|source| DeviceError::Irqfd { gsi, source })?;
            Ok(DeviceInterrupt::with_trigger(Arc::new(irqfd)))
        }
    }
}

/// Starts virtio-blk's event loop: its io_uring completions always, and with an irqchip an
/// ioeventfd per queue on QueueNotify.
fn start_block_events(transport: &BlockTransport, wiring: Wiring) -> Result<DeviceEventLoop, DeviceError> {
    let completions = transport.lock().unwrap_or_else(|e| e.into_inner()).device().completions()?;
    let mut subscribers: Vec<(&'static str, Subscriber)> =
        vec![("virtio-blk completions", Arc::new(Mutex::new(completions)))];
    if let Wiring::Irqchip(vm) = wiring {
        let notifier = QueueNotifier::new(Arc::clone(transport)).map_err(DeviceError::EventFd)?;
        let addr = VIRTIO_BLK_MMIO_ADDR + REG_QUEUE_NOTIFY;
        for (queue, event) in notifier.eventfds() {
            vm.register_ioevent(event, &IoEventAddress::Mmio(addr), queue)
                .map_err(|source| DeviceError::Ioeventfd { addr, queue, source })?;
        }
        subscribers.push(("virtio-blk queue notifications", Arc::new(Mutex::new(notifier))));
    }
    Ok(DeviceEventLoop::spawn("virtio-blk", subscribers)?)
}

/// Puts `transport` on `mmio` with its event loop running.
fn plug_block(mmio: &mut Bus, transport: MmioTransport<BlockDevice>, wiring: Wiring) -> Result<BlockSlot, DeviceError> {
    let transport = Arc::new(Mutex::new(transport));
    let events = start_block_events(&transport, wiring)?;
    mmio.insert(VIRTIO_BLK_MMIO_ADDR, MMIO_REGION_SIZE, transport.clone())?;
    Ok(BlockSlot { transport, _events: events })
}

/// Says which of the VM (if given), the saved state and the saved disk have virtio-blk.
fn blk_mismatch(vm: Option<bool>, state: bool, disk: bool) -> String {
    let has = |b: bool| if b { "has" } else { "has no" };
    let vm = vm.map_or(String::new(), |v| format!("the VM {} virtio-blk, ", has(v)));
    format!("{vm}the saved state {} virtio-blk, the snapshot {} disk", has(state), has(disk))
}

/// Rebuilds a clone's (or a restored snapshot's) MMIO devices on `mmio` from `state`, against
/// the VM's `ram` and its own copy-on-write `disk`, wired as `wiring` says (as the source was:
/// irqfds and ioeventfds when the VM has an irqchip): every virtio-blk request and the DMA
/// transfer that were in flight at the capture instant are started again against its pages.
/// virtio-blk state needs a disk and a disk needs virtio-blk state.
pub fn restore_mmio_devices(
    mmio: &mut Bus,
    ram: &Arc<GuestRam>,
    state: &MmioDevicesState,
    disk: Option<CowDisk>,
    wiring: Wiring,
) -> Result<MmioDevices, DeviceError> {
    let block = match (&state.block, disk) {
        (None, None) => None,
        (Some(saved), Some(disk)) => {
            let interrupt = device_interrupt(wiring, VIRTIO_BLK_IRQ)?;
            // Before any re-executed request can complete and raise its bit.
            interrupt.set_status(saved.transport.interrupt_status);
            let device = BlockDevice::restore(Arc::clone(ram), disk, Arc::clone(&interrupt), &saved.device)?;
            let transport = MmioTransport::restore(device, &saved.transport).map_err(DeviceError::Transport)?;
            let slot = plug_block(mmio, transport, wiring)?;
            let mut transport = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
            // Re-executed requests that finished before the event loop watched the completion
            // eventfd signalled nothing: reap them now.
            transport.device().poll_completions();
            // An ioeventfd the source's loop had not served yet at the clone instant is lost
            // with the source's eventfd: look at every queue once, as if notified.
            for queue in 0..saved.transport.queues.len() {
                transport.notify(u32::try_from(queue).unwrap_or(u32::MAX));
            }
            drop(transport);
            interrupt.resend_if_pending();
            Some(slot)
        }
        (saved, disk) => return Err(DeviceError::Mismatch(blk_mismatch(None, saved.is_some(), disk.is_some()))),
    };
    let interrupt = device_interrupt(wiring, DMA_ENGINE_IRQ)?;
    let engine = DmaEngine::restore(Arc::clone(ram), Arc::clone(&interrupt), &state.dma).map_err(DeviceError::Dma)?;
    interrupt.resend_if_pending();
    let dma = Arc::new(Mutex::new(engine));
    mmio.insert(DMA_ENGINE_MMIO_ADDR, DMA_REGION_SIZE, dma.clone())?;
    let _dma_runner = DmaRunner::spawn_with(Arc::clone(&dma), crate::seccomp::dma_thread_start).map_err(DeviceError::Thread)?;
    Ok(MmioDevices { block, dma, _dma_runner })
}

/// Puts the DMA engine, and virtio-blk serving `disk` if given, on `mmio`, wired as `wiring`.
pub fn attach_mmio_devices(
    mmio: &mut Bus,
    ram: &Arc<GuestRam>,
    disk: Option<&Path>,
    wiring: Wiring,
) -> Result<MmioDevices, DeviceError> {
    let block = match disk {
        Some(path) => {
            let disk = CowDisk::open(path, &std::env::temp_dir())?;
            let device = BlockDevice::new(Arc::clone(ram), disk, device_interrupt(wiring, VIRTIO_BLK_IRQ)?)?;
            Some(plug_block(mmio, MmioTransport::new(device), wiring)?)
        }
        None => None,
    };
    let dma = Arc::new(Mutex::new(DmaEngine::new(Arc::clone(ram), device_interrupt(wiring, DMA_ENGINE_IRQ)?)));
    mmio.insert(DMA_ENGINE_MMIO_ADDR, DMA_REGION_SIZE, dma.clone())?;
    let _dma_runner = DmaRunner::spawn_with(Arc::clone(&dma), crate::seccomp::dma_thread_start).map_err(DeviceError::Thread)?;
    Ok(MmioDevices { block, dma, _dma_runner })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_fragment_names_size_address_and_irq() {
        assert_eq!(virtio_mmio_cmdline(0xd000_0000, 0x1000, 5), "virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn devices_answer_at_their_addresses() {
        let ram = Arc::new(GuestRam::new(&[(memory::GuestAddress(0), 1 << 20)]).unwrap());
        let file = std::env::temp_dir().join(format!("zygote-mmio-{}", std::process::id()));
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        let mut bus = Bus::new();
        let devices = attach_mmio_devices(&mut bus, &ram, Some(&file), Wiring::Polled).unwrap();
        std::fs::remove_file(&file).unwrap();
        let mut word = [0u8; 4];
        assert!(bus.read(VIRTIO_BLK_MMIO_ADDR, &mut word));
        assert_eq!(&word, b"virt");
        assert!(bus.read(VIRTIO_BLK_MMIO_ADDR + 8, &mut word));
        assert_eq!(u32::from_le_bytes(word), 2, "block device id");
        assert!(bus.read(DMA_ENGINE_MMIO_ADDR, &mut word));
        assert_eq!(&word, b"DMAE");
        assert!(devices.kernel_cmdline().contains("@0xd0000000:"));
    }
}
