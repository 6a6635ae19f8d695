//! Snapshot files. A snapshot is a state file plus one RAM file per region:
//!
//! - RAM files (`<state name>-mem<region>-<nonce>.raw` in the memory directory) are full region
//!   images (`Snapshot::write_region`) or, for a diff, only the pages changed since the parent
//!   snapshot (`write_region_diff`), sparse, at file offset = region offset. New names every
//!   time: a snapshot never writes a file an older one uses.
//! - The disk file (`<state name>-disk-<nonce>.raw`, with virtio-blk only): every byte of the
//!   VM's disk as of the snapshot instant (`FrozenDisk::write_to`), sparse where the disk's
//!   base is sparse. The disk was frozen at the instant, with the device lock held, by copying
//!   the VM's overlay sectors (O(written)); the bytes are written here, after the VM resumed.
//!   A diff snapshot's disk file holds only the sectors that may have changed since the
//!   parent's (`FrozenDisk::changed_since`, listed in the body), sparse elsewhere; it is a
//!   full one only when the two disks share no base (a VM restored from another file).
//! - The state file is one JSON header line (magic, format version, body length and CRC32)
//!   followed by the JSON body (RAM files and their CRC32s, the parent for a diff, `VmState`).
//!   It is written last, to a temporary file that is fsynced and renamed over the old one, so a
//!   crash at any point leaves the previous snapshot whole.
//!
//! Loading checks all of it (the disk file's length and CRC32 too, and that the saved devices
//! and the disk file go together) and maps the RAM files MAP_PRIVATE (`Snapshot::from_files`,
//! or `from_diff_files` over the loaded parent); the disk file is opened read-only as the base
//! of the disks of the VMs started from it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::block::{FrozenDisk, SECTOR_SIZE};
use memory::{BlockSet, FileRun, MemoryError, Snapshot, PAGE_SIZE};
use serde::{Deserialize, Serialize};

use super::VmSnapshot;
use crate::vstate::VmState;

/// The first bytes of every state file.
pub const MAGIC: &str = "zygote-snapshot";
/// The one format version this build reads and writes (the whole file, not per struct).
/// Version 2: the MMIO devices' state and the disk file. Version 3: diff disk files.
pub const FORMAT_VERSION: u32 = 3;

/// Full: every RAM byte. Diff: the pages changed since the parent snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// What is wrong with a snapshot on disk, or what failed writing one.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: I/O failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a Zygote snapshot state file (bad header)")]
    NotASnapshot { path: PathBuf },
    #[error("{path}: the RAM files hold regions {files:?}, the state says {state:?}")]
    RamLayoutMismatch { path: PathBuf, files: Vec<(u64, usize)>, state: Vec<(u64, usize)> },
    #[error("{path}: format version {found}, this build reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated: header says {expected} body bytes, file has {actual}")]
    Truncated { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: corrupted: CRC32 {actual:#010x}, expected {expected:#010x}")]
    Corrupted { path: PathBuf, expected: u32, actual: u32 },
    #[error("{path}: body is not valid JSON for this format")]
    Body {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: RAM file has {actual} bytes, region needs {expected}")]
    RamFileSize { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: parent snapshot {parent} changed since this diff was taken")]
    ParentChanged { path: PathBuf, parent: PathBuf },
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
    #[error("RAM images of the snapshot could not be written or mapped")]
    Memory(#[source] MemoryError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    magic: String,
    format_version: u32,
    kind: SnapshotKind,
    body_len: u64,
    body_crc32: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    regions: Vec<RamFile>,
    /// For a diff: the parent's state file and its body CRC32 (refused if it changed since).
    parent: Option<(PathBuf, u32)>,
    /// The disk as of the snapshot, present exactly when `vm.devices` has virtio-blk.
    disk: Option<DiskFile>,
    vm: VmState,
}

#[derive(Debug, Serialize, Deserialize)]
struct DiskFile {
    /// Absolute path of the disk file.
    file: PathBuf,
    sectors: u64,
    crc32: u32,
    /// For a diff over the parent's disk: the (first sector, count) runs the file provides.
    diff_runs: Option<Vec<(usize, usize)>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RamFile {
    start: u64,
    size: usize,
    /// Absolute path of the region's RAM file.
    file: PathBuf,
    crc32: u32,
    /// For a diff: the (first page, count) runs the file provides.
    diff_runs: Option<Vec<(usize, usize)>>,
}

/// A snapshot written to (or loaded from) `state_path`, kept in memory as the parent of the
/// next diff.
#[derive(Clone, Debug)]
pub struct SnapshotOnDisk {
    pub state_path: PathBuf,
    pub body_crc32: u32,
    pub snapshot: VmSnapshot,
}

/// Writes `snap` as a snapshot at `state_path` with RAM files in `mem_dir`. A diff writes only
/// what changed since `parent`, which `snap` must descend from.
pub fn write_snapshot(
    snap: &VmSnapshot,
    state_path: &Path,
    mem_dir: &Path,
    kind: SnapshotKind,
    parent: Option<&SnapshotOnDisk>,
) -> Result<SnapshotOnDisk, SnapshotError> {
    let parent = match kind {
        SnapshotKind::Full => None,
        SnapshotKind::Diff => Some(parent.ok_or(SnapshotError::NoParent)?),
    };
    std::fs::create_dir_all(mem_dir).map_err(io(mem_dir))?;
    let mem_dir = mem_dir.canonicalize().map_err(io(mem_dir))?;
    let stem = state_path.file_name().map_or("snapshot".into(), |n| n.to_string_lossy().into_owned());
    let nonce = format!("{}-{}", std::process::id(), now_nanos());
    let mut regions = Vec::new();
    for (index, &(start, size)) in snap.ram.layout().iter().enumerate() {
        let path = mem_dir.join(format!("{stem}-mem{index}-{nonce}.raw"));
        let file = File::create_new(&path).map_err(io(&path))?;
        let diff_runs = match parent {
            None => {
                snap.ram.write_region(index, &file).map_err(SnapshotError::Memory)?;
                None
            }
            Some(p) => {
                let runs = snap.ram.write_region_diff(&p.snapshot.ram, index, &file).map_err(SnapshotError::Memory)?;
                Some(runs.iter().map(FileRun::page_run).collect())
            }
        };
        regions.push(RamFile { start: start.0, size, crc32: file_crc32(&path)?, file: path, diff_runs });
    }
    let disk = match &snap.disk {
        Some(frozen) => {
            let path = mem_dir.join(format!("{stem}-disk-{nonce}.raw"));
            let file = File::create_new(&path).map_err(io(&path))?;
            let changed = parent.and_then(|p| p.snapshot.disk.as_deref()).and_then(|p| frozen.changed_since(p));
            match &changed {
                Some(sectors) => frozen.write_sectors_to(&file, sectors),
                None => frozen.write_to(&file),
            }
            .map_err(io(&path))?;
            let diff_runs = changed.map(|sectors| sectors.runs());
            Some(DiskFile { crc32: file_crc32(&path)?, file: path, sectors: frozen.sectors(), diff_runs })
        }
        None => None,
    };
    let body = Body {
        regions,
        parent: parent.map(|p| (p.state_path.clone(), p.body_crc32)),
        disk,
        vm: clone_state(&snap.state),
    };
    let body_bytes = serde_json::to_vec(&body).map_err(|source| SnapshotError::Body { path: state_path.into(), source })?;
    let body_crc32 = crc32fast::hash(&body_bytes);
    let header = Header {
        magic: MAGIC.into(),
        format_version: FORMAT_VERSION,
        kind,
        body_len: body_bytes.len() as u64,
        body_crc32,
    };
    let mut bytes = serde_json::to_vec(&header).map_err(|source| SnapshotError::Body { path: state_path.into(), source })?;
    bytes.push(b'\n');
    bytes.extend_from_slice(&body_bytes);
    write_atomically(state_path, &bytes)?;
    Ok(SnapshotOnDisk { state_path: state_path.to_path_buf(), body_crc32, snapshot: snap.clone() })
}

/// Reads and checks the snapshot at `state_path` (and its parents), mapping its RAM files.
pub fn load_snapshot(state_path: &Path) -> Result<SnapshotOnDisk, SnapshotError> {
    let path = state_path.to_path_buf();
    let mut bytes = Vec::new();
    File::open(state_path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io(state_path))?;
    let newline = bytes.iter().position(|&b| b == b'\n').ok_or(SnapshotError::NotASnapshot { path: path.clone() })?;
    let header: Header =
        serde_json::from_slice(&bytes[..newline]).map_err(|_| SnapshotError::NotASnapshot { path: path.clone() })?;
    if header.magic != MAGIC {
        return Err(SnapshotError::NotASnapshot { path });
    }
    if header.format_version != FORMAT_VERSION {
        return Err(SnapshotError::Version { path, found: header.format_version });
    }
    let body_bytes = &bytes[newline + 1..];
    if body_bytes.len() as u64 != header.body_len {
        return Err(SnapshotError::Truncated { path, expected: header.body_len, actual: body_bytes.len() as u64 });
    }
    let crc = crc32fast::hash(body_bytes);
    if crc != header.body_crc32 {
        return Err(SnapshotError::Corrupted { path, expected: header.body_crc32, actual: crc });
    }
    let body: Body = serde_json::from_slice(body_bytes).map_err(|source| SnapshotError::Body { path: path.clone(), source })?;
    let mut files = Vec::with_capacity(body.regions.len());
    for region in &body.regions {
        let file = File::open(&region.file).map_err(io(&region.file))?;
        let actual = file.metadata().map_err(io(&region.file))?.len();
        if actual != region.size as u64 {
            return Err(SnapshotError::RamFileSize { path: region.file.clone(), expected: region.size as u64, actual });
        }
        let crc = file_crc32(&region.file)?;
        if crc != region.crc32 {
            return Err(SnapshotError::Corrupted { path: region.file.clone(), expected: region.crc32, actual: crc });
        }
        files.push(file);
    }
    let parent = match (&body.parent, header.kind) {
        (Some((parent_path, parent_crc)), SnapshotKind::Diff) => {
            let parent = load_snapshot(parent_path)?;
            if parent.body_crc32 != *parent_crc {
                return Err(SnapshotError::ParentChanged { path, parent: parent_path.clone() });
            }
            Some(parent)
        }
        (None, SnapshotKind::Full) => None,
        _ => return Err(SnapshotError::NotASnapshot { path }),
    };
    let disk = load_disk(&path, &body, parent.as_ref())?;
    let ram = match &parent {
        Some(parent) => {
            let diffs = files.into_iter().zip(&body.regions).map(|(file, region)| {
                (file, BlockSet::from_runs(region.size / PAGE_SIZE, region.diff_runs.as_deref().unwrap_or_default()))
            });
            Snapshot::from_diff_files(&parent.snapshot.ram, diffs.collect()).map_err(SnapshotError::Memory)?
        }
        None => Snapshot::from_files(&body.vm.regions(), files).map_err(SnapshotError::Memory)?,
    };
    if body.vm.regions() != ram.layout() {
        let shape = |regions: &[(memory::GuestAddress, usize)]| regions.iter().map(|&(a, s)| (a.0, s)).collect();
        return Err(SnapshotError::RamLayoutMismatch { path, files: shape(ram.layout()), state: shape(&body.vm.regions()) });
    }
    Ok(SnapshotOnDisk {
        state_path: state_path.to_path_buf(),
        body_crc32: header.body_crc32,
        snapshot: VmSnapshot { ram, state: Arc::new(body.vm), disk: disk.map(Arc::new) },
    })
}

/// Checks the disk file against the body (present exactly with virtio-blk state, length,
/// CRC32, the saved requests fit it) and opens it read-only as a frozen disk, or a diff one
/// over `parent`'s disk.
fn load_disk(path: &Path, body: &Body, parent: Option<&SnapshotOnDisk>) -> Result<Option<FrozenDisk>, SnapshotError> {
    let blk = body.vm.devices.block.as_ref();
    let mismatch = |reason: String| SnapshotError::DeviceMismatch { path: path.to_path_buf(), reason };
    let (saved, disk) = match (blk, &body.disk) {
        (None, None) => return Ok(None),
        (Some(saved), Some(disk)) => (saved, disk),
        (saved, disk) => {
            let has = |b: bool| if b { "has" } else { "has no" };
            return Err(mismatch(format!("the state {} virtio-blk, the snapshot {} disk file", has(saved.is_some()), has(disk.is_some()))));
        }
    };
    saved.device.check(disk.sectors).map_err(|e| mismatch(crate::api::chain(&e)))?;
    let actual = std::fs::metadata(&disk.file).map_err(io(&disk.file))?.len();
    let expected = disk.sectors * SECTOR_SIZE;
    if actual != expected {
        return Err(SnapshotError::DiskFileSize { path: disk.file.clone(), expected, actual });
    }
    let crc = file_crc32(&disk.file)?;
    if crc != disk.crc32 {
        return Err(SnapshotError::Corrupted { path: disk.file.clone(), expected: disk.crc32, actual: crc });
    }
    let overlay_dir = std::env::temp_dir();
    let opened = match (&disk.diff_runs, parent.and_then(|p| p.snapshot.disk.as_deref())) {
        (None, _) => FrozenDisk::open(&disk.file, &overlay_dir),
        (Some(runs), Some(parent_disk)) => {
            FrozenDisk::open_diff(parent_disk, &disk.file, &BlockSet::from_runs(disk.sectors as usize, runs))
        }
        (Some(_), None) => return Err(mismatch("a diff disk file with no parent disk under it".into())),
    };
    opened.map(Some).map_err(|source| SnapshotError::Disk { path: disk.file.clone(), source })
}

/// `VmState` is not `Clone` (kvm_xsave is not); a JSON round trip copies it exactly.
fn clone_state(state: &VmState) -> VmState {
    serde_json::from_value(serde_json::to_value(state).expect("VmState serializes")).expect("and deserializes")
}

fn file_crc32(path: &Path) -> Result<u32, SnapshotError> {
    let mut file = File::open(path).map_err(io(path))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// Writes `bytes` to `path` so that `path` holds either its old content or all of the new.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map_or("snapshot".into(), |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
