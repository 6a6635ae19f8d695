//! Snapshot RAM file cost: `cargo run --release -p zygote-memory --example snapshot_file_bench`.
//!
//! A RAM of 256 MiB and one of 1 GiB, each with the same 16 MiB of data (what a small Linux
//! guest holds), a full snapshot file, then ~170 KiB changed and a diff file. Per file, medians
//! of 5 rounds, µs:
//! - `write`: `write_region` / `write_region_diff` (copy, CRC32 per written run, fsync);
//! - `verify`: `Snapshot::verify_file` against those CRC32s (what a load checks);
//! - `whole_file_crc`: the reference the snapshot writer paid before (and a load still pays
//!   while it checks whole files): CRC32 of every byte read back, holes included;
//! - `floor`: writing the same pages with plain pwrite into a fresh sparse file, plus fsync.
//!
//! Prints one JSON object per RAM size.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use memory::{Bytes, FileKind, FileRun, GuestAddress, GuestRam, Snapshot, PAGE_SIZE};

const MIB: usize = 1 << 20;
const DATA_PAGES: usize = 16 * MIB / PAGE_SIZE;
const CHANGED_PAGES: usize = 43; // 172 KiB
const ROUNDS: usize = 5;

fn main() {
    let dir = std::env::temp_dir().join(format!("zygote-snapfile-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for size in [256 * MIB, 1024 * MIB] {
        measure(size, &dir);
    }
    std::fs::remove_dir_all(&dir).expect("remove scratch dir");
}

fn measure(size: usize, dir: &std::path::Path) {
    let pages = size / PAGE_SIZE;
    let ram = GuestRam::new(&[(GuestAddress(0), size)]).expect("RAM");
    for i in 0..DATA_PAGES {
        let page = spread(i, DATA_PAGES, pages);
        ram.write_slice(&[(i % 251) as u8 + 1; PAGE_SIZE], GuestAddress((page * PAGE_SIZE) as u64)).expect("populate");
    }
    let mut full = Phases::default();
    let mut diff = Phases::default();
    let mut parent = ram.snapshot().expect("snapshot");
    for round in 0..ROUNDS {
        let path = dir.join(format!("full-{round}"));
        full.measure(size, &path, FileKind::Full, |file| {
            parent.write_region(0, file).and_then(|r| file.sync_all().map(|()| r).map_err(memory::MemoryError::FileIo))
        });

        for i in 0..CHANGED_PAGES {
            let page = spread(i * 7 + round, CHANGED_PAGES * 7 + ROUNDS, pages);
            ram.write_slice(&[round as u8 ^ 0x5a; 64], GuestAddress((page * PAGE_SIZE) as u64)).expect("change");
        }
        let child = ram.snapshot().expect("snapshot");
        let path = dir.join(format!("diff-{round}"));
        diff.measure(size, &path, FileKind::Diff, |file| {
            child
                .write_region_diff(&parent, 0, file)
                .and_then(|r| file.sync_all().map(|()| r).map_err(memory::MemoryError::FileIo))
        });
        parent = child;
    }
    let mib = size / MIB;
    println!(
        "{{\"ram_mib\":{mib},\"data_mib\":{},\"changed_pages\":{CHANGED_PAGES},\"full\":{},\"diff\":{}}}",
        DATA_PAGES * PAGE_SIZE / MIB,
        full.json(),
        diff.json()
    );
}

/// Each phase's times over the rounds.
#[derive(Default)]
struct Phases {
    write: Vec<Duration>,
    verify: Vec<Duration>,
    whole_file_crc: Vec<Duration>,
    floor: Vec<Duration>,
    pages: usize,
}

impl Phases {
    /// Writes one file at `path` with `write`, then times its checks and its floor.
    fn measure(
        &mut self,
        size: usize,
        path: &std::path::Path,
        kind: FileKind,
        write: impl FnOnce(&File) -> Result<Vec<FileRun>, memory::MemoryError>,
    ) {
        let file = File::create(path).expect("RAM file");
        let start = Instant::now();
        let runs = write(&file).expect("write RAM file");
        self.write.push(start.elapsed());
        let file = File::open(path).expect("reopen");
        self.verify.push(time(|| Snapshot::verify_file(&file, size, &runs, kind).expect("verify")));
        self.whole_file_crc.push(time(|| whole_file_crc32(path)));
        std::fs::remove_file(path).expect("remove");
        self.floor.push(write_floor(path, size, &runs));
        self.pages = runs.iter().map(|r| r.pages).sum();
    }

    /// Medians, µs.
    fn json(&mut self) -> String {
        let (write, floor) = (median(&mut self.write), median(&mut self.floor));
        format!(
            "{{\"pages\":{},\"write_us\":{write},\"floor_us\":{floor},\"write_vs_floor\":{:.2},\"verify_us\":{},\"whole_file_crc_us\":{}}}",
            self.pages,
            write as f64 / floor as f64,
            median(&mut self.verify),
            median(&mut self.whole_file_crc)
        )
    }
}

fn median(v: &mut [Duration]) -> u128 {
    v.sort();
    v[v.len() / 2].as_micros()
}

fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// Writing `runs`' pages with plain pwrite into a fresh sparse file of `size` bytes, and fsync.
fn write_floor(path: &std::path::Path, size: usize, runs: &[FileRun]) -> Duration {
    let file = File::create(path).expect("floor file");
    let buf = vec![1u8; 1 << 20];
    let took = time(|| {
        file.set_len(size as u64).expect("size");
        for run in runs {
            let (mut at, end) = (run.first_page * PAGE_SIZE, (run.first_page + run.pages) * PAGE_SIZE);
            while at < end {
                let n = (end - at).min(buf.len());
                file.write_all_at(&buf[..n], at as u64).expect("write");
                at += n;
            }
        }
        file.sync_all().expect("fsync");
    });
    std::fs::remove_file(path).expect("remove");
    took
}

/// The snapshot writer's checksum today: CRC32 of every byte of the file, holes read back.
fn whole_file_crc32(path: &std::path::Path) {
    let mut file = File::open(path).expect("open");
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    std::hint::black_box(hasher.finalize());
}

/// Page `i` of `count` spread evenly over `pages`.
fn spread(i: usize, count: usize, pages: usize) -> usize {
    (i * (pages / count)) % pages
}
