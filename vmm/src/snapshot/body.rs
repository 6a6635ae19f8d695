//! The state file's body: the VM's state and the files that hold its RAM and disk, named
//! relative to the state file's directory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vstate::VmState;

/// What a state file's body holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    /// One entry per RAM region, in `vm.ram_layout` order.
    pub regions: Vec<RamFile>,
    /// For a diff: the snapshot it is relative to.
    pub parent: Option<ParentRef>,
    /// The disk as of the snapshot, present exactly when `vm.devices` has virtio-blk.
    pub disk: Option<DiskFile>,
    pub vm: VmState,
}

/// A diff's parent: its state file and that file's CRC32 (refused if it changed since).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    /// Relative to this state file's directory, inside it.
    pub file: PathBuf,
    pub crc32: u32,
}

/// A run of units (pages of a RAM file, sectors of a disk file) a file holds, with the CRC32
/// of its bytes: `(first, count, crc32)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run(pub u64, pub u64, pub u32);

/// The RAM file of one region.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamFile {
    pub start: u64,
    pub size: u64,
    /// Relative to the state file's directory, inside it; or Firecracker's single memory
    /// file, which may be anywhere and is then given explicitly at load.
    pub file: PathBuf,
    /// Where the region starts in its file: 0 for a file per region; in a single memory file,
    /// the sum of the sizes of the regions before it.
    #[serde(default)]
    pub file_offset: u64,
    /// The page runs the file holds: every page with data for a full snapshot (the rest
    /// reads as zeros), the pages changed since the parent for a diff.
    pub runs: Vec<Run>,
}

/// The disk file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    /// Relative to the state file's directory, inside it.
    pub file: PathBuf,
    pub sectors: u64,
    /// The sector runs the file holds (see `RamFile::runs`).
    pub runs: Vec<Run>,
    /// The file holds only its runs, over the parent's disk; else every sector.
    pub diff: bool,
}
