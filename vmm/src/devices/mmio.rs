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

use devices::block::{BlockDevice, BlockError, BlockState, CompletionThread, CowDisk, FrozenDisk};
use devices::dma::{DmaEngine, DmaRunner, DmaState, DMA_REGION_SIZE};
use devices::virtio::{MmioTransport, MmioTransportState, VirtioDevice, MMIO_REGION_SIZE};
use devices::DeviceInterrupt;
use memory::{GuestRam, MemoryError};
use serde::{Deserialize, Serialize};

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

/// Says which of the VM (if given), the saved state and the saved disk have virtio-blk.
fn blk_mismatch(vm: Option<bool>, state: bool, disk: bool) -> String {
    let has = |b: bool| if b { "has" } else { "has no" };
    let vm = vm.map_or(String::new(), |v| format!("the VM {} virtio-blk, ", has(v)));
    format!("{vm}the saved state {} virtio-blk, the snapshot {} disk", has(state), has(disk))
}

/// Rebuilds a clone's (or a restored snapshot's) MMIO devices on `mmio` from `state`, against
/// the VM's `ram` and its own copy-on-write `disk`: every virtio-blk request and the DMA
/// transfer that were in flight at the capture instant are started again against its pages.
/// virtio-blk state needs a disk and a disk needs virtio-blk state.
pub fn restore_mmio_devices(
    mmio: &mut Bus,
    ram: &Arc<GuestRam>,
    state: &MmioDevicesState,
    disk: Option<CowDisk>,
) -> Result<MmioDevices, DeviceError> {
    let block = match (&state.block, disk) {
        (None, None) => None,
        (Some(saved), Some(disk)) => {
            let interrupt = DeviceInterrupt::polled();
            // Before any re-executed request can complete and raise its bit.
            interrupt.set_status(saved.transport.interrupt_status);
            let device = BlockDevice::restore(Arc::clone(ram), disk, interrupt, &saved.device)?;
            let completions = device.spawn_completion_thread()?;
            // Re-executed requests that finished before the completion thread registered its
            // eventfd signalled nothing: reap them now.
            device.poll_completions();
            let transport = MmioTransport::restore(device, &saved.transport).map_err(DeviceError::Transport)?;
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(VIRTIO_BLK_MMIO_ADDR, MMIO_REGION_SIZE, transport.clone())?;
            Some(BlockSlot { transport, _completions: completions })
        }
        (saved, disk) => return Err(DeviceError::Mismatch(blk_mismatch(None, saved.is_some(), disk.is_some()))),
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
