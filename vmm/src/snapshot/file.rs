//! Snapshot files. A snapshot is a state file plus one RAM file per region, all in the state
//! file's directory (or below it), named in the state file relative to it:
//!
//! - RAM files (`<state name>-mem<region>-<nonce>.raw`) are sparse region images at file
//!   offset = region offset: every page holding data (`Snapshot::write_region`) or, for a
//!   diff, only the pages changed since the parent snapshot (`write_region_diff`). Each written
//!   run comes back with its CRC32: the state file lists the runs, so writing and checking cost
//!   what the file holds, never the region size. New names every time: a snapshot never writes
//!   a file an older one uses.
//! - The disk file (`<state name>-disk-<nonce>.raw`, with virtio-blk only): every byte of the
//!   VM's disk as of the snapshot instant (`FrozenDisk::write_to`, sparse where the disk's base
//!   is), or for a diff only the sectors that may have changed since the parent's
//!   (`FrozenDisk::changed_since`); its data runs are checksummed the same way.
//! - The state file (`format`): one header line (magic, version, producer, host CPU, body
//!   length and CRC32), then the JSON body (`body::Body`). It is written last, through a
//!   temporary file created exclusively, fsynced and renamed over the old one, so a crash at
//!   any point leaves the previous snapshot whole; then the old one's RAM and disk files go.
//!
//! Everything a write creates is created exclusively (a planted link is never followed) and
//! removed if the write fails. Loading (`load`) treats every file as untrusted input.
//!
//! This module writes; it is also where the rest of the VMM finds the reader (`load`) and
//! what both hand back (`on_disk`), which depend on nothing here.

use std::fs::File;
use std::path::{Path, PathBuf};

use memory::{FileRun, PAGE_SIZE};

use super::body::{Body, DiskFile, ParentRef, RamFile, Run};
use super::fsio::{nonce, open_beneath, open_dir, open_regular, parent_dir, read_limited, write_atomically, Created};
use super::host::HostCpu;
use super::runs::{checksum_runs, data_runs};
use super::{memfile, VmSnapshot};
use crate::vstate::VmState;
use devices::block::SECTOR_SIZE;

use super::error::io;
pub use super::error::SnapshotError;
pub use super::format::{SnapshotKind, FORMAT_VERSION, MAGIC};
pub use super::load::{check_state_file, load_snapshot, load_snapshot_with, LoadOptions};
pub use super::on_disk::{SnapshotOnDisk, WriteTiming};

/// Where a snapshot's RAM goes.
#[derive(Clone, Copy, Debug)]
pub enum MemTarget<'a> {
    /// One file per region in this directory (the state file's or one below it).
    Dir(&'a Path),
    /// Firecracker's single memory file (`mem_file_path`): anywhere; replaced whole. Loading
    /// finds it by itself only when it is inside the state file's directory; elsewhere the
    /// loader is given it (`LoadOptions::mem_file`).
    File(&'a Path),
}

/// Writes `snap` as a snapshot at `state_path` with RAM files in `mem_dir` (the state file's
/// directory or one below it). A diff writes only what changed since `parent`, which `snap`
/// must descend from, and never over `parent` or a snapshot `parent` depends on.
pub fn write_snapshot(
    snap: &VmSnapshot,
    state_path: &Path,
    mem_dir: &Path,
    kind: SnapshotKind,
    parent: Option<&SnapshotOnDisk>,
) -> Result<SnapshotOnDisk, SnapshotError> {
    write_snapshot_to(snap, state_path, MemTarget::Dir(mem_dir), kind, parent)
}

/// `write_snapshot` with the RAM in either layout (`MemTarget`).
pub fn write_snapshot_to(
    snap: &VmSnapshot,
    state_path: &Path,
    mem: MemTarget,
    kind: SnapshotKind,
    parent: Option<&SnapshotOnDisk>,
) -> Result<SnapshotOnDisk, SnapshotError> {
    let parent = match kind {
        SnapshotKind::Full => None,
        SnapshotKind::Diff => Some(parent.ok_or(SnapshotError::NoParent)?),
    };
    let name = state_path.file_name().ok_or_else(|| io(state_path)(std::io::ErrorKind::InvalidInput.into()))?;
    // The state file's directory is made if missing, as the RAM files' is.
    std::fs::create_dir_all(parent_dir(state_path)).map_err(io(state_path))?;
    let dir = parent_dir(state_path).canonicalize().map_err(io(state_path))?;
    let canonical = dir.join(name);
    let inside = |what, path: &Path| match path.strip_prefix(&dir) {
        Ok(relative) => Ok(relative.to_path_buf()),
        Err(_) => {
            Err(SnapshotError::OutsideDir { path: state_path.into(), what, outside: path.into(), dir: dir.clone() })
        }
    };
    let parent_ref = match parent {
        Some(p) => {
            if let Some(over) = p.chain.iter().find(|c| **c == canonical) {
                return Err(SnapshotError::OverItsParent { path: state_path.into(), parent: over.clone() });
            }
            Some(ParentRef { file: inside("parent snapshot", &p.chain[0])?, crc32: p.crc32 })
        }
        None => None,
    };
    let mem_rel = match mem {
        MemTarget::Dir(mem_dir) => {
            std::fs::create_dir_all(mem_dir).map_err(io(mem_dir))?;
            inside("mem_dir", &mem_dir.canonicalize().map_err(io(mem_dir))?)?
        }
        MemTarget::File(_) => PathBuf::new(),
    };
    let old_files = old_files(&dir, Path::new(name));
    let stem = name.to_string_lossy();
    let nonce = nonce();
    let mut created = Created::default();
    let mut timing = WriteTiming::default();
    let started = std::time::Instant::now();
    let parent_ram = parent.map(|p| &p.snapshot.ram);
    let to_run = |r: &FileRun| Run(r.first_page as u64, r.pages as u64, r.crc32);
    let mut regions = Vec::new();
    let mut mem_file = None;
    // Synced together with the state file.
    let mut to_sync: Vec<(File, PathBuf)> = Vec::new();
    match mem {
        MemTarget::Dir(_) => {
            for (index, &(start, size)) in snap.ram.layout().iter().enumerate() {
                let file_name = mem_rel.join(format!("{stem}-mem{index}-{nonce}.raw"));
                let file = created.create(&dir.join(&file_name))?;
                let runs = memfile::write_region(&snap.ram, parent_ram, index, &file)?;
                to_sync.push((file, dir.join(&file_name)));
                timing.ram_bytes += runs.iter().map(|r| (r.pages * PAGE_SIZE) as u64).sum::<u64>();
                let runs = runs.iter().map(to_run).collect();
                regions.push(RamFile { start: start.0, size: size as u64, file: file_name, file_offset: 0, runs });
            }
        }
        MemTarget::File(path) => {
            let file_name = path.file_name().ok_or_else(|| io(path)(std::io::ErrorKind::InvalidInput.into()))?;
            let mem_dir = parent_dir(path).canonicalize().map_err(io(path))?;
            let target = mem_dir.join(file_name);
            if let Some(over) = parent.and_then(|p| p.chain.iter().find(|c| **c == target)) {
                return Err(SnapshotError::OverItsParent { path: path.into(), parent: over.clone() });
            }
            // Written beside it and renamed over it once whole.
            let tmp = mem_dir.join(format!(".{}.tmp-{}-{nonce}", file_name.to_string_lossy(), std::process::id()));
            let file = created.create(&tmp)?;
            let written = memfile::write_single(&snap.ram, parent_ram, &file, &mem_dir)?;
            to_sync.push((file, tmp.clone()));
            let name_in_body = target.strip_prefix(&dir).map_or_else(|_| target.clone(), Path::to_path_buf);
            for (&(start, size), (file_offset, runs)) in snap.ram.layout().iter().zip(written) {
                timing.ram_bytes += runs.iter().map(|r| (r.pages * PAGE_SIZE) as u64).sum::<u64>();
                let runs = runs.iter().map(to_run).collect();
                regions.push(RamFile {
                    start: start.0,
                    size: size as u64,
                    file: name_in_body.clone(),
                    file_offset,
                    runs,
                });
            }
            mem_file = Some((tmp, target, mem_dir));
        }
    }
    timing.ram = started.elapsed();
    let disk = match &snap.disk {
        Some(frozen) => {
            let file_name = mem_rel.join(format!("{stem}-disk-{nonce}.raw"));
            let path = dir.join(&file_name);
            let file = created.create(&path)?;
            let changed = parent.and_then(|p| p.snapshot.disk.as_deref()).and_then(|p| frozen.changed_since(p));
            match &changed {
                Some(sectors) => frozen.write_sectors_to(&file, sectors),
                None => frozen.write_to(&file),
            }
            .map_err(io(&path))?;
            let listed = match &changed {
                Some(sectors) => sectors.runs().iter().map(|&(first, count)| (first as u64, count as u64)).collect(),
                None => data_runs(&file, frozen.sectors() * SECTOR_SIZE, SECTOR_SIZE).map_err(io(&path))?,
            };
            let runs = checksum_runs(&file, &path, SECTOR_SIZE, &listed)?;
            Some(DiskFile { file: file_name, sectors: frozen.sectors(), runs, diff: changed.is_some() })
        }
        None => None,
    };
    timing.disk = started.elapsed() - timing.ram;
    let body = Body { regions, parent: parent_ref, disk, vm: clone_state(&snap.state) };
    let body_bytes =
        serde_json::to_vec(&body).map_err(|source| SnapshotError::Body { path: state_path.into(), source })?;
    let (bytes, crc32) = super::format::encode(kind, HostCpu::current(), &body_bytes);
    let with: Vec<(&File, &Path)> = to_sync.iter().map(|(f, p)| (f, p.as_path())).collect();
    write_atomically(&mut created, &canonical, &bytes, &with, |created| {
        if let Some((tmp, target, mem_dir)) = &mem_file {
            std::fs::rename(tmp, target).map_err(io(target))?;
            created.forget(tmp);
            created.track(target);
            if *mem_dir != dir {
                File::open(mem_dir).and_then(|d| d.sync_all()).map_err(io(mem_dir))?;
            }
        }
        Ok(())
    })?;
    created.keep();
    remove_old_files(&dir, &old_files);
    timing.state = started.elapsed() - timing.ram - timing.disk;
    let mut chain = vec![canonical];
    chain.extend(mem_file.map(|(_, target, _)| target));
    chain.extend(parent.iter().flat_map(|p| p.chain.iter().cloned()));
    Ok(SnapshotOnDisk { state_path: state_path.to_path_buf(), crc32, snapshot: snap.clone(), chain, timing })
}

/// The RAM and disk files the snapshot now at `dir/name` names (none if there is none or it
/// is not a readable snapshot): they are removed once a new one replaced it.
fn old_files(dir: &Path, name: &Path) -> Vec<PathBuf> {
    let read = || -> Result<Vec<PathBuf>, SnapshotError> {
        let path = dir.join(name);
        let file = open_beneath(&open_dir(dir)?, dir, name, &path)?;
        let bytes = read_limited(&file, &path, super::format::MAX_STATE_FILE_BYTES)?;
        let (_, body) =
            super::format::decode(&bytes).map_err(|source| SnapshotError::Format { path: path.clone(), source })?;
        let body: Body = serde_json::from_slice(body).map_err(|source| SnapshotError::Body { path, source })?;
        Ok(body.regions.into_iter().map(|r| r.file).chain(body.disk.map(|d| d.file)).collect())
    };
    let stem = name.to_string_lossy();
    // Only names this writer gives (an edited state file cannot make it remove other files).
    let ours = |f: &PathBuf| {
        f.file_name().map(|n| n.to_string_lossy()).is_some_and(|n| {
            (n.starts_with(&format!("{stem}-mem")) || n.starts_with(&format!("{stem}-disk"))) && n.ends_with(".raw")
        })
    };
    read().unwrap_or_default().into_iter().filter(ours).collect()
}

/// Removes `files` (relative to `dir`) where each still resolves inside `dir`.
fn remove_old_files(dir: &Path, files: &[PathBuf]) {
    for file in files {
        let (Some(parent), Some(name)) = (file.parent(), file.file_name()) else {
            continue;
        };
        if let Ok(real_parent) = dir.join(parent).canonicalize() {
            if real_parent.starts_with(dir) && open_regular(&real_parent.join(name)).is_ok() {
                let _ = std::fs::remove_file(real_parent.join(name));
            }
        }
    }
}

/// `VmState` is not `Clone` (kvm_xsave is not); a JSON round trip copies it exactly.
fn clone_state(state: &VmState) -> VmState {
    serde_json::from_value(serde_json::to_value(state).expect("VmState serializes")).expect("and deserializes")
}
