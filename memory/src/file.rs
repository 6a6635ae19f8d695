//! Snapshot RAM files: one sparse file per region, full or diff, at file offset = region offset.
//!
//! Restoring maps the file MAP_PRIVATE as a read-only image, so N restores of one snapshot
//! share its page cache and load lazily. The state file (format version, checksum, vCPU and
//! device state, the list of RAM files) is the VMM's: this module only moves RAM bytes.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::GuestAddress;

use crate::blockset::BlockSet;
use crate::image::Image;
use crate::pages::PAGE_SIZE;
use crate::region::validate_layout;
use crate::snapshot::Snapshot;
use crate::stack::ImageStack;
use crate::MemoryError;

const COPY_CHUNK: usize = 1 << 20;

impl Snapshot {
    /// Writes region `region`'s full bytes into `out` (sparse: holes of the images stay holes)
    /// and syncs it.
    pub fn write_region(&self, region: usize, out: &File) -> Result<(), MemoryError> {
        let stack = self.stack(region)?;
        let len = self.layout[region].1;
        out.set_len(0).and_then(|()| out.set_len(len as u64)).map_err(MemoryError::FileIo)?;
        for (start, end) in data_segments(stack.base().file(), len)? {
            copy_range(stack.base().file(), out, start, end - start)?;
        }
        for layer in &stack.layers()[1..] {
            let Some(pages) = &layer.pages else { continue };
            for (first, count) in pages.runs() {
                copy_range(layer.image.file(), out, first * PAGE_SIZE, count * PAGE_SIZE)?;
            }
        }
        out.sync_all().map_err(MemoryError::FileIo)
    }

    /// Writes only the pages of region `region` that changed since `parent` (which this
    /// snapshot must descend from, parent kept alive meanwhile) and returns them.
    pub fn write_region_diff(&self, parent: &Snapshot, region: usize, out: &File) -> Result<BlockSet, MemoryError> {
        let stack = self.stack(region)?;
        let base = parent.stack(region)?;
        if !stack.starts_with(base) || self.layout != parent.layout {
            return Err(MemoryError::NotADescendant { region });
        }
        let len = self.layout[region].1;
        let pages = stack.pages_above(base.layers().len(), len / PAGE_SIZE);
        out.set_len(0).and_then(|()| out.set_len(len as u64)).map_err(MemoryError::FileIo)?;
        for (first, count) in pages.runs() {
            for page in first..first + count {
                copy_range(stack.image_for(page).file(), out, page * PAGE_SIZE, PAGE_SIZE)?;
            }
        }
        out.sync_all().map_err(MemoryError::FileIo)?;
        Ok(pages)
    }

    /// A snapshot from full region files (one per region, in layout order).
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

fn check_count(layout: &[(GuestAddress, usize)], files: usize) -> Result<(), MemoryError> {
    if files != layout.len() {
        return Err(MemoryError::FileCount { expected: layout.len(), actual: files });
    }
    Ok(())
}

/// The (start, end) byte ranges of `file` holding data, from SEEK_DATA/SEEK_HOLE.
fn data_segments(file: &File, len: usize) -> Result<Vec<(usize, usize)>, MemoryError> {
    use std::os::fd::AsRawFd;
    let seek = |from: usize, whence: i32| -> Option<usize> {
        // SAFETY: lseek on our own descriptor has no memory effects.
        let at = unsafe { libc::lseek(file.as_raw_fd(), i64::try_from(from).ok()?, whence) };
        usize::try_from(at).ok() // negative: ENXIO, no data past `from`
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA) else { break };
        let end = seek(data, libc::SEEK_HOLE).unwrap_or(len).min(len);
        if data >= end {
            break;
        }
        out.push((data, end));
        pos = end;
    }
    Ok(out)
}

/// Copies `len` bytes at `offset` from one file to the same offset of another.
fn copy_range(from: &File, to: &File, offset: usize, len: usize) -> Result<(), MemoryError> {
    let mut buf = vec![0u8; COPY_CHUNK.min(len)];
    let mut done = 0;
    while done < len {
        let n = buf.len().min(len - done);
        let pos = (offset + done) as u64;
        from.read_exact_at(&mut buf[..n], pos).map_err(MemoryError::FileIo)?;
        to.write_all_at(&buf[..n], pos).map_err(MemoryError::FileIo)?;
        done += n;
    }
    Ok(())
}
