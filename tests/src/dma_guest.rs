//! The `dma` tiny guest's fixtures: its test disk, the bytes its devices must leave in RAM,
//! and what it prints when both devices succeed.

#![allow(clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use memory::{Bytes, GuestAddress, GuestRam};
use vmm::layout::DMA_GUEST_PATTERN;
use vmm::{build_tiny_vm, guests, VmConfig};

use crate::captured;

/// A disk file filled with `disk_byte`, removed when dropped.
pub struct TempDisk(pub PathBuf);

/// A byte of the test disk (varies with sector and offset, never all zero).
pub fn disk_byte(offset: u64) -> u8 {
    (offset / 512 * 13 + offset % 251) as u8
}

impl TempDisk {
    pub fn new(sectors: u64) -> TempDisk {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("zygote-dmaguest-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, disk_bytes(0, (sectors * 512) as usize)).unwrap();
        TempDisk(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `len` bytes of the test disk from byte `offset`.
pub fn disk_bytes(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(disk_byte).collect()
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The DMA engine's pattern transfer, `len` bytes of it.
pub fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| DMA_GUEST_PATTERN.to_le_bytes()[i % 8]).collect()
}

/// `len` bytes of guest RAM at `addr`.
pub fn bytes(ram: &GuestRam, addr: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    ram.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// What the guest prints when both devices succeed and `disk_len` bytes are read.
pub fn expected_output(disk_len: usize) -> String {
    let dma = fnv1a64(&pattern_bytes(vmm::layout::DMA_GUEST_DMA_LEN as usize));
    let blk = fnv1a64(&disk_bytes(0, disk_len));
    format!("DMA done {dma:016x}\nBLK done {blk:016x}\n")
}

/// A paused VM `vm_id` running the `dma` guest with `arg` (pacing in µs, flags), one vCPU, a
/// captured console and `disk` if given.
pub fn dma_vm(disk: Option<&TempDisk>, vm_id: u64, arg: u64) -> (vmm::Vmm, Arc<Mutex<Vec<u8>>>) {
    let (config, out) = captured(1);
    let config = VmConfig { disk: disk.map(|d| d.0.clone()), vm_id, ..config };
    (build_tiny_vm(&config, guests::find("dma").unwrap(), arg).unwrap(), out)
}
