//! Fixtures shared by the memory tests.

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
