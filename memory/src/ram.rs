//! `GuestRam`: one VM's guest memory, its dirty and private page sets, and its pins.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::image::{Image, ImageStack};
use crate::mapping::HostRange;
use crate::pages::{PageSet, PAGE_SIZE};
use crate::pin::{Access, PinGuard};
use crate::precopy::Precopy;
use crate::region::{GuestRegions, RamRegion};
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

/// Mutable per-region bookkeeping, behind the RAM's lock.
#[derive(Debug)]
pub(crate) struct RegionState {
    /// The frozen content this region's non-private pages show.
    pub stack: ImageStack,
    /// Pages that may differ from `stack` (written since it was last frozen or mapped).
    pub private: PageSet,
    /// Pages written since the last `take_dirty` (or new / from_snapshot / reset_to).
    pub dirty: PageSet,
    /// Pages already written into the next freeze's target while the VM ran (see `precopy`).
    pub precopy: Option<Precopy>,
}

impl RegionState {
    /// Records that the pages of `words` (bit i = page i) were written by someone.
    fn mark_written(&mut self, words: &[u64]) {
        self.dirty.or_words(words);
        self.private.or_words(words);
        // A pre-copied page written since is stale in its target: the freeze writes it again.
        if let Some(precopy) = &mut self.precopy {
            precopy.clean.subtract_words(words);
        }
    }

    /// Records that any page may have been written (a dirty log could not be read).
    fn mark_all_written(&mut self) {
        let pages = self.private.capacity();
        self.dirty.insert_range(0, pages);
        self.private.insert_range(0, pages);
        self.precopy = None;
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub eager_copied_pages: AtomicU64,
    pub folds: AtomicU64,
    pub layers: AtomicU64,
    pub flattens: AtomicU64,
}

/// One VM's guest memory. `Send + Sync`; clone, snapshot and reset need the vCPUs paused.
pub struct GuestRam {
    pub(crate) arcs: Vec<Arc<RamRegion>>,
    pub(crate) regions: GuestRegions,
    pub(crate) state: Mutex<Vec<RegionState>>,
    pub(crate) has_pinned: AtomicBool,
    pub(crate) counters: Counters,
    vcpu_log: RwLock<Option<Arc<dyn VcpuDirtyLog>>>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("layout", &self.layout()).finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Fresh zeroed RAM with the given (start, size) regions.
    pub fn new(regions: &[(GuestAddress, usize)]) -> Result<GuestRam, MemoryError> {
        let layout = validate_layout(regions)?;
        let stacks = layout
            .iter()
            .map(|&(_, size)| Image::new(size).map(ImageStack::with_base))
            .collect::<Result<Vec<_>, _>>()?;
        GuestRam::from_stacks(&layout, stacks)
    }

    /// Maps each region's stack at a newly reserved host range.
    pub(crate) fn from_stacks(layout: &[(GuestAddress, usize)], stacks: Vec<ImageStack>) -> Result<GuestRam, MemoryError> {
        let mut arcs = Vec::with_capacity(layout.len());
        let mut state = Vec::with_capacity(layout.len());
        for (&(start, size), stack) in layout.iter().zip(stacks) {
            let host = HostRange::reserve(size)?;
            host.map_stack(&stack)?;
            arcs.push(Arc::new(RamRegion::new(start, host)?));
            let pages = size / PAGE_SIZE;
            state.push(RegionState { stack, private: PageSet::new(pages), dirty: PageSet::new(pages), precopy: None });
        }
        let regions = GuestRegions::from_arc_regions(arcs.clone())
            .map_err(|e| MemoryError::Os { op: "region collection", len: 0, source: std::io::Error::other(e) })?;
        Ok(GuestRam {
            arcs,
            regions,
            state: Mutex::new(state),
            has_pinned: AtomicBool::new(false),
            counters: Counters::default(),
            vcpu_log: RwLock::new(None),
        })
    }

    /// The (start, size) of each region, in address order.
    pub fn layout(&self) -> Vec<(GuestAddress, usize)> {
        self.arcs.iter().map(|r| (r.start_addr(), r.pages() * PAGE_SIZE)).collect()
    }

    /// The vm-memory collection devices, linux-loader and virtio-queue take.
    pub fn regions(&self) -> &GuestRegions {
        &self.regions
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
        region.host().populate_write(offset, len)?;
        self.has_pinned.store(true, Ordering::Release);
        Ok(PinGuard::new(Arc::clone(region), addr, offset, len, access))
    }

    /// Pages written since the last call (or since new / from_snapshot / reset_to), by anyone,
    /// plus every page pinned now; page-aligned and sorted. Clears the set.
    pub fn take_dirty(&self) -> Vec<GuestAddress> {
        let mut state = self.lock();
        self.harvest(&mut state);
        let mut out = Vec::new();
        for (region, st) in self.arcs.iter().zip(state.iter_mut()) {
            let mut pages = std::mem::replace(&mut st.dirty, PageSet::new(region.pages()));
            if self.has_pinned() {
                for page in region.pins.lock().unwrap_or_else(|e| e.into_inner()).pages() {
                    pages.insert(page);
                }
            }
            let base = region.start_addr().0;
            out.extend(pages.iter().map(|p| GuestAddress(base + (p * PAGE_SIZE) as u64)));
        }
        out
    }

    /// Finds the region holding all of `addr..addr+len`; returns (index, offset in region).
    pub(crate) fn locate(&self, addr: GuestAddress, len: usize) -> Result<(usize, usize), MemoryError> {
        let index = addr
            .0
            .checked_add(len as u64)
            .and_then(|end| self.arcs.iter().position(|r| r.start_addr() <= addr && end <= r.start_addr().0 + r.len()))
            .ok_or(MemoryError::OutOfRange { addr: addr.0, len })?;
        Ok((index, (addr.0 - self.arcs[index].start_addr().0) as usize))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Vec<RegionState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves host-bitmap and vCPU-log bits into each region's dirty and private sets (and out
    /// of its pre-copied set). Anything written after a region's harvest shows up in the next.
    pub(crate) fn harvest(&self, state: &mut [RegionState]) {
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
    pub(crate) fn pinned_pages(&self, index: usize) -> Option<Vec<usize>> {
        if !self.has_pinned() {
            return None;
        }
        Some(self.arcs[index].pins.lock().unwrap_or_else(|e| e.into_inner()).pages().collect())
    }
}

/// Checks and sorts a region list: non-empty, page-aligned, non-zero, no overflow, no overlap.
pub(crate) fn validate_layout(regions: &[(GuestAddress, usize)]) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if regions.is_empty() {
        return Err(MemoryError::NoRegions);
    }
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.0);
    for &(start, size) in &sorted {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(MemoryError::BadRegionSize { start: start.0, size });
        }
        if start.0 % PAGE_SIZE as u64 != 0 {
            return Err(MemoryError::UnalignedRegion(start.0));
        }
        if start.0.checked_add(size as u64).is_none_or(|end| end > 1 << 52) {
            return Err(MemoryError::RegionOverflow { start: start.0, size });
        }
    }
    for pair in sorted.windows(2) {
        if pair[0].0 .0 + pair[0].1 as u64 > pair[1].0 .0 {
            return Err(MemoryError::OverlappingRegions { first: pair[0].0 .0, second: pair[1].0 .0 });
        }
    }
    Ok(sorted)
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
