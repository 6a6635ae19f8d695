//! `VmDevice`: what every device kind gives the device manager, so that building, capturing,
//! cloning, snapshotting, restoring and resetting a VM are one loop over the registry
//! (`device_manager::registry`) instead of a path per device.
//!
//! A device kind implements it on the handle the manager keeps (e.g. the transport on the MMIO
//! bus plus its event loop); its typed state comes from the `devices` crate's `Persist` impls.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use devices::block::{CowDisk, FrozenDisk};
use memory::GuestRam;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::console::Console;
use super::mmio::{DeviceSpace, MmioSlot, Wiring};
use super::DeviceError;

/// How the guest finds a device: its MMIO window and interrupt. The ACPI DSDT describes the
/// virtio ones to a Linux guest (`crate::acpi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceDescription {
    pub kind: &'static str,
    /// The MMIO window, for devices on the MMIO bus.
    pub mmio: Option<MmioSlot>,
    /// Whether the guest drives it as a virtio-mmio device (and so must be told where it is).
    pub virtio: bool,
}

/// A device's counters for the metrics: its group (Firecracker's name where it has one) and
/// (name, value) pairs, cumulative since the device was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMetrics {
    pub group: &'static str,
    pub counters: Vec<(&'static str, u64)>,
}

impl DeviceMetrics {
    pub fn of(group: &'static str, counters: &dyn devices::metrics::Counters) -> DeviceMetrics {
        DeviceMetrics { group, counters: counters.values() }
    }
}

/// What a capture does to a device's host resources at the capture instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// Nothing (state only).
    Leave,
    /// Copy-on-write clones for a new VM (a disk: `CowDisk::clone_cow`).
    Clone,
    /// Frozen copies for a snapshot (a disk: `CowDisk::freeze`).
    Freeze,
}

/// The disk a capture took, if the VM has one and the mode asked for it.
#[derive(Debug)]
pub enum CapturedDisk {
    Clone(CowDisk),
    Frozen(FrozenDisk),
}

/// One device's capture: its state, a host resource the mode asked for, and what the
/// capture ran inside the device's lock.
#[derive(Debug)]
pub struct Captured<S, R> {
    pub state: S,
    pub disk: Option<CapturedDisk>,
    pub inner: R,
}

/// Why devices are being rebuilt from a saved state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreReason {
    /// A live clone of a VM in this process.
    Clone,
    /// An in-memory or on-disk snapshot.
    Snapshot,
}

/// Per-clone or per-restore replacements for host-side settings a saved state cannot carry
/// over (a TAP name, a vsock socket path). Each device kind that has such settings adds its
/// field here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceOverrides {
    /// virtio-net: the interfaces attached to a TAP of their own (`network_overrides`); the
    /// others are attached to nothing.
    pub net: Vec<super::net_config::NetOverride>,
    /// virtio-vsock: the socket the device listens on (`vsock_override`; a clone's default is
    /// `<source uds_path>.<vm id>`).
    pub vsock_uds_path: Option<PathBuf>,
}

/// The host side every device is built on.
#[derive(Clone, Copy, Debug)]
pub struct DeviceHost<'a> {
    pub ram: &'a Arc<GuestRam>,
    pub wiring: Wiring<'a>,
    pub console: &'a Console,
}

/// What a fresh VM asks for (`zygote run` flags).
#[derive(Clone, Debug, Default)]
pub struct AttachConfig {
    /// Disk image served by virtio-blk; none means no block device.
    pub disk: Option<PathBuf>,
    /// virtio-net interfaces, in guest order.
    pub net: Vec<super::net_config::NetConfig>,
    /// virtio-rng (`--entropy`); none means no entropy device.
    pub entropy: Option<devices::rng::EntropyConfig>,
    /// The virtio-vsock device, if any.
    pub vsock: Option<super::vsock_config::VsockConfig>,
    /// A VM generation ID device (VMs with an in-kernel irqchip only).
    pub vmgenid: bool,
}

/// What a restore builds the devices on.
#[derive(Debug)]
pub struct RestoreArgs<'a> {
    pub reason: RestoreReason,
    pub overrides: DeviceOverrides,
    pub host: DeviceHost<'a>,
    /// The VM's own copy-on-write disk (a clone's, or a fresh overlay over a snapshot's frozen
    /// disk); virtio-blk takes it.
    pub disk: Option<CowDisk>,
}

/// What a reset brings the devices back to besides their states.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResetArgs<'a> {
    /// The disk as of the snapshot, if the VM has virtio-blk.
    pub disk: Option<&'a FrozenDisk>,
}

/// A device kind the manager can build, capture, restore and reset. Every method that runs
/// `inner` runs it while holding the device's lock, so the manager can nest all devices'
/// locks around the RAM freeze (or reset) and see devices and RAM at one instant.
pub trait VmDevice: Sized {
    /// The name in errors, descriptions and the saved state.
    const KIND: &'static str;
    /// An MMIO window and GSI the device always has (the tiny guests hard-code them); `None`
    /// lets the allocator hand one out.
    const FIXED_SLOT: Option<MmioSlot>;
    /// The saved form (plain data, guest values only).
    type State: Clone + Debug + PartialEq + Serialize + DeserializeOwned;

    /// The device a fresh VM gets (placed in `space`), or `None` if `config` asks for none.
    fn attach(space: &mut DeviceSpace, host: &DeviceHost, config: &AttachConfig) -> Result<Option<Self>, DeviceError>;

    /// Saves the state, takes what `mode` asks for, and runs `inner` with the device locked.
    fn capture<R>(
        &self,
        mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<Self::State, R>, DeviceError>;

    /// Refuses a saved state that cannot be restored on `args`, before anything is built.
    fn check_saved(state: &Self::State, args: &RestoreArgs) -> Result<(), DeviceError>;

    /// A device in `state`, placed in `space` and wired as `args.host` says.
    fn restore(space: &mut DeviceSpace, state: &Self::State, args: &mut RestoreArgs) -> Result<Self, DeviceError>;

    /// Brings this device back to `state` in place: with the device locked runs `inner` (the
    /// RAM reset, refused while pinned); only if that succeeds changes the device.
    fn reset(
        &self,
        state: &Self::State,
        args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError>;

    /// Requests in flight in `state`, which a restore re-executes.
    fn in_flight(state: &Self::State) -> u64;

    /// Where the guest finds this device.
    fn description(&self) -> DeviceDescription;

    /// Signals the device's interrupt again if its status has a bit set. Run once the vCPUs'
    /// state is restored: KVM delivers irqfd signals asynchronously, and one signalled while
    /// the device was restored may have reached a LAPIC that KVM_SET_LAPIC then overwrote.
    fn resend_interrupt(&self) {}

    /// The device's counters, if it keeps any (`devices::metrics`).
    fn metrics(&self) -> Option<DeviceMetrics> {
        None
    }

    /// Where the guest finds each device of this kind (a kind with several instances, such as
    /// virtio-net's interfaces, lists them all).
    fn descriptions(&self) -> Vec<DeviceDescription> {
        vec![self.description()]
    }
}
