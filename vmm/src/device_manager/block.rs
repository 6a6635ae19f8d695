//! virtio-blk in a VM: the MMIO transport around `devices::block::BlockDevice`, on its fixed
//! slot, with the event loop that reaps its io_uring completions (and, with an irqchip, serves
//! its QueueNotify ioeventfds).

use std::sync::{Arc, Mutex};

use devices::block::{BlockArgs, BlockDevice, BlockState, CowDisk};
use devices::virtio::{MmioTransport, MmioTransportState, VirtioDevice, MMIO_REGION_SIZE};
use devices::Persist;
use serde::{Deserialize, Serialize};

use super::device::{
    AttachConfig, CaptureMode, Captured, CapturedDisk, DeviceDescription, DeviceHost, DeviceMetrics, ResetArgs,
    RestoreArgs, VmDevice,
};
use super::event_loop::{DeviceEventLoop, Subscriber};
use super::mmio::{device_interrupt, queue_notifications, DeviceSpace, MmioSlot, Wiring};
use super::DeviceError;
use crate::layout::{VIRTIO_BLK_IRQ, VIRTIO_BLK_MMIO_ADDR};

/// virtio-blk's transport as the bus, the event loop and the tests share it.
pub type BlockTransport = Arc<Mutex<MmioTransport<BlockDevice>>>;

/// The virtio-blk device on the bus, and the event loop serving it.
pub struct BlockSlot {
    pub transport: BlockTransport,
    metrics: Arc<devices::metrics::BlockMetrics>,
    // Declared after `transport`; stops before the device goes (the loop holds its own Arcs).
    _events: DeviceEventLoop,
}

/// virtio-blk's state: the transport's registers and the device's queue and requests in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSlotState {
    pub transport: MmioTransportState,
    pub device: BlockState,
}

const SLOT: MmioSlot = MmioSlot { base: VIRTIO_BLK_MMIO_ADDR, size: MMIO_REGION_SIZE, gsi: VIRTIO_BLK_IRQ };

/// Starts virtio-blk's event loop: its io_uring completions always, and with an irqchip an
/// ioeventfd per queue on QueueNotify.
fn start_events(transport: &BlockTransport, wiring: Wiring) -> Result<DeviceEventLoop, DeviceError> {
    let completions = transport.lock().unwrap_or_else(|e| e.into_inner()).device().completions()?;
    let mut subscribers: Vec<(&'static str, Subscriber)> =
        vec![("virtio-blk completions", Arc::new(Mutex::new(completions)))];
    if let Some(notifier) = queue_notifications(transport, SLOT.base, wiring)? {
        subscribers.push(("virtio-blk queue notifications", notifier));
    }
    Ok(DeviceEventLoop::spawn("virtio-blk", subscribers)?)
}

/// Puts `transport` on the MMIO bus with its event loop running.
fn plug(
    space: &mut DeviceSpace,
    transport: MmioTransport<BlockDevice>,
    wiring: Wiring,
) -> Result<BlockSlot, DeviceError> {
    let metrics = transport.device().metrics();
    let transport = Arc::new(Mutex::new(transport));
    let events = start_events(&transport, wiring)?;
    space.insert_mmio(SLOT, transport.clone())?;
    Ok(BlockSlot { transport, metrics, _events: events })
}

/// Says which of the VM (if known), the saved state and the saved disk have virtio-blk.
fn mismatch(vm: Option<bool>, state: bool, disk: bool) -> DeviceError {
    let has = |b: bool| if b { "has" } else { "has no" };
    let vm = vm.map_or(String::new(), |v| format!("the VM {} virtio-blk, ", has(v)));
    DeviceError::Mismatch(format!("{vm}the saved state {} virtio-blk, the snapshot {} disk", has(state), has(disk)))
}

impl VmDevice for BlockSlot {
    const KIND: &'static str = "virtio-blk";
    const FIXED_SLOT: Option<MmioSlot> = Some(SLOT);
    type State = BlockSlotState;

    fn attach(space: &mut DeviceSpace, host: &DeviceHost, config: &AttachConfig) -> Result<Option<Self>, DeviceError> {
        let Some(path) = &config.disk else {
            return Ok(None);
        };
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let disk = CowDisk::open(path, &std::env::temp_dir())?;
        let device = BlockDevice::new(Arc::clone(host.ram), disk, device_interrupt(host.wiring, slot.gsi)?)?;
        plug(space, MmioTransport::new(device), host.wiring).map(Some)
    }

    /// The transport's registers are read inside the device lock: its interrupt status then
    /// matches the used ring the frozen RAM holds.
    fn capture<R>(
        &self,
        mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<BlockSlotState, R>, DeviceError> {
        let transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let at_instant = || Ok::<_, DeviceError>((transport.state(), inner()?));
        let device = transport.device();
        let (device, disk, (transport_state, inner)) = match mode {
            CaptureMode::Clone => {
                let (state, disk, rest) = device.capture_and_clone(at_instant)?;
                (state, Some(CapturedDisk::Clone(disk)), rest?)
            }
            CaptureMode::Freeze => {
                let (state, disk, rest) = device.capture_and_freeze(at_instant)?;
                (state, Some(CapturedDisk::Frozen(disk)), rest?)
            }
            CaptureMode::Leave => {
                let (state, rest) = device.capture_with(at_instant);
                (state, None, rest?)
            }
        };
        Ok(Captured { state: BlockSlotState { transport: transport_state, device }, disk, inner })
    }

    fn check_saved(state: &BlockSlotState, args: &RestoreArgs) -> Result<(), DeviceError> {
        let disk = args.disk.as_ref().ok_or_else(|| mismatch(None, true, false))?;
        state.device.check(disk.sectors())?;
        Ok(())
    }

    /// Every request that was in flight at the capture instant is started again against the
    /// VM's own pages and disk.
    fn restore(space: &mut DeviceSpace, saved: &BlockSlotState, args: &mut RestoreArgs) -> Result<Self, DeviceError> {
        let disk = args.disk.take().ok_or_else(|| mismatch(None, true, false))?;
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let interrupt = device_interrupt(args.host.wiring, slot.gsi)?;
        // Before any re-executed request can complete and raise its bit.
        interrupt.set_status(saved.transport.interrupt_status);
        let device = BlockDevice::restore(
            BlockArgs { ram: Arc::clone(args.host.ram), disk, interrupt: Arc::clone(&interrupt) },
            &saved.device,
        )?;
        let transport = MmioTransport::restore(device, &saved.transport).map_err(DeviceError::Transport)?;
        let block = plug(space, transport, args.host.wiring)?;
        let mut transport = block.transport.lock().unwrap_or_else(|e| e.into_inner());
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
        Ok(block)
    }

    fn reset(
        &self,
        saved: &BlockSlotState,
        args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let disk = args.disk.ok_or_else(|| mismatch(Some(true), true, false))?;
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let interrupt = Arc::clone(transport.device().interrupt());
        transport.device_mut().reset_with(disk, &saved.device, || {
            inner()?;
            // Before any re-executed request can complete and raise its bit.
            interrupt.set_status(saved.transport.interrupt_status);
            Ok::<(), DeviceError>(())
        })?;
        transport.restore_registers(&saved.transport).map_err(DeviceError::Transport)
    }

    fn resend_interrupt(&self) {
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).device().interrupt().resend_if_pending();
    }

    fn in_flight(state: &BlockSlotState) -> u64 {
        state.device.in_flight.len() as u64
    }

    fn description(&self) -> DeviceDescription {
        DeviceDescription { kind: Self::KIND, mmio: Some(SLOT), virtio: true }
    }

    fn metrics(&self) -> Option<DeviceMetrics> {
        Some(DeviceMetrics::of("block", &*self.metrics))
    }
}
