//! Loading a snapshot, every file of it untrusted: the chain of state files is read and
//! validated whole (bounded, acyclic, each within the read limit, each body checked against
//! what a VM can be) before any RAM or disk file is opened; then, from the full snapshot at
//! the root down, each level's files are opened inside its directory, checked against their
//! listed runs and mapped.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::block::{FrozenDisk, SECTOR_SIZE};
use memory::{BlockSet, FileKind, FileRun, Snapshot, PAGE_SIZE};

use super::body::{Body, Run};
use super::error::{io, SnapshotError};
use super::format::{decode, Header, SnapshotKind, MAX_STATE_FILE_BYTES};
use super::fsio::{open_beneath, open_dir, open_regular, parent_dir, read_limited};
use super::host::HostCpu;
use super::memfile::{open_regions, RegionFile};
use super::on_disk::SnapshotOnDisk;
use super::runs::verify_runs;
use super::validate::check_body;
use super::VmSnapshot;

/// Most state files in one chain (a full snapshot and its diffs).
pub const MAX_CHAIN: usize = 64;

/// One state file of a chain, read and validated.
struct Level {
    /// As the user or the child's body named it.
    path: PathBuf,
    /// Its directory, where its files resolve.
    dir: File,
    dir_path: PathBuf,
    header: Header,
    body: Body,
}

/// What the user says about a snapshot beside its state file's path.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Firecracker's single memory file (`mem_backend.backend_path` / `mem_file_path`): every
    /// RAM region of the named snapshot is read from this file, at the offsets its state file
    /// lists, wherever the file is (an explicit path, not one read from the file).
    pub mem_file: Option<PathBuf>,
    /// Memory files this process wrote itself (canonical paths, from `SnapshotOnDisk::chain`):
    /// a parent in the chain may name one of these outside its directory (a diff chain written
    /// with `mem_file_path`s elsewhere). Any other name a state file gives stays beneath it.
    pub written_here: Vec<PathBuf>,
}

/// Reads and checks the snapshot at `state_path` (and its parents), mapping its RAM files.
pub fn load_snapshot(state_path: &Path) -> Result<SnapshotOnDisk, SnapshotError> {
    load_snapshot_with(state_path, &LoadOptions::default())
}

/// `load_snapshot` with the user's `options` (which apply to the named snapshot, not to the
/// parents it names).
pub fn load_snapshot_with(state_path: &Path, options: &LoadOptions) -> Result<SnapshotOnDisk, SnapshotError> {
    let levels = read_chain(state_path)?;
    let host = HostCpu::current();
    let mut loaded: Option<SnapshotOnDisk> = None;
    for (depth, level) in levels.into_iter().enumerate().rev() {
        let mem_file = if depth == 0 { options.mem_file.as_deref() } else { None };
        let path = &level.path;
        level
            .header
            .host_cpu
            .check_runs_on(&host)
            .map_err(|source| SnapshotError::Host { path: path.clone(), source })?;
        if let (Some(expected), Some(parent)) = (&level.body.parent, &loaded) {
            if expected.crc32 != parent.crc32 {
                return Err(SnapshotError::ParentChanged { path: path.clone(), parent: parent.state_path.clone() });
            }
            if parent.snapshot.ram.layout() != level.body.vm.regions() {
                return Err(SnapshotError::ParentLayout { path: path.clone() });
            }
        }
        loaded = Some(load_level(level, loaded.as_ref(), mem_file, &options.written_here)?);
    }
    loaded.ok_or(SnapshotError::NoParent)
}

/// Decodes, parses and validates the bytes of one state file (no file is opened): what
/// loading does to each state file of a chain before anything else. The fuzz target
/// `snapshot_state` feeds it bodies sealed with a valid checksum.
pub fn check_state_file(bytes: &[u8]) -> Result<SnapshotKind, SnapshotError> {
    let path = PathBuf::from("<state file>");
    let (header, body) = decode(bytes).map_err(|source| SnapshotError::Format { path: path.clone(), source })?;
    let body: Body =
        serde_json::from_slice(body).map_err(|source| SnapshotError::Body { path: path.clone(), source })?;
    check_body(header.kind, &body).map_err(|source| SnapshotError::Invalid { path, source })?;
    Ok(header.kind)
}

/// The state files from `state_path` up to its full snapshot, validated.
fn read_chain(state_path: &Path) -> Result<Vec<Level>, SnapshotError> {
    let mut levels: Vec<Level> = Vec::new();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut path = state_path.to_path_buf();
    let mut file = open_regular(&path)?;
    loop {
        let meta = file.metadata().map_err(io(&path))?;
        if seen.contains(&(meta.dev(), meta.ino())) {
            let child = levels.last().map_or_else(|| path.clone(), |l| l.path.clone());
            return Err(SnapshotError::ChainCycle { path: child, parent: path });
        }
        if levels.len() == MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong { path: state_path.into(), max: MAX_CHAIN });
        }
        seen.push((meta.dev(), meta.ino()));
        let bytes = read_limited(&file, &path, MAX_STATE_FILE_BYTES)?;
        let (header, body) = decode(&bytes).map_err(|source| SnapshotError::Format { path: path.clone(), source })?;
        let body: Body =
            serde_json::from_slice(body).map_err(|source| SnapshotError::Body { path: path.clone(), source })?;
        check_body(header.kind, &body).map_err(|source| SnapshotError::Invalid { path: path.clone(), source })?;
        let dir_path = parent_dir(&path).to_path_buf();
        let dir = open_dir(&dir_path)?;
        let parent = body.parent.clone();
        levels.push(Level { path: path.clone(), dir, dir_path, header, body });
        let Some(parent) = parent else {
            return Ok(levels);
        };
        let level = levels.last().expect("just pushed");
        file = open_beneath(&level.dir, &level.dir_path, &parent.file, &level.path)?;
        path = level.dir_path.join(&parent.file);
    }
}

/// Opens, checks and maps the files of one validated level over `parent` (present exactly for
/// a diff, as `check_body` made sure).
fn load_level(
    level: Level,
    parent: Option<&SnapshotOnDisk>,
    mem_file: Option<&Path>,
    written_here: &[PathBuf],
) -> Result<SnapshotOnDisk, SnapshotError> {
    let kind = match level.header.kind {
        SnapshotKind::Full => FileKind::Full,
        SnapshotKind::Diff => FileKind::Diff,
    };
    // Each distinct file once, with the regions it holds (a single memory file holds all).
    let mut by_file: Vec<(&Path, Vec<usize>)> = Vec::new();
    for (index, region) in level.body.regions.iter().enumerate() {
        let name = mem_file.unwrap_or(&region.file);
        match by_file.iter_mut().find(|(n, _)| *n == name) {
            Some((_, indices)) => indices.push(index),
            None => by_file.push((name, vec![index])),
        }
    }
    let mut files: Vec<Option<RegionFile>> = level.body.regions.iter().map(|_| None).collect();
    let mut mem_paths = Vec::new();
    for (name, indices) in by_file {
        let (file, path) = match mem_file {
            Some(explicit) => (open_regular(explicit)?, explicit.to_path_buf()),
            None if written_here.iter().any(|w| w == name) => (open_regular(name)?, name.to_path_buf()),
            None => (open_beneath(&level.dir, &level.dir_path, name, &level.path)?, level.dir_path.join(name)),
        };
        let regions: Vec<_> = indices.iter().map(|&i| &level.body.regions[i]).collect();
        if regions.len() > 1 || regions[0].file_offset != 0 || mem_file.is_some() {
            mem_paths.push(path.canonicalize().map_err(io(&path))?);
        }
        for (index, opened) in indices.iter().zip(open_regions(file, &path, &regions, kind)?) {
            files[*index] = Some(opened);
        }
    }
    let files: Vec<RegionFile> = files.into_iter().flatten().collect();
    let disk = load_disk(&level, parent)?;
    let ram = match parent {
        Some(parent) => {
            let diffs = files.into_iter().map(|RegionFile { file, runs, size }| {
                let runs: Vec<(usize, usize)> = runs.iter().map(FileRun::page_run).collect();
                (file, BlockSet::from_runs(size / PAGE_SIZE, &runs))
            });
            Snapshot::from_diff_files(&parent.snapshot.ram, diffs.collect()).map_err(SnapshotError::Memory)?
        }
        None => Snapshot::from_files(&level.body.vm.regions(), files.into_iter().map(|r| r.file).collect())
            .map_err(SnapshotError::Memory)?,
    };
    let canonical =
        level.dir_path.canonicalize().map_err(io(&level.dir_path))?.join(level.path.file_name().unwrap_or_default());
    let mut chain = vec![canonical];
    chain.extend(mem_paths);
    chain.extend(parent.iter().flat_map(|p| p.chain.iter().cloned()));
    Ok(SnapshotOnDisk {
        state_path: level.path,
        crc32: level.header.crc32,
        snapshot: VmSnapshot { ram, state: Arc::new(level.body.vm), disk: disk.map(Arc::new) },
        chain,
        timing: Default::default(),
    })
}

/// Checks the disk file against the body (present exactly with virtio-blk state, length,
/// checksums) and opens it read-only as a frozen disk, or a diff one over `parent`'s disk.
fn load_disk(level: &Level, parent: Option<&SnapshotOnDisk>) -> Result<Option<FrozenDisk>, SnapshotError> {
    let body = &level.body;
    let blk = body.vm.devices.block.as_ref();
    let mismatch = |reason: String| SnapshotError::DeviceMismatch { path: level.path.clone(), reason };
    let disk = match (blk, &body.disk) {
        (None, None) => return Ok(None),
        (Some(_), Some(disk)) => disk,
        (saved, disk) => {
            let has = |b: bool| if b { "has" } else { "has no" };
            return Err(mismatch(format!(
                "the state {} virtio-blk, the snapshot {} disk file",
                has(saved.is_some()),
                has(disk.is_some())
            )));
        }
    };
    let path = level.dir_path.join(&disk.file);
    let file = open_beneath(&level.dir, &level.dir_path, &disk.file, &level.path)?;
    let actual = file.metadata().map_err(io(&path))?.len();
    // Validated: sectors * SECTOR_SIZE does not overflow.
    let expected = disk.sectors * SECTOR_SIZE;
    if actual != expected {
        return Err(SnapshotError::DiskFileSize { path, expected, actual });
    }
    verify_runs(&file, &path, expected, SECTOR_SIZE, &disk.runs, !disk.diff)?;
    let overlay_dir = std::env::temp_dir();
    let sectors = usize::try_from(disk.sectors).map_err(|_| SnapshotError::DiskFileSize {
        path: path.clone(),
        expected,
        actual,
    })?;
    let opened = match (disk.diff, parent.and_then(|p| p.snapshot.disk.as_deref())) {
        (false, _) => FrozenDisk::open_file(file, &path, &overlay_dir),
        (true, Some(parent_disk)) => {
            let runs: Vec<(usize, usize)> =
                disk.runs.iter().map(|&Run(first, count, _)| (first as usize, count as usize)).collect();
            FrozenDisk::open_diff_file(parent_disk, file, &path, &BlockSet::from_runs(sectors, &runs))
        }
        (true, None) => return Err(mismatch("a diff disk file with no parent disk under it".into())),
    };
    opened.map(Some).map_err(|source| SnapshotError::Disk { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format::encode;

    /// The fuzz target's seeds (real bodies of tiny-guest snapshots, a kind byte first) pass
    /// the checks as the target seals them: the fuzzer starts from valid files.
    #[test]
    fn the_fuzz_seeds_are_valid_state_files() {
        for seed in [
            &include_bytes!("../../../tools/fuzz/seeds/snapshot_state/base")[..],
            &include_bytes!("../../../tools/fuzz/seeds/snapshot_state/diff")[..],
            &include_bytes!("../../../tools/fuzz/seeds/snapshot_state/disk")[..],
        ] {
            let kind = if seed[0] & 1 == 0 { SnapshotKind::Full } else { SnapshotKind::Diff };
            let (file, _) = encode(kind, HostCpu::current(), &seed[1..]);
            assert_eq!(check_state_file(&file).unwrap(), kind);
            // And one edit of a listed field is refused.
            let text =
                String::from_utf8(seed[1..].to_vec()).unwrap().replacen("\"vcpus\":[", "\"vcpus\":[],\"x\":[", 1);
            assert!(check_state_file(&encode(kind, HostCpu::current(), text.as_bytes()).0).is_err());
        }
    }
}
