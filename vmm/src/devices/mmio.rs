//! The MMIO devices a VM gets: virtio-blk (with `--disk`) and the DMA test engine, each at a
//! fixed address from `layout`, and the kernel command-line fragment that tells Linux where.
//!
//! Interrupts: the tiny guests run without an in-kernel irqchip, so both devices use polled
//! interrupts (the guest reads the interrupt-status register). Notifications arrive as MMIO
//! write exits on QueueNotify. When the Linux boot path creates an irqchip, it can swap in an
//! irqfd (`DeviceInterrupt::with_trigger(EventFd)`) and register an ioeventfd on
//! `MMIO addr + REG_QUEUE_NOTIFY` that calls `MmioTransport::notify`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::block::{BlockDevice, BlockError, BlockState, CompletionThread, CowDisk};
use devices::dma::{DmaEngine, DmaRunner, DmaState, DMA_REGION_SIZE};
use devices::virtio::{MmioTransport, MmioTransportState, MMIO_REGION_SIZE};
use devices::DeviceInterrupt;
use memory::GuestRam;

use super::DeviceError;
use crate::bus::Bus;
use crate::layout::{DMA_ENGINE_IRQ, DMA_ENGINE_MMIO_ADDR, VIRTIO_BLK_IRQ, VIRTIO_BLK_MMIO_ADDR};

/// The virtio-blk device on the bus, and the thread completing its I/O.
pub struct BlockSlot {
    pub transport: Arc<Mutex<MmioTransport<BlockDevice>>>,
    // Declared after `transport`; stops before the device goes (the thread holds its own Arc).
    _completions: CompletionThread,
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

/// Rebuilds a clone's MMIO devices on `mmio` from `state`, against the clone's `ram` and its
/// own copy-on-write `disk`: every virtio-blk request and the DMA transfer that were in flight
/// at the clone instant are started again against the clone's pages. virtio-blk is attached
/// only with a disk (a snapshot does not carry one yet).
pub fn restore_mmio_devices(
    mmio: &mut Bus,
    ram: &Arc<GuestRam>,
    state: &MmioDevicesState,
    disk: Option<CowDisk>,
) -> Result<MmioDevices, DeviceError> {
    let block = match (&state.block, disk) {
        (Some(saved), Some(disk)) => {
            let device = BlockDevice::restore(Arc::clone(ram), disk, DeviceInterrupt::polled(), &saved.device)?;
            let completions = device.spawn_completion_thread()?;
            // Re-executed requests that finished before the completion thread registered its
            // eventfd signalled nothing: reap them now.
            device.poll_completions();
            let transport = MmioTransport::restore(device, &saved.transport).map_err(DeviceError::Transport)?;
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(VIRTIO_BLK_MMIO_ADDR, MMIO_REGION_SIZE, transport.clone())?;
            Some(BlockSlot { transport, _completions: completions })
        }
        _ => None,
    };
    let engine = DmaEngine::restore(Arc::clone(ram), DeviceInterrupt::polled(), &state.dma).map_err(DeviceError::Dma)?;
    let dma = Arc::new(Mutex::new(engine));
    mmio.insert(DMA_ENGINE_MMIO_ADDR, DMA_REGION_SIZE, dma.clone())?;
    let _dma_runner = DmaRunner::spawn(Arc::clone(&dma)).map_err(DeviceError::Thread)?;
    Ok(MmioDevices { block, dma, _dma_runner })
}

/// Puts the DMA engine, and virtio-blk serving `disk` if given, on `mmio`.
pub fn attach_mmio_devices(mmio: &mut Bus, ram: &Arc<GuestRam>, disk: Option<&Path>) -> Result<MmioDevices, DeviceError> {
    let block = match disk {
        Some(path) => {
            let disk = CowDisk::open(path, &std::env::temp_dir())?;
            let device = BlockDevice::new(Arc::clone(ram), disk, DeviceInterrupt::polled())?;
            let completions = device.spawn_completion_thread()?;
            let transport = Arc::new(Mutex::new(MmioTransport::new(device)));
            mmio.insert(VIRTIO_BLK_MMIO_ADDR, MMIO_REGION_SIZE, transport.clone())?;
            Some(BlockSlot { transport, _completions: completions })
        }
        None => None,
    };
    let dma = Arc::new(Mutex::new(DmaEngine::new(Arc::clone(ram), DeviceInterrupt::polled())));
    mmio.insert(DMA_ENGINE_MMIO_ADDR, DMA_REGION_SIZE, dma.clone())?;
    let _dma_runner = DmaRunner::spawn(Arc::clone(&dma)).map_err(DeviceError::Thread)?;
    let _ = DMA_ENGINE_IRQ; // polled for now: see the module documentation
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
        let devices = attach_mmio_devices(&mut bus, &ram, Some(&file)).unwrap();
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
