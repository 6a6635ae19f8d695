//! Clone, snapshot, restore and reset: everything that freezes or maps an image stack.
//!
//! Freezing a region (clone and snapshot) writes the pages it changed since its stack was
//! frozen, and every pinned page, once: into its base image in place when this RAM is the sole
//! holder of its whole stack (fold: the reuse rule at image level), else into a new sparse layer
//! image shared by everyone who needs it. The pinned pages themselves stay mapped, untouched, in
//! the source, so DMA in flight lands there, complete; the clone maps the frozen copy.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;

use crate::image::{Image, ImageStack};
use crate::pages::{PageSet, PAGE_SIZE};
use crate::precopy::PrecopyTarget;
use crate::ram::{GuestRam, RegionState};
use crate::region::RamRegion;
use crate::MemoryError;

/// Above this many layer runs per region a freeze flattens instead of adding a layer: each
/// run costs two VMAs in every VM mapping the stack, and a process has only 65530.
pub const MAX_LAYER_RUNS: usize = 512;

/// The frozen RAM of one instant. Never changes, whatever any VM made from it does later.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub(crate) layout: Vec<(GuestAddress, usize)>,
    pub(crate) stacks: Vec<ImageStack>,
}

impl Snapshot {
    /// The (start, size) of each region.
    pub fn layout(&self) -> &[(GuestAddress, usize)] {
        &self.layout
    }

    /// Each region's stack, base first (for writing snapshot files).
    pub fn stacks(&self) -> &[ImageStack] {
        &self.stacks
    }

    /// Reads the snapshot's bytes at `addr` (for checks and for writing snapshot files).
    pub fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<(), MemoryError> {
        let (index, offset) = self
            .layout
            .iter()
            .position(|&(start, size)| {
                addr >= start && addr.0.checked_add(buf.len() as u64).is_some_and(|end| end <= start.0 + size as u64)
            })
            .map(|i| (i, (addr.0 - self.layout[i].0 .0) as usize))
            .ok_or(MemoryError::OutOfRange { addr: addr.0, len: buf.len() })?;
        // SAFETY: `buf` is a live, writable slice of ours and the range lies in the region.
        unsafe { self.stacks[index].read_range(offset, buf.len(), buf.as_mut_ptr()) }
    }
}

/// What one freeze did, for seeing where a clone's pause goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreezeReport {
    /// Harvesting the host-write bitmap and the vCPU dirty log (KVM's, through `VcpuDirtyLog`).
    pub harvest: Duration,
    /// Writing pages into images (fold or new layer).
    pub write: Duration,
    /// Pages written by this freeze (changed since the last pre-copy round, and pinned ones).
    pub written_pages: usize,
    /// Pages a pre-copy round had already written and nobody wrote since.
    pub precopied_pages: usize,
}

impl GuestRam {
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
        crate::planted::after_clone(&self.arcs, &clone.arcs);
        Ok(clone)
    }

    /// A frozen image of this instant.
    pub fn snapshot(&self) -> Result<Snapshot, MemoryError> {
        self.freeze().map(|(snapshot, _)| snapshot)
    }

    /// `snapshot`, saying where the time went. Pages a `precopy` round wrote and nobody wrote
    /// since are not written again.
    pub fn freeze(&self) -> Result<(Snapshot, FreezeReport), MemoryError> {
        let mut state = self.lock();
        let start = Instant::now();
        self.harvest(&mut state);
        let harvested = Instant::now();
        let mut report = FreezeReport { harvest: harvested - start, ..FreezeReport::default() };
        let mut stacks = Vec::with_capacity(state.len());
        for (index, st) in state.iter_mut().enumerate() {
            let region = &self.arcs[index];
            let mut changed = st.private.clone();
            // Rule 4: a RAM that never pinned skips every per-page pin step.
            let pinned = self.pinned_pages(index).unwrap_or_default();
            for &page in &pinned {
                changed.insert(page);
            }
            self.counters.eager_copied_pages.fetch_add(pinned.len() as u64, Ordering::Relaxed);
            self.freeze_region(region, st, changed, &pinned, &mut report)?;
            stacks.push(st.stack.clone());
        }
        report.write = harvested.elapsed();
        Ok((Snapshot { layout: self.layout(), stacks }, report))
    }

    /// A new RAM showing a snapshot's bytes; it starts unpinned and clean.
    pub fn from_snapshot(snap: &Snapshot) -> Result<GuestRam, MemoryError> {
        GuestRam::from_stacks(&snap.layout, snap.stacks.clone())
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
        for ((region, st), target) in self.arcs.iter().zip(state.iter_mut()).zip(&snap.stacks) {
            if st.stack.starts_with(target) {
                let mut pages = st.stack.pages_above(target.layers().len(), region.pages());
                pages.union_with(&st.private);
                // SAFETY: the host range is this region's live read-write mapping, and no pin
                // or running vCPU uses it (checked above; vCPUs paused by the caller).
                unsafe { target.read_pages_into(&pages, region.host().as_ptr()) }?;
            } else {
                region.host().map_stack(target)?;
            }
            st.stack = target.clone();
            st.private.clear();
            st.dirty.clear();
            st.precopy = None;
        }
        Ok(())
    }

    fn refuse_if_pinned(&self) -> Result<(), MemoryError> {
        let mut pages = 0;
        let mut first = None;
        for region in &self.arcs {
            let pins = region.pins.lock().unwrap_or_else(|e| e.into_inner());
            pages += pins.count();
            if first.is_none() {
                first = pins.pages().next().map(|p| region_addr(region, p));
            }
        }
        match first {
            Some(first) => Err(MemoryError::Pinned { pages, first }),
            None => Ok(()),
        }
    }

    /// Makes `st.stack` hold this region's current bytes, given the pages that may differ
    /// (`changed`, pinned ones included) and the pinned pages, which are always written.
    fn freeze_region(
        &self,
        region: &RamRegion,
        st: &mut RegionState,
        changed: PageSet,
        pinned: &[usize],
        report: &mut FreezeReport,
    ) -> Result<(), MemoryError> {
        let capacity = region.pages();
        let fold = st.stack.exclusive_from();
        let (target, mut clean) = match st.precopy.take() {
            Some(precopy) if precopy.matches(fold, &st.stack) => (Some(precopy.target), Some(precopy.clean)),
            _ => (None, None),
        };
        // Pre-copied pages still clean need no write, unless pinned: DMA may write those
        // behind every bitmap, so they are copied at this instant (rule 2).
        if let Some(clean) = clean.as_mut() {
            for &page in pinned {
                clean.remove(page);
            }
        }
        let clean = clean.as_ref();
        let mut write = |image: &Image, pages: &PageSet| {
            let (runs, skipped) = pages.runs_skipping(clean);
            report.precopied_pages += skipped;
            report.written_pages += runs.iter().map(|r| r.1).sum::<usize>();
            write_runs(region, image, &runs)
        };
        if let Some(index) = fold {
            // Sole owner of the top of the stack: write in place, no new image.
            let mut pages = match st.stack.layers().len() > index + 1 {
                true => {
                    let mut pages = st.stack.pages_above(index + 1, capacity);
                    pages.union_with(&changed);
                    pages
                }
                false => changed,
            };
            if !pages.is_empty() {
                let target = &st.stack.layers()[index];
                write(&target.image, &pages)?;
                if let Some(own) = &target.pages {
                    pages.union_with(own);
                }
                st.stack.fold_into(index, pages);
                self.counters.folds.fetch_add(1, Ordering::Relaxed);
            }
        } else if !changed.is_empty() {
            let image = match target {
                Some(PrecopyTarget::Layer(image)) => image,
                _ => Image::new(capacity * PAGE_SIZE)?,
            };
            write(&image, &changed)?;
            st.stack.push(image, changed);
            self.counters.layers.fetch_add(1, Ordering::Relaxed);
        }
        if st.stack.run_count() > MAX_LAYER_RUNS {
            let image = Image::new(capacity * PAGE_SIZE)?;
            let all = vec![(0, capacity)];
            write_runs(region, &image, &all)?;
            report.written_pages += capacity;
            st.stack = ImageStack::with_base(image);
            self.counters.flattens.fetch_add(1, Ordering::Relaxed);
        }
        st.private.clear();
        Ok(())
    }
}

/// Copies this region's current bytes of `runs` (first page, page count) into `image` at the
/// same offsets.
pub(crate) fn write_runs(region: &RamRegion, image: &Image, runs: &[(usize, usize)]) -> Result<(), MemoryError> {
    for &(first, count) in runs {
        let off = first * PAGE_SIZE;
        // SAFETY: the run lies inside the region's live mapping; a device writing a pinned page
        // meanwhile gives a torn copy, which is the clone-instant state rule 2 allows.
        unsafe { image.write_from(off, region.host().as_ptr().add(off), count * PAGE_SIZE) }?;
    }
    Ok(())
}

fn region_addr(region: &RamRegion, page: usize) -> u64 {
    use vm_memory::GuestMemoryRegion;
    region.start_addr().0 + (page * PAGE_SIZE) as u64
}
