//! Fixtures shared by the memory tests.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::sync::Mutex;

use memory::VcpuDirtyLog;

/// A vCPU dirty log the test writes into, standing in for KVM's: `mark` is what KVM does when
/// a vCPU writes a page, `fetch` returns and clears the bits (bit i = page i of a region).
pub struct FakeVcpuLog {
    regions: Mutex<Vec<Vec<u64>>>,
}

impl FakeVcpuLog {
    pub fn new(regions: usize) -> Self {
        FakeVcpuLog { regions: Mutex::new(vec![Vec::new(); regions]) }
    }

    pub fn mark(&self, region: usize, page: usize) {
        let mut regions = self.regions.lock().unwrap();
        let words = &mut regions[region];
        if words.len() <= page / 64 {
            words.resize(page / 64 + 1, 0);
        }
        words[page / 64] |= 1 << (page % 64);
    }
}

impl VcpuDirtyLog for FakeVcpuLog {
    fn fetch(&self, index: usize, _pages: usize) -> std::io::Result<Vec<u64>> {
        Ok(std::mem::take(&mut self.regions.lock().unwrap()[index]))
    }
}

/// Pss of `ram`'s mappings from /proc/self/smaps (what `GuestRam::stats` no longer reads: it
/// costs O(every mapping of the process)).
pub fn pss_bytes(ram: &memory::GuestRam) -> u64 {
    let ranges: Vec<(u64, u64)> = ram.kvm_regions().iter().map(|r| (r.userspace_addr, r.userspace_addr + r.memory_size)).collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut pss = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                inside = ranges.iter().any(|&(lo, hi)| start >= lo && end <= hi);
                continue;
            }
        }
        if inside && first == "Pss:" {
            pss += fields.next().and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) * 1024;
        }
    }
    pss
}
