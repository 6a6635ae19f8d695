//! virtio-vsock in a VM (Firecracker's hybrid model): the MMIO transport around
//! `devices::vsock::VsockDevice` on an allocated slot, with an event loop that serves the
//! device's host side (its listener on `uds_path`, the host streams, the timeouts: one epoll
//! fd, `HostEventSubscriber`) and, with an irqchip, its QueueNotify ioeventfds.
//!
//! Clones and restored VMs never share the source's socket: each listens on a `uds_path` of
//! its own, the one `DeviceOverrides::vsock_uds_path` gives (a clone's default is
//! `<source uds_path>.<vm id>`, filled in by `with_clone_default`; a VM restored from a file
//! has no default, the file holds no host path). The source keeps its listener and
//! connections. The restored device starts with no connections and sends the guest
//! TRANSPORT_RESET; every queue is looked at once before the VM runs (Firecracker's resume
//! kick, issue 5969).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::clock::MonotonicClock;
use devices::host_events::HostEventSubscriber;
use devices::virtio::{MmioTransport, MmioTransportState, VirtioDevice};
use devices::vsock::{VsockArgs, VsockDevice, VsockState};
use devices::Persist;
use serde::{Deserialize, Serialize};

use super::device::{
    AttachConfig, CaptureMode, Captured, DeviceDescription, DeviceHost, DeviceMetrics, DeviceOverrides, ResetArgs,
    RestoreArgs, VmDevice,
};
use super::event_loop::{DeviceEventLoop, Subscriber};
use super::mmio::{device_interrupt, queue_notifications, DeviceSpace, MmioSlot, Wiring};
pub use super::vsock_config::VsockConfig;
use super::DeviceError;

/// The vsock transport as the bus, the event loop and the tests share it.
pub type VsockTransport = Arc<Mutex<MmioTransport<VsockDevice>>>;

/// The vsock device on the bus, and the event loop serving it.
pub struct VsockSlot {
    pub slot: MmioSlot,
    pub transport: VsockTransport,
    // Declared after `transport`; stops before the device goes (the loop holds its own Arcs).
    _events: DeviceEventLoop,
}

impl VsockSlot {
    /// The device, locked through its transport.
    pub fn with_device<T>(&self, f: impl FnOnce(&VsockDevice) -> T) -> T {
        f(self.transport.lock().unwrap_or_else(|e| e.into_inner()).device())
    }
}

/// The vsock device's state: the transport's registers, the device's queues and buffers in
/// flight. Connections are host state, not saved (Firecracker's policy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSlotState {
    pub transport: MmioTransportState,
    pub device: VsockState,
    /// The capturing VM's `uds_path`, kept in memory only (never written to a snapshot file):
    /// a clone's default path is derived from it.
    #[serde(skip)]
    pub uds_path: Option<PathBuf>,
}

/// `<uds_path>.<vm_id>`: a clone's socket when its request names none.
pub fn clone_uds_path(uds_path: &Path, vm_id: u64) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!(".{vm_id}"));
    PathBuf::from(path)
}

/// `overrides` with a vsock path for VM `vm_id` built from `state`: the one given, or
/// `<source uds_path>.<vm_id>` when the state was captured in this process.
pub fn with_clone_default(
    mut overrides: DeviceOverrides,
    state: Option<&VsockSlotState>,
    vm_id: u64,
) -> DeviceOverrides {
    if overrides.vsock_uds_path.is_none() {
        overrides.vsock_uds_path = state.and_then(|s| s.uds_path.as_deref()).map(|p| clone_uds_path(p, vm_id));
    }
    overrides
}

/// Starts the event loop: the device's host side always, and with an irqchip an ioeventfd
/// per queue on QueueNotify.
fn start_events(transport: &VsockTransport, slot: MmioSlot, wiring: Wiring) -> Result<DeviceEventLoop, DeviceError> {
    let host = HostEventSubscriber::new(Arc::clone(transport));
    let mut subscribers: Vec<(&'static str, Subscriber)> =
        vec![("virtio-vsock host sockets", Arc::new(Mutex::new(host)))];
    if let Some(notifier) = queue_notifications(transport, slot.base, wiring)? {
        subscribers.push(("virtio-vsock queue notifications", notifier));
    }
    Ok(DeviceEventLoop::spawn("virtio-vsock", subscribers)?)
}

/// Puts `transport` on the MMIO bus at `slot` with its event loop running.
fn plug(
    space: &mut DeviceSpace,
    slot: MmioSlot,
    transport: MmioTransport<VsockDevice>,
    wiring: Wiring,
) -> Result<VsockSlot, DeviceError> {
    let transport = Arc::new(Mutex::new(transport));
    let events = start_events(&transport, slot, wiring)?;
    space.insert_mmio(slot, transport.clone())?;
    Ok(VsockSlot { slot, transport, _events: events })
}

fn device_args(host: &DeviceHost, interrupt: Arc<devices::DeviceInterrupt>, uds_path: &Path) -> VsockArgs {
    VsockArgs {
        ram: Arc::clone(host.ram),
        interrupt,
        uds_path: uds_path.to_path_buf(),
        clock: MonotonicClock::shared(),
    }
}

/// Looks at every queue once, as if notified (does nothing before the driver is ready).
fn kick_queues(transport: &mut MmioTransport<VsockDevice>, queues: usize) {
    for queue in 0..queues {
        transport.notify(u32::try_from(queue).unwrap_or(u32::MAX));
    }
}

impl VmDevice for VsockSlot {
    const KIND: &'static str = "virtio-vsock";
    const FIXED_SLOT: Option<MmioSlot> = None;
    type State = VsockSlotState;

    fn attach(space: &mut DeviceSpace, host: &DeviceHost, config: &AttachConfig) -> Result<Option<Self>, DeviceError> {
        let Some(vsock) = &config.vsock else {
            return Ok(None);
        };
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let interrupt = device_interrupt(host.wiring, slot.gsi)?;
        let device = VsockDevice::new(device_args(host, interrupt, &vsock.uds_path), vsock.guest_cid)?;
        plug(space, slot, MmioTransport::new(device), host.wiring).map(Some)
    }

    /// The registers are read inside the transport's lock, which is also the device's: no
    /// packet is published or pinned between the state and the RAM freeze.
    fn capture<R>(
        &self,
        _mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<VsockSlotState, R>, DeviceError> {
        let transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let device = transport.device().save()?;
        let uds_path = Some(transport.device().uds_path().to_path_buf());
        let state = VsockSlotState { transport: transport.state(), device, uds_path };
        Ok(Captured { state, disk: None, inner: inner()? })
    }

    fn check_saved(state: &VsockSlotState, args: &RestoreArgs) -> Result<(), DeviceError> {
        state.device.check(args.host.ram)?;
        if args.overrides.vsock_uds_path.is_none() {
            return Err(DeviceError::BadConfig {
                kind: Self::KIND,
                reason: "the saved VM has a vsock device: give the restored one a uds_path of its own (vsock_override, --vsock uds=PATH)"
                    .into(),
            });
        }
        Ok(())
    }

    /// On its own `uds_path`, with no connections: the buffers in flight at the capture go
    /// back to the guest unused, the guest is sent TRANSPORT_RESET, and every queue is looked
    /// at once (a TX descriptor made available and not yet served at the capture is served).
    fn restore(space: &mut DeviceSpace, saved: &VsockSlotState, args: &mut RestoreArgs) -> Result<Self, DeviceError> {
        let uds_path = args
            .overrides
            .vsock_uds_path
            .clone()
            .ok_or(DeviceError::BadConfig { kind: Self::KIND, reason: "no uds_path for the restored device".into() })?;
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let interrupt = device_interrupt(args.host.wiring, slot.gsi)?;
        // Before the restored device publishes anything and can raise a bit.
        interrupt.set_status(saved.transport.interrupt_status);
        let device = VsockDevice::restore(device_args(&args.host, Arc::clone(&interrupt), &uds_path), &saved.device)?;
        let transport = MmioTransport::restore(device, &saved.transport).map_err(DeviceError::Transport)?;
        let vsock = plug(space, slot, transport, args.host.wiring)?;
        kick_queues(&mut vsock.transport.lock().unwrap_or_else(|e| e.into_inner()), saved.transport.queues.len());
        interrupt.resend_if_pending();
        Ok(vsock)
    }

    /// In place, on the same `uds_path`: the listener stays, every connection closes, and the
    /// device takes `saved` as a restore would (TRANSPORT_RESET, queues looked at once).
    fn reset(
        &self,
        saved: &VsockSlotState,
        _args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let interrupt = Arc::clone(transport.device().interrupt());
        transport.device_mut().reset_with(&saved.device, || {
            inner()?;
            // Before the device publishes anything and can raise a bit.
            interrupt.set_status(saved.transport.interrupt_status);
            Ok::<(), DeviceError>(())
        })?;
        transport.restore_registers(&saved.transport).map_err(DeviceError::Transport)?;
        kick_queues(&mut transport, saved.transport.queues.len());
        Ok(())
    }

    fn resend_interrupt(&self) {
        self.with_device(|d| d.interrupt().resend_if_pending());
    }

    fn in_flight(state: &VsockSlotState) -> u64 {
        (state.device.tx_in_flight.len() + state.device.rx_in_flight.len()) as u64
    }

    fn description(&self) -> DeviceDescription {
        DeviceDescription { kind: Self::KIND, mmio: Some(self.slot), virtio: true }
    }

    /// Firecracker's `vsock` group: its packet counters, plus Zygote's buffers refused and
    /// TRANSPORT_RESET events delivered.
    fn metrics(&self) -> Option<DeviceMetrics> {
        let stats = self.with_device(VsockDevice::stats);
        let counters = vec![
            ("tx_packets_count", stats.tx_packets),
            ("rx_packets_count", stats.rx_packets),
            ("bad_buffers_count", stats.bad_buffers),
            ("transport_reset_count", stats.events),
        ];
        Some(DeviceMetrics { group: "vsock", counters })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    use memory::{GuestAddress, GuestRam};

    use super::*;
    use crate::device_manager::{Console, DeviceError, DeviceManager, DevicesState, RestoreReason};

    fn is_socket(path: &Path) -> bool {
        path.symlink_metadata().is_ok_and(|m| m.file_type().is_socket())
    }

    #[test]
    fn a_clone_listens_on_its_own_path_and_a_reset_keeps_the_listener() {
        let dir = std::env::temp_dir().join(format!("zygote-vsock-dm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let ram = Arc::new(GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let console = Console::capture().0;
        let host = DeviceHost { ram: &ram, wiring: Wiring::Polled, console: &console };
        let vsock = Some(VsockConfig { guest_cid: 3, uds_path: uds.clone() });
        let source = DeviceManager::attach(&host, &AttachConfig { vsock, ..AttachConfig::default() }).unwrap();
        assert!(is_socket(&uds));
        assert!(source.descriptions().iter().any(|d| d.kind == "virtio-vsock" && d.virtio));
        let (state, _, ()) = source.capture(CaptureMode::Clone, || ()).unwrap();
        let json = serde_json::to_string(&state).unwrap();
        assert!(!json.contains("v.sock"), "a host path in the saved form: {json}");
        let restore = |overrides| RestoreArgs { reason: RestoreReason::Snapshot, overrides, host, disk: None };
        // From a file (no path kept), a restore needs a path of its own.
        let loaded: DevicesState = serde_json::from_str(&json).unwrap();
        let err = DeviceManager::restore(&loaded, restore(DeviceOverrides::default())).unwrap_err();
        assert!(crate::api::chain(&err).contains("vsock_override"), "{err}");
        // A clone in this process defaults to `<uds>.<id>`; the source keeps its socket.
        let overrides = with_clone_default(DeviceOverrides::default(), state.vsock.as_ref(), 7);
        assert_eq!(overrides.vsock_uds_path, Some(dir.join("v.sock.7")));
        let clone = DeviceManager::restore(&state, restore(overrides)).unwrap();
        assert!(is_socket(&dir.join("v.sock.7")) && is_socket(&uds));
        // The path is taken: a second device there fails with the listener's error.
        let twice = with_clone_default(DeviceOverrides::default(), state.vsock.as_ref(), 7);
        let err = DeviceManager::restore(&state, restore(twice)).unwrap_err();
        assert!(matches!(err, DeviceError::Vsock(devices::vsock::VsockError::Listen { .. })), "{err}");
        // A reset keeps the listener.
        clone.reset(&state, &ResetArgs::default(), || Ok(())).unwrap();
        UnixStream::connect(dir.join("v.sock.7")).unwrap();
        assert!(clone.metrics().iter().any(|m| m.group == "vsock"));
        drop(clone);
        assert!(!dir.join("v.sock.7").exists() && is_socket(&uds));
        drop(source);
        assert!(!uds.exists());
        std::fs::remove_dir(&dir).unwrap();
    }
}
