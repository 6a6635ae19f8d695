//! A region's fixed host address range, and mapping image stacks onto it.
//!
//! The range is reserved once and never moves: KVM memslots and devices keep using the same
//! host address while images are mapped over it with MAP_FIXED. Every operation on a part of
//! the range checks that the part lies inside it, so MAP_FIXED never replaces memory this
//! range does not own.

use crate::pages::PAGE_SIZE;
use crate::MemoryError;

/// A reserved, owned range of host virtual memory; unmapped on drop.
#[derive(Debug)]
pub(crate) struct HostRange {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the range is plain memory owned by this value; all access goes through raw pointers
// whose synchronisation is the callers' (vm-memory volatile accesses, pins, the RAM lock).
unsafe impl Send for HostRange {}
// SAFETY: as above: no interior state other than the mapping itself.
unsafe impl Sync for HostRange {}

impl HostRange {
    /// Reserves `len` bytes of address space (inaccessible until an image is mapped over it).
    pub(crate) fn reserve(len: usize) -> Result<HostRange, MemoryError> {
        // SAFETY: a fresh anonymous PROT_NONE mapping at a kernel-chosen address touches no
        // existing memory; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::os("mmap reserve", len));
        }
        Ok(HostRange { addr: addr.cast(), len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The host address of `offset`, after checking that `offset..offset+len` lies inside
    /// the range.
    pub(crate) fn checked_ptr(&self, offset: usize, len: usize) -> Result<*mut u8, MemoryError> {
        match offset.checked_add(len) {
            // SAFETY: `offset <= end <= self.len`, so the result stays inside our mapping.
            Some(end) if end <= self.len => Ok(unsafe { self.addr.add(offset) }),
            _ => Err(MemoryError::OutOfBounds { what: "host range", offset, len, size: self.len }),
        }
    }

    /// Maps the whole range private, anonymous and read-write: zeros, which the kernel
    /// allocates on first write (a fresh RAM, whose base image is all holes).
    pub(crate) fn map_zeroed(&self) -> Result<(), MemoryError> {
        // SAFETY: `self.addr..self.addr+self.len` is exactly our own reservation, so MAP_FIXED
        // replaces only memory this value owns.
        let addr = unsafe {
            libc::mmap(
                self.addr.cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::os("mmap anonymous", self.len));
        }
        Ok(())
    }

    /// MAP_PRIVATE of `fd` at file offset = range offset, so neighbouring runs merge.
    pub(crate) fn map_file(&self, offset: usize, len: usize, fd: i32) -> Result<(), MemoryError> {
        let target = self.checked_ptr(offset, len)?;
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::OutOfBounds { what: "unaligned image mapping", offset, len, size: self.len });
        }
        // SAFETY: `target..target+len` is a page-aligned part of our own reservation (checked
        // above), so MAP_FIXED replaces only memory this value owns.
        let addr = unsafe {
            libc::mmap(
                target.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::os("mmap image", len));
        }
        Ok(())
    }

    /// Makes the pages covering `offset..offset+len` this VM's own (write-faults them without
    /// changing bytes), so that a pin refers to a page no COW can take away.
    pub(crate) fn populate_write(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        let start = offset / PAGE_SIZE * PAGE_SIZE;
        let end = offset.checked_add(len).and_then(|end| end.checked_next_multiple_of(PAGE_SIZE)).unwrap_or(usize::MAX);
        let target = self.checked_ptr(start, end - start)?;
        // SAFETY: `target..target+(end-start)` lies in our reservation (checked above), which
        // is mapped read-write; populating does not change its contents.
        let rc = unsafe { libc::madvise(target.cast(), end - start, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(MemoryError::os("madvise(MADV_POPULATE_WRITE)", end - start));
        }
        Ok(())
    }
}

impl Drop for HostRange {
    fn drop(&mut self) {
        // SAFETY: we own exactly this range; nothing refers to it once the last owner drops.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;

    #[test]
    fn ranges_outside_the_reservation_are_refused_not_mapped() {
        let host = HostRange::reserve(4 * PAGE_SIZE).unwrap();
        let image = Image::new(4 * PAGE_SIZE).unwrap();
        for (offset, len) in [(4 * PAGE_SIZE, PAGE_SIZE), (3 * PAGE_SIZE, 2 * PAGE_SIZE), (PAGE_SIZE, usize::MAX)] {
            assert!(
                matches!(host.map_file(offset, len, image.fd()), Err(MemoryError::OutOfBounds { .. })),
                "{offset:#x}+{len:#x}"
            );
            assert!(
                matches!(host.populate_write(offset, len), Err(MemoryError::OutOfBounds { .. })),
                "{offset:#x}+{len:#x}"
            );
        }
        assert!(matches!(host.map_file(100, PAGE_SIZE, image.fd()), Err(MemoryError::OutOfBounds { .. })), "unaligned");
        host.map_file(0, 4 * PAGE_SIZE, image.fd()).unwrap();
        host.populate_write(PAGE_SIZE + 1, PAGE_SIZE).unwrap();
    }
}
