//! Freeze and pre-copy: what each region's bytes are made of (a frozen image stack plus the
//! pages that may differ from it), and writing those pages into images.
//!
//! **Freeze** (clone and snapshot, vCPUs paused) writes the pages a region changed since its
//! stack was frozen, and every pinned page, once: into the top images in place when this RAM
//! is their sole holder (fold: the reuse rule at image level), else into one new sparse layer
//! image shared by everyone who needs it. The pinned pages themselves stay mapped, untouched,
//! in the source, so DMA in flight lands there, complete; the clone maps the frozen copy.
//!
//! **Pre-copy** (VM running, as live migration does) writes the changed pages early, into the
//! image the next freeze will write, so the freeze writes only what changed since. A page
//! copied early is only as good as the record that nobody wrote it since:
//! - every harvest (the host-write bitmap, KVM's dirty log) takes the pages it reports out of
//!   the clean set (`RegionState::mark_written`), and a harvest always runs before the copy it
//!   guards, so a write racing the copy is reported by the next harvest, the freeze's;
//! - pinned pages are never trusted: a device may DMA into them behind every bitmap, so the
//!   freeze copies whatever is pinned at its instant (rule 2); an unpin of a write pin reports
//!   its pages written. A round still copies them into the target, never marking them clean,
//!   so that the freeze's copy lands on pages the image already has: a first write into a
//!   memfd page faults it in (2-5 µs a page on these hosts), which for a 1 MiB DMA buffer was
//!   most of the pause. Pinned pages are private in the RAM's mapping (the pin populated them),
//!   so writing them into the fold target shows no VM anything;
//! - the dirty and private sets are left as they are: `take_dirty` and `reset_to` still see
//!   every page written since their last reference point.
//!
//! The pre-copy target is either an image only this RAM's stack holds (the fold target:
//! exclusive images can only become shared through a freeze, which holds the RAM lock and
//! consumes the pre-copy) or a new layer image nobody maps yet. Either way, writing it early
//! changes no byte any VM, snapshot or pin sees.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::image::Image;
use crate::pages::{PageSet, PAGE_SIZE};
use crate::region::RamRegion;
use crate::stack::ImageStack;
use crate::MemoryError;

/// Above this many layer runs per region a freeze flattens instead of adding a layer: each
/// run costs two VMAs in every VM mapping the stack, and a process has only 65530.
pub(crate) const MAX_LAYER_RUNS: usize = 512;

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

/// What one pre-copy round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyReport {
    /// Pages written into freeze targets by this round.
    pub written_pages: usize,
    /// Pages written by earlier rounds and not written since (not written again).
    pub clean_pages: usize,
    /// Pinned pages copied into freeze targets ahead of the freeze, which copies them again.
    pub pinned_pages: usize,
}

/// What this RAM's freezes have done so far (`GuestRam::stats`).
#[derive(Debug, Default)]
pub(crate) struct FreezeCounters {
    pub eager_copied_pages: AtomicU64,
    pub folds: AtomicU64,
    pub layers: AtomicU64,
    pub flattens: AtomicU64,
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
    /// Pages already written into the next freeze's target while the VM ran.
    pub precopy: Option<Precopy>,
}

/// Where one region's pre-copied pages went.
#[derive(Debug)]
pub(crate) enum PrecopyTarget {
    /// Layer `index` of the region's stack, held by the stack alone. Weak: a strong reference
    /// would make the image look shared to `ImageStack::exclusive_from`.
    Fold { index: usize, image: Weak<Image> },
    /// A new layer image, not on any stack yet.
    Layer(Arc<Image>),
}

/// One region's pre-copy progress.
#[derive(Debug)]
pub(crate) struct Precopy {
    target: PrecopyTarget,
    /// Pages whose bytes in the target are the region's current bytes, as far as every writer
    /// has reported. Always a subset of the region's private set and of the fold's pages.
    clean: PageSet,
}

impl Precopy {
    /// Whether this pre-copy went where a freeze of `stack` writes now (`fold`:
    /// `stack.exclusive_from()`, the layer to fold into, or `None` for a new layer).
    fn matches(&self, fold: Option<usize>, stack: &ImageStack) -> bool {
        match (&self.target, fold) {
            (PrecopyTarget::Fold { index, image }, Some(fold)) => {
                *index == fold && std::ptr::eq(image.as_ptr(), Arc::as_ptr(&stack.layers()[fold].image))
            }
            (PrecopyTarget::Layer(_), None) => true,
            _ => false,
        }
    }
}

impl RegionState {
    /// A region showing `stack`, clean and not pre-copied.
    pub(crate) fn new(stack: ImageStack, pages: usize) -> Self {
        RegionState { stack, private: PageSet::new(pages), dirty: PageSet::new(pages), precopy: None }
    }

    /// Records that the pages of `words` (bit i = page i) were written by someone.
    pub(crate) fn mark_written(&mut self, words: &[u64]) {
        self.dirty.or_words(words);
        self.private.or_words(words);
        // A pre-copied page written since is stale in its target: the freeze writes it again.
        if let Some(precopy) = &mut self.precopy {
            precopy.clean.subtract_words(words);
        }
    }

    /// Records that any page may have been written (a dirty log could not be read).
    pub(crate) fn mark_all_written(&mut self) {
        let pages = self.private.capacity();
        self.dirty.insert_range(0, pages);
        self.private.insert_range(0, pages);
        self.precopy = None;
    }

    /// Now shows `stack` with no page differing from it (after a freeze, reset or remap).
    pub(crate) fn settle_on(&mut self, stack: ImageStack) {
        self.stack = stack;
        self.private.clear();
        self.dirty.clear();
        self.precopy = None;
    }

    /// One pre-copy round for this region (harvested by the caller): writes every changed,
    /// unpinned page not already pre-copied into the image the next freeze will write, and
    /// the `pinned` pages, untrusted.
    pub(crate) fn precopy(
        &mut self,
        region: &RamRegion,
        pinned: &[usize],
        report: &mut PrecopyReport,
    ) -> Result<(), MemoryError> {
        let capacity = region.pages();
        let fold = self.stack.exclusive_from();
        let mut wanted = match fold {
            Some(index) => self.stack.pages_above(index + 1, capacity),
            None => PageSet::new(capacity),
        };
        wanted.union_with(&self.private);
        for &page in pinned {
            wanted.remove(page);
        }
        if !self.precopy.as_ref().is_some_and(|p| p.matches(fold, &self.stack)) {
            if wanted.is_empty() && pinned.is_empty() {
                self.precopy = None;
                return Ok(());
            }
            let target = match fold {
                Some(index) => PrecopyTarget::Fold { index, image: Arc::downgrade(&self.stack.layers()[index].image) },
                None => PrecopyTarget::Layer(Image::new(capacity * PAGE_SIZE)?),
            };
            self.precopy = Some(Precopy { target, clean: PageSet::new(capacity) });
        }
        let Some(precopy) = self.precopy.as_mut() else { return Ok(()) };
        wanted.subtract(&precopy.clean);
        report.clean_pages += precopy.clean.len();
        let image = match &precopy.target {
            PrecopyTarget::Fold { index, .. } => &self.stack.layers()[*index].image,
            PrecopyTarget::Layer(image) => image,
        };
        write_runs(region, image, &wanted.runs())?;
        report.written_pages += wanted.len();
        precopy.clean.union_with(&wanted);
        // One page per run: pins are few, and a set of them costs O(RAM) (see `pinned_pages`).
        let pinned: Vec<(usize, usize)> =
            pinned.iter().filter(|&&p| !precopy.clean.contains(p)).map(|&p| (p, 1)).collect();
        write_runs(region, image, &pinned)?;
        report.pinned_pages += pinned.len();
        Ok(())
    }

    /// Makes `self.stack` hold this region's current bytes (harvested by the caller): writes
    /// the private pages not pre-copied since, plus the `pinned` pages, always.
    pub(crate) fn freeze(
        &mut self,
        region: &RamRegion,
        pinned: &[usize],
        counters: &FreezeCounters,
        report: &mut FreezeReport,
    ) -> Result<(), MemoryError> {
        let capacity = region.pages();
        // A copy: if a write below fails, the private set still says what a freeze must write.
        let mut changed = self.private.clone();
        for &page in pinned {
            changed.insert(page);
        }
        counters.eager_copied_pages.fetch_add(pinned.len() as u64, Ordering::Relaxed);
        let fold = self.stack.exclusive_from();
        let (target, mut clean) = match self.precopy.take() {
            Some(precopy) if precopy.matches(fold, &self.stack) => (Some(precopy.target), Some(precopy.clean)),
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
            let mut pages = match self.stack.layers().len() > index + 1 {
                true => {
                    let mut pages = self.stack.pages_above(index + 1, capacity);
                    pages.union_with(&changed);
                    pages
                }
                false => changed,
            };
            if !pages.is_empty() {
                let target = &self.stack.layers()[index];
                write(&target.image, &pages)?;
                if let Some(own) = &target.pages {
                    pages.union_with(own);
                }
                self.stack.fold_into(index, pages);
                counters.folds.fetch_add(1, Ordering::Relaxed);
            }
        } else if !changed.is_empty() {
            let image = match target {
                Some(PrecopyTarget::Layer(image)) => image,
                _ => Image::new(capacity * PAGE_SIZE)?,
            };
            write(&image, &changed)?;
            self.stack.push(image, changed);
            counters.layers.fetch_add(1, Ordering::Relaxed);
        }
        if self.stack.run_count() > MAX_LAYER_RUNS {
            let image = Image::new(capacity * PAGE_SIZE)?;
            write_runs(region, &image, &[(0, capacity)])?;
            report.written_pages += capacity;
            self.stack = ImageStack::with_base(image);
            counters.flattens.fetch_add(1, Ordering::Relaxed);
        }
        self.private.clear();
        Ok(())
    }
}

/// Copies this region's current bytes of `runs` (first page, page count) into `image` at the
/// same offsets.
fn write_runs(region: &RamRegion, image: &Image, runs: &[(usize, usize)]) -> Result<(), MemoryError> {
    for &(first, count) in runs {
        image.write_from_host(region.host(), first * PAGE_SIZE, count * PAGE_SIZE)?;
    }
    Ok(())
}
