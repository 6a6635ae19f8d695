//! The VMs one `zygote run` process holds: the root VM and everything cloned or restored from
//! it, as a tree, with the operations the control API exposes. Single-threaded: the API server
//! calls it for one request at a time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use memory::{GuestAddress, PAGE_SIZE};
use serde::Serialize;

use super::preboot::PendingBoot;
use super::ApiError;
use crate::clone::{capture_clone, clone_vm, ClonePath, CloneReport};
use crate::devices::Console;
use crate::machine::{Paused, Vmm};
use crate::snapshot::file::{load_snapshot, write_snapshot, SnapshotKind, SnapshotOnDisk};
use crate::snapshot::VmSnapshot;
use crate::vstate::ClockOnRestore;

/// One VM of the tree.
struct VmEntry {
    vmm: Vmm,
    parent: Option<u64>,
    /// Set while the API holds the VM paused.
    paused: Option<Paused>,
    /// What `reset` goes back to: the clone instant, the loaded snapshot, or the last one taken.
    base: Option<VmSnapshot>,
    /// The last snapshot written to disk, the parent of the next diff.
    last_on_disk: Option<SnapshotOnDisk>,
}

/// One row of `GET /vms`.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    pub id: u64,
    pub parent: Option<u64>,
    pub state: String,
    pub vcpus: usize,
    pub mem_mib: u64,
    pub private_pages: u64,
    pub shared_pages: u64,
    pub pinned_pages: u64,
}

/// The VM tree.
pub struct Controller {
    vms: BTreeMap<u64, VmEntry>,
    next_id: u64,
    /// Where the guests read their VM id (the tiny guests' mailbox), if they do.
    id_mailbox: Option<GuestAddress>,
    /// VM 0's configuration while it is still to be started over the API (`Controller::empty`).
    pending: Option<PendingBoot>,
}

impl Controller {
    /// A tree holding `root`, already started.
    pub fn new(root: Vmm, id_mailbox: Option<GuestAddress>) -> Controller {
        let next_id = root.id() + 1;
        let mut vms = BTreeMap::new();
        vms.insert(root.id(), VmEntry { vmm: root, parent: None, paused: None, base: None, last_on_disk: None });
        Controller { vms, next_id, id_mailbox, pending: None }
    }

    /// No VM yet: VM 0 is configured and started over the API, or loaded from a snapshot.
    pub fn empty() -> Controller {
        Controller { vms: BTreeMap::new(), next_id: 0, id_mailbox: None, pending: Some(PendingBoot::default()) }
    }

    /// VM 0's configuration, while it can still change.
    pub fn preboot(&mut self) -> Result<&mut PendingBoot, ApiError> {
        match self.pending.as_mut() {
            Some(pending) if self.vms.is_empty() => Ok(pending),
            _ => Err(ApiError::BadRequest("VM 0 exists already: pre-boot configuration is closed".into())),
        }
    }

    /// Boots VM 0 from the pre-boot configuration (`PUT /actions` InstanceStart).
    pub fn instance_start(&mut self) -> Result<(), ApiError> {
        let mut root = self.preboot()?.build()?;
        root.start();
        *self = Controller::new(root, None);
        Ok(())
    }

    /// Whether VM 0 has not been started yet.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// A tree holding `root`, already started, restored from `loaded`: resetting it goes back
    /// to that snapshot, and its first diff snapshot is relative to it.
    pub fn restored(root: Vmm, loaded: SnapshotOnDisk) -> Controller {
        let mut controller = Controller::new(root, None);
        let root = controller.root_id();
        if let Some(entry) = controller.vms.get_mut(&root) {
            entry.base = Some(loaded.snapshot.clone());
            entry.last_on_disk = Some(loaded);
        }
        controller
    }

    /// The root VM's id (the lowest).
    pub fn root_id(&self) -> u64 {
        self.vms.keys().next().copied().unwrap_or(0)
    }

    fn entry(&mut self, id: u64) -> Result<&mut VmEntry, ApiError> {
        self.vms.get_mut(&id).ok_or(ApiError::UnknownVm(id))
    }

    /// Whether the root VM's guest has ended it (its outcome's exit code, if so).
    pub fn root_exit_code(&mut self) -> Option<u8> {
        let root = self.root_id();
        let entry = self.vms.get_mut(&root)?;
        entry.vmm.wait_timeout(Duration::ZERO).then(|| entry.vmm.outcome().map_or(0, |o| o.exit_code()))
    }

    /// Info on VM `id`.
    pub fn info(&mut self, id: u64) -> Result<VmInfo, ApiError> {
        let entry = self.entry(id)?;
        let ended = entry.vmm.wait_timeout(Duration::ZERO);
        let state = match (&entry.paused, ended) {
            (_, true) => format!("Ended({:?})", entry.vmm.outcome().map(|o| o.exit_code())),
            (Some(_), false) => "Paused".into(),
            (None, false) => "Running".into(),
        };
        let stats = entry.vmm.ram().stats();
        let private = stats.private_bytes.min(stats.ram_bytes);
        Ok(VmInfo {
            id,
            parent: entry.parent,
            state,
            vcpus: entry.vmm.vcpu_count(),
            mem_mib: stats.ram_bytes >> 20,
            private_pages: private / PAGE_SIZE as u64,
            shared_pages: (stats.ram_bytes - private) / PAGE_SIZE as u64,
            pinned_pages: stats.pinned_pages,
        })
    }

    /// Every VM, in id order.
    pub fn list(&mut self) -> Vec<VmInfo> {
        let ids: Vec<u64> = self.vms.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.info(id).ok()).collect()
    }

    /// Pauses (`true`) or resumes VM `id`; idempotent.
    pub fn set_paused(&mut self, id: u64, paused: bool) -> Result<(), ApiError> {
        let entry = self.entry(id)?;
        match (paused, entry.paused.take()) {
            (true, None) => entry.paused = Some(entry.vmm.pause().map_err(|e| ApiError::Vm(id, e.to_string()))?),
            (false, Some(token)) => {
                entry.vmm.resume(token);
            }
            (_, token) => entry.paused = token,
        }
        Ok(())
    }

    /// Clones VM `id` into a new VM that starts running (paused if the source is).
    pub fn clone_vm(&mut self, id: u64) -> Result<(u64, CloneReport), ApiError> {
        let new_id = self.next_id;
        let id_mailbox = self.id_mailbox;
        let console = Console::Prefixed(format!("[vm{new_id}] "));
        let entry = self.entry(id)?;
        let fail = |e: crate::clone::CloneError| ApiError::Vm(id, super::chain(&e));
        let (mut clone, report) = match &entry.paused {
            None => clone_vm(&mut entry.vmm, new_id, &console, id_mailbox).map_err(fail)?,
            Some(token) => {
                // Already paused by the API: no pause of its own to measure (pause_us stays 0).
                let image = capture_clone(&entry.vmm, token).map_err(fail)?;
                if let Some(mailbox) = id_mailbox {
                    image.tell_guest_id(mailbox, new_id).map_err(fail)?;
                }
                let report = image.report(new_id, ClonePath::InPause);
                (image.build(new_id, &console).map_err(fail)?, report)
            }
        };
        let source_paused = entry.paused.is_some();
        // The clone's own base, for reset: its first instant (cheap: its RAM is all frozen).
        let token = clone.pause().map_err(|e| ApiError::Vm(new_id, e.to_string()))?;
        let base = VmSnapshot::take(&clone, &token).map_err(|e| ApiError::Vm(new_id, super::chain(&e)))?;
        let paused = if source_paused {
            Some(token)
        } else {
            clone.resume(token);
            None
        };
        self.vms.insert(new_id, VmEntry { vmm: clone, parent: Some(id), paused, base: Some(base), last_on_disk: None });
        self.next_id += 1;
        Ok((new_id, report))
    }

    /// Runs `f` with VM `id` paused (by the API already, or just for `f`).
    fn with_paused<T>(&mut self, id: u64, f: impl FnOnce(&mut VmEntry, &Paused) -> Result<T, ApiError>) -> Result<T, ApiError> {
        let entry = self.entry(id)?;
        match entry.paused.take() {
            Some(token) => {
                let result = f(entry, &token);
                entry.paused = Some(token);
                result
            }
            None => {
                let token = entry.vmm.pause().map_err(|e| ApiError::Vm(id, e.to_string()))?;
                let result = f(entry, &token);
                entry.vmm.resume(token);
                result
            }
        }
    }

    /// Writes a snapshot of VM `id`; the VM is paused only while its state and RAM freeze.
    pub fn snapshot_create(&mut self, id: u64, state_path: &Path, mem_dir: &Path, kind: SnapshotKind) -> Result<(), ApiError> {
        let snap = self.with_paused(id, |entry, token| {
            VmSnapshot::take(&entry.vmm, token).map_err(|e| ApiError::Vm(id, super::chain(&e)))
        })?;
        let entry = self.entry(id)?;
        let written = write_snapshot(&snap, state_path, mem_dir, kind, entry.last_on_disk.as_ref())?;
        entry.base = Some(snap);
        entry.last_on_disk = Some(written);
        Ok(())
    }

    /// Restores the snapshot at `state_path` as a new VM; runs it if `resume`.
    pub fn snapshot_load(&mut self, state_path: &Path, resume: bool) -> Result<u64, ApiError> {
        self.snapshot_load_with_clock(state_path, resume, ClockOnRestore::Resume)
    }

    /// `snapshot_load`, with the restored guest's clock resumed or advanced to the host's real
    /// time (`clock_realtime`).
    pub fn snapshot_load_with_clock(
        &mut self,
        state_path: &Path,
        resume: bool,
        clock: ClockOnRestore,
    ) -> Result<u64, ApiError> {
        let loaded = load_snapshot(state_path)?;
        let new_id = self.next_id;
        let console = Console::Prefixed(format!("[vm{new_id}] "));
        // Everything restored comes from the file: a failure here is the file's (bad devices,
        // buffers outside RAM), answered with a 4xx like the checks of `load_snapshot`.
        let mut vmm = loaded.snapshot.restore(new_id, &console).map_err(|e| ApiError::Snapshot(super::chain(&e)))?;
        if clock == ClockOnRestore::AdvanceToHostRealtime {
            crate::vstate::clock::advance_to_host_realtime(&vmm, &loaded.snapshot.state.clock)
                .map_err(|e| ApiError::Snapshot(super::chain(&e)))?;
        }
        let paused = if resume {
            vmm.start();
            None
        } else {
            Some(vmm.pause().map_err(|e| ApiError::Vm(new_id, e.to_string()))?)
        };
        let base = Some(loaded.snapshot.clone());
        self.vms.insert(new_id, VmEntry { vmm, parent: None, paused, base, last_on_disk: Some(loaded) });
        self.next_id += 1;
        // Loaded into an empty server, it is VM 0: nothing is left to configure.
        self.pending = None;
        Ok(new_id)
    }

    /// Resets VM `id` to its base snapshot; waits up to `wait_for_pins` for DMA pins.
    pub fn reset(&mut self, id: u64, wait_for_pins: Option<Duration>) -> Result<u64, ApiError> {
        let base = self.entry(id)?.base.clone().ok_or(ApiError::NoBase(id))?;
        self.with_paused(id, |entry, token| {
            let took = base.reset(&mut entry.vmm, token, wait_for_pins)?;
            Ok(u64::try_from(took.total().as_micros()).unwrap_or(u64::MAX))
        })
    }
}
