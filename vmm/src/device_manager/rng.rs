//! virtio-rng in a VM (`--entropy`, `PUT /entropy`): the MMIO transport around
//! `devices::rng::RngDevice` on an allocated slot, with an event loop serving its rate-limit
//! timer (and, with an irqchip, its QueueNotify ioeventfd).
//!
//! Every buffer is pinned while it is filled, so a clone taken with a request in flight (held
//! by host stepping) leaves it to complete, whole, in the source; the clone pops it again and
//! fills it with its own entropy. A clone or restored VM never repeats its source's bytes.

use std::sync::{Arc, Mutex};

use devices::clock::MonotonicClock;
use devices::host_events::HostEventSubscriber;
use devices::rng::{RngArgs, RngDevice, RngState};
use devices::virtio::{MmioTransport, MmioTransportState, VirtioDevice};
use devices::Persist;
use serde::{Deserialize, Serialize};

use super::device::{
    AttachConfig, CaptureMode, Captured, DeviceDescription, DeviceHost, DeviceMetrics, ResetArgs, RestoreArgs, VmDevice,
};
use super::event_loop::{DeviceEventLoop, Subscriber};
use super::mmio::{device_interrupt, queue_notifications, DeviceSpace, MmioSlot, Wiring};
use super::DeviceError;

pub use devices::rng::EntropyConfig;

/// virtio-rng's transport as the bus, the event loop and the tests share it.
pub type RngTransport = Arc<Mutex<MmioTransport<RngDevice>>>;

/// The entropy device on the bus, and the event loop serving it.
pub struct RngSlot {
    pub slot: MmioSlot,
    pub transport: RngTransport,
    metrics: Arc<devices::metrics::EntropyMetrics>,
    // Declared after `transport`; stops before the device goes (the loop holds its own Arcs).
    _events: DeviceEventLoop,
}

impl RngSlot {
    /// The device, locked through its transport.
    pub fn with_device<T>(&self, f: impl FnOnce(&mut RngDevice) -> T) -> T {
        f(self.transport.lock().unwrap_or_else(|e| e.into_inner()).device_mut())
    }
}

/// virtio-rng's state: the transport's registers and the device's queue, buckets and the
/// requests held in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngSlotState {
    pub transport: MmioTransportState,
    pub device: RngState,
}

/// Starts the event loop: the rate-limit timer always, and with an irqchip the QueueNotify
/// ioeventfd.
fn start_events(transport: &RngTransport, slot: MmioSlot, wiring: Wiring) -> Result<DeviceEventLoop, DeviceError> {
    let timer: Subscriber = Arc::new(Mutex::new(HostEventSubscriber::new(Arc::clone(transport))));
    let mut subscribers: Vec<(&'static str, Subscriber)> = vec![("virtio-rng rate-limit timer", timer)];
    if let Some(notifier) = queue_notifications(transport, slot.base, wiring)? {
        subscribers.push(("virtio-rng queue notifications", notifier));
    }
    Ok(DeviceEventLoop::spawn("virtio-rng", subscribers)?)
}

/// Puts `transport` on the MMIO bus at `slot` with its event loop running.
fn plug(
    space: &mut DeviceSpace,
    slot: MmioSlot,
    transport: MmioTransport<RngDevice>,
    wiring: Wiring,
) -> Result<RngSlot, DeviceError> {
    let metrics = transport.device().metrics();
    let transport = Arc::new(Mutex::new(transport));
    let events = start_events(&transport, slot, wiring)?;
    space.insert_mmio(slot, transport.clone())?;
    Ok(RngSlot { slot, transport, metrics, _events: events })
}

impl VmDevice for RngSlot {
    const KIND: &'static str = "virtio-rng";
    const FIXED_SLOT: Option<MmioSlot> = None;
    type State = RngSlotState;

    fn attach(space: &mut DeviceSpace, host: &DeviceHost, config: &AttachConfig) -> Result<Option<Self>, DeviceError> {
        let Some(entropy) = &config.entropy else {
            return Ok(None);
        };
        entropy.check().map_err(|reason| DeviceError::BadConfig { kind: Self::KIND, reason })?;
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let interrupt = device_interrupt(host.wiring, slot.gsi)?;
        let args = RngArgs { ram: Arc::clone(host.ram), interrupt, clock: MonotonicClock::shared() };
        let device = RngDevice::new(args, entropy.rate_limiter.unwrap_or_default()).map_err(DeviceError::Rng)?;
        plug(space, slot, MmioTransport::new(device), host.wiring).map(Some)
    }

    /// The registers are read inside the device lock: the interrupt status then matches the
    /// used ring the frozen RAM holds, and no held request is filled before the freeze.
    fn capture<R>(
        &self,
        _mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<RngSlotState, R>, DeviceError> {
        let transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let device = transport.device().save().map_err(DeviceError::Rng)?;
        let state = RngSlotState { transport: transport.state(), device };
        Ok(Captured { state, disk: None, inner: inner()? })
    }

    fn check_saved(state: &RngSlotState, args: &RestoreArgs) -> Result<(), DeviceError> {
        state.device.check(args.host.ram).map(drop).map_err(DeviceError::Rng)
    }

    /// The requests held at the capture instant are popped again and filled with this VM's
    /// own entropy (or held again: host stepping is inherited).
    fn restore(space: &mut DeviceSpace, saved: &RngSlotState, args: &mut RestoreArgs) -> Result<Self, DeviceError> {
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let interrupt = device_interrupt(args.host.wiring, slot.gsi)?;
        // Before the restored device serves its queue and can raise a bit.
        interrupt.set_status(saved.transport.interrupt_status);
        let rng_args = RngArgs {
            ram: Arc::clone(args.host.ram),
            interrupt: Arc::clone(&interrupt),
            clock: MonotonicClock::shared(),
        };
        let device = RngDevice::restore(rng_args, &saved.device).map_err(DeviceError::Rng)?;
        let transport = MmioTransport::restore(device, &saved.transport).map_err(DeviceError::Transport)?;
        let rng = plug(space, slot, transport, args.host.wiring)?;
        // A notification the source had not served died with its eventfd: look once.
        rng.transport.lock().unwrap_or_else(|e| e.into_inner()).notify(0);
        interrupt.resend_if_pending();
        Ok(rng)
    }

    /// With the device locked the RAM is reset (refused while a held request pins a buffer);
    /// then the device, its buckets and registers go back to `saved`, and what was held
    /// there is popped again.
    fn reset(
        &self,
        saved: &RngSlotState,
        _args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        transport.device().check_state(&saved.device).map_err(DeviceError::Rng)?;
        inner()?;
        let interrupt = Arc::clone(transport.device().interrupt());
        interrupt.set_status(saved.transport.interrupt_status);
        transport.device_mut().reset_to(&saved.device).map_err(DeviceError::Rng)?;
        transport.restore_registers(&saved.transport).map_err(DeviceError::Transport)?;
        transport.notify(0);
        Ok(())
    }

    fn in_flight(state: &RngSlotState) -> u64 {
        state.device.in_flight.len() as u64
    }

    fn description(&self) -> DeviceDescription {
        DeviceDescription { kind: Self::KIND, mmio: Some(self.slot), virtio: true }
    }

    fn metrics(&self) -> Option<DeviceMetrics> {
        Some(DeviceMetrics::of("entropy", &*self.metrics))
    }
}
