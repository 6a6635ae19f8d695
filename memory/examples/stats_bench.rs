//! Statistics of many RAMs in one process: `cargo run --release -p zygote-memory --example stats_bench [VMS]`.
//!
//! VMS (default 1000) clones of one 64 MiB RAM holding 16 MiB of data, each writing 1 % of its
//! pages, as `GET /vms` sees them with that many VMs. Times `GuestRam::stats` for all of them
//! (PAGEMAP_SCAN) against the other ways of counting a RAM's pages, measured in the same run:
//! - `/proc/self/smaps`, what `stats` read before: O(every mapping of the process) per RAM
//!   (timed on 50 of the RAMs; the total for all is that times VMS);
//! - `/proc/self/pagemap`, 8 bytes per page (the fallback on kernels without PAGEMAP_SCAN);
//! - `mincore`, a byte per page, which cannot tell a VM's own pages from shared ones.
//!
//! Prints one JSON object.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use memory::{Bytes, GuestAddress, GuestRam, PAGE_SIZE};

const MIB: usize = 1 << 20;
const RAM: usize = 64 * MIB;
const SMAPS_SAMPLE: usize = 50;

fn main() {
    let vms: usize = std::env::args().nth(1).map_or(1000, |n| n.parse().expect("VMS is a number"));
    let pages = RAM / PAGE_SIZE;
    let root = GuestRam::new(&[(GuestAddress(0), RAM)]).expect("RAM");
    for page in (0..pages).step_by(4) {
        root.write_slice(&[1; PAGE_SIZE], GuestAddress((page * PAGE_SIZE) as u64)).expect("populate");
    }
    let written = pages / 100;
    let clones: Vec<GuestRam> = (0..vms)
        .map(|i| {
            let clone = root.clone_cow().expect("clone");
            for k in 0..written {
                let page = (k * 97 + i) % pages;
                clone.write_slice(&[2; 8], GuestAddress((page * PAGE_SIZE) as u64)).expect("write");
            }
            clone
        })
        .collect();
    let ranges: Vec<(u64, u64)> =
        clones.iter().map(|ram| ram.kvm_regions()[0]).map(|r| (r.userspace_addr, r.memory_size)).collect();

    let mut private = 0;
    let scan = time(|| {
        for ram in &clones {
            private += ram.stats().private_bytes / PAGE_SIZE as u64;
        }
    });
    assert_eq!(private, (vms * written) as u64, "each clone owns exactly the pages it wrote");
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let mut anon = 0;
    let read = time(|| ranges.iter().for_each(|&(start, len)| anon += pagemap_anon_pages(&pagemap, start, len)));
    assert_eq!(anon, private, "pagemap agrees");
    let mut resident = 0;
    let mincore = time(|| ranges.iter().for_each(|&(start, len)| resident += mincore_pages(start, len)));
    // smaps costs O(all mappings) per RAM: 1000 RAMs take over a minute, so it reads a sample.
    let sample = &ranges[..ranges.len().min(SMAPS_SAMPLE)];
    let mut smaps_anon = 0;
    let smaps = time(|| sample.iter().for_each(|&(start, len)| smaps_anon += smaps_anonymous_kib(start, len)));
    assert_eq!(smaps_anon * 1024 / PAGE_SIZE as u64, (sample.len() * written) as u64, "smaps agrees");
    let smaps_per_vm = smaps / sample.len() as u32;

    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    println!(
        "{{\"vms\":{vms},\"ram_mib\":{},\"written_pages_per_vm\":{written},\"stats_ms\":{},\"stats_us_per_vm\":{:.1},\
         \"pagemap_read_ms\":{},\"mincore_ms\":{},\"mincore_resident_pages\":{resident},\"smaps_us_per_vm\":{:.0},\"smaps_all_vms_ms_estimated\":{}}}",
        RAM / MIB,
        ms(scan),
        scan.as_secs_f64() * 1e6 / vms as f64,
        ms(read),
        ms(mincore),
        smaps_per_vm.as_secs_f64() * 1e6,
        ms(smaps_per_vm * vms as u32),
    );
}

fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// Anonymous (present or swapped, not file) pages of a range from /proc/self/pagemap.
fn pagemap_anon_pages(pagemap: &File, start: u64, len: u64) -> u64 {
    let mut buf = vec![0u8; (len / PAGE_SIZE as u64 * 8) as usize];
    pagemap.read_exact_at(&mut buf, start / PAGE_SIZE as u64 * 8).expect("read pagemap");
    let entries = buf.chunks_exact(8).map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
    entries.filter(|e| e & (3 << 62) != 0 && e & (1 << 61) == 0).count() as u64
}

/// Resident pages of a range (own or shared: mincore cannot tell).
fn mincore_pages(start: u64, len: u64) -> u64 {
    let mut vec = vec![0u8; (len / PAGE_SIZE as u64) as usize];
    // SAFETY: the range is a live mapping of a RAM we hold; `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore");
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64
}

/// `Anonymous:` KiB of the mappings inside a range, from a fresh read of /proc/self/smaps.
fn smaps_anonymous_kib(start: u64, len: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((lo, hi)) = first
            .split_once('-')
            .and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)))
        {
            inside = lo >= start && hi <= start + len;
        } else if inside && first == "Anonymous:" {
            kib += fields.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    kib
}
