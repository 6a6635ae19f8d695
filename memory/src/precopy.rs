//! Pre-copy: writing a running VM's changed pages into the image its next freeze will write,
//! so the freeze itself (vCPUs paused) writes only what changed since, as live migration does.
//!
//! A page copied early is only as good as the record that nobody wrote it since:
//! - every harvest (the host-write bitmap, KVM's dirty log) takes the pages it reports out of
//!   the clean set, and a harvest always runs before the copy it guards, so a write racing the
//!   copy is reported by the next harvest, the freeze's;
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
//! The target is either an image only this RAM's stack holds (the fold target: exclusive
//! images can only become shared through a freeze, which holds the RAM lock and consumes the
//! pre-copy) or a new layer image nobody maps yet. Either way, writing it early changes no
//! byte any VM, snapshot or pin sees.

use std::sync::{Arc, Weak};

use crate::cow::write_runs;
use crate::image::{Image, ImageStack};
use crate::pages::{PageSet, PAGE_SIZE};
use crate::ram::GuestRam;
use crate::MemoryError;

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
    pub target: PrecopyTarget,
    /// Pages whose bytes in the target are the region's current bytes, as far as every writer
    /// has reported. Always a subset of the region's private set and of the fold's pages.
    pub clean: PageSet,
}

impl Precopy {
    /// Whether this pre-copy went where a freeze of `stack` writes now (`fold`:
    /// `stack.exclusive_from()`, the layer to fold into, or `None` for a new layer).
    pub(crate) fn matches(&self, fold: Option<usize>, stack: &ImageStack) -> bool {
        match (&self.target, fold) {
            (PrecopyTarget::Fold { index, image }, Some(fold)) => {
                *index == fold && std::ptr::eq(image.as_ptr(), Arc::as_ptr(&stack.layers()[fold].image))
            }
            (PrecopyTarget::Layer(_), None) => true,
            _ => false,
        }
    }
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

impl GuestRam {
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
            let region = &self.arcs[index];
            let capacity = region.pages();
            let fold = st.stack.exclusive_from();
            let mut wanted = match fold {
                Some(index) => st.stack.pages_above(index + 1, capacity),
                None => PageSet::new(capacity),
            };
            wanted.union_with(&st.private);
            let pinned = self.pinned_pages(index).unwrap_or_default();
            for &page in &pinned {
                wanted.remove(page);
            }
            if !st.precopy.as_ref().is_some_and(|p| p.matches(fold, &st.stack)) {
                if wanted.is_empty() && pinned.is_empty() {
                    st.precopy = None;
                    continue;
                }
                let target = match fold {
                    Some(index) => PrecopyTarget::Fold { index, image: Arc::downgrade(&st.stack.layers()[index].image) },
                    None => PrecopyTarget::Layer(Image::new(capacity * PAGE_SIZE)?),
                };
                st.precopy = Some(Precopy { target, clean: PageSet::new(capacity) });
            }
            let Some(precopy) = st.precopy.as_mut() else { continue };
            wanted.subtract(&precopy.clean);
            report.clean_pages += precopy.clean.len();
            let image = match &precopy.target {
                PrecopyTarget::Fold { index, .. } => &st.stack.layers()[*index].image,
                PrecopyTarget::Layer(image) => image,
            };
            write_runs(region, image, &wanted.runs())?;
            report.written_pages += wanted.len();
            precopy.clean.union_with(&wanted);
            // One page per run: pins are few, and a set of them costs O(RAM) (see `pinned_pages`).
            let pinned: Vec<(usize, usize)> = pinned.into_iter().filter(|&p| !precopy.clean.contains(p)).map(|p| (p, 1)).collect();
            write_runs(region, image, &pinned)?;
            report.pinned_pages += pinned.len();
        }
        Ok(report)
    }
}
