//! `zygote bench report`: one run of every benchmark, each claim a ratio against its reference
//! measured in the same run, written as a table, JSON, a markdown summary and SVG plots. It
//! calls the benchmarks behind `zygote bench` (reset, clone, snapshot, fleet, first write); it
//! measures nothing of its own but `fork()` beside the clones.

mod plots;
mod summary;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::clone::ClonePath;

use crate::bench::{bench_clone_pages, bench_reset, BenchError, CloneBench, ResetBench};
use crate::bench_fleet::{bench_fleet, FleetBench, FleetBenchError, FleetOptions};
use crate::bench_host::{bench_first_write, fork_with_populated, FirstWriteBench, HostBenchError};
use crate::peer_restore::{bench_restore_vs_qemu, PeerBenchError, PeerGuest, RestorePeerBench};
use crate::snapshot_bench::{bench_snapshot, SnapshotBench, SnapshotBenchError};
pub use plots::PlotError;
pub use summary::{markdown, table};

/// What failed making the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reset or clone benchmark failed")]
    Bench(#[from] BenchError),
    #[error("host benchmark failed")]
    Host(#[from] HostBenchError),
    #[error("snapshot benchmark failed")]
    Snapshot(#[from] SnapshotBenchError),
    #[error("fleet benchmark failed")]
    Fleet(#[from] FleetBenchError),
    #[error("restore against QEMU failed")]
    Peer(#[from] PeerBenchError),
    #[error("cannot plot")]
    Plot(#[from] PlotError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this program's own binary (it runs the fleet's VMM)")]
    Exe(#[source] std::io::Error),
}

/// How much to run.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Fewer rounds and clones: a few minutes.
    pub quick: bool,
    /// Scratch space (snapshot files, the fleet's socket).
    pub work_dir: PathBuf,
    /// The Linux guest to restore under Zygote and QEMU (`--peers`), if asked.
    pub peers: Option<PeerGuest>,
}

/// One claim: `measured` against `reference`, and their ratio `value` (or, for idle CPU and
/// `GET /vms`, the figure itself, `reference` being the window or VM count it was taken over).
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub key: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub measured: f64,
    pub measured_what: String,
    pub reference: f64,
    pub reference_what: String,
    /// The target, as `value <= target`.
    pub target: f64,
    pub met: bool,
}

/// Clone pause against the RAM size and against the pages dirtied between clones.
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub mem_mib: u64,
    pub dirty_pages: u64,
    pub pause_us_p50: u64,
    pub pause_us_p99: u64,
}

/// Everything one report run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub quick: bool,
    pub host: String,
    pub took_s: f64,
    pub entries: Vec<Entry>,
    pub fork_us_p50: f64,
    pub reset: ResetBench,
    pub clone: CloneBench,
    pub by_ram: Vec<Sweep>,
    pub by_dirty: Vec<Sweep>,
    pub first_write: FirstWriteBench,
    pub snapshot: SnapshotBench,
    pub fleet: FleetBench,
    /// With `--peers`.
    pub restore_peer: Option<RestorePeerBench>,
}

/// The pages 1 % of a 1 GiB RAM holds: the dirty set every clone-size run uses.
const ONE_PERCENT_OF_1G: u64 = (1 << 30) / 4096 / 100;

fn sweep(bench: &CloneBench) -> Sweep {
    let path = bench.paths.iter().find(|p| p.path == ClonePath::Precopy).unwrap_or(&bench.paths[0]);
    Sweep {
        mem_mib: bench.mem_mib,
        dirty_pages: bench.dirty_pages,
        pause_us_p50: path.pause_us_p50,
        pause_us_p99: path.pause_us_p99,
    }
}

/// Runs every benchmark, prints what it is doing on stderr.
pub fn run(options: &ReportOptions) -> Result<Report, ReportError> {
    let start = Instant::now();
    let q = |quick, full| if options.quick { quick } else { full };
    let step = |what: &str| eprintln!("[{:>5.0} s] {what}", start.elapsed().as_secs_f64());

    step("reset");
    let reset = bench_reset(q(2_000, 10_000), false)?;

    step("clone of 1 GiB, 1 % dirty, against fork() of this process holding 1 GiB");
    let clone = bench_clone_pages(1024, q(20, 100), ONE_PERCENT_OF_1G, &[ClonePath::InPause, ClonePath::Precopy])?;
    let forks = fork_with_populated(1024, 15)?;
    let fork_us_p50 = forks[forks.len() / 2];

    step("clone against RAM size and dirty pages");
    let clones = q(10, 30);
    let mut by_ram = Vec::new();
    for mem in [256, 1024, 4096, 8192] {
        by_ram.push(sweep(&bench_clone_pages(mem, clones, ONE_PERCENT_OF_1G, &[ClonePath::Precopy])?));
    }
    let mut by_dirty = Vec::new();
    for pages in [64, ONE_PERCENT_OF_1G / 4, ONE_PERCENT_OF_1G, ONE_PERCENT_OF_1G * 4] {
        by_dirty.push(sweep(&bench_clone_pages(1024, clones, pages, &[ClonePath::Precopy])?));
    }

    step("first write into a clone's page");
    let first_write = bench_first_write(64, q(5, 9))?;

    step("snapshot");
    let snap_dir = options.work_dir.join(format!("zygote-report-snapshot-{}", std::process::id()));
    let snapshot = bench_snapshot(256, 43, q(10, 20), &snap_dir)?;

    step("fleet: 1000 clones of a 64 MiB VM through the API");
    let exe = std::env::current_exe().map_err(ReportError::Exe)?;
    let fleet = bench_fleet(
        &exe,
        &options.work_dir,
        &FleetOptions {
            clones: 1000,
            mem_mib: 64,
            busy: 100,
            checkpoints: vec![100, 300, 600],
            idle_window: Duration::from_secs(if options.quick { 2 } else { 5 }),
            timed_clones: q(10, 30),
        },
    )?;
    let restore_peer = match &options.peers {
        Some(guest) => {
            step("restore of a Linux guest, against QEMU's");
            Some(bench_restore_vs_qemu(&exe, guest, &options.work_dir, q(3, 10))?)
        }
        None => None,
    };
    step("done");

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let mut report = Report {
        quick: options.quick,
        host,
        took_s: start.elapsed().as_secs_f64(),
        entries: Vec::new(),
        fork_us_p50,
        reset,
        clone,
        by_ram,
        by_dirty,
        first_write,
        snapshot,
        fleet,
        restore_peer,
    };
    report.entries = summary::entries(&report);
    Ok(report)
}

/// Writes `report.json`-style JSON to `json`, and `report.md` plus the SVG plots into `out`.
pub fn write(report: &Report, json: Option<&Path>, out: Option<&Path>) -> Result<(), ReportError> {
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|source| ReportError::Write { path: path.to_path_buf(), source })
    };
    if let Some(path) = json {
        write(path, &serde_json::to_string_pretty(report).unwrap_or_default())?;
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write { path: dir.to_path_buf(), source })?;
        let plots = plots::draw_all(report, dir)?;
        write(&dir.join("report.md"), &markdown(report, &plots))?;
    }
    Ok(())
}
