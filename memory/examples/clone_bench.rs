//! Clone-cost benchmark: `cargo run --release -p zygote-memory --example clone_bench`.
//!
//! Absolute times on a nested-PVM host are not hardware times, so every figure is also given
//! as a ratio to a reference measured in the same run:
//! 1. a fully populated 1 GiB RAM, 1 % of it dirtied since its last freeze (in runs of 16
//!    pages) and 64 pages pinned: `clone_cow` time ÷ `fork()` time of this same process;
//! 2. the same dirty and pinned set in a 1 GiB and an 8 GiB RAM: clone time ratio.

use std::time::{Duration, Instant};

use memory::{Access, Bytes, GuestAddress, GuestRam, PinGuard, PAGE_SIZE};

const GIB: usize = 1 << 30;
const RUN: usize = 16;
const ROUNDS: usize = 15;

fn main() {
    let pages = GIB / PAGE_SIZE;
    let runs = dirty_runs(pages / 100 / RUN, pages);
    println!("dirty set: {} pages in {} runs of {RUN}; 64 pinned pages", runs.len() * RUN, runs.len());

    let ram = GuestRam::new(&[(GuestAddress(0), GIB)]).expect("1 GiB RAM");
    populate(&ram);
    let _pins = pin_64(&ram);
    drop(ram.snapshot().expect("first freeze")); // everything up to now is in the base image
    let fork = median(ROUNDS, time_fork);
    let _anchor = ram.clone_cow().expect("anchor clone"); // keeps the base shared: layer path
    let layered = time_clones(&ram, &runs);
    drop(_anchor);
    let folded = time_clones(&ram, &runs);
    let s = ram.stats();
    println!("fork() of this process (1 GiB populated): {}", us(fork));
    println!("clone, base shared (new layer):  {}  = {:.3} × fork", us(layered), ratio(layered, fork));
    println!("clone, sole owner (fold in place): {}  = {:.3} × fork", us(folded), ratio(folded, fork));
    println!(
        "source stats: eager_copied_pages {} folds {} layers {} flattens {} private {} MiB pss {} MiB",
        s.eager_copied_pages,
        s.folds,
        s.layers,
        s.flattens,
        s.private_bytes >> 20,
        s.pss_bytes >> 20
    );
    drop(ram);

    let mut at = Vec::new();
    for size in [GIB, 8 * GIB] {
        let ram = GuestRam::new(&[(GuestAddress(0), size)]).expect("RAM");
        let _pins = pin_64(&ram);
        let _anchor = ram.clone_cow().expect("anchor clone");
        at.push(time_clones(&ram, &runs));
    }
    println!("clone with the same dirty set: 1 GiB {}  8 GiB {}  ratio 8/1 = {:.2}", us(at[0]), us(at[1]), ratio(at[1], at[0]));
}

/// `count` runs of RUN pages, spread evenly with a fixed pseudo-random jitter.
fn dirty_runs(count: usize, pages: usize) -> Vec<usize> {
    let stride = pages / count;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    (0..count)
        .map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            i * stride + (seed as usize % (stride - RUN))
        })
        .collect()
}

fn populate(ram: &GuestRam) {
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..GIB).step_by(chunk.len()) {
        ram.write_slice(&chunk, GuestAddress(off as u64)).expect("populate");
    }
}

fn pin_64(ram: &GuestRam) -> Vec<PinGuard> {
    (0..64).map(|i| ram.pin(GuestAddress((i * 977 * PAGE_SIZE) as u64), PAGE_SIZE, Access::Write).expect("pin")).collect()
}

/// Median time of `clone_cow` after dirtying `runs`; each clone is dropped after timing.
fn time_clones(ram: &GuestRam, runs: &[usize]) -> Duration {
    let mut round = 0u8;
    median(ROUNDS, || {
        round = round.wrapping_add(1);
        let data = vec![round; RUN * PAGE_SIZE];
        for &first in runs {
            ram.write_slice(&data, GuestAddress((first * PAGE_SIZE) as u64)).expect("dirty");
        }
        let start = Instant::now();
        let clone = ram.clone_cow().expect("clone");
        let took = start.elapsed();
        drop(clone);
        took
    })
}

fn time_fork() -> Duration {
    let start = Instant::now();
    // SAFETY: the child only calls _exit, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: terminating the child without running any Rust code.
        unsafe { libc::_exit(0) };
    }
    let took = start.elapsed();
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    took
}

fn median(rounds: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut v: Vec<Duration> = (0..rounds).map(|_| f()).collect();
    v.sort();
    v[rounds / 2]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
