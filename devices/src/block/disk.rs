//! A copy-on-write disk: a frozen base file shared by every VM cloned from it, plus this VM's
//! own sparse overlay holding the sectors it wrote since.
//!
//! A VM started from a file writes that file directly (no base). Its first clone freezes the
//! file as the base and gives the VM a fresh overlay; every clone gets the same base and a copy
//! of the source's overlay sectors (O(written), never O(disk)). Writes on either side after the
//! clone land in that side's overlay only; clones of clones work the same way.
//! Writes in flight at the freeze may still land in the file that just became the base: both
//! VMs had that request in flight, and the clone re-executes it against its own overlay.
//!
//! Snapshots and resets use the same mechanism: `CowDisk::freeze` (in `frozen`) is a clone
//! nobody writes, and the disk remembers which sectors it wrote since, so a reset to that
//! freeze copies back only those.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memory::sparse::copy_extent;
use memory::BlockSet;

use super::BlockError;

/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// A set of a disk's sectors (bit i = sector i).
pub type SectorSet = BlockSet;
/// Alignment of offset, length and memory an O_DIRECT transfer needs (conservative: the page).
pub const DIRECT_IO_ALIGN: u64 = 4096;

/// One open file of a disk, buffered and, where the filesystem allows it, O_DIRECT.
#[derive(Debug)]
pub struct LayerFile {
    buffered: File,
    direct: Option<File>,
}

impl LayerFile {
    pub(super) fn new(buffered: File) -> LayerFile {
        // Reopen through /proc so O_DIRECT also works for unnamed (O_TMPFILE) overlays.
        let path = format!("/proc/self/fd/{}", buffered.as_raw_fd());
        let direct = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).ok();
        LayerFile { buffered, direct }
    }

    /// A layer only ever read (a snapshot's saved disk file, which nothing may write).
    pub(super) fn read_only(buffered: File) -> LayerFile {
        let path = format!("/proc/self/fd/{}", buffered.as_raw_fd());
        let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok();
        LayerFile { buffered, direct }
    }

    pub(super) fn file(&self) -> &File {
        &self.buffered
    }

    /// The fd to use for a transfer; O_DIRECT only when `aligned`.
    pub fn fd(&self, aligned: bool) -> RawFd {
        match (&self.direct, aligned) {
            (Some(direct), true) => direct.as_raw_fd(),
            _ => self.buffered.as_raw_fd(),
        }
    }

    pub fn has_direct(&self) -> bool {
        self.direct.is_some()
    }
}

/// Which file a run of sectors is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskLayer {
    Top,
    Base,
}

/// A run of sectors served by one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub layer: DiskLayer,
    pub sector: u64,
    pub count: u64,
}

/// A VM's disk. See the module documentation.
#[derive(Debug)]
pub struct CowDisk {
    pub(super) sectors: u64,
    pub(super) base: Option<Arc<LayerFile>>,
    pub(super) top: LayerFile,
    /// Sectors in `top` (meaningful only with a base: without one, `top` holds everything).
    pub(super) written: SectorSet,
    pub(super) overlay_dir: PathBuf,
    /// The freeze (`FrozenDisk::id`) whose bytes plus `since_freeze` are this disk's bytes,
    /// if any: a reset to it copies back only `since_freeze`.
    pub(super) frozen_from: Option<u64>,
    /// Sectors written (or being written) since that freeze.
    pub(super) since_freeze: SectorSet,
}

impl CowDisk {
    /// Opens `path` as a VM's disk; its size must be a whole number of sectors. Overlays made
    /// by later clones go to `overlay_dir`.
    pub fn open(path: &Path, overlay_dir: &Path) -> Result<CowDisk, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| BlockError::Open { path: path.to_path_buf(), source })?;
        let len = file.metadata().map_err(|source| BlockError::Open { path: path.to_path_buf(), source })?.len();
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::DiskSize { path: path.to_path_buf(), len });
        }
        let sectors = len / SECTOR_SIZE;
        Ok(CowDisk {
            sectors,
            base: None,
            top: LayerFile::new(file),
            written: SectorSet::new(0),
            overlay_dir: overlay_dir.to_path_buf(),
            frozen_from: None,
            since_freeze: SectorSet::new(0),
        })
    }

    /// Disk size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn top(&self) -> &LayerFile {
        &self.top
    }

    /// The base file, if this disk has been cloned (or is a clone).
    pub fn base(&self) -> Option<&LayerFile> {
        self.base.as_deref()
    }

    /// Sectors this VM wrote since its base was frozen (0 before the first clone).
    pub fn written_sectors(&self) -> usize {
        self.written.len()
    }

    /// Which layers `count` sectors at `sector` are read from, in order.
    pub fn plan_read(&self, sector: u64, count: u64) -> Vec<Extent> {
        let mut extents: Vec<Extent> = Vec::new();
        for s in sector..sector + count {
            let layer = match self.base {
                Some(_) if !self.written.contains(s as usize) => DiskLayer::Base,
                _ => DiskLayer::Top,
            };
            match extents.last_mut() {
                Some(last) if last.layer == layer => last.count += 1,
                _ => extents.push(Extent { layer, sector: s, count: 1 }),
            }
        }
        extents
    }

    /// Records that `count` sectors at `sector` are being written to the top layer.
    pub fn mark_written(&mut self, sector: u64, count: u64) {
        if self.base.is_some() {
            self.written.insert_range(sector as usize, count as usize);
            self.since_freeze.insert_range(sector as usize, count as usize);
        }
    }

    fn new_overlay(&self) -> Result<LayerFile, BlockError> {
        new_overlay(&self.overlay_dir, self.sectors)
    }

    /// A copy-on-write clone: same base, a copy of this disk's written sectors. The first
    /// clone freezes this disk's file as the base and moves this disk onto a fresh overlay.
    pub fn clone_cow(&mut self) -> Result<CowDisk, BlockError> {
        if self.base.is_none() {
            let overlay = self.new_overlay()?;
            self.base = Some(Arc::new(std::mem::replace(&mut self.top, overlay)));
            self.written = SectorSet::new(self.sectors as usize);
            self.since_freeze = SectorSet::new(self.sectors as usize);
        }
        self.fork()
    }

    /// A new disk with the same base and a copy of this disk's written sectors. Only for a
    /// disk that has a base.
    pub(super) fn fork(&self) -> Result<CowDisk, BlockError> {
        let top = self.new_overlay()?;
        for (first, count) in self.written.runs() {
            copy_extent(
                &self.top.buffered,
                &top.buffered,
                first as u64 * SECTOR_SIZE,
                count as u64 * SECTOR_SIZE,
                None,
            )
            .map_err(|source| BlockError::Overlay { dir: self.overlay_dir.clone(), source })?;
        }
        Ok(CowDisk {
            sectors: self.sectors,
            base: self.base.clone(),
            top,
            written: self.written.clone(),
            overlay_dir: self.overlay_dir.clone(),
            frozen_from: None,
            since_freeze: SectorSet::new(self.sectors as usize),
        })
    }
}

/// A fresh, empty (sparse) overlay of `sectors` sectors: an unnamed file in `dir`.
pub(super) fn new_overlay(dir: &Path, sectors: u64) -> Result<LayerFile, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .and_then(|f| f.set_len(sectors * SECTOR_SIZE).map(|()| f))
        .map_err(|source| BlockError::Overlay { dir: dir.to_path_buf(), source })?;
    Ok(LayerFile::new(file))
}
