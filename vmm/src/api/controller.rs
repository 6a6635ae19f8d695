//! The VMs one `zygote run` process holds: the root VM and everything cloned or restored from
//! it, as a tree, with the operations the control API exposes. Single-threaded: the API server
//! calls it for one request at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memory::{GuestAddress, PAGE_SIZE};

use super::preboot::VmResources;
use super::requests::VmInfo;
use super::ApiError;
use crate::builder::BuildError;
use crate::clone::{capture_clone, clone_vm_with, ClonePath, CloneReport};
use crate::device_manager::{Console, DeviceError, DeviceMetrics, DeviceOverrides};
use crate::machine::{Paused, VmOutcome, Vmm};
use crate::snapshot::file::{
    load_snapshot_with, write_snapshot_to, LoadOptions, MemTarget, SnapshotKind, SnapshotOnDisk,
};
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

/// The VM tree.
pub struct Controller {
    vms: BTreeMap<u64, VmEntry>,
    next_id: u64,
    /// Where the guests read their VM id (the tiny guests' mailbox), if they do.
    id_mailbox: Option<GuestAddress>,
    /// VM 0's configuration (`GET /vm/config`): set over the API before it starts
    /// (`Controller::empty`), or what is known of a VM 0 built otherwise.
    resources: VmResources,
    /// Whether `resources` can still change: no VM 0 yet.
    configurable: bool,
    /// Firecracker's `--id`: the root VM's `id` in `GET /` (else its number).
    instance_id: Option<String>,
}

impl Controller {
    /// A tree holding `root`, already started.
    pub fn new(root: Vmm, id_mailbox: Option<GuestAddress>) -> Controller {
        let next_id = root.id() + 1;
        let mut vms = BTreeMap::new();
        let vcpus = u32::try_from(root.vcpu_count()).unwrap_or(u32::MAX);
        let resources = VmResources::of_running(vcpus, root.ram().stats().ram_bytes >> 20);
        vms.insert(root.id(), VmEntry { vmm: root, parent: None, paused: None, base: None, last_on_disk: None });
        Controller { vms, next_id, id_mailbox, resources, configurable: false, instance_id: None }
    }

    /// No VM yet: VM 0 is configured and started over the API, or loaded from a snapshot.
    pub fn empty() -> Controller {
        Controller {
            vms: BTreeMap::new(),
            next_id: 0,
            id_mailbox: None,
            resources: VmResources::default(),
            configurable: true,
            instance_id: None,
        }
    }

    /// VM 0's configuration, while it can still change; `what` names the request refused
    /// once it cannot.
    pub fn preboot(&mut self, what: &'static str) -> Result<&mut VmResources, ApiError> {
        match self.configurable && self.vms.is_empty() {
            true => Ok(&mut self.resources),
            false => Err(ApiError::PreBootOnly(what)),
        }
    }

    /// No VM yet, and VM 0 configured by `resources` (`--config-file`): started by
    /// `instance_start`.
    pub fn configured(resources: VmResources) -> Controller {
        Controller { resources, ..Controller::empty() }
    }

    pub fn set_instance_id(&mut self, id: Option<String>) {
        self.instance_id = id;
    }

    /// How `GET /` names VM `vm_id`: the instance id for the root, if one was given.
    pub fn instance_name(&self, vm_id: u64) -> String {
        match &self.instance_id {
            Some(id) if vm_id == self.root_id() => id.clone(),
            _ => vm_id.to_string(),
        }
    }

    /// VM 0's configuration as it stands (`GET /vm/config`).
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// The logger and metrics settings, which may change at any time.
    pub fn resources_mut(&mut self) -> &mut VmResources {
        &mut self.resources
    }

    /// Boots VM 0 from the pre-boot configuration (`PUT /actions` InstanceStart).
    pub fn instance_start(&mut self) -> Result<(), ApiError> {
        let mut root = self.preboot("InstanceStart")?.build(Console::Prefixed("[vm0] ".into()))?;
        root.start();
        let (resources, instance_id) = (std::mem::take(&mut self.resources), self.instance_id.take());
        *self = Controller::new(root, None);
        (self.resources, self.instance_id) = (resources, instance_id);
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

    /// The memory files of every snapshot chain this server wrote or loaded: a diff chain's
    /// parents may keep theirs outside the state files' directory (`LoadOptions::written_here`).
    pub fn written_mem_files(&self) -> Vec<PathBuf> {
        let chains = self.vms.values().filter_map(|e| e.last_on_disk.as_ref()).flat_map(|d| d.chain.iter());
        let mut files: Vec<PathBuf> = chains.cloned().collect();
        files.sort();
        files.dedup();
        files
    }

    /// The ids of VM `id`'s network interfaces, in guest order.
    pub fn iface_ids(&mut self, id: u64) -> Result<Vec<String>, ApiError> {
        Ok(self.entry(id)?.vmm.devices().net().iter().map(|n| n.iface_id.clone()).collect())
    }

    /// The root VM's id (the lowest).
    pub fn root_id(&self) -> u64 {
        self.vms.keys().next().copied().unwrap_or(0)
    }

    fn entry(&mut self, id: u64) -> Result<&mut VmEntry, ApiError> {
        self.vms.get_mut(&id).ok_or(ApiError::UnknownVm(id))
    }

    /// Whether the root VM's guest has ended it: its outcome's exit code and, for a failure,
    /// what failed (as `zygote run` without the API reports it).
    pub fn root_end(&mut self) -> Option<(u8, Option<String>)> {
        let root = self.root_id();
        let entry = self.vms.get_mut(&root)?;
        if !entry.vmm.wait_timeout(Duration::ZERO) {
            return None;
        }
        let outcome = entry.vmm.outcome();
        let message = match outcome {
            Some(VmOutcome::Failed(err)) => Some(super::chain(err)),
            Some(VmOutcome::AllParked) => Some("every vCPU parked itself without an exit code".to_string()),
            _ => None,
        };
        Some((outcome.map_or(0, VmOutcome::exit_code), message))
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

    /// Every VM's device counters, in id order.
    pub fn device_metrics(&self) -> Vec<(u64, Vec<DeviceMetrics>)> {
        self.vms.iter().map(|(id, entry)| (*id, entry.vmm.devices().metrics())).collect()
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
        self.clone_vm_with(id, DeviceOverrides::default())
    }

    /// `clone_vm`, the clone given host resources of its own (`network_overrides`: a TAP per
    /// interface named; the others are attached to nothing).
    pub fn clone_vm_with(&mut self, id: u64, overrides: DeviceOverrides) -> Result<(u64, CloneReport), ApiError> {
        let new_id = self.next_id;
        let id_mailbox = self.id_mailbox;
        let console = Console::Prefixed(format!("[vm{new_id}] "));
        let entry = self.entry(id)?;
        let fail = |e: crate::clone::CloneError| match &e {
            // The request's overrides (a TAP that is missing or busy, an unknown interface).
            crate::clone::CloneError::Build {
                source:
                    BuildError::Devices(
                        DeviceError::Net { .. }
                        | DeviceError::Vsock(_)
                        | DeviceError::BadConfig { .. }
                        | DeviceError::Mismatch(_),
                    ),
                ..
            } => ApiError::BadRequest(super::chain(&e)),
            _ => ApiError::Vm(id, super::chain(&e)),
        };
        let (mut clone, report) = match &entry.paused {
            None => clone_vm_with(&mut entry.vmm, new_id, &console, id_mailbox, ClonePath::default(), overrides)
                .map_err(fail)?,
            Some(token) => {
                // Already paused by the API: no pause of its own to measure (pause_us stays 0).
                let image = capture_clone(&entry.vmm, token).map_err(fail)?;
                if let Some(mailbox) = id_mailbox {
                    image.tell_guest_id(mailbox, new_id).map_err(fail)?;
                }
                let report = image.report(new_id, ClonePath::InPause);
                (image.build_with(new_id, &console, overrides).map_err(fail)?, report)
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
    fn with_paused<T>(
        &mut self,
        id: u64,
        f: impl FnOnce(&mut VmEntry, &Paused) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
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

    /// Writes a snapshot of VM `id`, its RAM to `mem` (RAM files in a directory, or
    /// Firecracker's single memory file); the VM is paused only while its state and RAM freeze.
    pub fn snapshot_create(
        &mut self,
        id: u64,
        state_path: &Path,
        mem: MemTarget,
        kind: SnapshotKind,
    ) -> Result<(), ApiError> {
        let snap = self.with_paused(id, |entry, token| {
            VmSnapshot::take(&entry.vmm, token).map_err(|e| ApiError::Vm(id, super::chain(&e)))
        })?;
        let entry = self.entry(id)?;
        let written = write_snapshot_to(&snap, state_path, mem, kind, entry.last_on_disk.as_ref())?;
        entry.base = Some(snap);
        entry.last_on_disk = Some(written);
        Ok(())
    }

    /// Restores the snapshot at `state_path` as a new VM; runs it if `resume`.
    pub fn snapshot_load(&mut self, state_path: &Path, resume: bool) -> Result<u64, ApiError> {
        self.snapshot_load_with(
            state_path,
            &LoadOptions::default(),
            resume,
            ClockOnRestore::Resume,
            DeviceOverrides::default(),
        )
    }

    /// `snapshot_load` with the user's `options` (a memory file named beside the state file),
    /// the restored guest's clock resumed or advanced to the host's real time (`clock_realtime`),
    /// and its own TAPs (`network_overrides`).
    pub fn snapshot_load_with(
        &mut self,
        state_path: &Path,
        options: &LoadOptions,
        resume: bool,
        clock: ClockOnRestore,
        overrides: DeviceOverrides,
    ) -> Result<u64, ApiError> {
        let loaded = load_snapshot_with(state_path, options)?;
        let new_id = self.next_id;
        let console = Console::Prefixed(format!("[vm{new_id}] "));
        // Everything restored comes from the file: a failure here is the file's (bad devices,
        // buffers outside RAM), answered with a 4xx like the checks of `load_snapshot`.
        let mut vmm = loaded
            .snapshot
            .restore_with(new_id, &console, overrides)
            .map_err(|e| ApiError::Snapshot(super::chain(&e)))?;
        if clock == ClockOnRestore::AdvanceToHostRealtime {
            crate::vstate::clock::advance_to_host_realtime(&vmm, &loaded.snapshot.state.clock)
                .map_err(|e| ApiError::Snapshot(super::chain(&e)))?;
        }
        let (loaded_vcpus, loaded_mib) = (vmm.vcpu_count(), vmm.ram().stats().ram_bytes >> 20);
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
        if std::mem::take(&mut self.configurable) {
            let vcpus = u32::try_from(loaded_vcpus).unwrap_or(u32::MAX);
            let (logger, metrics) = (self.resources.logger.take(), self.resources.metrics.take());
            self.resources = VmResources { logger, metrics, ..VmResources::of_running(vcpus, loaded_mib) };
        }
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
