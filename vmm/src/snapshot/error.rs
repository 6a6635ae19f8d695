//! What is wrong with a snapshot on disk, or what failed writing one.

use std::path::{Path, PathBuf};

use memory::MemoryError;

use super::format::FormatError;
use super::host::HostCpuError;
use super::validate::ValidateError;

/// What is wrong with a snapshot on disk, or what failed writing one. Every variant names the
/// file; a snapshot file is input, so everything but `Io` on the writer's side is bad input.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: I/O failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: cannot be restored on this host")]
    Host {
        path: PathBuf,
        #[source]
        source: HostCpuError,
    },
    #[error("{path}: body is not valid JSON for this format")]
    Body {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: invalid snapshot")]
    Invalid {
        path: PathBuf,
        #[source]
        source: ValidateError,
    },
    #[error("{path}: file name {name:?} does not stay inside the snapshot's directory {dir}")]
    Escapes { path: PathBuf, name: PathBuf, dir: PathBuf },
    #[error("{path}: parent chain longer than {max} snapshots")]
    ChainTooLong { path: PathBuf, max: usize },
    #[error("{path}: parent chain comes back to {parent}")]
    ChainCycle { path: PathBuf, parent: PathBuf },
    #[error("{path}: RAM file has {actual} bytes, region needs {expected}")]
    RamFileSize { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: RAM file does not match its checksums")]
    RamFile {
        path: PathBuf,
        #[source]
        source: MemoryError,
    },
    #[error("{path}: corrupted: CRC32 {actual:#010x} over bytes {offset}..+{len}, expected {expected:#010x}")]
    Corrupted { path: PathBuf, offset: u64, len: u64, expected: u32, actual: u32 },
    #[error("{path}: holds data at byte {offset} outside the runs its state file lists")]
    DataOutsideRuns { path: PathBuf, offset: u64 },
    #[error("{path}: parent snapshot {parent} changed since this diff was taken")]
    ParentChanged { path: PathBuf, parent: PathBuf },
    #[error("{path}: RAM layout differs from its parent snapshot's")]
    ParentLayout { path: PathBuf },
    #[error("{path}: disk file has {actual} bytes, the snapshot's disk has {expected}")]
    DiskFileSize { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: saved devices and disk do not go together: {reason}")]
    DeviceMismatch { path: PathBuf, reason: String },
    #[error("{path}: cannot write or open the disk of the snapshot")]
    Disk {
        path: PathBuf,
        #[source]
        source: devices::block::BlockError,
    },
    #[error("a diff snapshot needs the snapshot it is relative to (take a full one first)")]
    NoParent,
    #[error("{path}: a diff cannot be written over {parent}, a snapshot it depends on")]
    OverItsParent { path: PathBuf, parent: PathBuf },
    #[error("{path}: {what} {outside} is outside the snapshot's directory {dir} (loading resolves files there)")]
    OutsideDir { path: PathBuf, what: &'static str, outside: PathBuf, dir: PathBuf },
    #[error("RAM images of the snapshot could not be written or mapped")]
    Memory(#[source] MemoryError),
}

impl From<crate::regular_file::RegularFileError> for SnapshotError {
    fn from(e: crate::regular_file::RegularFileError) -> SnapshotError {
        use crate::regular_file::RegularFileError;
        match e {
            RegularFileError::Open { path, source } => SnapshotError::Io { path, source },
            RegularFileError::NotRegular { path, kind } => SnapshotError::NotRegular { path, kind },
        }
    }
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}
