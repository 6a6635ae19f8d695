//! `zygote bench`: the benchmarks, each a ratio against a reference measured in the same run.

use clap::Subcommand;
use vmm::clone::ClonePath;

use vmm::builder::{MAX_MEM_MIB, MIN_MEM_MIB};
use vmm::cli::{report, EXIT_BAD_INPUT, EXIT_FAILURE};

/// Most rounds and clones one bench run takes (each one's timings are kept for the percentiles).
const MAX_ROUNDS: u64 = 10_000_000;
const MAX_CLONES: u64 = 100_000;

#[derive(Debug, Subcommand)]
pub(super) enum BenchCommand {
    /// Reset a guest that dirties 16 pages per run back to its snapshot, ROUNDS times.
    Reset {
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=MAX_ROUNDS))]
        rounds: u64,
        /// Give the VM virtio-blk on a 1 MiB scratch disk, reset with the rest every round.
        #[arg(long)]
        disk: bool,
    },
    /// Clone a running VM of MEM MiB with DIRTY_PERCENT % of its RAM rewritten between clones.
    Clone {
        #[arg(long, value_name = "MiB", default_value_t = 1024,
              value_parser = clap::value_parser!(u64).range(MIN_MEM_MIB..=MAX_MEM_MIB))]
        mem: u64,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_CLONES))]
        clones: u64,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=100))]
        dirty_percent: u64,
        /// Pages rewritten between clones whatever the RAM size (instead of DIRTY_PERCENT), so
        /// that RAM sizes can be compared at the same dirty set.
        #[arg(long, conflicts_with = "dirty_percent")]
        dirty_pages: Option<u64>,
        /// Only the reference path (everything in the pause, no pre-copy). By default the
        /// clones alternate between it and the pre-copy path.
        #[arg(long)]
        no_precopy: bool,
    },
    /// Diff snapshots of a MEM MiB VM with DIRTY_PAGES pages rewritten between them, against
    /// the floor of writing those pages; a Full one; loading the chain.
    Snapshot {
        #[arg(long, value_name = "MiB", default_value_t = 256)]
        mem: u64,
        /// 43 pages: the 170 KiB of changes of issue 15's measurement.
        #[arg(long, default_value_t = 43)]
        dirty_pages: u64,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Where the snapshot files go (removed after); default a directory under /tmp.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Every claim of the benchmarks against its reference, in one run: a table, and with
    /// --json / --out the JSON, a markdown summary and SVG plots.
    Report {
        /// Fewer rounds and clones (a few minutes).
        #[arg(long)]
        quick: bool,
        #[arg(long, value_name = "FILE")]
        json: Option<std::path::PathBuf>,
        /// Directory for report.md and the SVG plots.
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// Scratch directory (snapshot files, the fleet's API socket); default the system's temp dir.
        #[arg(long, value_name = "DIR")]
        work_dir: Option<std::path::PathBuf>,
        /// Also restore the same Linux guest under QEMU (`qemu-system-x86_64`, Debian's
        /// qemu-system-x86) and under Zygote: `restore_vs_qemu`.
        #[arg(long, requires_all = ["kernel", "initrd"])]
        peers: bool,
        /// The Linux guest of --peers (resources/linux/build.sh prints its paths).
        #[arg(long, value_name = "FILE", requires = "peers")]
        kernel: Option<std::path::PathBuf>,
        #[arg(long, value_name = "FILE", requires = "peers")]
        initrd: Option<std::path::PathBuf>,
    },
    /// CLONES clones of a 64 MiB VM in one `zygote run`, through its API, each writing 1 % of
    /// its pages: Pss, idle CPU, `GET /vms`, clone calls with BUSY clones running, limits.
    Fleet {
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        clones: u64,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        busy: u64,
        #[arg(long, value_name = "DIR")]
        work_dir: Option<std::path::PathBuf>,
    },
    /// Bulk TCP echo through virtio-net and a TAP to a Linux guest vs the same over the host's
    /// loopback (MIB MiB each way per round).
    Net {
        #[arg(long, value_name = "FILE")]
        kernel: std::path::PathBuf,
        #[arg(long, value_name = "FILE")]
        initrd: std::path::PathBuf,
        #[arg(long, default_value_t = 4)]
        mib: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Bulk transfer through virtio-vsock (CONNECT to a Linux guest's echo) vs the same over a
    /// host Unix socket pair (KIB KiB each way per round), and a 16-byte round trip.
    Vsock {
        #[arg(long, value_name = "FILE")]
        kernel: std::path::PathBuf,
        #[arg(long, value_name = "FILE")]
        initrd: std::path::PathBuf,
        #[arg(long, default_value_t = 256)]
        kib: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// A Linux guest snapshotted once and restored ROUNDS times in a new process, under Zygote
    /// and under QEMU (qemu-system-x86_64, microvm): spawn to the guest's first line (the
    /// report's restore_vs_qemu alone).
    Restore {
        #[arg(long, value_name = "FILE")]
        kernel: std::path::PathBuf,
        #[arg(long, value_name = "FILE")]
        initrd: std::path::PathBuf,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        #[arg(long, value_name = "DIR")]
        work_dir: Option<std::path::PathBuf>,
    },
}

pub(super) fn bench(command: BenchCommand) -> i32 {
    let result = match command {
        BenchCommand::Report { quick, json, out, work_dir, peers: _, kernel, initrd } => {
            let peers = kernel.zip(initrd).map(|(kernel, initrd)| tools::peer_restore::PeerGuest { kernel, initrd });
            let work_dir = work_dir.unwrap_or_else(std::env::temp_dir);
            let options = tools::report::ReportOptions { quick, work_dir, peers };
            let written = tools::report::run(&options).and_then(|r| {
                print!("{}", tools::report::table(&r));
                tools::report::write(&r, json.as_deref(), out.as_deref())
            });
            return match written {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("{}", report(&e));
                    EXIT_FAILURE
                }
            };
        }
        BenchCommand::Fleet { clones, busy, work_dir } => {
            let options = tools::bench_fleet::FleetOptions {
                clones: usize::try_from(clones).unwrap_or(usize::MAX),
                mem_mib: 64,
                busy: usize::try_from(busy).unwrap_or(usize::MAX),
                checkpoints: vec![100, 300],
                idle_window: std::time::Duration::from_secs(5),
                timed_clones: 30,
            };
            let exe = match std::env::current_exe() {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!("zygote: cannot find this program's binary: {e}");
                    return EXIT_FAILURE;
                }
            };
            let work = work_dir.unwrap_or_else(std::env::temp_dir);
            return match tools::bench_fleet::bench_fleet(&exe, &work, &options) {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    0
                }
                Err(e) => {
                    eprintln!("{}", report(&e));
                    EXIT_FAILURE
                }
            };
        }
        BenchCommand::Reset { rounds, disk } => {
            tools::bench::bench_reset(usize::try_from(rounds).unwrap_or(usize::MAX), disk).map(|r| {
                println!(
                    "reset: {} rounds, {:.0} loops/s (run + pause + reset), reset p50 {:.1} us p99 {:.1} us \
                 (RAM {:.1} us + state {:.1} us), {} dirty pages: memcpy {:.2} us + KVM_RUN {:.1} us, ratio {:.2}",
                    r.rounds,
                    r.loops_per_s,
                    r.reset_us_p50,
                    r.reset_us_p99,
                    r.reset_ram_us_p50,
                    r.reset_state_us_p50,
                    r.dirty_pages,
                    r.memcpy_us,
                    r.kvm_run_us,
                    r.ratio
                );
                serde_json::to_string(&r)
            })
        }
        BenchCommand::Clone { mem, clones, dirty_percent, dirty_pages, no_precopy } => {
            let paths: &[ClonePath] =
                if no_precopy { &[ClonePath::InPause] } else { &[ClonePath::InPause, ClonePath::Precopy] };
            let clones = usize::try_from(clones).unwrap_or(usize::MAX);
            let bench = match dirty_pages {
                Some(pages) => tools::bench::bench_clone_pages(mem, clones, pages, paths),
                None => tools::bench::bench_clone(mem, clones, dirty_percent, paths),
            };
            bench.map(|r| {
                println!("clone: {} MiB, {} clones per path, {} pages dirty per clone", r.mem_mib, r.clones, r.dirty_pages);
                for p in &r.paths {
                    println!(
                        "  {:?}: source pause p50 {} us p99 {} us = wait {} + state {} + dirty log {} + freeze write {} ({} pages) \
                         + map {} (in pause on InPause only) + resume {}; pre-copy {} us ({} rounds, {} pages) before the pause; \
                         clone build {} us after it (all p50)",
                        p.path,
                        p.pause_us_p50,
                        p.pause_us_p99,
                        p.pause_wait_us_p50,
                        p.capture_us_p50,
                        p.dirty_log_us_p50,
                        p.freeze_write_us_p50,
                        p.freeze_pages_p50,
                        p.map_us_p50,
                        p.resume_us_p50,
                        p.precopy_us_p50,
                        p.precopy_rounds_p50,
                        p.precopy_pages_p50,
                        p.build_us_p50
                    );
                }
                if let Some(ratio) = r.pause_p50_ratio {
                    println!("  pause p50 Precopy / InPause = {ratio:.3}");
                }
                serde_json::to_string(&r)
            })
        }
        BenchCommand::Net { kernel, initrd, mib, rounds } => {
            return match tools::net_bench::bench_net(&kernel, &initrd, mib, rounds) {
                Ok(r) => {
                    println!(
                        "net: {} MiB each way per round, {} rounds: guest via TAP {:.1} MiB/s, host loopback {:.1} MiB/s, \
                         ratio {:.4}; boot to echo listening {} ms",
                        r.mib_per_round, r.rounds, r.guest_tap_mib_s, r.host_loopback_mib_s, r.ratio, r.boot_to_listening_ms
                    );
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    0
                }
                Err(e) => {
                    eprintln!("{}", report(&e));
                    match e {
                        tools::net_bench::NetBenchError::Size(..) | tools::net_bench::NetBenchError::Build(_) => {
                            EXIT_BAD_INPUT
                        }
                        _ => EXIT_FAILURE,
                    }
                }
            };
        }
        BenchCommand::Vsock { kernel, initrd, kib, rounds } => {
            return match tools::vsock_bench::bench_vsock(&kernel, &initrd, kib, rounds) {
                Ok(r) => {
                    println!(
                        "vsock: {} KiB each way per round, {} rounds: guest {:.3} MiB/s, host Unix socket {:.1} MiB/s, \
                         ratio {:.5}; 16-byte round trip {:.0} us (host {:.0} us); boot to echo listening {} ms",
                        r.kib_per_round,
                        r.rounds,
                        r.guest_vsock_mib_s,
                        r.host_unix_mib_s,
                        r.ratio,
                        r.guest_rtt_us,
                        r.host_rtt_us,
                        r.boot_to_listening_ms
                    );
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    0
                }
                Err(e) => {
                    eprintln!("{}", report(&e));
                    match e {
                        tools::vsock_bench::VsockBenchError::Size(..)
                        | tools::vsock_bench::VsockBenchError::Build(_) => EXIT_BAD_INPUT,
                        _ => EXIT_FAILURE,
                    }
                }
            };
        }
        BenchCommand::Restore { kernel, initrd, rounds, work_dir } => {
            let guest = tools::peer_restore::PeerGuest { kernel, initrd };
            let work_dir = work_dir.unwrap_or_else(std::env::temp_dir);
            let measured = std::env::current_exe().map_err(|e| e.to_string()).and_then(|exe| {
                tools::peer_restore::bench_restore_vs_qemu(&exe, &guest, &work_dir, rounds as usize)
                    .map_err(|e| report(&e))
            });
            return match measured {
                Ok(r) => {
                    println!(
                        "restore: spawn to the guest's first line, p50: Zygote {:.1} ms, {} {:.1} ms, ratio {:.2}",
                        r.zygote_ms_p50,
                        r.qemu_version,
                        r.qemu_ms_p50,
                        r.zygote_ms_p50 / r.qemu_ms_p50
                    );
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    0
                }
                Err(e) => {
                    eprintln!("{e}");
                    EXIT_FAILURE
                }
            };
        }
        BenchCommand::Snapshot { mem, dirty_pages, rounds, dir } => {
            let dir = dir
                .unwrap_or_else(|| std::env::temp_dir().join(format!("zygote-bench-snapshot-{}", std::process::id())));
            match tools::snapshot_bench::bench_snapshot(mem, dirty_pages, rounds, &dir) {
                Ok(r) => {
                    println!(
                        "snapshot: {} MiB, {} dirty pages, {} rounds: Diff call p50 {:.0} us (freeze {:.0} + RAM {:.0} + state {:.0}) \
                         vs write floor {:.0} us = {:.2}x; Full {:.0} us for {} bytes (floor {:.0} us); load chain {:.0} us",
                        r.mem_mib,
                        r.dirty_pages,
                        r.rounds,
                        r.diff_call_us_p50,
                        r.diff_take_us_p50,
                        r.diff_ram_us_p50,
                        r.diff_state_us_p50,
                        r.write_floor_us_p50,
                        r.diff_snapshot_vs_write_floor,
                        r.full_call_us,
                        r.full_ram_bytes,
                        r.full_write_floor_us,
                        r.load_chain_us
                    );
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    return 0;
                }
                Err(e) => {
                    eprintln!("{}", report(&e));
                    let bad_input = matches!(
                        e,
                        tools::snapshot_bench::SnapshotBenchError::TooSmall { .. }
                            | tools::snapshot_bench::SnapshotBenchError::Rounds { .. }
                            | tools::snapshot_bench::SnapshotBenchError::Build(_)
                    );
                    return if bad_input { EXIT_BAD_INPUT } else { EXIT_FAILURE };
                }
            }
        }
    };
    match result {
        Ok(json) => {
            println!("{}", json.unwrap_or_default());
            0
        }
        Err(e) => {
            eprintln!("{}", report(&e));
            // A VM too small for the asked dirtying is the flags' fault.
            match e {
                tools::bench::BenchError::TooSmall { .. } => EXIT_BAD_INPUT,
                _ => EXIT_FAILURE,
            }
        }
    }
}
