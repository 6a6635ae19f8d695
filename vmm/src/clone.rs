//! Live clone of a running VM in the same process, like fork(): pre-copy the source's changed
//! RAM while it runs, pause it, capture its vCPU and device state and freeze its RAM (only what
//! changed since the pre-copy, and pinned pages), resume it, then map the clone's RAM and
//! build its KVM VM outside the pause.

use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::{Bytes, FreezeReport, GuestAddress, GuestRam, MemoryError, Snapshot, PAGE_SIZE};
use serde::Serialize;

use devices::block::CowDisk;

use crate::builder::{build_restored, BuildError};
use crate::device_manager::{Console, DeviceOverrides, RestoreReason};
use crate::machine::{Paused, Vmm, VmmError};
use crate::vstate::{StateError, VmState};

/// What failed cloning a VM. The source is resumed whatever failed.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("cannot pause the source VM {vm}")]
    Pause {
        vm: u64,
        #[source]
        source: VmmError,
    },
    #[error("cannot capture or restore the state of VM {vm}")]
    State {
        vm: u64,
        #[source]
        source: StateError,
    },
    #[error("cannot build the clone {vm}")]
    Build {
        vm: u64,
        #[source]
        source: BuildError,
    },
    #[error("cannot clone the RAM of VM {vm}")]
    Memory {
        vm: u64,
        #[source]
        source: MemoryError,
    },
    #[error("cannot write the new id {id} at guest {addr:#x} of the clone")]
    GuestId {
        id: u64,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// How a clone spends the source's pause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ClonePath {
    /// Pre-copy rounds write the changed pages while the source still runs; the pause only
    /// freezes what was written since (plus pinned pages); the clone's RAM is mapped after the
    /// source resumed.
    #[default]
    Precopy,
    /// Everything in the pause: `GuestRam::clone_cow` (freeze and map), no pre-copy. The path
    /// before pre-copy existed, kept as the benchmark's same-run reference.
    InPause,
}

/// Pre-copy rounds before the pause stop after this many (a guest that rewrites its working
/// set faster than a round copies it never gets below the threshold)...
pub const PRECOPY_MAX_ROUNDS: u64 = 4;
/// ...or once a round had no more than this many pages to write: what is left is the freeze's,
/// tens of µs.
pub const PRECOPY_ENOUGH_PAGES: usize = 64;

/// What one clone cost.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CloneReport {
    pub source_id: u64,
    pub clone_id: u64,
    pub path: ClonePath,
    /// How long the source did not run: from the pause request until its last vCPU was told
    /// to resume (`Vmm::resume`), in µs.
    pub pause_us: u64,
    /// Within the pause: telling every vCPU to leave KVM_RUN and waiting for all of them.
    pub pause_wait_us: u64,
    /// Within the pause: capturing vCPU, clock and device state.
    pub capture_us: u64,
    /// Within the pause: the RAM freeze (`dirty_log_us` + `freeze_write_us`), plus `map_us` on
    /// the `InPause` path.
    pub ram_clone_us: u64,
    /// Within the freeze: fetching KVM's dirty log and the host-write bitmap.
    pub dirty_log_us: u64,
    /// Within the freeze: writing changed and pinned pages into images.
    pub freeze_write_us: u64,
    /// Pages the freeze wrote, and pages it found already pre-copied.
    pub freeze_pages: u64,
    pub freeze_precopied_pages: u64,
    /// Mapping the clone's RAM: inside the pause on the `InPause` path, after it otherwise.
    pub map_us: u64,
    /// Within the pause: telling all vCPUs but the last to run again.
    pub resume_us: u64,
    /// Before the pause, the source running: pre-copy rounds (CPU time, not pause time).
    pub precopy_us: u64,
    pub precopy_rounds: u64,
    pub precopy_pages: u64,
    /// After the source resumed: creating the clone's KVM VM, devices and vCPUs.
    pub build_us: u64,
    /// Pages pinned for DMA at the clone instant, copied into the clone eagerly.
    pub eager_copied_pages: u64,
    /// Device requests in flight at the clone instant, which the clone runs again against its
    /// own RAM and disk (virtio-blk requests, plus the DMA engine's transfer).
    pub reexecuted_requests: u64,
    /// The clone's RAM right after the clone: pages backed by frozen images it shares with the
    /// source (and its other clones), and its own pages (anonymous, from smaps).
    pub clone_shared_pages: u64,
    pub clone_private_pages: u64,
}

/// A clone's state and frozen RAM as of the clone instant: its RAM not mapped yet.
#[derive(Debug)]
pub struct FrozenClone {
    pub source_id: u64,
    pub frozen: Snapshot,
    pub state: VmState,
    pub disk: Option<CowDisk>,
    pub eager_copied_pages: u64,
    pub capture_us: u64,
    pub freeze: FreezeReport,
}

/// A clone's RAM and state as of the clone instant: not yet a VM.
#[derive(Debug)]
pub struct CloneImage {
    pub source_id: u64,
    pub ram: Arc<GuestRam>,
    pub state: VmState,
    /// The clone's copy-on-write disk, if the source has one.
    pub disk: Option<CowDisk>,
    pub eager_copied_pages: u64,
    pub capture_us: u64,
    /// Freeze plus map.
    pub ram_clone_us: u64,
    pub freeze: FreezeReport,
    pub map_us: u64,
}

/// Captures `source`'s state and freezes its RAM at one instant; `token` proves it paused.
/// The frozen RAM holds exactly the source's bytes of this instant, whatever either does
/// afterwards.
pub fn freeze_clone(source: &Vmm, token: &Paused) -> Result<FrozenClone, CloneError> {
    let vm = source.id();
    let start = Instant::now();
    let eager_before = source.ram().eager_copied_pages();
    let mut freeze_took = Duration::ZERO;
    // The freeze pulls KVM's dirty log through the VM's registered VcpuDirtyLog first.
    let (state, disk, frozen) = VmState::capture_for_clone(source, token, || {
        let t = Instant::now();
        let frozen = source.ram().freeze();
        freeze_took = t.elapsed();
        frozen
    })
    .map_err(|source| CloneError::State { vm, source })?;
    let (frozen, freeze) = frozen.map_err(|source| CloneError::Memory { vm, source })?;
    Ok(FrozenClone {
        source_id: vm,
        frozen,
        state,
        disk,
        eager_copied_pages: source.ram().eager_copied_pages() - eager_before,
        capture_us: micros(start.elapsed().saturating_sub(freeze_took)),
        freeze,
    })
}

impl FrozenClone {
    /// Maps the frozen RAM as the clone's; needs no pause (a frozen image never changes).
    pub fn map(self, source: &Vmm) -> Result<CloneImage, CloneError> {
        let start = Instant::now();
        let ram = source
            .ram()
            .clone_from_frozen(&self.frozen)
            .map_err(|e| CloneError::Memory { vm: self.source_id, source: e })?;
        let map_us = micros(start.elapsed());
        Ok(CloneImage {
            source_id: self.source_id,
            ram: Arc::new(ram),
            state: self.state,
            disk: self.disk,
            eager_copied_pages: self.eager_copied_pages,
            capture_us: self.capture_us,
            ram_clone_us: micros(self.freeze.harvest + self.freeze.write) + map_us,
            freeze: self.freeze,
            map_us,
        })
    }
}

/// Captures `source`'s state and clones its RAM; `token` proves it paused. The clone's RAM
/// holds exactly the source's bytes of this instant, whatever either does afterwards.
pub fn capture_clone(source: &Vmm, token: &Paused) -> Result<CloneImage, CloneError> {
    freeze_clone(source, token)?.map(source)
}

impl CloneImage {
    /// Writes `id` at guest address `mailbox` of the clone (the tiny guests' VM id mailbox,
    /// `layout::VM_ID_ADDR`), so the clone's guest knows it is a new VM.
    pub fn tell_guest_id(&self, mailbox: GuestAddress, id: u64) -> Result<(), CloneError> {
        self.ram.write_obj(id, mailbox).map_err(|source| CloneError::GuestId { id, addr: mailbox.0, source })
    }

    /// Builds the clone as a paused VM with id `id` writing to `console`.
    pub fn build(self, id: u64, console: &Console) -> Result<Vmm, CloneError> {
        self.build_with(id, console, DeviceOverrides::default())
    }

    /// `build`, with host resources of the clone's own (a TAP per network interface named in
    /// `overrides`; the others are attached to nothing, never to the source's).
    pub fn build_with(self, id: u64, console: &Console, overrides: DeviceOverrides) -> Result<Vmm, CloneError> {
        build_restored(id, self.ram, console, &self.state, self.disk, RestoreReason::Clone, overrides)
            .map_err(|source| CloneError::Build { vm: id, source })
    }

    /// The report of a clone `clone_id` made from this image along `path` (whether the map
    /// was in the pause), without the pause and build figures (the caller's).
    pub fn report(&self, clone_id: u64, path: ClonePath) -> CloneReport {
        let map_in_pause = if path == ClonePath::InPause { self.map_us } else { 0 };
        CloneReport {
            source_id: self.source_id,
            clone_id,
            path,
            capture_us: self.capture_us,
            ram_clone_us: self.ram_clone_us - self.map_us + map_in_pause,
            dirty_log_us: micros(self.freeze.harvest),
            freeze_write_us: micros(self.freeze.write),
            freeze_pages: self.freeze.written_pages as u64,
            freeze_precopied_pages: self.freeze.precopied_pages as u64,
            map_us: self.map_us,
            eager_copied_pages: self.eager_copied_pages,
            reexecuted_requests: self.state.devices.in_flight(),
            ..CloneReport::default()
        }
    }
}

/// Pre-copy rounds on running `ram` until one has little left to write; returns
/// (rounds, pages written).
fn precopy_rounds(ram: &GuestRam) -> Result<(u64, u64), MemoryError> {
    let mut pages = 0;
    for round in 1..=PRECOPY_MAX_ROUNDS {
        let written = ram.precopy()?.written_pages;
        pages += written as u64;
        if written <= PRECOPY_ENOUGH_PAGES {
            return Ok((round, pages));
        }
    }
    Ok((PRECOPY_MAX_ROUNDS, pages))
}

/// What the pause produced: the clone's RAM mapped already (`InPause`), or still to map.
enum Captured {
    Mapped(CloneImage),
    Frozen(FrozenClone),
}

/// Clones running (or paused-by-nobody) `source` into a new paused VM `clone_id`, writing the
/// new id into the guest's mailbox if given. The source runs again before the clone is built.
pub fn clone_vm(
    source: &mut Vmm,
    clone_id: u64,
    console: &Console,
    id_mailbox: Option<GuestAddress>,
) -> Result<(Vmm, CloneReport), CloneError> {
    clone_vm_by(source, clone_id, console, id_mailbox, ClonePath::default())
}

/// `clone_vm` along `path`.
pub fn clone_vm_by(
    source: &mut Vmm,
    clone_id: u64,
    console: &Console,
    id_mailbox: Option<GuestAddress>,
    path: ClonePath,
) -> Result<(Vmm, CloneReport), CloneError> {
    clone_vm_with(source, clone_id, console, id_mailbox, path, DeviceOverrides::default())
}

/// `clone_vm_by`, the clone built with `overrides` (its own TAPs).
pub fn clone_vm_with(
    source: &mut Vmm,
    clone_id: u64,
    console: &Console,
    id_mailbox: Option<GuestAddress>,
    path: ClonePath,
    overrides: DeviceOverrides,
) -> Result<(Vmm, CloneReport), CloneError> {
    let vm = source.id();
    let precopy_start = Instant::now();
    let (precopy_rounds, precopy_pages) = match path {
        ClonePath::Precopy => precopy_rounds(source.ram()).map_err(|source| CloneError::Memory { vm, source })?,
        ClonePath::InPause => (0, 0),
    };
    let precopy_us = micros(precopy_start.elapsed());
    let start = Instant::now();
    let token = source.pause().map_err(|e| CloneError::Pause { vm, source: e })?;
    let pause_wait_us = micros(start.elapsed());
    let captured = freeze_clone(source, &token).and_then(|frozen| match path {
        // The same work as `clone_cow`, in the pause; split only to time its parts.
        ClonePath::InPause => frozen.map(source).map(Captured::Mapped),
        ClonePath::Precopy => Ok(Captured::Frozen(frozen)),
    });
    let resume_start = Instant::now();
    let told = source.resume(token);
    let resume_us = micros(told.saturating_duration_since(resume_start));
    let pause_us = micros(told.saturating_duration_since(start));
    let image = match captured? {
        Captured::Mapped(image) => image,
        Captured::Frozen(frozen) => frozen.map(source)?,
    };
    if let Some(mailbox) = id_mailbox {
        image.tell_guest_id(mailbox, clone_id)?;
    }
    let mut report = CloneReport {
        pause_us,
        pause_wait_us,
        resume_us,
        precopy_us,
        precopy_rounds,
        precopy_pages,
        ..image.report(clone_id, path)
    };
    let built = Instant::now();
    let clone = image.build_with(clone_id, console, overrides)?;
    report.build_us = micros(built.elapsed());
    let stats = clone.ram().stats();
    report.clone_private_pages = stats.private_bytes / PAGE_SIZE as u64;
    report.clone_shared_pages = (stats.ram_bytes - stats.private_bytes.min(stats.ram_bytes)) / PAGE_SIZE as u64;
    Ok((clone, report))
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
