//! `PinGuard`: a device's hold on guest pages for the life of one DMA.
//!
//! Pinning first makes the pages the VM's own (MADV_POPULATE_WRITE), so no later COW can move
//! the VM away from the page the device writes, and counts each page exactly. The guard keeps
//! its region's mapping alive, so it may outlive its `GuestRam` (rule 5): its writes then reach
//! no VM and no snapshot.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::pages::{page_span, PAGE_SIZE};
use crate::region::RamRegion;
use crate::MemoryError;

/// How a device uses pinned pages. `Write` implies read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

/// Pinned guest bytes; dropping the guard unpins them.
#[derive(Debug)]
pub struct PinGuard {
    region: Arc<RamRegion>,
    addr: GuestAddress,
    offset: usize,
    len: usize,
    access: Access,
}

impl PinGuard {
    /// Records the pin in the region's table. The caller has already populated the pages.
    pub(crate) fn new(region: Arc<RamRegion>, addr: GuestAddress, offset: usize, len: usize, access: Access) -> Self {
        let (first, count) = page_span(offset, len);
        region.pins.lock().unwrap_or_else(|e| e.into_inner()).add(first, count, access == Access::Write);
        PinGuard { region, addr, offset, len, access }
    }

    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn access(&self) -> Access {
        self.access
    }

    /// Host address of the pinned bytes, for handing to the kernel (io_uring, O_DIRECT).
    /// Stable while the guard lives; writes through it are counted dirty at unpin.
    pub fn host_ptr(&self) -> *mut u8 {
        // `GuestRam::pin` checked `offset..offset+len` against the region, which the guard
        // keeps mapped: an error here is a broken invariant, not bad input.
        self.region.host().checked_ptr(self.offset, self.len).expect("a pin lies inside its region")
    }

    /// A device's DMA write of `data` at `offset` into the pinned bytes.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        self.check(offset, data.len())?;
        if self.access != Access::Write {
            return Err(MemoryError::ReadOnlyPin { addr: self.addr.0, len: self.len });
        }
        #[cfg(feature = "planted-bugs")]
        if self.planted_write(offset, data)? {
            return Ok(());
        }
        let slice = self.region.slice(self.offset + offset, data.len())?;
        slice.write_slice(data, 0).map_err(|e| MemoryError::Access(self.addr.0 + offset as u64, e.into()))
    }

    /// Misroutes or hides a DMA write when a planted bug says so; true if it did the write.
    #[cfg(feature = "planted-bugs")]
    fn planted_write(&self, offset: usize, data: &[u8]) -> Result<bool, MemoryError> {
        use crate::planted::{active, PlantedBug};
        let at = self.offset + offset;
        for target in self.region.redirect.targets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            target.slice(at, data.len())?.copy_from(data);
        }
        if self.region.redirect.skip_own.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(true);
        }
        if active(PlantedBug::LostDirty) {
            let dst = self.region.host().checked_ptr(at, data.len())?;
            // SAFETY: `dst..dst+len` lies in the region's mapping (checked by `checked_ptr`),
            // which the guard keeps alive; `data` is our own slice.
            unsafe { libc::memcpy(dst.cast(), data.as_ptr().cast(), data.len()) };
            return Ok(true);
        }
        Ok(false)
    }

    /// A device's DMA read of `buf.len()` bytes at `offset` of the pinned bytes.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(offset, buf.len())?;
        let slice = self.region.slice(self.offset + offset, buf.len())?;
        slice.read_slice(buf, 0).map_err(|e| MemoryError::Access(self.addr.0 + offset as u64, e.into()))
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MemoryError::GuardOutOfRange { offset, len, pinned: self.len }),
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let (first, count) = page_span(self.offset, self.len);
        let write = self.access == Access::Write;
        #[cfg(feature = "planted-bugs")]
        let report = write && !crate::planted::active(crate::planted::PlantedBug::LostDirty);
        #[cfg(not(feature = "planted-bugs"))]
        let report = write;
        if report {
            // The kernel may have DMA'd into these pages behind our back (io_uring, O_DIRECT):
            // report them once more after the pin ends.
            use vm_memory::bitmap::Bitmap;
            self.region.host_dirty().mark_dirty(first * PAGE_SIZE, count * PAGE_SIZE);
        }
        self.region.pins.lock().unwrap_or_else(|e| e.into_inner()).remove(first, count, write);
    }
}
