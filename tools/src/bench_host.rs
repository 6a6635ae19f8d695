//! Host-side references and the first-write benchmark: `fork()` of this process, and the first
//! guest write into a page of a clone against the kernel's cheapest fault.
//!
//! A clone's page is the frozen image's page, mapped MAP_PRIVATE: its first write is a kernel
//! COW fault (allocate a page, copy 4 KiB from the image's page cache). The reference is the
//! cheapest fault there is, measured in the same run: the first write into a page of a fresh
//! private anonymous mapping (allocate a zeroed page; 4 KiB pages, no THP). Rounds alternate
//! the two; each writes one word into every page of the RAM, through the host address a vCPU
//! or a device writes through. Also measured, for information: a clone's page read first, then
//! written (the read maps the image's page, fault-around maps its neighbours; the write copies
//! it), and the first write into a fresh `GuestRam` (a memfd hole).

use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress, GuestRam, MemoryError, PAGE_SIZE};
use serde::Serialize;

/// What failed while measuring on the host.
#[derive(Debug, thiserror::Error)]
pub enum HostBenchError {
    #[error("cannot make the {mib} MiB RAM")]
    Ram {
        mib: usize,
        #[source]
        source: MemoryError,
    },
    #[error("cannot fill the source RAM")]
    Fill(#[source] vm_memory::GuestMemoryError),
    #[error("{call} failed")]
    Os {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The first write into a clone's page against an anonymous-page fault, ns per page (medians).
#[derive(Clone, Debug, Serialize)]
pub struct FirstWriteBench {
    pub pages: usize,
    pub clone_first_write_ns: f64,
    pub anon_fault_ns: f64,
    pub first_write_vs_anon_fault: f64,
    pub clone_read_then_write_ns: f64,
    pub fresh_ram_first_write_ns: f64,
}

/// Runs `rounds` rounds over a RAM of `mib` MiB.
pub fn bench_first_write(mib: usize, rounds: usize) -> Result<FirstWriteBench, HostBenchError> {
    let size = mib << 20;
    let new_ram = || GuestRam::new(&[(GuestAddress(0), size)]).map_err(|source| HostBenchError::Ram { mib, source });
    let source = new_ram()?;
    let data: Vec<u8> = (0..size).map(|i| (i / PAGE_SIZE) as u8).collect();
    source.write_slice(&data, GuestAddress(0)).map_err(HostBenchError::Fill)?;
    let clone_ram = || source.clone_cow().map_err(|source| HostBenchError::Ram { mib, source });
    let (mut clone, mut anon, mut read_then_write, mut fresh) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let ram = clone_ram()?;
        clone.push(touch_every_page(host_addr(&ram), size, false));
        anon.push(anonymous_first_writes(size)?);
        let ram = clone_ram()?;
        read_then_write.push(touch_every_page(host_addr(&ram), size, true));
        let ram = new_ram()?;
        fresh.push(touch_every_page(host_addr(&ram), size, false));
    }
    let pages = size / PAGE_SIZE;
    let ns = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e9 / pages as f64
    };
    let (clone, anon) = (ns(&mut clone), ns(&mut anon));
    Ok(FirstWriteBench {
        pages,
        clone_first_write_ns: clone,
        anon_fault_ns: anon,
        first_write_vs_anon_fault: clone / anon,
        clone_read_then_write_ns: ns(&mut read_then_write),
        fresh_ram_first_write_ns: ns(&mut fresh),
    })
}

fn host_addr(ram: &GuestRam) -> *mut u8 {
    ram.kvm_regions()[0].userspace_addr as *mut u8
}

/// Writes one word into every page of the `size` bytes at `base` (reading each first if
/// `read_first`), timed. `base` is always a live mapping of `size` bytes made by the caller.
fn touch_every_page(base: *mut u8, size: usize, read_first: bool) -> Duration {
    let start = Instant::now();
    for offset in (0..size).step_by(PAGE_SIZE) {
        // SAFETY: `base` is the host address of a live read-write mapping of `size` bytes (a RAM
        // region or the anonymous mapping below) that nothing else uses while the bench runs.
        unsafe {
            let word = base.add(offset).cast::<u64>();
            let value = if read_first { std::ptr::read_volatile(word) } else { 0 };
            std::ptr::write_volatile(word, value.wrapping_add(1));
        }
    }
    start.elapsed()
}

/// The reference: first writes into a fresh private anonymous mapping, 4 KiB pages.
fn anonymous_first_writes(size: usize) -> Result<Duration, HostBenchError> {
    let os = |call| HostBenchError::Os { call, source: std::io::Error::last_os_error() };
    // SAFETY: a new private anonymous mapping at a kernel-chosen address; checked below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(os("mmap"));
    }
    // SAFETY: advice on the mapping made above.
    let advised = unsafe { libc::madvise(addr, size, libc::MADV_NOHUGEPAGE) } == 0;
    let result = if advised { Ok(touch_every_page(addr.cast(), size, false)) } else { Err(os("madvise")) };
    // SAFETY: unmapping the mapping made above, which nothing refers to any more.
    unsafe { libc::munmap(addr, size) };
    result
}

/// `rounds` `fork()`s of this process while it holds `mib` MiB of populated private anonymous
/// memory: the cost of cloning a VM whose RAM lives in ordinary process memory by fork(), the
/// reference a clone's pause is compared with. Sorted, µs.
pub fn fork_with_populated(mib: usize, rounds: usize) -> Result<Vec<f64>, HostBenchError> {
    let size = mib << 20;
    // SAFETY: a new private anonymous mapping at a kernel-chosen address; checked below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(HostBenchError::Os { call: "mmap", source: std::io::Error::last_os_error() });
    }
    touch_every_page(addr.cast(), size, false);
    let times: Result<Vec<f64>, _> = (0..rounds.max(1)).map(|_| fork_time().map(|d| d.as_secs_f64() * 1e6)).collect();
    // SAFETY: unmapping the mapping made above, which nothing refers to any more.
    unsafe { libc::munmap(addr, size) };
    let mut times = times?;
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// One `fork()` of this process, the child exiting at once: the time until `fork` returned in
/// the parent (the child is reaped untimed).
pub fn fork_time() -> Result<Duration, HostBenchError> {
    let start = Instant::now();
    // SAFETY: the child only calls _exit, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: terminating the child without running any Rust code.
        unsafe { libc::_exit(0) };
    }
    let took = start.elapsed();
    if pid < 0 {
        return Err(HostBenchError::Os { call: "fork", source: std::io::Error::last_os_error() });
    }
    let mut status = 0;
    // SAFETY: waiting for our own child, with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_write_bench_measures_every_page_and_fork_returns() {
        let r = bench_first_write(1, 1).unwrap();
        assert_eq!(r.pages, 256);
        assert!(r.clone_first_write_ns > 0.0 && r.anon_fault_ns > 0.0);
        assert!(fork_time().unwrap() > Duration::ZERO);
        assert_eq!(fork_with_populated(1, 3).unwrap().len(), 3);
    }
}
