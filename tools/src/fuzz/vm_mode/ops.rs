//! Executing VM-mode steps: each does the real thing to a paused VM (or its devices) and
//! applies the same effect to the model, checking what the step itself can tell (the clone
//! instant's bytes, eager copies, refused resets, completed requests, dirty pages).

use std::collections::BTreeSet;

use memory::{Bytes, GuestAddress, MemoryError, PAGE_SIZE};

use devices::dma::DmaSource;

use super::driver::{host_dma, request_status, run_guest_command, GuestCommand, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use super::model::{first_diff, BlkKind, BlkRequestModel, DmaFrom, DmaModel, SECTOR};
use super::{complete_blk, ensure, pause, pick, quiet_console, FuzzVm, SnapModel, VmStep, VmWorld};
use super::{DATA_ADDR, DATA_BYTES, DATA_PAGES, DISK_SECTORS, MAX_VMS};
use crate::fuzz::Violation;
use vmm::clone::capture_clone;
use vmm::snapshot::{VmSnapshot, VmSnapshotError};

/// `len` bytes from `offset` of data page `page`, clipped to the data area: (start, len).
fn span(page: u8, offset: u16, len: u16) -> (usize, usize) {
    let start = usize::from(page % DATA_PAGES) * PAGE_SIZE + usize::from(offset) % PAGE_SIZE;
    (start, usize::from(len).min(DATA_BYTES - start))
}

/// A VMM operation that failed: the message carries the whole error chain.
fn failed(what: &str, vm: u64, e: impl std::error::Error) -> Violation {
    let mut msg = format!("VM {vm}: {what} failed: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Violation(msg)
}

impl VmWorld {
    fn vm(&mut self, i: usize) -> &mut FuzzVm {
        self.vms[i].as_mut().expect("picked a live VM")
    }

    pub(super) fn execute(&mut self, step: &VmStep) -> Result<(), Violation> {
        let pick_vm = |vm: u8| pick(&self.vms, vm);
        match *step {
            VmStep::GuestWrite { vm, page, offset, len, byte } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                let (start, len) = span(page, offset, len);
                let v = self.vm(i);
                let command = GuestCommand::Fill { addr: DATA_ADDR + start as u64, len: len as u64, byte };
                let token = v.token.take().expect("paused between steps");
                v.token = Some(run_guest_command(&mut v.vmm, token, command)?);
                v.model.write(start, &vec![byte; len]);
            }
            VmStep::HostWrite { vm, page, offset, len, byte } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                let (start, len) = span(page, offset, len);
                let v = self.vm(i);
                let id = v.vmm.id();
                v.vmm
                    .ram()
                    .write_slice(&vec![byte; len], GuestAddress(DATA_ADDR + start as u64))
                    .map_err(|e| failed("host write", id, e))?;
                v.model.write(start, &vec![byte; len]);
            }
            VmStep::DmaStart { vm, page, pages, pattern, chunk, by_guest } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                self.dma_start(i, page, pages, DmaFrom::Pattern(pattern), chunk, by_guest)?;
            }
            VmStep::DmaCopy { vm, page, pages, src_page, chunk, by_guest } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                let src = usize::from(src_page % DATA_PAGES) * PAGE_SIZE;
                self.dma_start(i, page, pages, DmaFrom::Copy(src), chunk, by_guest)?;
            }
            VmStep::DmaStep { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                self.dma_steps(i, false)?;
            }
            VmStep::DmaComplete { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                self.dma_steps(i, true)?;
            }
            VmStep::BlkRead { vm, sector, sectors, page } | VmStep::BlkWrite { vm, sector, sectors, page } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                let kind = if matches!(step, VmStep::BlkRead { .. }) { BlkKind::Read } else { BlkKind::Write };
                self.blk_submit(i, kind, sector, sectors, page)?;
            }
            VmStep::BlkComplete { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                complete_held(self.vm(i))?;
            }
            VmStep::Clone { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                if self.live() < MAX_VMS {
                    self.clone_vm(i)?;
                }
            }
            VmStep::Snapshot { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                let v = self.vm(i);
                let id = v.vmm.id();
                let snap = VmSnapshot::take(&v.vmm, v.token.as_ref().expect("paused"))
                    .map_err(|e| failed("snapshot", id, e))?;
                let model = v.model.cloned();
                self.snaps.push(SnapModel { snap, model });
            }
            VmStep::Restore { snap } => {
                if self.snaps.is_empty() || self.live() >= MAX_VMS {
                    return Ok(());
                }
                let s = &self.snaps[usize::from(snap) % self.snaps.len()];
                let id = self.next_id;
                self.next_id += 1;
                let mut vmm = s.snap.restore(id, &quiet_console()).map_err(|e| failed("restore", id, e))?;
                // The restored VM has its own disk as of the snapshot and re-executed the
                // requests in flight then; settle them now, deterministically, as for a clone.
                let mut restored = FuzzVm { token: Some(pause(&mut vmm)?), vmm, model: s.model.cloned() };
                complete_held(&mut restored)?;
                self.vms.push(Some(restored));
            }
            VmStep::Reset { vm, snap } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                if !self.snaps.is_empty() {
                    self.reset(i, usize::from(snap) % self.snaps.len())?;
                }
            }
            VmStep::DropVm { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                self.vms[i] = None;
            }
            VmStep::DropSnapshot { snap } => {
                if !self.snaps.is_empty() {
                    self.snaps.remove(usize::from(snap) % self.snaps.len());
                }
            }
            VmStep::TakeDirty { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                let v = self.vm(i);
                let got: BTreeSet<usize> = v
                    .vmm
                    .ram()
                    .take_dirty()
                    .into_iter()
                    .filter(|a| (DATA_ADDR..DATA_ADDR + DATA_BYTES as u64).contains(&a.0))
                    .map(|a| ((a.0 - DATA_ADDR) as usize) / PAGE_SIZE)
                    .collect();
                let missed: Vec<_> = v.model.dirty.difference(&got).collect();
                ensure!(missed.is_empty(), "VM {}: take_dirty missed written data pages {missed:?}", v.vmm.id());
                v.model.dirty.clear();
            }
            VmStep::Precopy { vm } => {
                let Some(i) = pick_vm(vm) else { return Ok(()) };
                let v = self.vm(i);
                v.vmm.ram().precopy().map_err(|e| failed("precopy", v.vmm.id(), e))?;
            }
        }
        Ok(())
    }

    fn dma_start(
        &mut self,
        i: usize,
        page: u8,
        pages: u8,
        from: DmaFrom,
        chunk: u16,
        by_guest: bool,
    ) -> Result<(), Violation> {
        let page = page % DATA_PAGES;
        let first = usize::from(page) * PAGE_SIZE;
        let mut len = usize::from(pages.clamp(1, DATA_PAGES - page)) * PAGE_SIZE;
        if let DmaFrom::Copy(src) = from {
            len = len.min(DATA_BYTES - src);
        }
        let dst = DATA_ADDR + first as u64;
        let chunk = u64::from(chunk.max(1));
        let source = match from {
            DmaFrom::Pattern(p) => DmaSource::Pattern(p),
            DmaFrom::Copy(src) => DmaSource::Guest(DATA_ADDR + src as u64),
        };
        let v = self.vm(i);
        let id = v.vmm.id();
        if by_guest {
            let token = v.token.take().expect("paused between steps");
            let command = GuestCommand::Dma { source, dst, len: len as u64, chunk };
            v.token = Some(run_guest_command(&mut v.vmm, token, command)?);
        } else {
            #[allow(clippy::cast_possible_truncation)] // at most DATA_BYTES and 4 KiB
            host_dma(&v.vmm, source, dst, len as u32, chunk as u32)?;
        }
        let error = v.vmm.devices().dma().map_or(0, |dma| dma.lock().unwrap_or_else(|e| e.into_inner()).state().error);
        // The engine refuses a second transfer (busy, 1) and a copy onto its own source
        // (overlap, 3), and leaves a transfer in flight alone.
        let overlaps = matches!(from, DmaFrom::Copy(src) if src < first + len && first < src + len);
        let want = match (v.model.dma.is_some(), overlaps) {
            (true, _) => 1,
            (false, true) => 3,
            (false, false) => 0,
        };
        ensure!(error == want, "VM {id}: DMA start left error {error}, expected {want}");
        if want == 0 {
            v.model.dma = Some(DmaModel { first, len, chunk: chunk as usize, from, done: 0 });
        }
        Ok(())
    }

    /// One chunk, or every remaining one, of the VM's transfer (an idle engine must do nothing).
    fn dma_steps(&mut self, i: usize, all: bool) -> Result<(), Violation> {
        let v = self.vm(i);
        let id = v.vmm.id();
        let dma = v.vmm.devices().dma().ok_or_else(|| Violation(format!("VM {id} has no DMA engine")))?;
        let mut engine = dma.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let more = engine.step();
            let model_more = v.model.dma_step();
            ensure!(more == model_more, "VM {id}: the DMA engine says in flight={more}, the model {model_more}");
            if !all || !more {
                return Ok(());
            }
        }
    }

    fn blk_submit(&mut self, i: usize, kind: BlkKind, sector: u8, sectors: u8, page: u8) -> Result<(), Violation> {
        let v = self.vm(i);
        let Some(blk) = v.model.blk.as_mut() else { return Ok(()) };
        let sectors = usize::from(sectors.clamp(1, 8));
        let sector = usize::from(sector) % (DISK_SECTORS as usize - sectors + 1);
        let buf = usize::from(page % DATA_PAGES) * PAGE_SIZE;
        let placeholder = super::driver::Submitted { status: 0 };
        let request = BlkRequestModel { kind, sector, sectors, buf, submitted: placeholder };
        // Requests that could race each other are left out: the model would not know the order.
        if blk.held.len() + 1 >= usize::from(super::driver::REQUEST_SLOTS)
            || blk.held.iter().any(|h| h.conflicts(&request))
        {
            return Ok(());
        }
        let virtio_kind = if kind == BlkKind::Read { VIRTIO_BLK_T_IN } else { VIRTIO_BLK_T_OUT };
        #[allow(clippy::cast_possible_truncation)] // at most 8 sectors
        let submitted =
            blk.queue.submit(&v.vmm, virtio_kind, sector as u64, DATA_ADDR + buf as u64, (sectors * SECTOR) as u32)?;
        blk.held.push(BlkRequestModel { submitted, ..request });
        Ok(())
    }

    fn clone_vm(&mut self, i: usize) -> Result<(), Violation> {
        let id = self.next_id;
        self.next_id += 1;
        let source = self.vm(i);
        let pinned = source.model.pinned_pages().len() as u64;
        let source_id = source.vmm.id();
        let image = capture_clone(&source.vmm, source.token.as_ref().expect("paused"))
            .map_err(|e| failed("clone", source_id, e))?;
        ensure!(
            image.eager_copied_pages == pinned,
            "VM {source_id}: clone copied {} pages eagerly, {pinned} were pinned",
            image.eager_copied_pages
        );
        // The clone instant, before the clone's devices re-execute anything.
        let mut buf = vec![0u8; DATA_BYTES];
        image.ram.read_slice(&mut buf, GuestAddress(DATA_ADDR)).map_err(|e| failed("reading the clone", id, e))?;
        if let Some(at) = first_diff(&buf, &source.model.bytes) {
            return Err(Violation(format!("clone {id} of VM {source_id} differs from the clone instant at {at}")));
        }
        let model = source.model.cloned();
        let mut vmm = image.build(id, &quiet_console()).map_err(|e| failed("building the clone", id, e))?;
        // The clone re-executed the requests in flight; settle them now, deterministically.
        let mut clone = FuzzVm { token: Some(pause(&mut vmm)?), vmm, model };
        complete_held(&mut clone)?;
        self.vms.push(Some(clone));
        Ok(())
    }

    fn reset(&mut self, i: usize, snap: usize) -> Result<(), Violation> {
        let s = &self.snaps[snap];
        let v = self.vms[i].as_mut().expect("picked a live VM");
        let id = v.vmm.id();
        let pinned = !v.model.pinned_pages().is_empty();
        match s.snap.reset(&mut v.vmm, v.token.as_ref().expect("paused"), None) {
            Ok(_) => {
                ensure!(!pinned, "VM {id}: reset went ahead while a device buffer was pinned");
                // RAM, virtio-blk (queue, disk) and the DMA engine are back at the snapshot;
                // the requests in flight then were re-executed: settle them, as for a clone.
                v.model = s.model.cloned();
                complete_held(v)?;
            }
            Err(VmSnapshotError::Memory { source: MemoryError::Pinned { .. }, .. }) => {
                ensure!(pinned, "VM {id}: reset refused with nothing pinned");
            }
            Err(e) => return Err(failed("reset", id, e)),
        }
        Ok(())
    }
}

/// Completes every held request of `vm`, in the VM (to the kernel, then into the used ring)
/// and in its model, and checks them.
fn complete_held(vm: &mut FuzzVm) -> Result<(), Violation> {
    complete_blk(&vm.vmm);
    let done = vm.model.complete_blk();
    check_completed(vm, &done)
}

/// After the requests `done` completed in `vm`: each has status OK and all are in the used ring.
fn check_completed(vm: &FuzzVm, done: &[BlkRequestModel]) -> Result<(), Violation> {
    let id = vm.vmm.id();
    for r in done {
        let status = request_status(&vm.vmm, r.submitted)?;
        ensure!(status == 0, "VM {id}: {:?} of sector {} completed with status {status}", r.kind, r.sector);
    }
    if let Some(blk) = &vm.model.blk {
        blk.queue.check_all_used(&vm.vmm)?;
    }
    Ok(())
}
