//! `GuestRam`: one VM's guest memory, and every operation on it.
//!
//! This is the memory layer's whole contract; each method takes the RAM lock (where it needs
//! one) and hands the work to the module that holds the mechanism: `freeze` (freeze, pre-copy,
//! the per-region private and dirty sets), `snapshot` (reset), `pin` (pin guards), `stats`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::freeze::{FreezeCounters, FreezeReport, PrecopyReport, RegionState};
use crate::image::Image;
use crate::mapping::HostRange;
use crate::pages::PAGE_SIZE;
use crate::pin::{Access, PinGuard};
use crate::region::{validate_layout, GuestRegions, RamRegion};
use crate::snapshot::{reset_region, Snapshot};
use crate::stack::ImageStack;
use crate::stats::{MemoryStats, QuietCounts};
use crate::MemoryError;

/// Source of the pages vCPUs wrote: the VMM feeds KVM's dirty log through this.
pub trait VcpuDirtyLog: Send + Sync {
    /// Returns and clears the bitmap of pages vCPUs wrote in region `index` (bit i = page i)
    /// since the previous call.
    fn fetch(&self, index: usize, pages: usize) -> std::io::Result<Vec<u64>>;
}

/// What the VMM needs to register one region as a KVM memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmRegion {
    pub slot: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
}

/// One VM's guest memory. `Send + Sync`; clone, snapshot and reset need the vCPUs paused.
pub struct GuestRam {
    pub(crate) arcs: Vec<Arc<RamRegion>>,
    regions: GuestRegions,
    state: Mutex<Vec<RegionState>>,
    has_pinned: AtomicBool,
    counters: FreezeCounters,
    vcpu_log: RwLock<Option<Arc<dyn VcpuDirtyLog>>>,
    quiet: QuietCounts,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("layout", &self.layout()).finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Fresh zeroed RAM with the given (start, size) regions.
    ///
    /// Each region's base image is an empty memfd, but the region is mapped anonymous, not
    /// from it: both read as zeros, and a write fault on a memfd hole would fill a memfd page
    /// with zeros and then copy it (two pages and 2.1-2.4x an anonymous fault here). The
    /// pages this RAM writes are private either way; the first freeze writes them into the
    /// image, as it does for a mapped one.
    pub fn new(regions: &[(GuestAddress, usize)]) -> Result<GuestRam, MemoryError> {
        let layout = validate_layout(regions)?;
        let stacks = layout
            .iter()
            .map(|&(_, size)| Image::new(size).map(ImageStack::with_base))
            .collect::<Result<Vec<_>, _>>()?;
        GuestRam::from_stacks(&layout, stacks, |host, _| host.map_zeroed())
    }

    /// A new RAM showing a snapshot's bytes; it starts unpinned and clean.
    pub fn from_snapshot(snap: &Snapshot) -> Result<GuestRam, MemoryError> {
        GuestRam::from_stacks(&snap.layout, snap.stacks.clone(), |host, stack| stack.map_onto(host))
    }

    /// Reserves a host range per region and maps it with `map`, which must make it show the
    /// region's stack.
    fn from_stacks(
        layout: &[(GuestAddress, usize)],
        stacks: Vec<ImageStack>,
        map: impl Fn(&HostRange, &ImageStack) -> Result<(), MemoryError>,
    ) -> Result<GuestRam, MemoryError> {
        let mut arcs = Vec::with_capacity(layout.len());
        let mut state = Vec::with_capacity(layout.len());
        for (&(start, size), stack) in layout.iter().zip(stacks) {
            let host = HostRange::reserve(size)?;
            map(&host, &stack)?;
            arcs.push(Arc::new(RamRegion::new(start, host)?));
            state.push(RegionState::new(stack, size / PAGE_SIZE));
        }
        let regions = GuestRegions::from_arc_regions(arcs.clone()).map_err(|e| MemoryError::Os {
            op: "region collection",
            len: 0,
            source: std::io::Error::other(e),
        })?;
        Ok(GuestRam {
            arcs,
            regions,
            state: Mutex::new(state),
            has_pinned: AtomicBool::new(false),
            counters: FreezeCounters::default(),
            vcpu_log: RwLock::new(None),
            quiet: QuietCounts::default(),
        })
    }

    /// The (start, size) of each region, in address order.
    pub fn layout(&self) -> Vec<(GuestAddress, usize)> {
        self.arcs.iter().map(|r| (r.start_addr(), r.pages() * PAGE_SIZE)).collect()
    }

    /// One memslot per region, slot = region index.
    pub fn kvm_regions(&self) -> Vec<KvmRegion> {
        self.arcs
            .iter()
            .zip(0u32..)
            .map(|(r, slot)| KvmRegion {
                slot,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.host_addr(),
            })
            .collect()
    }

    /// Makes `take_dirty`, clone, snapshot and reset also see vCPU writes.
    pub fn set_vcpu_dirty_log(&self, log: Arc<dyn VcpuDirtyLog>) {
        *self.vcpu_log.write().unwrap_or_else(|e| e.into_inner()) = Some(log);
    }

    /// The VMM's word on whether this RAM's vCPUs are stopped (out of KVM_RUN, not to run
    /// until told otherwise): while they are, `stats` reuses its page counts until something
    /// else could change them. Say `false` before letting them run.
    pub fn set_vcpus_stopped(&self, stopped: bool) {
        self.quiet.set_vcpus_stopped(stopped);
    }

    /// Whether this RAM was ever pinned (sticky, like MMF_HAS_PINNED).
    pub fn has_pinned(&self) -> bool {
        self.has_pinned.load(Ordering::Acquire)
    }

    /// Pins `len` bytes at `addr` for a device; they stay this VM's own pages until the guard
    /// drops, and a clone made meanwhile gets an eager copy.
    pub fn pin(&self, addr: GuestAddress, len: usize, access: Access) -> Result<PinGuard, MemoryError> {
        if len == 0 {
            return Err(MemoryError::EmptyPin(addr.0));
        }
        let (index, offset) = self.locate(addr, len)?;
        // The RAM lock orders pins against clone, snapshot and reset.
        let _state = self.lock();
        let region = &self.arcs[index];
        let populated = region.host().populate_write(offset, len);
        // After the page-table change: a `stats` scanning meanwhile must not keep its counts.
        self.quiet.bump();
        populated?;
        self.has_pinned.store(true, Ordering::Release);
        Ok(PinGuard::new(Arc::clone(region), addr, offset, len, access))
    }

    /// Pages written since the last call (or since new / from_snapshot / reset_to), by anyone,
    /// plus every page pinned now; page-aligned and sorted. Clears the set.
    pub fn take_dirty(&self) -> Vec<GuestAddress> {
        let mut state = self.lock();
        self.harvest(&mut state);
        let mut out = Vec::new();
        for (index, (region, st)) in self.arcs.iter().zip(state.iter_mut()).enumerate() {
            let mut pages = std::mem::replace(&mut st.dirty, crate::pages::PageSet::new(region.pages()));
            for page in self.pinned_pages(index).unwrap_or_default() {
                pages.insert(page);
            }
            out.extend(pages.iter().map(|p| region_addr(region, p)));
        }
        out
    }

    /// One pre-copy round, with the VM running: harvests who wrote what, then writes every
    /// changed, unpinned page not already pre-copied into the image the next freeze of its
    /// region will write (and the pinned pages, untrusted, so that the freeze's copy of them
    /// faults nothing in). The next `clone_cow`, `snapshot` or `freeze` then writes only the
    /// pages written since, plus the pinned ones. Call it again to shrink that remainder.
    ///
    /// Costs CPU, not pause. Pins wait for it (it holds the RAM lock); DMA does not.
    pub fn precopy(&self) -> Result<PrecopyReport, MemoryError> {
        let mut state = self.lock();
        self.harvest(&mut state);
        let mut report = PrecopyReport::default();
        for (index, st) in state.iter_mut().enumerate() {
            let pinned = self.pinned_pages(index).unwrap_or_default();
            st.precopy(&self.arcs[index], &pinned, &mut report)?;
        }
        Ok(report)
    }

    /// A frozen image of this instant, saying where the time went. Pages a `precopy` round
    /// wrote and nobody wrote since are not written again.
    pub fn freeze(&self) -> Result<(Snapshot, FreezeReport), MemoryError> {
        let mut state = self.lock();
        let start = Instant::now();
        self.harvest(&mut state);
        let harvested = Instant::now();
        let mut report = FreezeReport { harvest: harvested - start, ..FreezeReport::default() };
        let mut stacks = Vec::with_capacity(state.len());
        for (index, st) in state.iter_mut().enumerate() {
            // Rule 4: a RAM that never pinned skips every per-page pin step.
            let pinned = self.pinned_pages(index).unwrap_or_default();
            st.freeze(&self.arcs[index], &pinned, &self.counters, &mut report)?;
            stacks.push(st.stack.clone());
        }
        report.write = harvested.elapsed();
        Ok((Snapshot { layout: self.layout(), stacks }, report))
    }

    /// A frozen image of this instant.
    pub fn snapshot(&self) -> Result<Snapshot, MemoryError> {
        self.freeze().map(|(snapshot, _)| snapshot)
    }

    /// fork(): a new RAM with this one's exact bytes; both go on independently.
    pub fn clone_cow(&self) -> Result<GuestRam, MemoryError> {
        let (frozen, _) = self.freeze()?;
        self.clone_from_frozen(&frozen)
    }

    /// The second half of `clone_cow`, which needs no pause: maps `frozen`, a snapshot this RAM
    /// just took with `freeze`, as a new RAM (its clone). The first half runs with the vCPUs
    /// paused, this one once they run again: a frozen image never changes.
    pub fn clone_from_frozen(&self, frozen: &Snapshot) -> Result<GuestRam, MemoryError> {
        let clone = GuestRam::from_snapshot(frozen)?;
        #[cfg(feature = "planted-bugs")]
        crate::region::planted::after_clone(&self.arcs, &clone.arcs);
        Ok(clone)
    }

    /// Brings this RAM back to `snap`'s bytes, copying back only what differs when `snap` is
    /// where this RAM's stack came from. Refused, changing nothing, while any page is pinned.
    pub fn reset_to(&self, snap: &Snapshot) -> Result<(), MemoryError> {
        let layout = self.layout();
        if layout != snap.layout {
            return Err(MemoryError::LayoutMismatch {
                snapshot: snap.layout.iter().map(|r| (r.0 .0, r.1)).collect(),
                ram: layout.iter().map(|r| (r.0 .0, r.1)).collect(),
            });
        }
        let mut state = self.lock();
        self.refuse_if_pinned()?;
        self.harvest(&mut state);
        let reset = self
            .arcs
            .iter()
            .zip(state.iter_mut())
            .zip(&snap.stacks)
            .try_for_each(|((region, st), target)| reset_region(region, st, target));
        // After the remap and copies: a `stats` scanning meanwhile must not keep its counts.
        self.quiet.bump();
        reset
    }

    /// What this RAM costs now and what its freezes did. O(this RAM's populated page tables),
    /// or O(its size / 64) while nothing could have changed its pages since the last call
    /// (`QuietCounts`): cheap enough to call for every VM of a process on every request.
    pub fn stats(&self) -> MemoryStats {
        let mut stats = MemoryStats {
            ram_bytes: self.layout().iter().map(|r| r.1 as u64).sum(),
            eager_copied_pages: self.eager_copied_pages(),
            folds: self.counters.folds.load(Ordering::Relaxed),
            layers: self.counters.layers.load(Ordering::Relaxed),
            flattens: self.counters.flattens.load(Ordering::Relaxed),
            ..MemoryStats::default()
        };
        for (region, counts) in self.arcs.iter().zip(self.quiet.counts(&self.arcs)) {
            stats.pinned_pages += region.pins.lock().unwrap_or_else(|e| e.into_inner()).count() as u64;
            stats.private_bytes += counts.private * PAGE_SIZE as u64;
            stats.shared_bytes += counts.shared * PAGE_SIZE as u64;
        }
        stats.mappings = self.lock().iter().map(|st| st.stack.mapping_count() as u64).sum();
        stats
    }

    /// `stats().eager_copied_pages` alone.
    pub fn eager_copied_pages(&self) -> u64 {
        self.counters.eager_copied_pages.load(Ordering::Relaxed)
    }

    /// Finds the region holding all of `addr..addr+len`; returns (index, offset in region).
    fn locate(&self, addr: GuestAddress, len: usize) -> Result<(usize, usize), MemoryError> {
        let index = addr
            .0
            .checked_add(len as u64)
            .and_then(|end| self.arcs.iter().position(|r| r.start_addr() <= addr && end <= r.start_addr().0 + r.len()))
            .ok_or(MemoryError::OutOfRange { addr: addr.0, len })?;
        Ok((index, (addr.0 - self.arcs[index].start_addr().0) as usize))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<RegionState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves host-bitmap and vCPU-log bits into each region's dirty and private sets (and out
    /// of its pre-copied set). Anything written after a region's harvest shows up in the next.
    fn harvest(&self, state: &mut [RegionState]) {
        // Clears the host-write bitmap, which `stats` counts on to see host writes.
        self.quiet.bump();
        let log = self.vcpu_log.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (index, (region, st)) in self.arcs.iter().zip(state.iter_mut()).enumerate() {
            st.mark_written(&region.host_dirty().get_and_reset());
            if let Some(log) = &log {
                match log.fetch(index, region.pages()) {
                    Ok(words) => st.mark_written(&words),
                    // Missing a page is never allowed; over-reporting is.
                    Err(_) => st.mark_all_written(),
                }
            }
        }
    }

    /// The pages pinned now in region `index`, read at one instant, or `None` if this RAM
    /// never pinned (rule 4: no per-page pin work then). A list, not a set: pins are few and
    /// a set costs O(RAM) to allocate.
    fn pinned_pages(&self, index: usize) -> Option<Vec<usize>> {
        if !self.has_pinned() {
            return None;
        }
        Some(self.arcs[index].pins.lock().unwrap_or_else(|e| e.into_inner()).pages().collect())
    }

    fn refuse_if_pinned(&self) -> Result<(), MemoryError> {
        let mut pages = 0;
        let mut first = None;
        for region in &self.arcs {
            let pins = region.pins.lock().unwrap_or_else(|e| e.into_inner());
            pages += pins.count();
            if first.is_none() {
                first = pins.pages().next().map(|p| region_addr(region, p).0);
            }
        }
        match first {
            Some(first) => Err(MemoryError::Pinned { pages, first }),
            None => Ok(()),
        }
    }
}

fn region_addr(region: &RamRegion, page: usize) -> GuestAddress {
    GuestAddress(region.start_addr().0 + (page * PAGE_SIZE) as u64)
}

impl GuestMemoryBackend for GuestRam {
    type R = RamRegion;

    fn num_regions(&self) -> usize {
        self.regions.num_regions()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&RamRegion> {
        self.regions.find_region(addr)
    }

    fn iter(&self) -> impl Iterator<Item = &RamRegion> {
        self.regions.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn a_fresh_ram_allocates_image_pages_only_when_it_freezes() {
        let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
        ram.write_slice(&[7; 16 * PAGE_SIZE], GuestAddress(0x4000)).unwrap();
        let image_bytes = |ram: &GuestRam| ram.lock()[0].stack.base().file().metadata().unwrap().blocks() * 512;
        assert_eq!(image_bytes(&ram), 0, "a first write fills no image page");
        assert_eq!(ram.stats().private_bytes, 16 * PAGE_SIZE as u64);
        let clone = ram.clone_cow().unwrap();
        assert_eq!(image_bytes(&ram), 16 * PAGE_SIZE as u64, "the freeze wrote exactly the written pages");
        let mut buf = [0u8; 8];
        clone.read_slice(&mut buf, GuestAddress(0x13ff8)).unwrap();
        assert_eq!(buf, [7; 8]);
    }

    #[test]
    fn stopped_vcpus_keep_page_counts_but_every_other_writer_is_seen() {
        let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let private = |ram: &GuestRam| ram.stats().private_bytes / PAGE_SIZE as u64;
        // A write into the mapping behind vm-memory's back, as a vCPU's is.
        let vcpu_write = |ram: &GuestRam, page: usize| {
            let host = ram.arcs[0].host().as_ptr();
            // SAFETY: `page` lies inside the 1 MiB region, mapped read-write.
            unsafe { host.add(page * PAGE_SIZE).write_volatile(1) };
        };
        vcpu_write(&ram, 0);
        assert_eq!(private(&ram), 1, "running vCPUs: every call scans");
        ram.set_vcpus_stopped(true);
        assert_eq!(private(&ram), 1);
        // Not possible while the vCPUs are stopped: it shows that the counts are reused.
        vcpu_write(&ram, 30);
        assert_eq!(private(&ram), 1, "stopped vCPUs: the last counts hold");
        ram.write_slice(&[7; 2 * PAGE_SIZE], GuestAddress(0x4000)).unwrap();
        assert_eq!(private(&ram), 4, "a host write through vm-memory makes it scan again");
        let _pin = ram.pin(GuestAddress(0x10000), PAGE_SIZE, Access::Write).unwrap();
        assert_eq!(private(&ram), 5, "so does a pin");
        ram.set_vcpus_stopped(false);
        vcpu_write(&ram, 20);
        assert_eq!(private(&ram), 6, "vCPUs that may run: every call scans");
    }
}
