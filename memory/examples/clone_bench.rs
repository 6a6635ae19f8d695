//! Clone-cost benchmark: `cargo run --release -p zygote-memory --example clone_bench`.
//!
//! Absolute times on a nested-PVM host are not hardware times, so every figure is also given
//! as a ratio to a reference measured in the same run:
//! 1. a fully populated 1 GiB RAM, 1 % of it dirtied since its last freeze (in runs of 16
//!    pages) and 64 pages pinned: `clone_cow` time ÷ `fork()` time of this same process;
//! 2. the same with one pre-copy round before each clone (`GuestRam::precopy`, the VM still
//!    running): what is left for the clone, which is what a VM clone's pause pays;
//! 3. the same dirty and pinned set in a 1 GiB and an 8 GiB RAM: clone time ratio.

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
                                                 // Rounds alternate the reference and the measurement, so both see the same host load.
    let anchor = ram.clone_cow().expect("anchor clone"); // keeps the base shared: layer path
    let (fork, layered) = alternate(time_fork, || time_clone(&ram, &runs));
    drop(anchor);
    let (fork2, folded) = alternate(time_fork, || time_clone(&ram, &runs));
    let mut precopy = Vec::new();
    let (fork3, after_precopy) = alternate(time_fork, || {
        let (took, round) = time_clone_after_precopy(&ram, &runs);
        precopy.push(round);
        took
    });
    precopy.sort();
    let s = ram.stats();
    println!("fork() of this process (1 GiB populated): {} / {}", us(fork), us(fork2));
    println!("clone, base shared (new layer):  {}  = {:.3} × fork", us(layered), ratio(layered, fork));
    println!("clone, sole owner (fold in place): {}  = {:.3} × fork", us(folded), ratio(folded, fork2));
    println!(
        "clone, sole owner, after a pre-copy round: {}  = {:.3} × fork (the round, VM running: {})",
        us(after_precopy),
        ratio(after_precopy, fork3),
        us(precopy[precopy.len() / 2])
    );
    println!(
        "source stats: eager_copied_pages {} folds {} layers {} flattens {} private {} MiB shared {} MiB",
        s.eager_copied_pages,
        s.folds,
        s.layers,
        s.flattens,
        s.private_bytes >> 20,
        s.shared_bytes >> 20
    );
    drop(ram);

    let rams: Vec<GuestRam> =
        [GIB, 8 * GIB].iter().map(|&size| GuestRam::new(&[(GuestAddress(0), size)]).expect("RAM")).collect();
    let _pins: Vec<_> = rams.iter().map(pin_64).collect();
    let _anchors: Vec<_> = rams.iter().map(|r| r.clone_cow().expect("anchor clone")).collect();
    let (one, eight) = alternate(|| time_clone(&rams[0], &runs), || time_clone(&rams[1], &runs));
    println!(
        "clone with the same dirty set: 1 GiB {}  8 GiB {}  ratio 8/1 = {:.2}",
        us(one),
        us(eight),
        ratio(eight, one)
    );
}

/// Medians of `a` and `b` over ROUNDS rounds that run one of each.
fn alternate(mut a: impl FnMut() -> Duration, mut b: impl FnMut() -> Duration) -> (Duration, Duration) {
    let (mut xs, mut ys): (Vec<_>, Vec<_>) = (0..ROUNDS).map(|_| (a(), b())).unzip();
    xs.sort();
    ys.sort();
    (xs[ROUNDS / 2], ys[ROUNDS / 2])
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
    (0..64)
        .map(|i| ram.pin(GuestAddress((i * 977 * PAGE_SIZE) as u64), PAGE_SIZE, Access::Write).expect("pin"))
        .collect()
}

/// Time of one `clone_cow` after dirtying `runs` with fresh bytes; the clone is dropped untimed.
fn time_clone(ram: &GuestRam, runs: &[usize]) -> Duration {
    static ROUND: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let data = vec![ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed); RUN * PAGE_SIZE];
    for &first in runs {
        ram.write_slice(&data, GuestAddress((first * PAGE_SIZE) as u64)).expect("dirty");
    }
    let start = Instant::now();
    let clone = ram.clone_cow().expect("clone");
    let took = start.elapsed();
    drop(clone);
    took
}

/// Like `time_clone`, with one pre-copy round between the writes and the timed clone;
/// returns (clone time, pre-copy time).
fn time_clone_after_precopy(ram: &GuestRam, runs: &[usize]) -> (Duration, Duration) {
    let data = vec![0xc3u8; RUN * PAGE_SIZE];
    for &first in runs {
        ram.write_slice(&data, GuestAddress((first * PAGE_SIZE) as u64)).expect("dirty");
    }
    let start = Instant::now();
    ram.precopy().expect("pre-copy");
    let round = start.elapsed();
    let start = Instant::now();
    let clone = ram.clone_cow().expect("clone");
    let took = start.elapsed();
    drop(clone);
    (took, round)
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

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
