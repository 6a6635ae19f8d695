//! Diff snapshots of a disk: only the sectors that may differ from the parent snapshot's
//! freeze are saved, and loading puts them over the parent's disk. Cost grows with what the VM
//! wrote, not with the disk size, as for the RAM diff.
//!
//! Two freezes over the same base differ at most where either holds a private sector (its
//! `written` overlay) or where a write in flight at the parent's freeze may still have landed
//! in the base afterwards (`unsettled`): everywhere else both read the same base bytes.

use std::fs::{File, OpenOptions};
use std::path::Path;

use memory::sparse::copy_extent;

use super::disk::{SectorSet, SECTOR_SIZE};
use super::{BlockError, FrozenDisk};

impl FrozenDisk {
    /// The sectors whose bytes may differ between this freeze and `parent`'s, or `None` when
    /// the two share no base (a disk restored from another file): then only a full copy says
    /// what this disk holds.
    pub fn changed_since(&self, parent: &FrozenDisk) -> Option<SectorSet> {
        if !self.disk.shares_base(&parent.disk) || self.disk.sectors != parent.disk.sectors {
            return None;
        }
        let mut changed = self.disk.written.clone();
        changed.union_with(&parent.disk.written);
        changed.union_with(&parent.unsettled);
        Some(changed)
    }

    /// Writes this freeze's bytes of `sectors` into `out`, sized to the disk and sparse
    /// everywhere else, and syncs it.
    pub fn write_sectors_to(&self, out: &File, sectors: &SectorSet) -> std::io::Result<()> {
        out.set_len(self.disk.sectors * SECTOR_SIZE)?;
        self.copy_sectors(sectors, out)?;
        out.sync_all()
    }

    /// The disk a diff file describes: `parent`'s bytes with `sectors` read from the file at
    /// `path` (sized to the disk; `write_sectors_to` wrote it). The parent's private sectors
    /// and these go into a new overlay over the parent's base; no VM writes either.
    pub fn open_diff(parent: &FrozenDisk, path: &Path, sectors: &SectorSet) -> Result<FrozenDisk, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|source| BlockError::Open { path: path.to_path_buf(), source })?;
        Self::open_diff_file(parent, file, path, sectors)
    }

    /// `open_diff` for a file the caller opened (and checked) itself; `path` names it in errors.
    pub fn open_diff_file(
        parent: &FrozenDisk,
        file: File,
        path: &Path,
        sectors: &SectorSet,
    ) -> Result<FrozenDisk, BlockError> {
        let open_error = |source| BlockError::Open { path: path.to_path_buf(), source };
        let len = file.metadata().map_err(open_error)?.len();
        if len != parent.disk.sectors * SECTOR_SIZE || sectors.capacity() as u64 != parent.disk.sectors {
            return Err(BlockError::DiskSize { path: path.to_path_buf(), len });
        }
        let mut disk = parent.disk.fork()?;
        for (first, count) in sectors.runs() {
            copy_extent(&file, disk.top.file(), first as u64 * SECTOR_SIZE, count as u64 * SECTOR_SIZE, None)
                .map_err(|source| BlockError::Overlay { dir: disk.overlay_dir.clone(), source })?;
            disk.written.insert_range(first, count);
        }
        Ok(FrozenDisk::new(disk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::frozen::tests::{disk_file, scratch, write, SECTORS};
    use crate::block::CowDisk;

    /// A disk whose sector `s` is filled with byte `s`.
    fn disk(dir: &Path) -> CowDisk {
        CowDisk::open(&disk_file(dir, "disk.img"), dir).unwrap()
    }

    /// Every byte of a frozen disk, through the saved-file path that is known to be exact.
    fn bytes(frozen: &FrozenDisk, dir: &Path, name: &str) -> Vec<u8> {
        let path = dir.join(name);
        frozen.write_to(&File::create(&path).unwrap()).unwrap();
        std::fs::read(path).unwrap()
    }

    #[test]
    fn a_diff_saves_only_changed_sectors_and_loads_to_the_same_bytes() {
        let dir = scratch("roundtrip");
        let mut disk = disk(&dir);
        let parent = disk.freeze().unwrap();
        write(&mut disk, 5, 0xaa, 2);
        write(&mut disk, 40, 0xbb, 1);
        let child = disk.freeze().unwrap();
        let changed = child.changed_since(&parent).unwrap();
        assert_eq!(changed.runs(), vec![(5, 2), (40, 1)], "only the sectors written between the freezes");

        let parent_file = dir.join("parent.raw");
        parent.write_to(&File::create(&parent_file).unwrap()).unwrap();
        let diff_file = dir.join("diff.raw");
        child.write_sectors_to(&File::create(&diff_file).unwrap(), &changed).unwrap();
        let loaded_parent = FrozenDisk::open(&parent_file, &dir).unwrap();
        let loaded = FrozenDisk::open_diff(&loaded_parent, &diff_file, &changed).unwrap();
        assert!(bytes(&loaded, &dir, "loaded.raw") == bytes(&child, &dir, "child.raw"), "diff over parent = child");

        // A diff of a diff: sectors the first diff saved and new ones.
        write(&mut disk, 6, 0xcc, 1);
        write(&mut disk, 63, 0xdd, 1);
        let grandchild = disk.freeze().unwrap();
        let changed = grandchild.changed_since(&child).unwrap();
        assert_eq!(changed.runs(), vec![(5, 2), (40, 1), (63, 1)], "the child's private sectors and the new ones");
        let second = dir.join("diff2.raw");
        grandchild.write_sectors_to(&File::create(&second).unwrap(), &changed).unwrap();
        let loaded2 = FrozenDisk::open_diff(&loaded, &second, &changed).unwrap();
        assert!(bytes(&loaded2, &dir, "loaded2.raw") == bytes(&grandchild, &dir, "grandchild.raw"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unsettled_sectors_are_carried_and_other_bases_need_a_full_copy() {
        let dir = scratch("unsettled");
        let mut disk = disk(&dir);
        let mut parent = disk.freeze().unwrap();
        parent.mark_unsettled(9, 3);
        let child = disk.freeze().unwrap();
        assert_eq!(child.changed_since(&parent).unwrap().runs(), vec![(9, 3)], "writes in flight at the parent");

        let other = CowDisk::open(
            &{
                let path = dir.join("other.img");
                std::fs::write(&path, vec![0u8; (SECTORS * SECTOR_SIZE) as usize]).unwrap();
                path
            },
            &dir,
        )
        .map(|mut d| d.freeze().unwrap())
        .unwrap();
        assert!(child.changed_since(&other).is_none(), "no shared base: no diff");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_diff_file_of_the_wrong_size_is_refused() {
        let dir = scratch("size");
        let mut disk = disk(&dir);
        let parent = disk.freeze().unwrap();
        let short = dir.join("short.raw");
        std::fs::write(&short, vec![0u8; 512]).unwrap();
        let err = FrozenDisk::open_diff(&parent, &short, &SectorSet::new(SECTORS as usize)).unwrap_err();
        assert!(matches!(err, BlockError::DiskSize { len: 512, .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
