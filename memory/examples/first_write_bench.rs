//! The first write into a page of a clone: `cargo run --release -p zygote-memory --example first_write_bench`.
//!
//! A clone's page is the frozen image's page, mapped MAP_PRIVATE: its first write is a kernel
//! COW fault (allocate a page, copy 4 KiB from the image's page cache). The reference is the
//! cheapest fault there is, measured in the same run: the first write into a page of a fresh
//! private anonymous mapping (allocate a zeroed page; 4 KiB pages, no THP). Rounds alternate
//! the two; each writes one word into every page of 64 MiB, through the host address a vCPU
//! or a device writes through. Also measured, for information:
//! - a clone's page read first, then written (the read maps the image's page, fault-around
//!   maps its neighbours; the write then copies it);
//! - the first write into a fresh `GuestRam` (a memfd hole: the kernel fills the memfd page,
//!   then copies it).
//!
//! Prints one JSON object (median ns per page over the rounds).

use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress, GuestRam, PAGE_SIZE};

const SIZE: usize = 64 << 20;
const ROUNDS: usize = 9;

fn main() {
    let source = GuestRam::new(&[(GuestAddress(0), SIZE)]).expect("RAM");
    let data: Vec<u8> = (0..SIZE).map(|i| (i / PAGE_SIZE) as u8).collect();
    source.write_slice(&data, GuestAddress(0)).expect("populate");
    let (mut clone, mut anon, mut read_then_write, mut fresh) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let ram = source.clone_cow().expect("clone");
        clone.push(touch_every_page(host_addr(&ram), false));
        anon.push(anonymous_first_writes());
        let ram = source.clone_cow().expect("clone");
        read_then_write.push(touch_every_page(host_addr(&ram), true));
        let ram = GuestRam::new(&[(GuestAddress(0), SIZE)]).expect("fresh RAM");
        fresh.push(touch_every_page(host_addr(&ram), false));
    }
    let pages = (SIZE / PAGE_SIZE) as f64;
    let ns = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e9 / pages
    };
    let (clone, anon, read_then_write, fresh) =
        (ns(&mut clone), ns(&mut anon), ns(&mut read_then_write), ns(&mut fresh));
    println!(
        "{{\"pages\":{pages},\"clone_first_write_ns\":{clone:.0},\"anon_fault_ns\":{anon:.0},\"first_write_vs_anon_fault\":{:.2},\
         \"clone_read_then_write_ns\":{read_then_write:.0},\"fresh_ram_first_write_ns\":{fresh:.0}}}",
        clone / anon
    );
}

fn host_addr(ram: &GuestRam) -> *mut u8 {
    ram.kvm_regions()[0].userspace_addr as *mut u8
}

/// Writes one word into every page of the SIZE bytes at `base` (reading each first if
/// `read_first`), timed.
fn touch_every_page(base: *mut u8, read_first: bool) -> Duration {
    let start = Instant::now();
    for offset in (0..SIZE).step_by(PAGE_SIZE) {
        // SAFETY: `base` is the host address of a live RAM region of SIZE bytes, mapped
        // read-write, that nothing else uses while the bench runs.
        unsafe {
            let word = base.add(offset).cast::<u64>();
            let value = if read_first { std::ptr::read_volatile(word) } else { 0 };
            std::ptr::write_volatile(word, value + 1);
        }
    }
    start.elapsed()
}

/// The reference: first writes into a fresh private anonymous mapping, 4 KiB pages.
fn anonymous_first_writes() -> Duration {
    // SAFETY: a new private anonymous mapping at a kernel-chosen address; checked below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap");
    // SAFETY: advice on the mapping made above.
    assert_eq!(unsafe { libc::madvise(addr, SIZE, libc::MADV_NOHUGEPAGE) }, 0, "madvise");
    let took = touch_every_page(addr.cast(), false);
    // SAFETY: unmapping the mapping made above, which nothing refers to any more.
    unsafe { libc::munmap(addr, SIZE) };
    took
}
