//! Frozen RAM images: memfds holding guest bytes at file offset = region offset.
//!
//! An image is written only while exactly one VM's stack holds it (the reuse rule at image
//! level); as soon as a second holder exists (a clone, a snapshot) it is never written again,
//! because every MAP_PRIVATE mapping of it would see the change on pages it has not copied.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, OnceLock};

use crate::pages::{PageSet, PAGE_SIZE};
use crate::MemoryError;

/// One memfd of a region's size. Sparse: pages never written read as zero.
#[derive(Debug)]
pub struct Image {
    file: File,
    len: usize,
    /// False for images backed by a snapshot file: those are never written, owner or not.
    writable: bool,
    /// A MAP_SHARED view for writing while the image is still exclusive: a memcpy into it
    /// costs half a pwrite, which takes the inode lock and copies through the page cache API.
    writer: OnceLock<WriterView>,
}

#[derive(Debug)]
struct WriterView(*mut u8, usize);

// SAFETY: the view is plain shared memory; writers are serialised by the owning RAM's lock.
unsafe impl Send for WriterView {}
// SAFETY: as above.
unsafe impl Sync for WriterView {}

impl Drop for WriterView {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing else refers to it.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

impl Image {
    /// A zero-filled image of `len` bytes.
    pub fn new(len: usize) -> Result<Arc<Image>, MemoryError> {
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked below
        // and then owned by the `File`.
        let fd = unsafe { libc::memfd_create(c"zygote-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::os("memfd_create", len));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(|source| MemoryError::Os { op: "ftruncate", len, source })?;
        Ok(Arc::new(Image { file, len, writable: true, writer: OnceLock::new() }))
    }

    /// A read-only image backed by a snapshot file of exactly `len` bytes. Mapped MAP_PRIVATE,
    /// its pages live in the page cache, shared by every VM restored from it.
    pub fn from_file(file: File, len: usize) -> Result<Arc<Image>, MemoryError> {
        let actual = file.metadata().map_err(|source| MemoryError::Os { op: "stat snapshot file", len, source })?.len();
        if actual != len as u64 {
            return Err(MemoryError::FileSize { expected: len as u64, actual });
        }
        Ok(Arc::new(Image { file, len, writable: false, writer: OnceLock::new() }))
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `len` bytes from host memory at `src` into the image at `offset`.
    ///
    /// # Safety
    /// `src..src+len` must be mapped and readable, and `offset+len` within the image;
    /// concurrent writers to the source (DMA into a pinned page) are fine: a torn page is the
    /// documented clone-instant state.
    pub unsafe fn write_from(&self, offset: usize, src: *const u8, len: usize) -> Result<(), MemoryError> {
        let view = self.writer_view()?;
        debug_assert!(offset + len <= view.1);
        // SAFETY: the destination lies in our MAP_SHARED view (caller keeps offset+len within
        // the image); the source is mapped (caller). libc's memcpy is opaque to Rust, so a
        // device writing the source meanwhile is not a Rust-level data race.
        unsafe { libc::memcpy(view.0.add(offset).cast(), src.cast(), len) };
        Ok(())
    }

    fn writer_view(&self) -> Result<&WriterView, MemoryError> {
        if let Some(view) = self.writer.get() {
            return Ok(view);
        }
        // SAFETY: a new shared mapping of our own memfd at a kernel-chosen address.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), self.len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, self.fd(), 0)
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::os("mmap image writer", self.len));
        }
        let view = WriterView(addr.cast(), self.len);
        // Writers hold the RAM lock, so a lost race only happens across RAMs, which never
        // write the same image; if it does, the loser's view is unmapped by its drop.
        Ok(self.writer.get_or_init(|| view))
    }

    /// Copies `len` bytes of the image at `offset` into host memory at `dst`.
    ///
    /// # Safety
    /// `dst..dst+len` must be mapped writable and not in use by anything that relies on its
    /// bytes (reset runs with vCPUs stopped and no pins).
    pub unsafe fn read_into(&self, offset: usize, dst: *mut u8, len: usize) -> Result<(), MemoryError> {
        copy_all(len, |done| {
            // SAFETY: as documented on the function.
            unsafe { libc::pread(self.fd(), dst.add(done).cast(), len - done, (offset + done) as libc::off_t) }
        })
        .map_err(|source| MemoryError::Os { op: "pread from image", len, source })
    }
}

/// Runs `step(done)` until `len` bytes are transferred; `step` returns what a pread/pwrite does.
fn copy_all(len: usize, mut step: impl FnMut(usize) -> isize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        match usize::try_from(step(done)) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short copy")),
            Ok(n) => done += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// A layer: an image plus the pages it provides (None = every page: the base).
#[derive(Clone, Debug)]
pub struct Layer {
    pub image: Arc<Image>,
    pub pages: Option<Arc<PageSet>>,
}

/// The frozen content of one region: a base image and sparse layers above it, top wins.
#[derive(Clone, Debug)]
pub struct ImageStack {
    layers: Vec<Layer>,
}

impl ImageStack {
    pub fn with_base(base: Arc<Image>) -> Self {
        ImageStack { layers: vec![Layer { image: base, pages: None }] }
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn base(&self) -> &Arc<Image> {
        &self.layers[0].image
    }

    pub fn push(&mut self, image: Arc<Image>, pages: PageSet) {
        self.layers.push(Layer { image, pages: Some(Arc::new(pages)) });
    }

    /// Index of the lowest layer from which every image up is held by this stack alone, so
    /// it may still be written (the reuse rule for images); `None` if the top one is shared.
    pub fn exclusive_from(&self) -> Option<usize> {
        let shared = self.layers.iter().rposition(|l| Arc::strong_count(&l.image) > 1 || !l.image.writable);
        match shared {
            None => Some(0),
            Some(i) if i + 1 < self.layers.len() => Some(i + 1),
            Some(_) => None,
        }
    }

    /// Folds the layers above `index` into it: `pages` (their pages and any others that were
    /// written into its image) become its page set. The base's set stays "every page".
    pub fn fold_into(&mut self, index: usize, pages: PageSet) {
        self.layers.truncate(index + 1);
        if index > 0 {
            self.layers[index].pages = Some(Arc::new(pages));
        }
    }

    /// Whether `prefix` is the bottom of this stack, layer for layer (same images).
    pub fn starts_with(&self, prefix: &ImageStack) -> bool {
        prefix.layers.len() <= self.layers.len()
            && prefix.layers.iter().zip(&self.layers).all(|(a, b)| Arc::ptr_eq(&a.image, &b.image))
    }

    /// Pages provided by the layers at index `from` and above.
    pub fn pages_above(&self, from: usize, capacity: usize) -> PageSet {
        let mut set = PageSet::new(capacity);
        for layer in self.layers.iter().skip(from.max(1)) {
            if let Some(pages) = &layer.pages {
                set.union_with(pages);
            }
        }
        set
    }

    /// Total page runs mapped over the base: each costs two VMAs in every VM on this stack.
    pub fn run_count(&self) -> usize {
        self.layers.iter().filter_map(|l| l.pages.as_ref()).map(|p| p.runs().len()).sum()
    }

    /// The topmost layer holding `page`.
    pub fn image_for(&self, page: usize) -> &Arc<Image> {
        self.layers
            .iter()
            .rev()
            .find(|l| l.pages.as_ref().is_none_or(|p| p.contains(page)))
            .map(|l| &l.image)
            .unwrap_or_else(|| self.base())
    }

    /// Copies the stack's bytes of `pages` into host memory at `dst` (the region's start).
    ///
    /// # Safety
    /// `dst` must be the start of a writable mapping at least as long as the region.
    pub unsafe fn read_pages_into(&self, pages: &PageSet, dst: *mut u8) -> Result<(), MemoryError> {
        for (first, count) in pages.runs() {
            let off = first * PAGE_SIZE;
            // SAFETY: the run lies inside the region, which the caller says is mapped at dst.
            unsafe { self.read_range(off, count * PAGE_SIZE, dst.add(off)) }?;
        }
        Ok(())
    }

    /// Copies `len` bytes of the stack's content at `offset` to `dst`, one read per stretch
    /// of consecutive pages that come from the same image.
    ///
    /// # Safety
    /// `dst..dst+len` must be writable memory of the caller's; `offset+len` within the region.
    pub unsafe fn read_range(&self, offset: usize, len: usize, dst: *mut u8) -> Result<(), MemoryError> {
        let mut done = 0;
        while done < len {
            let image = self.image_for((offset + done) / PAGE_SIZE);
            let mut end = ((offset + done) / PAGE_SIZE + 1) * PAGE_SIZE;
            while end < offset + len && Arc::ptr_eq(self.image_for(end / PAGE_SIZE), image) {
                end += PAGE_SIZE;
            }
            let n = end.min(offset + len) - (offset + done);
            // SAFETY: within the caller's destination and the region, as documented.
            unsafe { image.read_into(offset + done, dst.add(done), n) }?;
            done += n;
        }
        Ok(())
    }
}
