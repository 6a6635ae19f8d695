//! virtio-net in a VM: one MMIO transport around `devices::net::NetDevice` per interface
//! (`eth0`, `eth1`, ... in the order given), each on an allocated slot with an event loop that
//! receives frames as its TAP has them (and, with an irqchip, serves its QueueNotify
//! ioeventfds).
//!
//! A clone or a restored VM never gets the source's TAP: an interface named in
//! `DeviceOverrides::net` is attached to the TAP given there (optionally opened in another
//! network namespace, optionally with a new MAC); any other interface is attached to nothing
//! and the guest sees its link go down.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::net::{NetArgs, NetDevice, NetError, NetState, Tap};
use devices::virtio::{MmioTransport, MmioTransportState, VirtioDevice};
use devices::Persist;
use serde::{Deserialize, Serialize};

use super::device::{
    AttachConfig, CaptureMode, Captured, DeviceDescription, DeviceHost, DeviceMetrics, ResetArgs, RestoreArgs, VmDevice,
};
use super::event_loop::{DeviceEventLoop, Subscriber};
use super::mmio::{device_interrupt, queue_notifications, DeviceSpace, MmioSlot, Wiring};
use super::net_config::{check_iface_id, NetConfig, MAX_INTERFACES};
use super::DeviceError;

/// A virtio-net transport as the bus, the event loop and the tests share it.
pub type NetTransport = Arc<Mutex<MmioTransport<NetDevice>>>;

/// One interface: its id, where it sits, the transport and the event loop serving it.
pub struct NetSlot {
    pub iface_id: String,
    pub slot: MmioSlot,
    pub transport: NetTransport,
    // Declared after `transport`; stops before the device goes (the loop holds its own Arcs).
    _events: DeviceEventLoop,
}

impl NetSlot {
    /// The device, locked through its transport.
    pub fn with_device<T>(&self, f: impl FnOnce(&NetDevice) -> T) -> T {
        f(self.transport.lock().unwrap_or_else(|e| e.into_inner()).device())
    }
}

/// A VM's virtio-net interfaces, in the order they were configured.
pub struct NetSlots {
    pub interfaces: Vec<NetSlot>,
}

/// One interface's state: its id, the transport's registers and the device's queues and
/// chains in flight. The TAP is host state: not saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSlotState {
    pub iface_id: String,
    pub transport: MmioTransportState,
    pub device: NetState,
}

fn net_error(iface_id: &str, source: NetError) -> DeviceError {
    DeviceError::Net { iface_id: iface_id.to_string(), source }
}

fn open_tap(iface_id: &str, name: &str, netns: Option<&PathBuf>) -> Result<Tap, DeviceError> {
    let tap = match netns {
        Some(path) => Tap::open_in_netns(name, path),
        None => Tap::open(name),
    };
    tap.map_err(|e| net_error(iface_id, NetError::Tap(e)))
}

/// Starts an interface's event loop: its TAP's frames (if it has one) and, with an irqchip,
/// an ioeventfd per queue on QueueNotify.
fn start_events(transport: &NetTransport, slot: MmioSlot, wiring: Wiring) -> Result<DeviceEventLoop, DeviceError> {
    let tap_events = transport.lock().unwrap_or_else(|e| e.into_inner()).device().tap_events();
    let mut subscribers: Vec<(&'static str, Subscriber)> = Vec::new();
    if let Some(events) = tap_events {
        subscribers.push(("virtio-net TAP", Arc::new(Mutex::new(events))));
    }
    if let Some(notifier) = queue_notifications(transport, slot.base, wiring)? {
        subscribers.push(("virtio-net queue notifications", notifier));
    }
    Ok(DeviceEventLoop::spawn("virtio-net", subscribers)?)
}

/// Puts `transport` for `iface_id` on the MMIO bus at `slot` with its event loop running.
fn plug(
    space: &mut DeviceSpace,
    iface_id: &str,
    slot: MmioSlot,
    transport: MmioTransport<NetDevice>,
    wiring: Wiring,
) -> Result<NetSlot, DeviceError> {
    let transport = Arc::new(Mutex::new(transport));
    let events = start_events(&transport, slot, wiring)?;
    space.insert_mmio(slot, transport.clone())?;
    Ok(NetSlot { iface_id: iface_id.to_string(), slot, transport, _events: events })
}

/// Captures `slots` one inside the other (each locked around the next), the last around
/// `inner`; their states in order. Boxed: a recursion over closures.
fn capture_nested<'a, R>(
    slots: &'a [NetSlot],
    inner: Box<dyn FnOnce() -> Result<R, DeviceError> + 'a>,
) -> Result<(Vec<NetSlotState>, R), DeviceError> {
    let Some((first, rest)) = slots.split_first() else {
        return Ok((Vec::new(), inner()?));
    };
    let transport = first.transport.lock().unwrap_or_else(|e| e.into_inner());
    // The registers are read inside the device lock: their interrupt status then matches the
    // used rings the frozen RAM holds.
    let (device, rest) =
        transport.device().capture_with(|| Ok::<_, DeviceError>((transport.state(), capture_nested(rest, inner)?)));
    let (registers, (mut states, result)) = rest?;
    states.insert(0, NetSlotState { iface_id: first.iface_id.clone(), transport: registers, device });
    Ok((states, result))
}

/// Resets `slots` to `states` one inside the other, the last around `inner`.
fn reset_nested<'a>(
    slots: &'a [NetSlot],
    states: &'a [NetSlotState],
    inner: Box<dyn FnOnce() -> Result<(), DeviceError> + 'a>,
) -> Result<(), DeviceError> {
    let (Some((first, rest)), Some((saved, saved_rest))) = (slots.split_first(), states.split_first()) else {
        return inner();
    };
    let mut transport = first.transport.lock().unwrap_or_else(|e| e.into_inner());
    let interrupt = Arc::clone(transport.device().interrupt());
    let iface = first.iface_id.as_str();
    transport
        .device_mut()
        .reset_with(&saved.device, || {
            reset_nested(rest, saved_rest, inner).map_err(ResetFailure::Device)?;
            // Before the device serves its queues again and can raise a bit.
            interrupt.set_status(saved.transport.interrupt_status);
            Ok::<(), ResetFailure>(())
        })
        .map_err(|e| match e {
            ResetFailure::Device(e) => e,
            ResetFailure::Net(e) => net_error(iface, e),
        })?;
    transport.restore_registers(&saved.transport).map_err(DeviceError::Transport)
}

/// What failed inside one interface's reset: its own state, or what it ran inside.
enum ResetFailure {
    Net(NetError),
    Device(DeviceError),
}

impl From<NetError> for ResetFailure {
    fn from(e: NetError) -> Self {
        ResetFailure::Net(e)
    }
}

impl VmDevice for NetSlots {
    const KIND: &'static str = "virtio-net";
    const FIXED_SLOT: Option<MmioSlot> = None;
    type State = Vec<NetSlotState>;

    fn attach(space: &mut DeviceSpace, host: &DeviceHost, config: &AttachConfig) -> Result<Option<Self>, DeviceError> {
        if config.net.is_empty() {
            return Ok(None);
        }
        check_configs(&config.net)?;
        let mut interfaces = Vec::with_capacity(config.net.len());
        for net in &config.net {
            let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
            let tap = open_tap(&net.iface_id, &net.host_dev_name, net.netns.as_ref())?;
            let interrupt = device_interrupt(host.wiring, slot.gsi)?;
            let device = NetDevice::new(Arc::clone(host.ram), interrupt, Some(tap), net.guest_mac);
            interfaces.push(plug(space, &net.iface_id, slot, MmioTransport::new(device), host.wiring)?);
        }
        Ok(Some(NetSlots { interfaces }))
    }

    fn capture<R>(
        &self,
        _mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<Vec<NetSlotState>, R>, DeviceError> {
        let (state, inner) = capture_nested(&self.interfaces, Box::new(inner))?;
        Ok(Captured { state, disk: None, inner })
    }

    fn check_saved(state: &Vec<NetSlotState>, args: &RestoreArgs) -> Result<(), DeviceError> {
        let bad = |reason: String| DeviceError::BadState { kind: Self::KIND, reason };
        if state.is_empty() || state.len() > MAX_INTERFACES {
            return Err(bad(format!("{} interfaces, a VM has 1 to {MAX_INTERFACES}", state.len())));
        }
        for (index, saved) in state.iter().enumerate() {
            check_iface_id(&saved.iface_id).map_err(bad)?;
            if state[..index].iter().any(|s| s.iface_id == saved.iface_id) {
                return Err(bad(format!("interface id {:?} is saved twice", saved.iface_id)));
            }
            saved.device.check(args.host.ram).map_err(|e| net_error(&saved.iface_id, e))?;
        }
        for wanted in &args.overrides.net {
            if !state.iter().any(|s| s.iface_id == wanted.iface_id) {
                let ids: Vec<_> = state.iter().map(|s| s.iface_id.as_str()).collect();
                return Err(DeviceError::Mismatch(format!(
                    "network override for interface {:?}: the VM has {ids:?}",
                    wanted.iface_id
                )));
            }
        }
        Ok(())
    }

    /// Each interface on the TAP its override names, or on none (link down); the chains that
    /// were in flight are popped again (receive buffers refilled, the transmit frame sent
    /// again on the new TAP).
    fn restore(
        space: &mut DeviceSpace,
        state: &Vec<NetSlotState>,
        args: &mut RestoreArgs,
    ) -> Result<Self, DeviceError> {
        let mut interfaces = Vec::with_capacity(state.len());
        for saved in state {
            let iface = saved.iface_id.as_str();
            let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
            let wanted = args.overrides.net.iter().find(|o| o.iface_id == iface);
            let backend = wanted.map(|o| open_tap(iface, &o.host_dev_name, o.netns.as_ref())).transpose()?;
            let mut device_state = saved.device.clone();
            if let Some(mac) = wanted.and_then(|o| o.guest_mac) {
                device_state.mac = Some(mac);
            }
            let interrupt = device_interrupt(args.host.wiring, slot.gsi)?;
            // Before the restored device serves its queues and can raise a bit.
            interrupt.set_status(saved.transport.interrupt_status);
            let net_args = NetArgs { ram: Arc::clone(args.host.ram), interrupt: Arc::clone(&interrupt), backend };
            let device = NetDevice::restore(net_args, &device_state).map_err(|e| net_error(iface, e))?;
            let transport = MmioTransport::restore(device, &saved.transport).map_err(DeviceError::Transport)?;
            interfaces.push(plug(space, iface, slot, transport, args.host.wiring)?);
            interrupt.resend_if_pending();
        }
        Ok(NetSlots { interfaces })
    }

    fn reset(
        &self,
        state: &Vec<NetSlotState>,
        _args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let ids = |ids: &mut dyn Iterator<Item = &String>| ids.cloned().collect::<Vec<_>>();
        let (ours, saved) =
            (ids(&mut self.interfaces.iter().map(|s| &s.iface_id)), ids(&mut state.iter().map(|s| &s.iface_id)));
        if ours != saved {
            return Err(DeviceError::Mismatch(format!("the VM has interfaces {ours:?}, the saved state {saved:?}")));
        }
        reset_nested(&self.interfaces, state, Box::new(inner))
    }

    fn resend_interrupt(&self) {
        for slot in &self.interfaces {
            slot.with_device(|d| d.interrupt().resend_if_pending());
        }
    }

    fn in_flight(state: &Vec<NetSlotState>) -> u64 {
        state.iter().map(|s| s.device.rx_in_flight.len() as u64 + u64::from(s.device.tx_in_flight.is_some())).sum()
    }

    fn description(&self) -> DeviceDescription {
        let slot = self.interfaces.first().map(|s| s.slot);
        DeviceDescription { kind: Self::KIND, mmio: slot, virtio: true }
    }

    fn descriptions(&self) -> Vec<DeviceDescription> {
        self.interfaces
            .iter()
            .map(|s| DeviceDescription { kind: Self::KIND, mmio: Some(s.slot), virtio: true })
            .collect()
    }

    /// Firecracker's `net` group, summed over the VM's interfaces (`bad_chains`, chains the
    /// driver got wrong, is Zygote's own).
    fn metrics(&self) -> Option<DeviceMetrics> {
        let counters = self.interfaces.iter().map(|slot| slot.with_device(|d| d.counters()));
        let sum = counters.fold(devices::net::NetCounters::default(), |sum, c| sum + c);
        let counters = vec![
            ("rx_packets_count", sum.rx_frames),
            ("rx_bytes_count", sum.rx_bytes),
            ("rx_fails", sum.rx_dropped),
            ("tx_packets_count", sum.tx_frames),
            ("tx_bytes_count", sum.tx_bytes),
            ("tx_fails", sum.tx_dropped),
            ("bad_chains", sum.bad_chains),
        ];
        Some(DeviceMetrics { group: "net", counters })
    }
}

/// Refuses interface configurations a VM cannot have: bad or repeated ids, too many.
pub fn check_configs(configs: &[NetConfig]) -> Result<(), DeviceError> {
    let bad = |reason: String| DeviceError::BadConfig { kind: NetSlots::KIND, reason };
    if configs.len() > MAX_INTERFACES {
        return Err(bad(format!("{} interfaces, a VM has at most {MAX_INTERFACES}", configs.len())));
    }
    for (index, net) in configs.iter().enumerate() {
        check_iface_id(&net.iface_id).map_err(bad)?;
        if configs[..index].iter().any(|c| c.iface_id == net.iface_id) {
            return Err(bad(format!("interface id {:?} is given twice", net.iface_id)));
        }
        if let Some(other) =
            configs[..index].iter().find(|c| c.host_dev_name == net.host_dev_name && c.netns == net.netns)
        {
            return Err(bad(format!(
                "interfaces {:?} and {:?} both ask for TAP {}",
                other.iface_id, net.iface_id, net.host_dev_name
            )));
        }
    }
    Ok(())
}
