//! Image stacks: a region's frozen content as a base image plus sparse layer images, top wins.
//!
//! Every VM, snapshot and pre-copy target that shows a region's frozen bytes holds its stack;
//! the reference counts of the images say who else holds them (`exclusive_from`).

use std::sync::Arc;

use crate::image::Image;
use crate::mapping::HostRange;
use crate::pages::{PageSet, PAGE_SIZE};
use crate::MemoryError;

/// An image in a stack, with the pages it provides (`None` = every page: the base).
#[derive(Clone, Debug)]
pub(crate) struct ImageLayer {
    pub image: Arc<Image>,
    pub pages: Option<Arc<PageSet>>,
}

/// Bytes `offset..offset+len` of a region, all from one image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stretch<'a> {
    pub image: &'a Arc<Image>,
    pub offset: usize,
    pub len: usize,
}

/// The frozen content of one region: a base image and sparse layers above it, top wins.
#[derive(Clone, Debug)]
pub(crate) struct ImageStack {
    layers: Vec<ImageLayer>,
}

impl ImageStack {
    pub(crate) fn with_base(base: Arc<Image>) -> Self {
        ImageStack { layers: vec![ImageLayer { image: base, pages: None }] }
    }

    pub(crate) fn layers(&self) -> &[ImageLayer] {
        &self.layers
    }

    pub(crate) fn base(&self) -> &Arc<Image> {
        &self.layers[0].image
    }

    /// Region size in bytes (every image of a stack has it).
    pub(crate) fn len(&self) -> usize {
        self.base().len()
    }

    pub(crate) fn push(&mut self, image: Arc<Image>, pages: PageSet) {
        self.layers.push(ImageLayer { image, pages: Some(Arc::new(pages)) });
    }

    /// Index of the lowest layer from which every image up is held by this stack alone, so
    /// it may still be written (the reuse rule for images); `None` if the top one is shared.
    pub(crate) fn exclusive_from(&self) -> Option<usize> {
        let shared = self.layers.iter().rposition(|l| Arc::strong_count(&l.image) > 1 || !l.image.is_writable());
        match shared {
            None => Some(0),
            Some(i) if i + 1 < self.layers.len() => Some(i + 1),
            Some(_) => None,
        }
    }

    /// Folds the layers above `index` into it: `pages` (their pages and any others that were
    /// written into its image) become its page set. The base's set stays "every page".
    pub(crate) fn fold_into(&mut self, index: usize, pages: PageSet) {
        self.layers.truncate(index + 1);
        if index > 0 {
            self.layers[index].pages = Some(Arc::new(pages));
        }
    }

    /// Whether `prefix` is the bottom of this stack, layer for layer (same images).
    pub(crate) fn starts_with(&self, prefix: &ImageStack) -> bool {
        prefix.layers.len() <= self.layers.len()
            && prefix.layers.iter().zip(&self.layers).all(|(a, b)| Arc::ptr_eq(&a.image, &b.image))
    }

    /// Pages provided by the layers at index `from` and above.
    pub(crate) fn pages_above(&self, from: usize, capacity: usize) -> PageSet {
        let mut set = PageSet::new(capacity);
        for layer in self.layers.iter().skip(from.max(1)) {
            if let Some(pages) = &layer.pages {
                set.union_with(pages);
            }
        }
        set
    }

    /// Total page runs mapped over the base: each costs two VMAs in every VM on this stack.
    pub(crate) fn run_count(&self) -> usize {
        self.layers.iter().filter_map(|l| l.pages.as_ref()).map(|p| p.runs().len()).sum()
    }

    /// Maximal stretches of pages that come from one image: the mappings a VM on this stack
    /// has (MAP_PRIVATE at file offset = region offset, so neighbours from one image merge).
    /// O(runs × layers): the owner of a page can only change at a run boundary.
    pub(crate) fn mapping_count(&self) -> usize {
        let pages = self.len() / PAGE_SIZE;
        let mut bounds: Vec<usize> = vec![0];
        for runs in self.layers.iter().filter_map(|l| l.pages.as_ref()).map(|p| p.runs()) {
            bounds.extend(runs.iter().flat_map(|&(first, count)| [first, first + count]).filter(|&b| b < pages));
        }
        bounds.sort_unstable();
        bounds.dedup();
        let mut count = 0;
        let mut previous: Option<&Arc<Image>> = None;
        for page in bounds {
            let image = self.image_for(page);
            if previous.is_none_or(|p| !Arc::ptr_eq(p, image)) {
                count += 1;
            }
            previous = Some(image);
        }
        count
    }

    /// The topmost layer holding `page`.
    pub(crate) fn image_for(&self, page: usize) -> &Arc<Image> {
        self.layers
            .iter()
            .rev()
            .find(|l| l.pages.as_ref().is_none_or(|p| p.contains(page)))
            .map(|l| &l.image)
            .unwrap_or_else(|| self.base())
    }

    /// Splits `offset..offset+len` into maximal stretches whose pages come from one image.
    /// Refuses a range outside the region.
    pub(crate) fn stretches(&self, offset: usize, len: usize) -> Result<Vec<Stretch<'_>>, MemoryError> {
        let end = offset.checked_add(len).filter(|&end| end <= self.len()).ok_or(MemoryError::OutOfBounds {
            what: "image stack read",
            offset,
            len,
            size: self.len(),
        })?;
        let mut out: Vec<Stretch<'_>> = Vec::new();
        let mut at = offset;
        while at < end {
            let image = self.image_for(at / PAGE_SIZE);
            let next = ((at / PAGE_SIZE + 1) * PAGE_SIZE).min(end);
            match out.last_mut() {
                Some(last) if Arc::ptr_eq(last.image, image) => last.len += next - at,
                _ => out.push(Stretch { image, offset: at, len: next - at }),
            }
            at = next;
        }
        Ok(out)
    }

    /// Maps this stack over the whole of `host`: the base, then each layer's runs, top last.
    ///
    /// Whatever was mapped here before (including this VM's private copies) is replaced, so
    /// the caller must know no pin or running vCPU relies on those pages.
    pub(crate) fn map_onto(&self, host: &HostRange) -> Result<(), MemoryError> {
        if self.len() != host.len() {
            return Err(MemoryError::OutOfBounds {
                what: "image stack mapping",
                offset: 0,
                len: self.len(),
                size: host.len(),
            });
        }
        host.map_file(0, host.len(), self.base().fd())?;
        for layer in &self.layers()[1..] {
            let Some(pages) = &layer.pages else { continue };
            for (first, count) in pages.runs() {
                host.map_file(first * PAGE_SIZE, count * PAGE_SIZE, layer.image.fd())?;
            }
        }
        Ok(())
    }

    /// Copies the stack's bytes of `pages` into `host` at the same offsets.
    pub(crate) fn read_pages_to_host(&self, pages: &PageSet, host: &HostRange) -> Result<(), MemoryError> {
        for (first, count) in pages.runs() {
            for stretch in self.stretches(first * PAGE_SIZE, count * PAGE_SIZE)? {
                stretch.image.read_to_host(host, stretch.offset, stretch.len)?;
            }
        }
        Ok(())
    }

    /// Copies the stack's bytes at `offset` into `buf`.
    pub(crate) fn read_to_slice(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0;
        for stretch in self.stretches(offset, buf.len())? {
            stretch.image.read_to_slice(stretch.offset, &mut buf[done..done + stretch.len])?;
            done += stretch.len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_of_another_size_is_refused_not_mapped() {
        let host = HostRange::reserve(4 * PAGE_SIZE).unwrap();
        let other = ImageStack::with_base(Image::new(8 * PAGE_SIZE).unwrap());
        assert!(matches!(other.map_onto(&host), Err(MemoryError::OutOfBounds { .. })));
    }
}
