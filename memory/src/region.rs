//! `RamRegion`: one region of guest RAM as vm-memory sees it.
//!
//! Host writes through vm-memory (`Bytes`, volatile slices, linux-loader, virtio-queue) mark the
//! region's `AtomicBitmap`; the RAM harvests it into its dirty and private sets.

use std::collections::BTreeMap;
use std::sync::Mutex;

use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::mmap::MmapRegion;
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{
    GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes, GuestRegionCollection, GuestUsize,
    MemoryRegionAddress,
};

use crate::mapping::HostRange;
use crate::pages::PAGE_SIZE;
use crate::MemoryError;

/// The vm-memory collection of a RAM's regions, which `GuestRam` looks addresses up in.
pub(crate) type GuestRegions = GuestRegionCollection<RamRegion>;

/// Per-page pin counts of one region, exact (rule 3).
#[derive(Debug, Default)]
pub(crate) struct PinTable {
    /// page index → (read pins, write pins)
    pages: BTreeMap<usize, (u32, u32)>,
}

impl PinTable {
    pub(crate) fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.pages.keys().copied()
    }

    pub(crate) fn count(&self) -> usize {
        self.pages.len()
    }

    pub(crate) fn add(&mut self, first: usize, count: usize, write: bool) {
        for page in first..first + count {
            let entry = self.pages.entry(page).or_default();
            if write {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
    }

    pub(crate) fn remove(&mut self, first: usize, count: usize, write: bool) {
        for page in first..first + count {
            if let Some(entry) = self.pages.get_mut(&page) {
                let slot = if write { &mut entry.1 } else { &mut entry.0 };
                *slot = slot.saturating_sub(1);
                if *entry == (0, 0) {
                    self.pages.remove(&page);
                }
            }
        }
    }
}

/// One contiguous region of guest RAM at a fixed host address, as vm-memory sees it (the
/// region type of `GuestRam`'s `GuestMemoryBackend`).
#[derive(Debug)]
pub struct RamRegion {
    guest_base: GuestAddress,
    // Drop order: the vm-memory view first, then the reservation it points into.
    mmap: MmapRegion<AtomicBitmap>,
    host: HostRange,
    pub(crate) pins: Mutex<PinTable>,
    #[cfg(feature = "planted-bugs")]
    pub(crate) redirect: planted::DmaRedirect,
}

impl RamRegion {
    pub(crate) fn new(guest_base: GuestAddress, host: HostRange) -> Result<RamRegion, MemoryError> {
        // SAFETY: `host` is a live mapping of exactly this size, owned by the region and
        // outliving `mmap` (field order), so the raw view never dangles.
        let mmap = unsafe {
            MmapRegion::build_raw(host.as_ptr(), host.len(), libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE)
        }
        .map_err(|e| MemoryError::Os { op: "mmap view", len: host.len(), source: std::io::Error::other(e) })?;
        Ok(RamRegion {
            guest_base,
            mmap,
            host,
            pins: Mutex::new(PinTable::default()),
            #[cfg(feature = "planted-bugs")]
            redirect: Default::default(),
        })
    }

    pub(crate) fn host(&self) -> &HostRange {
        &self.host
    }

    /// Number of 4 KiB pages.
    pub(crate) fn pages(&self) -> usize {
        self.host.len() / PAGE_SIZE
    }

    /// Host address of the region's first byte (stable for the region's life).
    pub(crate) fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// The host-write bitmap; harvesting it atomically swaps each word to zero.
    pub(crate) fn host_dirty(&self) -> &AtomicBitmap {
        self.mmap.bitmap()
    }

    /// Volatile access to `len` bytes at region offset `offset`, marking the bitmap on write.
    pub(crate) fn slice(
        &self,
        offset: usize,
        len: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, AtomicBitmap>>, MemoryError> {
        self.get_slice(MemoryRegionAddress(offset as u64), len)
            .map_err(|e| MemoryError::Access(self.guest_base.0 + offset as u64, e))
    }
}

impl GuestMemoryRegion for RamRegion {
    type B = AtomicBitmap;

    fn len(&self) -> GuestUsize {
        self.host.len() as GuestUsize
    }

    fn start_addr(&self) -> GuestAddress {
        self.guest_base
    }

    fn bitmap(&self) -> BS<'_, AtomicBitmap> {
        use vm_memory::bitmap::Bitmap;
        self.mmap.bitmap().slice_at(0)
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> vm_memory::guest_memory::Result<*mut u8> {
        self.check_address(addr)
            .ok_or(GuestMemoryError::InvalidBackendAddress)
            // SAFETY: check_address proved the offset lies inside the mapping.
            .map(|a| unsafe { self.host.as_ptr().add(a.0 as usize) })
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, AtomicBitmap>>> {
        use vm_memory::VolatileMemory;
        Ok(self.mmap.get_slice(offset.0 as usize, count)?)
    }
}

impl GuestMemoryRegionBytes for RamRegion {}

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

/// How a region mis-routes guard writes when a bug is planted (feature `planted-bugs`).
#[cfg(feature = "planted-bugs")]
pub(crate) mod planted {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use super::RamRegion;
    use crate::planted::{active, PlantedBug};

    /// Where guard writes of a region go besides (or instead of) the region itself.
    #[derive(Debug, Default)]
    pub(crate) struct DmaRedirect {
        pub targets: Mutex<Vec<Arc<RamRegion>>>,
        pub skip_own: std::sync::atomic::AtomicBool,
    }

    /// After `source` was cloned into `clone`, mis-route its pinned pages as the active bug says.
    pub(crate) fn after_clone(source: &[Arc<RamRegion>], clone: &[Arc<RamRegion>]) {
        let wrong_way = active(PlantedBug::WrongWayCow);
        if !(wrong_way || active(PlantedBug::SharedPin)) {
            return;
        }
        for (src, dst) in source.iter().zip(clone) {
            if src.pins.lock().unwrap_or_else(|e| e.into_inner()).count() == 0 {
                continue;
            }
            src.redirect.targets.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(dst));
            if wrong_way {
                src.redirect.skip_own.store(true, Ordering::SeqCst);
            }
        }
    }
}
