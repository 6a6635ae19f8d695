//! The steps a `RamModel` takes: each drives the real objects, updates the model, and checks
//! what the rules say about that step's own outcome.

use std::collections::BTreeSet;

use super::{ensure, Checked, ModelPin, ModelViolation, RamModel};
use crate::pages::PAGE_SIZE;
use crate::{Access, Bytes, GuestAddress, MemoryError};

fn failed(what: &str, e: MemoryError) -> ModelViolation {
    ModelViolation(format!("{what} failed: {e}"))
}

impl RamModel {
    /// Bytes `offset..offset+len` from model page `page`, clipped to the end of its region:
    /// (first model byte, length, region index, the region's first model page).
    fn clip(&self, page: usize, offset: usize, len: usize) -> (usize, usize, usize, usize) {
        let (region, first, count) = self.region_of(page);
        let start = (page % self.pages()) * PAGE_SIZE + offset;
        let end = start.saturating_add(len).min((first + count) * PAGE_SIZE);
        (start, end.saturating_sub(start), region, first)
    }

    /// A host write (vm-memory `Bytes`, which marks the RAM's host bitmap) of `len` bytes of
    /// `byte`.
    pub fn host_write(&mut self, vm: usize, page: usize, offset: usize, len: usize, byte: u8) -> Checked {
        let (start, len, _, _) = self.clip(page, offset, len);
        if len == 0 {
            return Ok(());
        }
        let addr = GuestAddress(self.page_addr(start / PAGE_SIZE).0 + (start % PAGE_SIZE) as u64);
        let v = self.vm(vm)?;
        v.ram.write_slice(&vec![byte; len], addr).map_err(|e| ModelViolation(format!("host write failed: {e}")))?;
        v.record_write(start, len, byte);
        Ok(())
    }

    /// A guest write: straight into the VM's memory, reported only through its vCPU dirty log
    /// (as KVM's dirty log reports vCPU writes).
    pub fn vcpu_write(&mut self, vm: usize, page: usize, offset: usize, len: usize, byte: u8) -> Checked {
        let (start, len, region, first) = self.clip(page, offset, len);
        if len == 0 {
            return Ok(());
        }
        let v = self.vm(vm)?;
        let host = v.ram.kvm_regions()[region].userspace_addr as *mut u8;
        // SAFETY: `clip` kept `start..start+len` inside region `region`, which the RAM keeps
        // mapped read-write at this host address; nothing else accesses it meanwhile.
        unsafe { std::ptr::write_bytes(host.add(start - first * PAGE_SIZE), byte, len) };
        for page in start / PAGE_SIZE..(start + len).div_ceil(PAGE_SIZE) {
            v.vcpu_log.mark(region, page - first);
        }
        v.record_write(start, len, byte);
        Ok(())
    }

    /// A device pins `pages` pages (clipped to the region) from model page `page`; returns the
    /// pin's index.
    pub fn pin(&mut self, vm: usize, page: usize, pages: usize, access: Access) -> Checked<usize> {
        let page = page % self.pages();
        let pages = pages.clamp(1, self.room(page));
        let addr = self.page_addr(page);
        let v = self.vm(vm)?;
        let guard = v.ram.pin(addr, pages * PAGE_SIZE, access).map_err(|e| failed("pin", e))?;
        ensure!(v.ram.has_pinned(), "has_pinned is false after a pin");
        v.ever_pinned = true;
        let write = access == Access::Write;
        self.pins.push(ModelPin { vm: Some(vm), ghost: 0, guard: Some(guard), first: page, pages, write });
        Ok(self.pins.len() - 1)
    }

    /// A device's DMA write of `len` bytes of `byte` at `offset` of a pin's bytes, through
    /// its guard: refused for a read-only pin or past the pin's end, done otherwise.
    pub fn dma_write(&mut self, pin: usize, offset: usize, len: usize, byte: u8) -> Checked {
        let p = &self.pins[pin];
        let Some(guard) = &p.guard else { return Ok(()) };
        let result = guard.write_at(offset, &vec![byte; len]);
        if !p.write {
            ensure!(result.is_err(), "a read-only pin accepted a DMA write");
            return Ok(());
        }
        if offset.saturating_add(len) > p.pages * PAGE_SIZE {
            ensure!(result.is_err(), "a guard accepted a write past its end");
            return Ok(());
        }
        result.map_err(|e| failed("DMA write", e))?;
        self.record_device_write(pin, offset, len, byte);
        Ok(())
    }

    /// A write the kernel makes into a write pin's buffer behind the VMM's back (io_uring,
    /// O_DIRECT): no bitmap sees it. Nothing happens for a read-only, ended or short pin.
    pub fn kernel_dma(&mut self, pin: usize, offset: usize, len: usize, byte: u8) -> Checked {
        let p = &self.pins[pin];
        let Some(guard) = &p.guard else { return Ok(()) };
        if !p.write || offset.saturating_add(len) > p.pages * PAGE_SIZE {
            return Ok(());
        }
        // SAFETY: the guard pins `pages * PAGE_SIZE` bytes at `host_ptr` and keeps them mapped;
        // `offset + len` is within them (checked above).
        unsafe { std::ptr::write_bytes(guard.host_ptr().add(offset), byte, len) };
        self.record_device_write(pin, offset, len, byte);
        Ok(())
    }

    /// A device's DMA read of `len` bytes at `offset` of a pin: it must see exactly what its
    /// VM holds now (or held when it was dropped).
    pub fn dma_read(&mut self, pin: usize, offset: usize, len: usize) -> Checked {
        let p = &self.pins[pin];
        let Some(guard) = &p.guard else { return Ok(()) };
        let mut got = vec![0; len];
        guard.read_at(offset, &mut got).map_err(|e| failed("DMA read", e))?;
        let start = p.first * PAGE_SIZE + offset;
        let holder = match p.vm {
            Some(vm) => &self.vms[vm].as_ref().expect("a pin's VM is live").bytes,
            None => &self.ghosts[p.ghost],
        };
        ensure!(got == holder[start..start + len], "a pinned buffer does not show its VM's bytes");
        Ok(())
    }

    /// The device releases a pin. A write pin's pages may be reported dirty afterwards.
    pub fn unpin(&mut self, pin: usize) -> Checked {
        let p = &mut self.pins[pin];
        p.guard = None;
        let (vm, write, pages) = (p.vm, p.write, p.first..p.first + p.pages);
        if let (Some(vm), true) = (vm, write) {
            self.vm(vm)?.excused.extend(pages);
        }
        Ok(())
    }

    /// A device wrote `len` bytes of `byte` at `offset` of pin `pin`: its VM (or, once the VM
    /// is gone, the bytes its pins keep) holds them, and the VM must report the pages dirty.
    fn record_device_write(&mut self, pin: usize, offset: usize, len: usize, byte: u8) {
        let p = &self.pins[pin];
        let start = p.first * PAGE_SIZE + offset;
        match p.vm {
            Some(vm) => self.vms[vm].as_mut().expect("a pin's VM is live").record_write(start, len, byte),
            None => self.ghosts[p.ghost][start..start + len].fill(byte),
        }
    }

    /// Clones VM `vm` (unless `max_vms` are live): eager copies are exactly the pinned pages
    /// (none for a RAM that never pinned), and the clone starts unpinned and clean.
    pub fn clone_vm(&mut self, vm: usize) -> Checked<Option<usize>> {
        if self.live_vms() >= self.max_vms {
            return Ok(None);
        }
        let pinned = self.pinned_pages(vm).len() as u64;
        let v = self.vm(vm)?;
        let before = v.ram.eager_copied_pages();
        let clone = v.ram.clone_cow().map_err(|e| failed("clone", e))?;
        let copied = v.ram.eager_copied_pages() - before;
        let want = if v.ever_pinned { pinned } else { 0 };
        ensure!(copied == want, "clone copied {copied} pages eagerly, {want} were pinned");
        let bytes = v.bytes.clone();
        Self::check_fresh(&clone, "a clone")?;
        Ok(Some(self.add_vm(clone, bytes)))
    }

    /// A clone in two steps, as a running VM's clone is: freeze, the source writes 8 bytes of
    /// `byte` at model page `page` (as it does once resumed), then the clone is mapped.
    pub fn clone_split(&mut self, vm: usize, page: usize, byte: u8) -> Checked<Option<usize>> {
        if self.live_vms() >= self.max_vms {
            return Ok(None);
        }
        let addr = self.page_addr(page);
        let start = (page % self.pages()) * PAGE_SIZE;
        let v = self.vm(vm)?;
        let (frozen, _) = v.ram.freeze().map_err(|e| failed("freeze", e))?;
        let bytes = v.bytes.clone();
        v.ram.write_slice(&[byte; 8], addr).map_err(|e| ModelViolation(format!("host write failed: {e}")))?;
        v.record_write(start, 8, byte);
        let clone = v.ram.clone_from_frozen(&frozen).map_err(|e| failed("clone from frozen", e))?;
        Self::check_fresh(&clone, "a clone")?;
        Ok(Some(self.add_vm(clone, bytes)))
    }

    /// A pre-copy round while the VM "runs": it counts no page as eagerly copied.
    pub fn precopy(&mut self, vm: usize) -> Checked {
        let v = self.vm(vm)?;
        let before = v.ram.eager_copied_pages();
        v.ram.precopy().map_err(|e| failed("pre-copy", e))?;
        ensure!(v.ram.eager_copied_pages() == before, "a pre-copy round counted pinned pages as copied");
        Ok(())
    }

    /// A snapshot of VM `vm`; returns its index.
    pub fn snapshot(&mut self, vm: usize) -> Checked<usize> {
        let v = self.vm(vm)?;
        let snap = v.ram.snapshot().map_err(|e| failed("snapshot", e))?;
        let bytes = v.bytes.clone();
        self.snaps.push((snap, bytes));
        Ok(self.snaps.len() - 1)
    }

    /// A new VM from snapshot `snap` (unless `max_vms` are live); it starts unpinned and clean.
    pub fn restore(&mut self, snap: usize) -> Checked<Option<usize>> {
        if self.live_vms() >= self.max_vms {
            return Ok(None);
        }
        let (snap, bytes) = &self.snaps[snap];
        let ram = crate::GuestRam::from_snapshot(snap).map_err(|e| failed("restore", e))?;
        let bytes = bytes.clone();
        Self::check_fresh(&ram, "a restored RAM")?;
        Ok(Some(self.add_vm(ram, bytes)))
    }

    /// Resets VM `vm` to snapshot `snap`: done exactly when nothing of it is pinned.
    pub fn reset(&mut self, vm: usize, snap: usize) -> Checked {
        let pinned = !self.pinned_pages(vm).is_empty();
        let (snap, bytes) = &self.snaps[snap];
        let v = self
            .vms
            .get_mut(vm)
            .and_then(Option::as_mut)
            .ok_or_else(|| ModelViolation(format!("VM {vm} is not live")))?;
        match v.ram.reset_to(snap) {
            Ok(()) => {
                ensure!(!pinned, "reset went ahead while a DMA buffer was pinned");
                v.bytes.clone_from(bytes);
                v.dirty.clear();
                v.excused.clear();
            }
            Err(MemoryError::Pinned { .. }) => ensure!(pinned, "reset refused with nothing pinned"),
            Err(e) => return Err(failed("reset", e)),
        }
        Ok(())
    }

    /// Drops VM `vm`; its pins keep its bytes.
    pub fn drop_vm(&mut self, vm: usize) -> Checked {
        let v = self
            .vms
            .get_mut(vm)
            .and_then(Option::take)
            .ok_or_else(|| ModelViolation(format!("VM {vm} is not live")))?;
        self.ghosts.push(v.bytes);
        for p in self.pins.iter_mut().filter(|p| p.vm == Some(vm)) {
            p.vm = None;
            p.ghost = self.ghosts.len() - 1;
        }
        Ok(())
    }

    pub fn drop_snapshot(&mut self, snap: usize) {
        if snap < self.snaps.len() {
            self.snaps.remove(snap);
        }
    }

    /// `take_dirty` reports every page written since the last call, and nothing but those,
    /// pinned pages and pages write-pinned since.
    pub fn take_dirty(&mut self, vm: usize) -> Checked {
        let pinned = self.pinned_pages(vm);
        let pages: Vec<_> = self.vm(vm)?.ram.take_dirty();
        let got: BTreeSet<usize> = pages.into_iter().filter_map(|a| self.page_of(a)).collect();
        let v = self.vm(vm)?;
        let missed: Vec<_> = v.dirty.difference(&got).collect();
        ensure!(missed.is_empty(), "take_dirty missed written pages {missed:?}");
        let extra: Vec<_> =
            got.iter().filter(|p| !v.dirty.contains(p) && !v.excused.contains(p) && !pinned.contains(p)).collect();
        ensure!(extra.is_empty(), "take_dirty reported unwritten pages {extra:?}");
        v.dirty.clear();
        v.excused.clear();
        Ok(())
    }

    fn check_fresh(ram: &crate::GuestRam, what: &str) -> Checked {
        ensure!(!ram.has_pinned(), "{what} starts with has_pinned set");
        let dirty = ram.take_dirty();
        ensure!(dirty.is_empty(), "{what} starts with dirty pages {dirty:?}");
        Ok(())
    }
}

impl super::ModelVm {
    fn record_write(&mut self, start: usize, len: usize, byte: u8) {
        self.bytes[start..start + len].fill(byte);
        self.dirty.extend(start / PAGE_SIZE..(start + len).div_ceil(PAGE_SIZE));
    }
}
