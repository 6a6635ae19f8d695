//! `zygote bench snapshot`: what a Diff snapshot costs against the floor of writing its
//! changed pages (the same bytes at the same offsets of a fresh sparse file, fsynced), both
//! measured in the same run, alternately; and what a Full one and loading cost.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress, PAGE_SIZE};
use serde::Serialize;

use vmm::builder::{build_tiny_vm, BuildError, VmConfig};
use vmm::device_manager::Console;
use vmm::guests;
use vmm::layout::TOUCH_ADDR;
use vmm::machine::VmmError;
use vmm::snapshot::file::{load_snapshot, write_snapshot, SnapshotError, SnapshotKind, SnapshotOnDisk};
use vmm::snapshot::{VmSnapshot, VmSnapshotError};

/// What failed while benchmarking snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotBenchError {
    #[error("cannot build the benchmark VM")]
    Build(#[from] BuildError),
    #[error("cannot pause the benchmark VM")]
    Pause(#[from] VmmError),
    #[error("cannot freeze the benchmark VM")]
    Take(#[from] VmSnapshotError),
    #[error("snapshot write or load failed")]
    Snapshot(#[from] SnapshotError),
    #[error("{path}: floor write failed")]
    Floor {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write guest RAM")]
    Ram(#[source] vm_memory::GuestMemoryError),
    #[error("{dirty_pages} dirty pages do not fit {mem_mib} MiB above {TOUCH_ADDR:#x}")]
    TooSmall { mem_mib: u64, dirty_pages: u64 },
    #[error("--rounds must be at least 1 and at most {max}")]
    Rounds { max: usize },
}

/// Most diff rounds (each is one more diff in the chain a load follows).
pub const MAX_ROUNDS: usize = 60;

/// `zygote bench snapshot`.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotBench {
    pub mem_mib: u64,
    pub dirty_pages: u64,
    pub rounds: usize,
    /// Median Diff snapshot call (freeze + RAM file + state file) ÷ median floor.
    pub diff_snapshot_vs_write_floor: f64,
    pub diff_call_us_p50: f64,
    pub diff_call_us_max: f64,
    /// The parts of the median-call round: freeze, RAM file, state file.
    pub diff_take_us_p50: f64,
    pub diff_ram_us_p50: f64,
    pub diff_state_us_p50: f64,
    /// Writing the same pages at the same offsets of a fresh sparse file, then fsync.
    pub write_floor_us_p50: f64,
    /// A Full snapshot of the VM with every page holding data, its RAM bytes written, and the
    /// time to write that many bytes to one file and fsync it.
    pub full_call_us: f64,
    pub full_ram_bytes: u64,
    pub full_write_floor_us: f64,
    /// Loading the last diff (its whole chain, every run's checksum verified).
    pub load_chain_us: f64,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Writes `bytes` at each offset of `offsets` in a new file `path` of `len` bytes and fsyncs.
fn floor_write(path: &Path, len: u64, offsets: &[u64], bytes: &[u8]) -> Result<Duration, SnapshotBenchError> {
    let floor = |source| SnapshotBenchError::Floor { path: path.to_path_buf(), source };
    let _ = std::fs::remove_file(path);
    let start = Instant::now();
    let file = File::create_new(path).map_err(floor)?;
    file.set_len(len).map_err(floor)?;
    for &offset in offsets {
        file.write_all_at(bytes, offset).map_err(floor)?;
    }
    file.sync_all().map_err(floor)?;
    let took = start.elapsed();
    drop(file);
    std::fs::remove_file(path).map_err(floor)?;
    Ok(took)
}

/// Runs the benchmark in `dir` (created; its snapshot files removed after).
pub fn bench_snapshot(
    mem_mib: u64,
    dirty_pages: u64,
    rounds: usize,
    dir: &Path,
) -> Result<SnapshotBench, SnapshotBenchError> {
    if !(1..=MAX_ROUNDS).contains(&rounds) {
        return Err(SnapshotBenchError::Rounds { max: MAX_ROUNDS });
    }
    let page = PAGE_SIZE as u64;
    let ram_bytes = mem_mib.checked_mul(1 << 20).ok_or(SnapshotBenchError::TooSmall { mem_mib, dirty_pages })?;
    let room = ram_bytes.saturating_sub(TOUCH_ADDR) / page;
    if dirty_pages == 0 || dirty_pages > room {
        return Err(SnapshotBenchError::TooSmall { mem_mib, dirty_pages });
    }
    std::fs::create_dir_all(dir).map_err(|source| SnapshotBenchError::Floor { path: dir.into(), source })?;
    let config = VmConfig {
        mem_mib,
        vcpus: 1,
        vm_id: 0,
        console: Console::Prefixed(String::new()),
        disk: None,
        net: Vec::new(),
        entropy: None,
        vsock: None,
        irqchip: false,
        vmgenid: false,
    };
    let mut vm = build_tiny_vm(&config, guests::find("spin").expect("spin is bundled"), 0)?;
    let token = vm.pause()?;
    // Every page above the guest's own holds data: a Full snapshot writes all of RAM.
    let fill = vec![0x5au8; 1 << 20];
    for offset in (TOUCH_ADDR..ram_bytes).step_by(fill.len()) {
        let n = usize::try_from((ram_bytes - offset).min(fill.len() as u64)).unwrap_or(0);
        vm.ram().write_slice(&fill[..n], GuestAddress(offset)).map_err(SnapshotBenchError::Ram)?;
    }
    let start = Instant::now();
    let full = write_snapshot(&VmSnapshot::take(&vm, &token)?, &dir.join("full.json"), dir, SnapshotKind::Full, None)?;
    let full_call = start.elapsed();
    let full_ram_bytes = full.timing.ram_bytes;
    let full_floor = floor_write(
        &dir.join("floor-full"),
        ram_bytes,
        &[0],
        &vec![0x5au8; usize::try_from(full_ram_bytes).unwrap_or(0)],
    )?;

    // Each round rewrites `dirty_pages` pages spread over RAM, then takes a Diff over the last.
    let stride = (room / dirty_pages).max(1) * page;
    let offsets: Vec<u64> = (0..dirty_pages).map(|i| TOUCH_ADDR + i * stride).collect();
    let mut parent: SnapshotOnDisk = full;
    let (mut calls, mut floors, mut parts) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let byte = vec![u8::try_from(round % 251).unwrap_or(0); PAGE_SIZE];
        for &offset in &offsets {
            vm.ram().write_slice(&byte, GuestAddress(offset)).map_err(SnapshotBenchError::Ram)?;
        }
        let start = Instant::now();
        let snap = VmSnapshot::take(&vm, &token)?;
        let take = start.elapsed();
        let diff =
            write_snapshot(&snap, &dir.join(format!("diff{round}.json")), dir, SnapshotKind::Diff, Some(&parent))?;
        let call = start.elapsed();
        calls.push(us(call));
        parts.push((us(call), us(take), us(diff.timing.ram), us(diff.timing.state)));
        floors.push(us(floor_write(&dir.join("floor-diff"), ram_bytes, &offsets, &byte)?));
        parent = diff;
    }
    let start = Instant::now();
    load_snapshot(&parent.state_path)?;
    let load_chain = start.elapsed();
    drop((token, vm.stop()));
    let _ = std::fs::remove_dir_all(dir);

    let diff_call_us_max = calls.iter().copied().fold(0.0, f64::max);
    let diff_call_us_p50 = median(&mut calls);
    let write_floor_us_p50 = median(&mut floors);
    parts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (_, take, ram, state) = parts[parts.len() / 2];
    Ok(SnapshotBench {
        mem_mib,
        dirty_pages,
        rounds,
        diff_snapshot_vs_write_floor: diff_call_us_p50 / write_floor_us_p50,
        diff_call_us_p50,
        diff_call_us_max,
        diff_take_us_p50: take,
        diff_ram_us_p50: ram,
        diff_state_us_p50: state,
        write_floor_us_p50,
        full_call_us: us(full_call),
        full_ram_bytes,
        full_write_floor_us: us(full_floor),
        load_chain_us: us(load_chain),
    })
}
