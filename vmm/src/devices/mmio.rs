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

use devices::block::{BlockDevice, BlockError, BlockState, CowDisk};
use devices::dma::{DmaEngine, DmaRunner, DmaState, DMA_REGION_SIZE};
use devices::virtio::{MmioTransport, MmioTransportState, QueueNotifier, MMIO_REGION_SIZE, REG_QUEUE_NOTIFY};
use devices::DeviceInterrupt;
use kvm_ioctls::{IoEventAddress, VmFd};
use memory::GuestRam;
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSlotState {
    pub transport: MmioTransportState,
    pub device: BlockState,
}

/// The MMIO devices' state as plain data (guest physical addresses only).
#[derive(Clone, Debug, PartialEq, Eq)]
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

impl MmioDevices {
    /// Saves every MMIO device and runs `freeze_ram` at one instant with respect to them: the
    /// DMA engine's lock and virtio-blk's device lock are held across the state capture and
    /// `freeze_ram`, so no chunk and no completion lands in between. With `clone_disk` the
    /// disk is cloned copy-on-write at that instant too (a VM clone; a snapshot does not).
    pub fn save_state_with<R>(
        &self,
        clone_disk: bool,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(MmioDevicesState, Option<CowDisk>, R), BlockError> {
        let dma = self.dma.lock().unwrap_or_else(|e| e.into_inner());
        let dma_state = dma.state();
        let Some(slot) = &self.block else {
            return Ok((MmioDevicesState { block: None, dma: dma_state }, None, freeze_ram()));
        };
        let transport = slot.transport.lock().unwrap_or_else(|e| e.into_inner());
        // The transport's registers are read inside the device lock: its interrupt status
        // then matches the used ring the frozen RAM holds.
        let at_instant = || (transport.state(), freeze_ram());
        let (device, disk, (transport_state, frozen)) = match clone_disk {
            true => {
                let (device, disk, rest) = transport.device().capture_and_clone(at_instant)?;
                (device, Some(disk), rest)
            }
            false => {
                let (device, rest) = transport.device().capture_with(at_instant);
                (device, None, rest)
            }
        };
        let block = Some(BlockSlotState { transport: transport_state, device });
        Ok((MmioDevicesState { block, dma: dma_state }, disk, frozen))
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

/// Rebuilds a clone's MMIO devices on `mmio` from `state`, against the clone's `ram` and its
/// own copy-on-write `disk`, wired as `wiring` says (as the source was: irqfds and ioeventfds
/// when the clone has an irqchip): every virtio-blk request and the DMA transfer that were in
/// flight at the clone instant are started again against the clone's pages. virtio-blk is
/// attached only with a disk (a snapshot does not carry one yet).
pub fn restore_mmio_devices(
    mmio: &mut Bus,
    ram: &Arc<GuestRam>,
    state: &MmioDevicesState,
    disk: Option<CowDisk>,
    wiring: Wiring,
) -> Result<MmioDevices, DeviceError> {
    let block = match (&state.block, disk) {
        (Some(saved), Some(disk)) => {
            let interrupt = device_interrupt(wiring, VIRTIO_BLK_IRQ)?;
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
        _ => None,
    };
    let interrupt = device_interrupt(wiring, DMA_ENGINE_IRQ)?;
    let engine = DmaEngine::restore(Arc::clone(ram), Arc::clone(&interrupt), &state.dma).map_err(DeviceError::Dma)?;
    interrupt.resend_if_pending();
    let dma = Arc::new(Mutex::new(engine));
    mmio.insert(DMA_ENGINE_MMIO_ADDR, DMA_REGION_SIZE, dma.clone())?;
    let _dma_runner = DmaRunner::spawn(Arc::clone(&dma)).map_err(DeviceError::Thread)?;
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
    let _dma_runner = DmaRunner::spawn(Arc::clone(&dma)).map_err(DeviceError::Thread)?;
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
