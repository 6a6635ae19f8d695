//! Snapshot RAM files: one sparse file per region, full or diff, at file offset = region offset.
//!
//! Writing costs what the file holds, never the region size: a full file gets the pages that
//! hold data (the base image's data extents and every layer's pages; holes stay holes and are
//! neither read nor checksummed), a diff file only the pages changed since its parent. Each
//! written run comes back with the CRC32 of its bytes, so the state file can record them
//! instead of reading the files back; `Snapshot::verify_file` checks a file against them
//! before anything maps it (O(the file's data)).
//!
//! Restoring maps the file MAP_PRIVATE as a read-only image, so N restores of one snapshot
//! share its page cache and load lazily. The state file (format version, checksums, vCPU and
//! device state, the list of RAM files) is the VMM's: this module only moves RAM bytes.

use std::fs::File;

use vm_memory::GuestAddress;

use crate::blockset::BlockSet;
use crate::image::Image;
use crate::pages::{PageSet, PAGE_SIZE};
use crate::region::validate_layout;
use crate::snapshot::Snapshot;
use crate::sparse::{copy_extent, data_extents};
use crate::stack::ImageStack;
use crate::MemoryError;

/// A run of pages a snapshot RAM file holds, with the CRC32 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRun {
    pub first_page: usize,
    pub pages: usize,
    pub crc32: u32,
}

impl FileRun {
    /// (first page, page count).
    pub fn page_run(&self) -> (usize, usize) {
        (self.first_page, self.pages)
    }
}

/// What the bytes of a RAM file outside its runs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// Every page: outside its runs the file must read as zeros (it is mapped whole).
    Full,
    /// Only its runs are ever mapped (over the parent's pages); the rest is not looked at.
    Diff,
}

impl Snapshot {
    /// Writes region `region`'s bytes into `out`: every page holding data, sparse elsewhere.
    /// Does not sync `out` (the caller syncs it with its other files, in one go). Returns the
    /// runs written with their checksums.
    pub fn write_region(&self, region: usize, out: &File) -> Result<Vec<FileRun>, MemoryError> {
        let stack = self.stack(region)?;
        let pages = data_pages(stack)?;
        write_pages(stack, &pages, out)
    }

    /// Writes only the pages of region `region` that changed since `parent` (which this
    /// snapshot must descend from, parent kept alive meanwhile), sparse elsewhere; does not
    /// sync `out`. Returns the runs written with their checksums.
    pub fn write_region_diff(&self, parent: &Snapshot, region: usize, out: &File) -> Result<Vec<FileRun>, MemoryError> {
        let stack = self.stack(region)?;
        let base = parent.stack(region)?;
        if !stack.starts_with(base) || self.layout != parent.layout {
            return Err(MemoryError::NotADescendant { region });
        }
        let pages = stack.pages_above(base.layers().len(), stack.len() / PAGE_SIZE);
        write_pages(stack, &pages, out)
    }

    /// Checks a RAM file of a `size`-byte region against the runs its writer returned (input:
    /// the runs come from a state file): its length, each run's checksum, and for a full file
    /// that it holds nothing but zeros elsewhere. Reads only the file's data.
    pub fn verify_file(file: &File, size: usize, runs: &[FileRun], kind: FileKind) -> Result<(), MemoryError> {
        let actual = file.metadata().map_err(MemoryError::FileIo)?.len();
        if actual != size as u64 {
            return Err(MemoryError::FileSize { expected: size as u64, actual });
        }
        let pages = size / PAGE_SIZE;
        let mut next = 0;
        let mut buf = Vec::new();
        for run in runs {
            let end = run
                .first_page
                .checked_add(run.pages)
                .filter(|&end| run.pages > 0 && run.first_page >= next && end <= pages);
            let Some(end) = end else {
                return Err(MemoryError::BadFileRun {
                    first_page: run.first_page,
                    pages: run.pages,
                    region_pages: pages,
                });
            };
            let mut crc = crc32fast::Hasher::new();
            for chunk in (run.first_page..end).step_by(256) {
                let n = (end - chunk).min(256) * PAGE_SIZE;
                buf.resize(n, 0);
                std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, (chunk * PAGE_SIZE) as u64)
                    .map_err(MemoryError::FileIo)?;
                crc.update(&buf);
            }
            let crc = crc.finalize();
            if crc != run.crc32 {
                return Err(MemoryError::FileChecksum {
                    first_page: run.first_page,
                    pages: run.pages,
                    expected: run.crc32,
                    actual: crc,
                });
            }
            next = end;
        }
        if kind == FileKind::Full {
            let listed = BlockSet::from_runs(pages, &runs.iter().map(FileRun::page_run).collect::<Vec<_>>());
            check_zero_outside(file, size, &listed)?;
        }
        Ok(())
    }

    /// A snapshot from full region files (one per region, in layout order), which the caller
    /// checked with `verify_file` (or otherwise) first.
    pub fn from_files(layout: &[(GuestAddress, usize)], files: Vec<File>) -> Result<Snapshot, MemoryError> {
        let layout = validate_layout(layout)?;
        check_count(&layout, files.len())?;
        let stacks = layout
            .iter()
            .zip(files)
            .map(|(&(_, len), file)| Image::from_file(file, len).map(ImageStack::with_base))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot { layout, stacks })
    }

    /// A snapshot from diff files laid over `parent`: each region's file provides `pages`.
    /// The caller checked the files with `verify_file` (or otherwise) first.
    pub fn from_diff_files(parent: &Snapshot, files: Vec<(File, BlockSet)>) -> Result<Snapshot, MemoryError> {
        check_count(&parent.layout, files.len())?;
        let mut stacks = parent.stacks.clone();
        for ((stack, &(_, len)), (file, pages)) in stacks.iter_mut().zip(&parent.layout).zip(files) {
            if pages.capacity() != len / PAGE_SIZE {
                return Err(MemoryError::DiffShape { pages: pages.capacity(), region_pages: len / PAGE_SIZE });
            }
            if !pages.is_empty() {
                stack.push(Image::from_file(file, len)?, pages);
            }
        }
        Ok(Snapshot { layout: parent.layout.clone(), stacks })
    }
}

/// The pages of `stack` that hold data: the base image's data extents (rounded out to pages)
/// and every layer's pages.
fn data_pages(stack: &ImageStack) -> Result<PageSet, MemoryError> {
    let pages = stack.len() / PAGE_SIZE;
    let mut set = stack.pages_above(1, pages);
    for (offset, len) in data_extents(stack.base().file(), stack.len() as u64).map_err(MemoryError::FileIo)? {
        let first = offset as usize / PAGE_SIZE;
        set.insert_range(first, (offset + len).div_ceil(PAGE_SIZE as u64) as usize - first);
    }
    Ok(set)
}

/// Writes the stack's bytes of `pages` into `out` (sized to the region, sparse elsewhere), one
/// checksum per run.
fn write_pages(stack: &ImageStack, pages: &PageSet, out: &File) -> Result<Vec<FileRun>, MemoryError> {
    out.set_len(0).and_then(|()| out.set_len(stack.len() as u64)).map_err(MemoryError::FileIo)?;
    let mut runs = Vec::new();
    for (first_page, count) in pages.runs() {
        let mut crc = crc32fast::Hasher::new();
        for stretch in stack.stretches(first_page * PAGE_SIZE, count * PAGE_SIZE)? {
            let (offset, len) = (stretch.offset as u64, stretch.len as u64);
            copy_extent(stretch.image.file(), out, offset, len, Some(&mut crc)).map_err(MemoryError::FileIo)?;
        }
        runs.push(FileRun { first_page, pages: count, crc32: crc.finalize() });
    }
    Ok(runs)
}

/// Fails if `file` holds a non-zero byte in a page outside `listed`.
fn check_zero_outside(file: &File, size: usize, listed: &PageSet) -> Result<(), MemoryError> {
    let mut buf = vec![0u8; PAGE_SIZE];
    for (offset, len) in data_extents(file, size as u64).map_err(MemoryError::FileIo)? {
        let first = offset as usize / PAGE_SIZE;
        let end = (offset + len).div_ceil(PAGE_SIZE as u64) as usize;
        for page in (first..end).filter(|&p| !listed.contains(p)) {
            std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, (page * PAGE_SIZE) as u64)
                .map_err(MemoryError::FileIo)?;
            if buf.iter().any(|&b| b != 0) {
                return Err(MemoryError::DataOutsideRuns { page });
            }
        }
    }
    Ok(())
}

fn check_count(layout: &[(GuestAddress, usize)], files: usize) -> Result<(), MemoryError> {
    if files != layout.len() {
        return Err(MemoryError::FileCount { expected: layout.len(), actual: files });
    }
    Ok(())
}
