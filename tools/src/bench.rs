//! Benchmarks behind `zygote bench`: reset rate and cost against its floor, and the source's
//! pause time when cloning a big VM with some of its RAM dirty. Tests assert behaviour only;
//! numbers come from here.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use memory::{Bytes, GuestAddress, PAGE_SIZE};
use serde::Serialize;

use vmm::builder::{build_bare_vcpu, build_tiny_vm, BuildError, VmConfig};
use vmm::clone::{clone_vm_by, CloneError, ClonePath, CloneReport};
use vmm::device_manager::Console;
use vmm::guests;
use vmm::layout::{COUNTERS_ADDR, TOUCH_ADDR, VM_ID_ADDR};
use vmm::machine::{VmOutcome, VmmError};
use vmm::regs::EntryArgs;
use vmm::snapshot::{VmSnapshot, VmSnapshotError};

/// What failed while benchmarking.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot build the benchmark VM")]
    Build(#[from] BuildError),
    #[error("cannot pause the benchmark VM")]
    Pause(#[from] VmmError),
    #[error("reset failed")]
    Reset(#[from] VmSnapshotError),
    #[error("clone failed")]
    Clone(#[from] CloneError),
    #[error("the guest did not {what} (outcome {outcome})")]
    Guest { what: &'static str, outcome: String },
    #[error("KVM_RUN of the round-trip probe failed")]
    Run(#[source] kvm_ioctls::Error),
    #[error("cannot create the scratch disk {path}")]
    Disk {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{mem_mib} MiB is too small for {pages} dirty pages above {TOUCH_ADDR:#x}")]
    TooSmall { mem_mib: u64, pages: u64 },
}

/// `zygote bench reset`.
#[derive(Clone, Debug, Serialize)]
pub struct ResetBench {
    pub rounds: usize,
    /// Whole fuzzing-loop iterations (run the guest, pause, reset) per second.
    pub loops_per_s: f64,
    pub reset_us_p50: f64,
    pub reset_us_p99: f64,
    /// Medians of the two parts of a reset: RAM copy-back, and vCPU/device/clock state.
    pub reset_ram_us_p50: f64,
    pub reset_state_us_p50: f64,
    /// Pages the guest dirtied per round (its 16 plus whatever else it touched).
    pub dirty_pages: usize,
    /// memcpy of that many pages, measured here.
    pub memcpy_us: f64,
    /// One KVM_RUN round trip (an I/O exit), median, measured here.
    pub kvm_run_us: f64,
    /// reset p50 ÷ (memcpy of the dirty pages + one KVM_RUN).
    pub ratio: f64,
    /// Every reset, in µs, sorted (for the report's distribution; not in the JSON).
    #[serde(skip)]
    pub samples_us: Vec<f64>,
}

/// `zygote bench clone`.
#[derive(Clone, Debug, Serialize)]
pub struct CloneBench {
    pub mem_mib: u64,
    /// Clones per path.
    pub clones: usize,
    /// Pages the source guest rewrites between two clones.
    pub dirty_pages: u64,
    /// One entry per path measured; the clones alternate between them, so each sees the same
    /// host load.
    pub paths: Vec<PathBench>,
    /// Pause p50 of the pre-copy path ÷ that of the in-pause reference, if both ran.
    pub pause_p50_ratio: Option<f64>,
}

/// Medians (and the pause's p99) of one clone path's `CloneReport`s.
#[derive(Clone, Debug, Serialize)]
pub struct PathBench {
    pub path: ClonePath,
    pub pause_us_p50: u64,
    pub pause_us_p99: u64,
    pub pause_wait_us_p50: u64,
    pub capture_us_p50: u64,
    pub dirty_log_us_p50: u64,
    pub freeze_write_us_p50: u64,
    pub freeze_pages_p50: u64,
    pub map_us_p50: u64,
    pub resume_us_p50: u64,
    pub precopy_us_p50: u64,
    pub precopy_rounds_p50: u64,
    pub precopy_pages_p50: u64,
    pub build_us_p50: u64,
    /// Every clone's source pause, in µs, sorted (for the report's distribution; not in the JSON).
    #[serde(skip)]
    pub pause_samples_us: Vec<u64>,
}

impl PathBench {
    fn from_reports(path: ClonePath, reports: &[CloneReport]) -> PathBench {
        let p50 = |f: fn(&CloneReport) -> u64| percentile(&sorted(reports, f), 50);
        PathBench {
            path,
            pause_us_p50: p50(|r| r.pause_us),
            pause_us_p99: percentile(&sorted(reports, |r| r.pause_us), 99),
            pause_wait_us_p50: p50(|r| r.pause_wait_us),
            capture_us_p50: p50(|r| r.capture_us),
            dirty_log_us_p50: p50(|r| r.dirty_log_us),
            freeze_write_us_p50: p50(|r| r.freeze_write_us),
            freeze_pages_p50: p50(|r| r.freeze_pages),
            map_us_p50: p50(|r| r.map_us),
            resume_us_p50: p50(|r| r.resume_us),
            precopy_us_p50: p50(|r| r.precopy_us),
            precopy_rounds_p50: p50(|r| r.precopy_rounds),
            precopy_pages_p50: p50(|r| r.precopy_pages),
            build_us_p50: p50(|r| r.build_us),
            pause_samples_us: sorted(reports, |r| r.pause_us),
        }
    }
}

fn sorted(reports: &[CloneReport], f: fn(&CloneReport) -> u64) -> Vec<u64> {
    let mut v: Vec<u64> = reports.iter().map(f).collect();
    v.sort_unstable();
    v
}

fn percentile<T: Copy + Ord>(sorted: &[T], pct: usize) -> T {
    sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Bytes of the scratch disk `bench reset --disk` gives the VM.
const BENCH_DISK_BYTES: u64 = 1 << 20;

/// Runs `dirty16` `rounds` times, resetting to its snapshot after each run. With `disk` the VM
/// also has virtio-blk on a scratch disk (which dirty16 never touches), so every reset also
/// resets that device and its disk: the fixed cost a disk adds.
pub fn bench_reset(rounds: usize, disk: bool) -> Result<ResetBench, BenchError> {
    let path = std::env::temp_dir().join(format!("zygote-bench-disk-{}.img", std::process::id()));
    if disk {
        let file = std::fs::File::create(&path).and_then(|f| f.set_len(BENCH_DISK_BYTES));
        file.map_err(|source| BenchError::Disk { path: path.clone(), source })?;
    }
    let result = reset_rounds(rounds, disk.then_some(path.clone()));
    if disk {
        let _ = std::fs::remove_file(&path);
    }
    result
}

fn reset_rounds(rounds: usize, disk: Option<std::path::PathBuf>) -> Result<ResetBench, BenchError> {
    let rounds = rounds.max(1);
    let config = VmConfig { console: Console::capture().0, disk, ..VmConfig::default() };
    let mut vm = build_tiny_vm(&config, guests::find("dirty16").expect("dirty16 is bundled"), 0)?;
    let token = vm.pause()?;
    let snap = VmSnapshot::take(&vm, &token)?;
    let mut token = Some(token);
    let mut resets = Vec::with_capacity(rounds);
    let mut dirty_pages = 0;
    let start = Instant::now();
    for _ in 0..rounds {
        vm.resume(token.take().expect("paused between rounds"));
        if !vm.wait_timeout(Duration::from_secs(10)) || !matches!(vm.outcome(), Some(VmOutcome::Exited(0))) {
            return Err(BenchError::Guest { what: "exit 0", outcome: format!("{:?}", vm.outcome()) });
        }
        let t = vm.pause()?;
        dirty_pages = vm.ram().take_dirty().len();
        resets.push(snap.reset(&mut vm, &t, None)?);
        token = Some(t);
    }
    let loops_per_s = rounds as f64 / start.elapsed().as_secs_f64();
    let _paused = token;
    let mut ram: Vec<Duration> = resets.iter().map(|r| r.ram).collect();
    let mut state: Vec<Duration> = resets.iter().map(|r| r.state).collect();
    let mut resets: Vec<Duration> = resets.iter().map(|r| r.total()).collect();
    resets.sort();
    ram.sort();
    state.sort();
    let memcpy_us = us(memcpy_time(dirty_pages));
    let kvm_run_us = us(kvm_run_round_trip(1000)?);
    let reset_us_p50 = us(percentile(&resets, 50));
    Ok(ResetBench {
        rounds,
        loops_per_s,
        reset_us_p50,
        reset_us_p99: us(percentile(&resets, 99)),
        reset_ram_us_p50: us(percentile(&ram, 50)),
        reset_state_us_p50: us(percentile(&state, 50)),
        dirty_pages,
        memcpy_us,
        kvm_run_us,
        ratio: reset_us_p50 / (memcpy_us + kvm_run_us),
        samples_us: resets.iter().map(|&d| us(d)).collect(),
    })
}

/// Median time to memcpy `pages` pages between two buffers.
fn memcpy_time(pages: usize) -> Duration {
    let src = vec![0x5au8; pages.max(1) * PAGE_SIZE];
    let mut dst = vec![0u8; src.len()];
    let mut samples: Vec<Duration> = (0..1000)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            t.elapsed()
        })
        .collect();
    samples.sort();
    percentile(&samples, 50)
}

/// Median KVM_RUN round trip: a vCPU on this thread parked in `hello`'s `out` loop.
fn kvm_run_round_trip(samples: usize) -> Result<Duration, BenchError> {
    let hello = guests::find("hello").expect("hello is bundled");
    // vCPU index 1: `hello` sends it straight to its park loop, one port exit per KVM_RUN.
    let (_vm, mut fd) = build_bare_vcpu(hello, EntryArgs { vm_id: 0, vcpu: 1, arg: 0 })?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples + 10 {
        let t = Instant::now();
        match fd.run().map_err(BenchError::Run)? {
            VcpuExit::IoOut(..) => times.push(t.elapsed()),
            other => return Err(BenchError::Guest { what: "exit on a port", outcome: format!("{other:?}") }),
        }
    }
    times.drain(..10); // warm-up
    times.sort();
    Ok(percentile(&times, 50))
}

/// Clones a running `spin` VM of `mem_mib` MiB `clones` times along each of `paths` (taking
/// turns), the guest rewriting `dirty_percent` % of its RAM between clones.
pub fn bench_clone(
    mem_mib: u64,
    clones: usize,
    dirty_percent: u64,
    paths: &[ClonePath],
) -> Result<CloneBench, BenchError> {
    let pages = (mem_mib << 20) / PAGE_SIZE as u64 * dirty_percent / 100;
    bench_clone_pages(mem_mib, clones, pages, paths)
}

/// `bench_clone` with the guest rewriting `pages` pages between clones, whatever the RAM size.
pub fn bench_clone_pages(
    mem_mib: u64,
    clones: usize,
    pages: u64,
    paths: &[ClonePath],
) -> Result<CloneBench, BenchError> {
    let clones = clones.max(1);
    let paths = if paths.is_empty() { &[ClonePath::Precopy][..] } else { paths };
    let end = pages.checked_mul(PAGE_SIZE as u64).and_then(|bytes| bytes.checked_add(TOUCH_ADDR));
    if end.is_none_or(|end| end > mem_mib << 20) {
        return Err(BenchError::TooSmall { mem_mib, pages });
    }
    let config = VmConfig { mem_mib, vm_id: 1, console: Console::capture().0, ..VmConfig::default() };
    let mut vm = build_tiny_vm(&config, guests::find("spin").expect("spin is bundled"), pages)?;
    vm.start();
    let mut reports: Vec<Vec<CloneReport>> = vec![Vec::with_capacity(clones); paths.len()];
    let mut last = 0;
    // One warm-up clone per path first (the first probes the MSR list), then `clones` each.
    for i in 0..(clones + 1) * paths.len() {
        // Let the guest go once through its working set: `pages` pages dirty since the last clone.
        let deadline = Instant::now() + Duration::from_secs(30);
        while vm.ram().read_obj::<u64>(GuestAddress(COUNTERS_ADDR)).unwrap_or(0) < last + pages.max(1) {
            if Instant::now() > deadline {
                return Err(BenchError::Guest { what: "make progress", outcome: format!("{:?}", vm.outcome()) });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let path = paths[i % paths.len()];
        let console = Console::capture().0;
        let (clone, report) = clone_vm_by(&mut vm, 1000 + i as u64, &console, Some(GuestAddress(VM_ID_ADDR)), path)?;
        drop(clone);
        last = vm.ram().read_obj::<u64>(GuestAddress(COUNTERS_ADDR)).unwrap_or(0);
        if i >= paths.len() {
            reports[i % paths.len()].push(report);
        }
    }
    let paths: Vec<PathBench> = paths.iter().zip(&reports).map(|(&path, r)| PathBench::from_reports(path, r)).collect();
    let p50 = |path| paths.iter().find(|p| p.path == path).map(|p| p.pause_us_p50 as f64);
    let pause_p50_ratio = p50(ClonePath::Precopy).zip(p50(ClonePath::InPause)).map(|(new, old)| new / old);
    Ok(CloneBench { mem_mib, clones, dirty_pages: pages, paths, pause_p50_ratio })
}
