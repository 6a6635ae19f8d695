//! Snapshots of a whole VM: in memory (`VmSnapshot`: frozen RAM + state, the base of resets)
//! and on disk (`file`: RAM files plus a versioned, checksummed state file, written atomically).

mod body;
mod error;
pub mod file;
pub mod format;
mod fsio;
pub mod host;
mod load;
mod memfile;
mod on_disk;
mod runs;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use memory::{GuestRam, MemoryError, Snapshot};

use devices::block::FrozenDisk;

use crate::builder::{build_restored, BuildError};
use crate::device_manager::{Console, DeviceError, DeviceOverrides, ResetArgs, RestoreReason};
use crate::machine::{Paused, Vmm};
use crate::vstate::{StateError, VmState};
pub use file::{load_snapshot, write_snapshot, SnapshotError, SnapshotKind, SnapshotOnDisk};

/// A VM frozen at one instant: its RAM and disk (never change) and everything else. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct VmSnapshot {
    pub ram: Snapshot,
    pub state: Arc<VmState>,
    /// The disk as of the snapshot, if the VM has virtio-blk.
    pub disk: Option<Arc<FrozenDisk>>,
}

/// Where a reset's time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetTiming {
    /// Bringing RAM back (`GuestRam::reset_to`: dirty-log fetch and copy-back), pin waits included.
    pub ram: std::time::Duration,
    /// Restoring MMIO devices and disk, vCPU, irqchip, clock and legacy device state.
    pub state: std::time::Duration,
}

impl ResetTiming {
    /// The whole reset.
    pub fn total(&self) -> std::time::Duration {
        self.ram + self.state
    }
}

/// What failed taking, restoring or resetting to an in-memory snapshot.
#[derive(Debug, thiserror::Error)]
pub enum VmSnapshotError {
    #[error("VM {vm}: cannot capture or restore vCPU/device state")]
    State {
        vm: u64,
        #[source]
        source: StateError,
    },
    #[error("VM {vm}: cannot build it from the snapshot")]
    Build {
        vm: u64,
        #[source]
        source: BuildError,
    },
    #[error("VM {vm}: cannot freeze or reset its RAM")]
    Memory {
        vm: u64,
        #[source]
        source: MemoryError,
    },
}

impl VmSnapshot {
    /// Freezes `vmm`, which `token` proves paused: its RAM goes on copy-on-write, its disk is
    /// frozen (its overlay sectors copied, `CowDisk::freeze`), its devices' state is captured
    /// with them at one instant.
    pub fn take(vmm: &Vmm, token: &Paused) -> Result<VmSnapshot, VmSnapshotError> {
        let vm = vmm.id();
        let (state, disk, ram) = VmState::capture_for_snapshot(vmm, token, || vmm.ram().snapshot())
            .map_err(|source| VmSnapshotError::State { vm, source })?;
        let ram = ram.map_err(|source| VmSnapshotError::Memory { vm, source })?;
        Ok(VmSnapshot { ram, state: Arc::new(state), disk: disk.map(Arc::new) })
    }

    /// A new paused VM `id` starting from this snapshot; its RAM maps the snapshot lazily, its
    /// disk is a fresh overlay over the frozen disk, its devices re-execute what was in flight.
    pub fn restore(&self, id: u64, console: &Console) -> Result<Vmm, VmSnapshotError> {
        self.restore_with(id, console, DeviceOverrides::default())
    }

    /// `restore`, with host resources of its own for the new VM (`network_overrides`: a TAP
    /// per interface; interfaces without one are attached to nothing).
    pub fn restore_with(&self, id: u64, console: &Console, overrides: DeviceOverrides) -> Result<Vmm, VmSnapshotError> {
        let ram = GuestRam::from_snapshot(&self.ram).map_err(|source| VmSnapshotError::Memory { vm: id, source })?;
        let build_error = |source| VmSnapshotError::Build { vm: id, source };
        let disk = match &self.disk {
            Some(frozen) => {
                Some(frozen.instantiate().map_err(|e| build_error(BuildError::Devices(DeviceError::Disk(e))))?)
            }
            None => None,
        };
        let reason = RestoreReason::Snapshot;
        build_restored(id, Arc::new(ram), console, &self.state, disk, reason, overrides).map_err(build_error)
    }

    /// Brings paused `vmm` back to this snapshot: RAM (copying back only its dirty pages when
    /// it came from this snapshot), the MMIO devices and the disk (copying back only the
    /// sectors written since, likewise; requests and the DMA transfer in flight at the snapshot
    /// are re-executed), vCPUs, legacy devices, clock. Refused with `MemoryError::Pinned`,
    /// changing nothing, while a device holds a pin; `wait_for_pins` retries until the pins are
    /// released or it runs out. Returns where the time went.
    pub fn reset(
        &self,
        vmm: &mut Vmm,
        token: &Paused,
        wait_for_pins: Option<std::time::Duration>,
    ) -> Result<ResetTiming, VmSnapshotError> {
        let vm = vmm.id();
        let start = Instant::now();
        self.state.check_shape(vmm.ram()).map_err(|source| VmSnapshotError::State { vm, source })?;
        let mut ram_done = start;
        loop {
            let reset_ram = || {
                let result = vmm.ram().reset_to(&self.ram);
                ram_done = Instant::now();
                result
            };
            let args = ResetArgs { disk: self.disk.as_deref() };
            let result = vmm.devices().reset(&self.state.devices, &args, reset_ram);
            match result {
                Ok(()) => break,
                Err(DeviceError::Ram(MemoryError::Pinned { .. }))
                    if wait_for_pins.is_some_and(|limit| start.elapsed() < limit) =>
                {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(DeviceError::Ram(source)) => return Err(VmSnapshotError::Memory { vm, source }),
                Err(e) => return Err(VmSnapshotError::State { vm, source: StateError::Devices(e) }),
            }
        }
        let ram = ram_done - start;
        self.state.restore_into(vmm, token).map_err(|source| VmSnapshotError::State { vm, source })?;
        // A reset VM is a new generation: a fresh ID, told now its vCPUs and irqchip are set.
        let state_error = |e| VmSnapshotError::State { vm, source: StateError::Devices(e) };
        vmm.devices().new_generation(vmm.vm().fd()).map_err(state_error)?;
        Ok(ResetTiming { ram, state: start.elapsed() - ram })
    }
}
