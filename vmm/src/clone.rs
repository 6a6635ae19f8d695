//! Live clone of a running VM in the same process, like fork(): pause the source, capture its
//! vCPU and device state, clone its RAM copy-on-write, resume it, then build the clone's KVM VM
//! on the cloned RAM outside the pause.

use std::sync::Arc;
use std::time::Instant;

use memory::{Bytes, GuestAddress, GuestRam, MemoryError, PAGE_SIZE};
use serde::Serialize;

use devices::block::CowDisk;

use crate::devices::Console;
use crate::machine::{Paused, Vmm, VmmError};
use crate::vstate::{build_from_state, StateError, VmState};

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

/// What one clone cost.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CloneReport {
    pub source_id: u64,
    pub clone_id: u64,
    /// How long the source did not run: from the pause request until its vCPUs were told to
    /// resume, in µs.
    pub pause_us: u64,
    /// Within the pause: capturing vCPU, clock and device state.
    pub capture_us: u64,
    /// Within the pause: `GuestRam::clone_cow` (dirty-log fetch, freeze, map).
    pub ram_clone_us: u64,
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
    pub ram_clone_us: u64,
}

/// Captures `source`'s state and clones its RAM; `token` proves it paused. The clone's RAM
/// holds exactly the source's bytes of this instant, whatever either does afterwards.
pub fn capture_clone(source: &Vmm, token: &Paused) -> Result<CloneImage, CloneError> {
    let vm = source.id();
    let start = Instant::now();
    let eager_before = source.ram().eager_copied_pages();
    let mut froze_at = start;
    // clone_cow pulls KVM's dirty log through the VM's registered VcpuDirtyLog first.
    let (state, disk, ram) = VmState::capture_for_clone(source, token, || {
        froze_at = Instant::now();
        source.ram().clone_cow()
    })
    .map_err(|source| CloneError::State { vm, source })?;
    let ram = ram.map_err(|source| CloneError::Memory { vm, source })?;
    let done = Instant::now();
    Ok(CloneImage {
        source_id: vm,
        ram: Arc::new(ram),
        state,
        disk,
        eager_copied_pages: source.ram().eager_copied_pages() - eager_before,
        capture_us: micros(froze_at - start),
        ram_clone_us: micros(done - froze_at),
    })
}

impl CloneImage {
    /// Writes `id` at guest address `mailbox` of the clone (the tiny guests' VM id mailbox,
    /// `layout::VM_ID_ADDR`), so the clone's guest knows it is a new VM.
    pub fn tell_guest_id(&self, mailbox: GuestAddress, id: u64) -> Result<(), CloneError> {
        self.ram.write_obj(id, mailbox).map_err(|source| CloneError::GuestId { id, addr: mailbox.0, source })
    }

    /// Builds the clone as a paused VM with id `id` writing to `console`.
    pub fn build(self, id: u64, console: &Console) -> Result<Vmm, CloneError> {
        build_from_state(self.ram, &self.state, id, console, self.disk).map_err(|source| CloneError::State { vm: id, source })
    }
}

/// Clones running (or paused-by-nobody) `source` into a new paused VM `clone_id`, writing the
/// new id into the guest's mailbox if given. The source runs again before the clone is built.
pub fn clone_vm(
    source: &mut Vmm,
    clone_id: u64,
    console: &Console,
    id_mailbox: Option<GuestAddress>,
) -> Result<(Vmm, CloneReport), CloneError> {
    let start = Instant::now();
    let token = source.pause().map_err(|e| CloneError::Pause { vm: source.id(), source: e })?;
    let image = capture_clone(source, &token);
    source.resume(token);
    let pause_us = micros(start.elapsed());
    let image = image?;
    if let Some(mailbox) = id_mailbox {
        image.tell_guest_id(mailbox, clone_id)?;
    }
    let mut report = CloneReport {
        source_id: image.source_id,
        clone_id,
        pause_us,
        capture_us: image.capture_us,
        ram_clone_us: image.ram_clone_us,
        eager_copied_pages: image.eager_copied_pages,
        reexecuted_requests: image.state.mmio.as_ref().map_or(0, |m| {
            u64::from(m.dma.in_flight.is_some()) + m.block.as_ref().map_or(0, |b| b.device.in_flight.len() as u64)
        }),
        ..CloneReport::default()
    };
    let built = Instant::now();
    let clone = image.build(clone_id, console)?;
    report.build_us = micros(built.elapsed());
    let stats = clone.ram().stats();
    report.clone_private_pages = stats.private_bytes / PAGE_SIZE as u64;
    report.clone_shared_pages = (stats.ram_bytes - stats.private_bytes.min(stats.ram_bytes)) / PAGE_SIZE as u64;
    Ok((clone, report))
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
