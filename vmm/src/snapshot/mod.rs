//! Snapshots of a whole VM: in memory (`VmSnapshot`: frozen RAM + state, the base of resets)
//! and on disk (`file`: RAM files plus a versioned, checksummed state file, written atomically).

pub mod file;

use std::sync::Arc;
use std::time::Instant;

use memory::{GuestRam, MemoryError, Snapshot};

use crate::devices::Console;
use crate::machine::{Paused, Vmm};
use crate::vstate::{build_from_state, StateError, VmState};
pub use file::{load_snapshot, write_snapshot, SnapshotError, SnapshotKind};

/// A VM frozen at one instant: its RAM (never changes) and everything else. Cheap to clone.
#[derive(Clone, Debug)]
pub struct VmSnapshot {
    pub ram: Snapshot,
    pub state: Arc<VmState>,
}

/// Where a reset's time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetTiming {
    /// Bringing RAM back (`GuestRam::reset_to`: dirty-log fetch and copy-back), pin waits included.
    pub ram: std::time::Duration,
    /// Restoring vCPU, irqchip, clock and device state.
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
pub enum ResetError {
    #[error("VM {vm}: cannot capture or restore vCPU/device state")]
    State {
        vm: u64,
        #[source]
        source: StateError,
    },
    #[error("VM {vm}: cannot freeze or reset its RAM")]
    Memory {
        vm: u64,
        #[source]
        source: MemoryError,
    },
}

impl VmSnapshot {
    /// Freezes `vmm`, which `token` proves paused. Its RAM goes on copy-on-write.
    pub fn take(vmm: &Vmm, token: &Paused) -> Result<VmSnapshot, ResetError> {
        let vm = vmm.id();
        let (state, ram) = VmState::capture_with(vmm, token, || vmm.ram().snapshot())
            .map_err(|source| ResetError::State { vm, source })?;
        let ram = ram.map_err(|source| ResetError::Memory { vm, source })?;
        Ok(VmSnapshot { ram, state: Arc::new(state) })
    }

    /// A new paused VM `id` starting from this snapshot; its RAM maps the snapshot lazily.
    pub fn restore(&self, id: u64, console: &Console) -> Result<Vmm, ResetError> {
        let ram = GuestRam::from_snapshot(&self.ram).map_err(|source| ResetError::Memory { vm: id, source })?;
        build_from_state(Arc::new(ram), &self.state, id, console, None).map_err(|source| ResetError::State { vm: id, source })
    }

    /// Brings paused `vmm` back to this snapshot: RAM (copying back only its dirty pages when
    /// it came from this snapshot), vCPUs, devices, clock. Refused with
    /// `MemoryError::Pinned`, changing nothing, while a device holds a pin; `wait_for_pins`
    /// retries until the pins are released or it runs out. Returns where the time went.
    pub fn reset(&self, vmm: &mut Vmm, token: &Paused, wait_for_pins: Option<std::time::Duration>) -> Result<ResetTiming, ResetError> {
        let vm = vmm.id();
        let start = Instant::now();
        self.state.check_shape(vmm.ram()).map_err(|source| ResetError::State { vm, source })?;
        loop {
            match vmm.ram().reset_to(&self.ram) {
                Ok(()) => break,
                Err(MemoryError::Pinned { .. }) if wait_for_pins.is_some_and(|limit| start.elapsed() < limit) => {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(source) => return Err(ResetError::Memory { vm, source }),
            }
        }
        let ram = start.elapsed();
        self.state.restore_into(vmm, token).map_err(|source| ResetError::State { vm, source })?;
        Ok(ResetTiming { ram, state: start.elapsed() - ram })
    }
}
