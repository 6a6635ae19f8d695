//! Snapshot RAM file cost: `cargo run --release -p zygote-memory --example snapshot_file_bench`.
//!
//! A RAM of 256 MiB and one of 1 GiB, each with the same 16 MiB of data (what a small Linux
//! guest holds), a full snapshot file, then ~170 KiB changed and a diff file. Each phase is
//! timed the way the VMM's snapshot writer runs it today: the RAM file write (copy + fsync),
//! then a CRC32 of the whole file read back.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress, GuestRam, PAGE_SIZE};

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
        let file = File::create(&path).expect("full file");
        let start = Instant::now();
        parent.write_region(0, &file).expect("write full");
        full.write.push(start.elapsed());
        full.crc.push(time(|| whole_file_crc32(&path)));
        std::fs::remove_file(&path).expect("remove");

        for i in 0..CHANGED_PAGES {
            let page = spread(i * 7 + round, CHANGED_PAGES * 7 + ROUNDS, pages);
            ram.write_slice(&[round as u8 ^ 0x5a; 64], GuestAddress((page * PAGE_SIZE) as u64)).expect("change");
        }
        let child = ram.snapshot().expect("snapshot");
        let path = dir.join(format!("diff-{round}"));
        let file = File::create(&path).expect("diff file");
        let start = Instant::now();
        let written = child.write_region_diff(&parent, 0, &file).expect("write diff");
        diff.write.push(start.elapsed());
        diff.crc.push(time(|| whole_file_crc32(&path)));
        diff.fsync.push(sparse_fsync(dir, size, written.len()));
        std::fs::remove_file(&path).expect("remove");
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

/// Medians, in µs, of each phase over the rounds.
#[derive(Default)]
struct Phases {
    write: Vec<Duration>,
    crc: Vec<Duration>,
    fsync: Vec<Duration>,
}

impl Phases {
    fn json(&mut self) -> String {
        let mut fields = vec![format!("\"write_us\":{}", median(&mut self.write)), format!("\"crc_us\":{}", median(&mut self.crc))];
        if !self.fsync.is_empty() {
            fields.push(format!("\"of_which_fsync_us\":{}", median(&mut self.fsync)));
        }
        format!("{{{}}}", fields.join(","))
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

/// The fsync part of a diff write: a sparse file of `size` bytes with `pages` pages written.
fn sparse_fsync(dir: &std::path::Path, size: usize, pages: usize) -> Duration {
    let path = dir.join("fsync");
    let file = File::create(&path).expect("fsync file");
    file.set_len(size as u64).expect("size");
    for i in 0..pages {
        file.write_all_at(&[1; PAGE_SIZE], (spread(i, pages, size / PAGE_SIZE) * PAGE_SIZE) as u64).expect("write");
    }
    let took = time(|| file.sync_all().expect("fsync"));
    std::fs::remove_file(&path).expect("remove");
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
