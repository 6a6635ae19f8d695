//! Frozen RAM images: memfds (or snapshot files) holding a region's bytes at file offset =
//! region offset.
//!
//! An image is written only while exactly one VM's stack holds it (the reuse rule at image
//! level); as soon as a second holder exists (a clone, a snapshot) it is never written again,
//! because every MAP_PRIVATE mapping of it would see the change on pages it has not copied.
//! Images backed by snapshot files are never written at all.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use crate::mapping::HostRange;
use crate::MemoryError;

/// One memfd or snapshot file of a region's size. Sparse: pages never written read as zero.
#[derive(Debug)]
pub(crate) struct Image {
    file: File,
    len: usize,
    /// False for images backed by a snapshot file: those are never written, owner or not.
    writable: bool,
    /// A MAP_SHARED view for writing while the image is still exclusive: a memcpy into it
    /// costs half a pwrite, which takes the inode lock and copies through the page cache API.
    writer: OnceLock<WriterView>,
}

/// A MAP_SHARED read-write mapping of a whole image: (address, length).
#[derive(Debug)]
struct WriterView(*mut u8, usize);

// SAFETY: the view is plain shared memory; writers are serialised by the owning RAM's lock.
unsafe impl Send for WriterView {}
// SAFETY: as above.
unsafe impl Sync for WriterView {}

impl Drop for WriterView {
    fn drop(&mut self) {
        // SAFETY: `writer_view` mapped exactly this range and only this value refers to it.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

impl Image {
    /// A zero-filled memfd image of `len` bytes.
    pub(crate) fn new(len: usize) -> Result<Arc<Image>, MemoryError> {
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked below
        // and then owned by the `File`.
        let fd = unsafe { libc::memfd_create(c"zygote-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::os("memfd_create", len));
        }
        // SAFETY: `fd` is a fresh descriptor (checked non-negative) that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(|source| MemoryError::Os { op: "ftruncate", len, source })?;
        Ok(Arc::new(Image { file, len, writable: true, writer: OnceLock::new() }))
    }

    /// A read-only image backed by a snapshot file of exactly `len` bytes. Mapped MAP_PRIVATE,
    /// its pages live in the page cache, shared by every VM restored from it.
    pub(crate) fn from_file(file: File, len: usize) -> Result<Arc<Image>, MemoryError> {
        let actual = file.metadata().map_err(|source| MemoryError::Os { op: "stat snapshot file", len, source })?.len();
        if actual != len as u64 {
            return Err(MemoryError::FileSize { expected: len as u64, actual });
        }
        Ok(Arc::new(Image { file, len, writable: false, writer: OnceLock::new() }))
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the image may ever be written (memfds may, while exclusive; files never).
    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }

    /// Copies `len` bytes of `host` at `offset` into the image at the same offset. A device
    /// writing the source meanwhile (DMA into a pinned page) gives a torn copy, which is the
    /// documented clone-instant state (rule 2).
    pub(crate) fn write_from_host(&self, host: &HostRange, offset: usize, len: usize) -> Result<(), MemoryError> {
        self.check_range("image write", offset, len)?;
        if !self.writable {
            return Err(MemoryError::ReadOnlyImage { offset, len });
        }
        let src = host.checked_ptr(offset, len)?;
        let view = self.writer_view()?;
        // SAFETY: the destination `offset..offset+len` lies in our MAP_SHARED view of `self.len`
        // bytes (checked by `check_range`); the source lies in `host`'s live mapping (checked by
        // `checked_ptr`). libc's memcpy is opaque to Rust, so a device writing the source
        // meanwhile is not a Rust-level data race.
        unsafe { libc::memcpy(view.0.add(offset).cast(), src.cast(), len) };
        Ok(())
    }

    fn writer_view(&self) -> Result<&WriterView, MemoryError> {
        if let Some(view) = self.writer.get() {
            return Ok(view);
        }
        // SAFETY: a new shared mapping of our own memfd at a kernel-chosen address touches no
        // existing memory; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::os("mmap image writer", self.len));
        }
        let view = WriterView(addr.cast(), self.len);
        // Writers hold the RAM lock, so a lost race only happens across RAMs, which never
        // write the same image; if it does, the loser's view is unmapped by its drop.
        Ok(self.writer.get_or_init(|| view))
    }

    /// Copies `len` bytes of the image at `offset` into `host` at the same offset. The caller
    /// makes sure nothing relies on those host bytes meanwhile (reset: vCPUs paused, no pins).
    pub(crate) fn read_to_host(&self, host: &HostRange, offset: usize, len: usize) -> Result<(), MemoryError> {
        self.check_range("image read", offset, len)?;
        let dst = host.checked_ptr(offset, len)?;
        let mut done = 0;
        while done < len {
            // SAFETY: `dst..dst+len` lies in `host`'s live read-write mapping (checked by
            // `checked_ptr`) and `done < len`, so the kernel writes only inside it.
            let n = unsafe { libc::pread(self.fd(), dst.add(done).cast(), len - done, (offset + done) as libc::off_t) };
            match usize::try_from(n) {
                Ok(0) => {
                    return Err(MemoryError::os_error(
                        "pread from image",
                        len,
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(n) => done += n,
                Err(_) => {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::Interrupted {
                        return Err(MemoryError::os_error("pread from image", len, err));
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies the image's bytes at `offset` into `buf`.
    pub(crate) fn read_to_slice(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check_range("image read", offset, buf.len())?;
        self.file.read_exact_at(buf, offset as u64).map_err(|e| MemoryError::os_error("pread from image", buf.len(), e))
    }

    fn check_range(&self, what: &'static str, offset: usize, len: usize) -> Result<(), MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MemoryError::OutOfBounds { what, offset, len, size: self.len }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::PAGE_SIZE;

    #[test]
    fn copies_outside_the_image_or_the_host_range_are_refused() {
        let image = Image::new(2 * PAGE_SIZE).unwrap();
        let host = HostRange::reserve(4 * PAGE_SIZE).unwrap();
        crate::stack::ImageStack::with_base(Image::new(4 * PAGE_SIZE).unwrap()).map_onto(&host).unwrap();
        for (offset, len) in [(2 * PAGE_SIZE, 1), (PAGE_SIZE, PAGE_SIZE + 1), (1, usize::MAX)] {
            assert!(matches!(image.write_from_host(&host, offset, len), Err(MemoryError::OutOfBounds { .. })));
            assert!(matches!(image.read_to_host(&host, offset, len), Err(MemoryError::OutOfBounds { .. })));
        }
        let mut buf = [0u8; 8];
        assert!(matches!(image.read_to_slice(2 * PAGE_SIZE - 4, &mut buf), Err(MemoryError::OutOfBounds { .. })));
        image.write_from_host(&host, PAGE_SIZE, PAGE_SIZE).unwrap();
        image.read_to_slice(2 * PAGE_SIZE - 8, &mut buf).unwrap();

        let file = tempfile(2 * PAGE_SIZE);
        let frozen = Image::from_file(file, 2 * PAGE_SIZE).unwrap();
        assert!(matches!(frozen.write_from_host(&host, 0, PAGE_SIZE), Err(MemoryError::ReadOnlyImage { .. })));
    }

    fn tempfile(len: usize) -> File {
        let path = std::env::temp_dir().join(format!("zygote-image-test-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(len as u64).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
