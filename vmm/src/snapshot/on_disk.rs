//! A snapshot as it lies on disk: what writing one (`file`) or loading one (`load`) hands
//! back, kept as the parent of the next diff.

use std::path::PathBuf;

use super::VmSnapshot;

/// A snapshot written to (or loaded from) `state_path`, kept in memory as the parent of the
/// next diff.
#[derive(Clone, Debug)]
pub struct SnapshotOnDisk {
    pub state_path: PathBuf,
    /// The state file's CRC32 (header and body).
    pub crc32: u32,
    pub snapshot: VmSnapshot,
    /// The canonical state paths of this snapshot and every parent it depends on (itself
    /// first): a diff is never written over one of them.
    pub chain: Vec<PathBuf>,
    /// Where the write's time went (zero for a loaded snapshot).
    pub timing: WriteTiming,
}

/// Where a snapshot write's time went, and what it wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteTiming {
    /// RAM files: written, checksummed per run, fsynced.
    pub ram: std::time::Duration,
    /// Bytes of RAM written (the runs' pages).
    pub ram_bytes: u64,
    pub disk: std::time::Duration,
    /// The state file: serialized, written through its temporary file, fsynced, renamed.
    pub state: std::time::Duration,
}
