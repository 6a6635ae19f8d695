//! A disk frozen at one instant (`FrozenDisk`): the disk half of a VM snapshot. It is a
//! copy-on-write clone that no VM writes: the shared base plus a private copy of the sectors the
//! VM had written. Restores and resets start VMs from it with their own overlay; a snapshot file
//! saves its bytes (`write_to`) and a loaded one serves them again (`open`).
//!
//! Cost: freezing copies the VM's overlay sectors (O(written), like a clone); a reset to the
//! freeze the disk last came from copies back only the sectors written since (`since_freeze`).

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memory::sparse::{copy_extent, data_extents};

use super::disk::{new_overlay, CowDisk, LayerFile, SectorSet, SECTOR_SIZE};
use super::BlockError;

/// Ids of freezes, unique in the process: a disk knows which freeze it last came from.
static NEXT_FREEZE_ID: AtomicU64 = AtomicU64::new(1);

/// A disk's bytes as of one instant; never written again. See the module documentation.
#[derive(Debug)]
pub struct FrozenDisk {
    pub(super) id: u64,
    /// Always has a base.
    pub(super) disk: CowDisk,
    /// Sectors a write in flight at the freeze may still change in the base (when the freeze
    /// made the VM's file the base, the file takes those writes): a diff against this freeze
    /// must carry them.
    pub(super) unsettled: SectorSet,
}

impl CowDisk {
    /// Freezes this disk's bytes as of now (the first freeze or clone makes the disk's file the
    /// base, as `clone_cow` does). Writes in flight land in this disk only; the device marks
    /// their sectors (`mark_changed_since_freeze`) because a snapshot re-executes them.
    pub fn freeze(&mut self) -> Result<FrozenDisk, BlockError> {
        let frozen = FrozenDisk::new(self.clone_cow()?);
        self.frozen_from = Some(frozen.id);
        self.since_freeze.clear();
        Ok(frozen)
    }

    /// Whether this disk and `other` read unwritten sectors from the same base file.
    pub(super) fn shares_base(&self, other: &CowDisk) -> bool {
        match (&self.base, &other.base) {
            (Some(mine), Some(theirs)) => Arc::ptr_eq(mine, theirs),
            _ => false,
        }
    }

    /// Counts `count` sectors at `sector` as changed since the last freeze (a write that was in
    /// flight at the freeze may land after it).
    pub fn mark_changed_since_freeze(&mut self, sector: u64, count: u64) {
        if self.base.is_some() {
            self.since_freeze.insert_range(sector as usize, count as usize);
        }
    }

    /// Brings this disk back to `frozen`'s bytes, discarding every write since. Copies back
    /// only the sectors written since when this disk came from `frozen` (the reset loop);
    /// otherwise moves onto a fresh overlay over `frozen`. Call it with no I/O in flight.
    pub fn reset_to(&mut self, frozen: &FrozenDisk) -> Result<(), BlockError> {
        if frozen.disk.sectors != self.sectors {
            return Err(BlockError::DiskMismatch { sectors: frozen.disk.sectors, disk_sectors: self.sectors });
        }
        if self.frozen_from != Some(frozen.id) || !self.shares_base(&frozen.disk) {
            *self = frozen.instantiate()?;
            return Ok(());
        }
        frozen
            .copy_sectors(&self.since_freeze, self.top.file())
            .map_err(|source| BlockError::Overlay { dir: self.overlay_dir.clone(), source })?;
        // The copied-back sectors stay in `written`: the overlay now holds the frozen bytes.
        self.since_freeze.clear();
        Ok(())
    }
}

/// Splits the run (`first`, `count`) into maximal pieces inside or outside `set`:
/// (inside, first, count).
fn split_by(set: &SectorSet, first: usize, count: usize) -> Vec<(bool, usize, usize)> {
    let mut pieces: Vec<(bool, usize, usize)> = Vec::new();
    for s in first..first + count {
        let inside = set.contains(s);
        match pieces.last_mut() {
            Some(last) if last.0 == inside => last.2 += 1,
            _ => pieces.push((inside, s, 1)),
        }
    }
    pieces
}

impl FrozenDisk {
    /// `disk`'s bytes as a new freeze, settled (nothing in flight can change them).
    pub(super) fn new(disk: CowDisk) -> FrozenDisk {
        let unsettled = SectorSet::new(disk.sectors as usize);
        FrozenDisk { id: NEXT_FREEZE_ID.fetch_add(1, Ordering::Relaxed), disk, unsettled }
    }

    /// Counts `count` sectors at `sector` as being written at the freeze (see `unsettled`).
    pub fn mark_unsettled(&mut self, sector: u64, count: u64) {
        self.unsettled.insert_range(sector as usize, count as usize);
    }

    /// A saved disk file as a frozen disk, opened read-only (it must never change: VMs
    /// started from it write their own overlays in `overlay_dir`).
    pub fn open(path: &Path, overlay_dir: &Path) -> Result<FrozenDisk, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|source| BlockError::Open { path: path.to_path_buf(), source })?;
        Self::open_file(file, path, overlay_dir)
    }

    /// `open` for a file the caller opened (and checked) itself; `path` names it in errors.
    pub fn open_file(file: File, path: &Path, overlay_dir: &Path) -> Result<FrozenDisk, BlockError> {
        let open_error = |source| BlockError::Open { path: path.to_path_buf(), source };
        let len = file.metadata().map_err(open_error)?.len();
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::DiskSize { path: path.to_path_buf(), len });
        }
        let sectors = len / SECTOR_SIZE;
        let disk = CowDisk {
            sectors,
            base: Some(Arc::new(LayerFile::read_only(file))),
            top: new_overlay(overlay_dir, sectors)?,
            written: SectorSet::new(sectors as usize),
            overlay_dir: overlay_dir.to_path_buf(),
            frozen_from: None,
            since_freeze: SectorSet::new(sectors as usize),
        };
        Ok(FrozenDisk::new(disk))
    }

    /// Disk size in sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors
    }

    /// Sectors held in the private overlay (written by the VM since its base was frozen).
    pub fn written_sectors(&self) -> usize {
        self.disk.written.len()
    }

    fn base(&self) -> &LayerFile {
        self.disk.base().expect("a frozen disk always has a base")
    }

    /// Copies this freeze's bytes of `sectors` into `out` at the same offsets: each run from
    /// the private overlay where the freeze holds it, else from the base.
    pub(super) fn copy_sectors(&self, sectors: &SectorSet, out: &File) -> std::io::Result<()> {
        for (first, count) in sectors.runs() {
            for (from_top, start, n) in split_by(&self.disk.written, first, count) {
                let from = if from_top { self.disk.top.file() } else { self.base().file() };
                copy_extent(from, out, start as u64 * SECTOR_SIZE, n as u64 * SECTOR_SIZE, None)?;
            }
        }
        Ok(())
    }

    /// A new VM disk with these bytes: same base, its own copy of the overlay sectors.
    pub fn instantiate(&self) -> Result<CowDisk, BlockError> {
        let mut disk = self.disk.fork()?;
        disk.frozen_from = Some(self.id);
        Ok(disk)
    }

    /// Writes every byte of this disk into `out` (sized to the disk), sparse where the base is
    /// sparse: the base's data extents (SEEK_DATA/SEEK_HOLE), then the overlay sectors over
    /// them. `copy_file_range` keeps the copy in the kernel (and reflinks where the filesystem
    /// can).
    pub fn write_to(&self, out: &File) -> std::io::Result<()> {
        let size = self.disk.sectors * SECTOR_SIZE;
        out.set_len(size)?;
        let base = self.base().file();
        for (start, len) in data_extents(base, size)? {
            copy_extent(base, out, start, len, None)?;
        }
        self.copy_sectors(&self.disk.written, out)?;
        out.sync_all()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::super::disk::DiskLayer;
    use super::*;

    pub(crate) const SECTORS: u64 = 64;

    pub(crate) fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("zygote-frozen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A disk file `name` whose sector `s` is filled with byte `s`.
    pub(crate) fn disk_file(dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn read(disk: &CowDisk, sector: u64, count: u64) -> Vec<u8> {
        let mut out = vec![0u8; (count * SECTOR_SIZE) as usize];
        for extent in disk.plan_read(sector, count) {
            let file = match extent.layer {
                DiskLayer::Top => disk.top.file(),
                DiskLayer::Base => disk.base().unwrap().file(),
            };
            let at = ((extent.sector - sector) * SECTOR_SIZE) as usize;
            let len = (extent.count * SECTOR_SIZE) as usize;
            file.read_exact_at(&mut out[at..at + len], extent.sector * SECTOR_SIZE).unwrap();
        }
        out
    }

    pub(crate) fn write(disk: &mut CowDisk, sector: u64, byte: u8, count: u64) {
        disk.mark_written(sector, count);
        disk.top.file().write_all_at(&vec![byte; (count * SECTOR_SIZE) as usize], sector * SECTOR_SIZE).unwrap();
    }

    #[test]
    fn reset_copies_back_only_what_was_written_since_the_freeze() {
        let dir = scratch("reset");
        let mut disk = CowDisk::open(&disk_file(&dir, "disk.img"), &dir).unwrap();
        write(&mut disk, 3, 0xaa, 2); // before any freeze: goes into the file itself
        let frozen = disk.freeze().unwrap();
        let expected = read(&disk, 0, SECTORS);
        assert_eq!(&expected[3 * 512..5 * 512], &[0xaa; 1024][..]);
        for round in 0..3u8 {
            write(&mut disk, 4, 0xb0 + round, 1);
            write(&mut disk, 10, 0xc0 + round, 3);
            assert_eq!(disk.since_freeze.len(), 4);
            assert!(read(&disk, 0, SECTORS) != expected, "round {round}: the writes landed");
            disk.reset_to(&frozen).unwrap();
            assert_eq!(disk.since_freeze.len(), 0, "round {round}: the copy-back path");
            assert!(read(&disk, 0, SECTORS) == expected, "round {round}: reset left writes behind");
        }
        // Another VM's disk reset to this freeze moves onto a fresh overlay over it.
        let mut other = CowDisk::open(&disk_file(&dir, "other.img"), &dir).unwrap();
        other.reset_to(&frozen).unwrap();
        assert!(read(&other, 0, SECTORS) == expected, "another disk reset to the freeze");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_to_saves_the_frozen_bytes_and_open_serves_them_read_only() {
        let dir = scratch("save");
        let mut disk = CowDisk::open(&disk_file(&dir, "disk.img"), &dir).unwrap();
        let first = disk.freeze().unwrap();
        write(&mut disk, 7, 0x77, 2);
        let frozen = disk.freeze().unwrap();
        write(&mut disk, 7, 0x99, 1); // after the freeze: not in it
        assert_eq!(frozen.written_sectors(), 2);
        let saved = dir.join("saved.raw");
        frozen.write_to(&File::create(&saved).unwrap()).unwrap();
        let bytes = std::fs::read(&saved).unwrap();
        assert!(bytes == read(&frozen.instantiate().unwrap(), 0, SECTORS), "saved file = frozen bytes");
        assert_eq!(&bytes[7 * 512..9 * 512], &[0x77; 1024][..]);
        assert_eq!(bytes[6 * 512], 6);
        drop(first);

        let loaded = FrozenDisk::open(&saved, &dir).unwrap();
        assert_eq!(loaded.sectors(), SECTORS);
        let mut vm = loaded.instantiate().unwrap();
        write(&mut vm, 0, 0xee, 8);
        assert_eq!(read(&vm, 0, 1), vec![0xee; 512]);
        assert!(std::fs::read(&saved).unwrap() == bytes, "a VM over a saved disk never writes it");
        vm.reset_to(&loaded).unwrap();
        assert!(read(&vm, 0, SECTORS) == bytes, "a reset VM reads the saved bytes");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_sparse_base_stays_sparse_in_the_saved_file() {
        let dir = scratch("sparse");
        let path = dir.join("sparse.img");
        let file = File::create(&path).unwrap();
        file.set_len(16 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        let mut disk = CowDisk::open(&path, &dir).unwrap();
        let frozen = disk.freeze().unwrap();
        let saved = dir.join("saved.raw");
        frozen.write_to(&File::create(&saved).unwrap()).unwrap();
        let meta = std::fs::metadata(&saved).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "{} bytes allocated for 4 KiB of data", meta.blocks() * 512);
        assert!(std::fs::read(&saved).unwrap() == std::fs::read(&path).unwrap(), "same bytes");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
