//! Memory and cost accounting, cheap enough for every VM of a process on every request.
//!
//! Page counts come from the kernel's page tables, one region at a time: PAGEMAP_SCAN (Linux
//! 6.7+) returns the runs of present pages of a range with their categories, so a RAM costs
//! O(its populated page tables), whatever else the process maps. `/proc/self/smaps` (what this
//! used before) costs O(every mapping of the process) per call: quadratic over many VMs.
//! Kernels without PAGEMAP_SCAN get the same counts from `/proc/self/pagemap` (O(pages)).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::pages::PAGE_SIZE;
use crate::region::RamRegion;
use crate::MemoryError;

/// What one RAM costs and what its clones have cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Bytes of this VM's own pages (its COW copies and pinned pages): anonymous pages in its
    /// mapping, present or swapped.
    pub private_bytes: u64,
    /// Bytes mapped from frozen images (page cache other VMs and snapshots may share).
    pub shared_bytes: u64,
    /// Pages pinned right now.
    pub pinned_pages: u64,
    /// Pages copied eagerly into clones because they were pinned at the clone instant.
    pub eager_copied_pages: u64,
    /// Freezes that wrote into an image this RAM owned alone.
    pub folds: u64,
    /// Layer images written because the stack was shared.
    pub layers: u64,
    /// Stacks flattened into a full image to bound the number of mappings.
    pub flattens: u64,
    /// Mappings (VMAs) the RAM occupies: one per stretch of pages from one image.
    pub mappings: u64,
}

/// Pages of one host range by owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageCounts {
    /// Anonymous pages (present or swapped): the VM's own.
    pub private: u64,
    /// Present pages of a file (an image's page cache).
    pub shared: u64,
}

/// A RAM's page counts, kept from one `GuestRam::stats` to the next while nothing could have
/// changed them, so that listing 1,000 paused VMs does not walk 1,000 VMs' page tables
/// (16 M page-table entries for 64 MiB clones: 60-120 ms here). A RAM gains anonymous pages
/// only by a write into it: a vCPU's (only while its vCPUs run: the VMM says when they stop
/// and start), a host writer's through vm-memory (which sets a bit in the host-write bitmap,
/// and bits only accumulate until a harvest), or a pin's, reset's or harvest's (each bumps
/// `generation`). The counts are reused only if the vCPUs stayed stopped, the generation is
/// the same and the host-write bitmap holds as many bits as at the scan. Present page-cache
/// pages (`shared`) can still drop by reclaim meanwhile: that figure is as of the last scan.
#[derive(Debug, Default)]
pub(crate) struct QuietCounts {
    generation: AtomicU64,
    vcpus_stopped: AtomicBool,
    /// (generation, host-write bits, counts per region) of the last scan made while quiet.
    cached: Mutex<Option<(u64, u64, Vec<PageCounts>)>>,
}

impl QuietCounts {
    /// Something may have changed the RAM's pages (pin, reset, harvest).
    pub(crate) fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn set_vcpus_stopped(&self, stopped: bool) {
        self.bump();
        self.vcpus_stopped.store(stopped, Ordering::SeqCst);
    }

    /// The page counts of each of `regions`, reused from the last call if quiet since.
    pub(crate) fn counts(&self, regions: &[Arc<RamRegion>]) -> Vec<PageCounts> {
        let generation = self.generation.load(Ordering::SeqCst);
        let quiet = self.vcpus_stopped.load(Ordering::SeqCst);
        // Only while quiet are the counts reused, so only then are the host-write bits needed.
        // A copy of each bitmap: vm-memory reads its words only by resetting them.
        let host_bits = quiet.then(|| {
            regions
                .iter()
                .map(|r| r.host_dirty().clone().get_and_reset().iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
                .sum::<u64>()
        });
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(bits_now), Some((g, bits, counts))) = (host_bits, cached.as_ref()) {
            if *g == generation && *bits == bits_now {
                return counts.clone();
            }
        }
        // A region the kernel cannot scan is reported with no pages rather than failing the
        // whole request; it can only happen without /proc.
        let counts: Vec<PageCounts> =
            regions.iter().map(|r| count_pages(r.host_addr(), r.pages() * PAGE_SIZE).unwrap_or_default()).collect();
        // Kept only if nothing started meanwhile (a resume bumps the generation).
        *cached = host_bits
            .filter(|_| self.generation.load(Ordering::SeqCst) == generation)
            .map(|bits| (generation, bits, counts.clone()));
        counts
    }
}

/// `<linux/fs.h>` PAGEMAP_SCAN: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `/proc/self/pagemap`, opened once per process.
fn pagemap() -> Result<&'static File, MemoryError> {
    static PAGEMAP: OnceLock<File> = OnceLock::new();
    if let Some(file) = PAGEMAP.get() {
        return Ok(file);
    }
    let file = File::open("/proc/self/pagemap").map_err(|e| MemoryError::os_error("open /proc/self/pagemap", 0, e))?;
    Ok(PAGEMAP.get_or_init(|| file))
}

/// Counts the pages of `len` bytes at host address `start` by owner.
pub(crate) fn count_pages(start: u64, len: usize) -> Result<PageCounts, MemoryError> {
    match scan_pages(start, len) {
        Err(MemoryError::Os { source, .. }) if matches!(source.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            read_pagemap(start, len)
        }
        counts => counts,
    }
}

/// PAGEMAP_SCAN over the range: the kernel returns runs of pages with equal categories.
fn scan_pages(start: u64, len: usize) -> Result<PageCounts, MemoryError> {
    let fd = pagemap()?.as_raw_fd();
    let end = start + len as u64;
    let mut regions = [PageRegion::default(); 256];
    let mut counts = PageCounts::default();
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE | PAGE_IS_PFNZERO,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `size` says so, and `vec`/`vec_len`
        // describe our own `regions` array, the only memory the kernel writes besides `arg`.
        let n = unsafe { libc::ioctl(fd, PAGEMAP_SCAN, &mut arg) };
        let n = usize::try_from(n).map_err(|_| MemoryError::os("ioctl(PAGEMAP_SCAN)", len))?;
        for region in &regions[..n.min(regions.len())] {
            let pages = (region.end - region.start) / PAGE_SIZE as u64;
            if region.categories & PAGE_IS_FILE != 0 {
                counts.shared += pages;
            } else if region.categories & PAGE_IS_PFNZERO == 0 {
                counts.private += pages;
            }
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(counts)
}

/// The same counts from `/proc/self/pagemap`'s 64-bit entry per page (bit 63 present, 62
/// swapped, 61 file page or shared anonymous).
fn read_pagemap(start: u64, len: usize) -> Result<PageCounts, MemoryError> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let file = pagemap()?;
    let mut counts = PageCounts::default();
    let pages = len / PAGE_SIZE;
    let mut buf = vec![0u8; 8 * 4096];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(buf.len() / 8);
        let offset = (start / PAGE_SIZE as u64 + done as u64) * 8;
        file.read_exact_at(&mut buf[..n * 8], offset)
            .map_err(|e| MemoryError::os_error("read /proc/self/pagemap", len, e))?;
        for entry in buf[..n * 8].chunks_exact(8).map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes"))) {
            if entry & FILE == 0 && entry & (PRESENT | SWAPPED) != 0 {
                counts.private += 1;
            } else if entry & FILE != 0 && entry & PRESENT != 0 {
                counts.shared += 1;
            }
        }
        done += n;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private file mapping of a memfd: `read` pages read (shared), `written` pages written
    /// (private, COW copies).
    fn mapping(pages: usize, read: std::ops::Range<usize>, written: std::ops::Range<usize>) -> (*mut u8, File) {
        // SAFETY: a valid C string; the fd is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"stats-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len((pages * PAGE_SIZE) as u64).unwrap();
        file.write_all_at(&vec![1u8; pages * PAGE_SIZE], 0).unwrap();
        let len = pages * PAGE_SIZE;
        // SAFETY: a new private mapping of our memfd at a kernel-chosen address.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, fd, 0)
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let base: *mut u8 = addr.cast();
        for page in read {
            // SAFETY: inside the mapping we just made.
            unsafe { std::ptr::read_volatile(base.add(page * PAGE_SIZE)) };
        }
        for page in written {
            // SAFETY: inside the mapping we just made, mapped read-write.
            unsafe { std::ptr::write_volatile(base.add(page * PAGE_SIZE), 2) };
        }
        (base, file)
    }

    #[test]
    fn scan_and_pagemap_agree_on_private_and_shared_pages() {
        let pages = 256;
        let (base, _file) = mapping(pages, 0..64, 100..110);
        let scanned = scan_pages(base as u64, pages * PAGE_SIZE).unwrap();
        let read = read_pagemap(base as u64, pages * PAGE_SIZE).unwrap();
        assert_eq!(scanned, read);
        assert_eq!(scanned.private, 10, "the written pages are COW copies");
        // Read faults map around them (fault-around), so at least the pages read are shared.
        assert!(scanned.shared >= 64, "{scanned:?}");
        // SAFETY: unmapping the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(base.cast(), pages * PAGE_SIZE) };
    }
}
