//! RAM files as the state file lists them, in either layout:
//!
//! - one file per region (`<state>-mem<i>-<nonce>.raw`, Zygote's own), region byte `x` at
//!   file offset `x`;
//! - Firecracker's single memory file (`mem_file_path` at create, `mem_backend` /
//!   `mem_file_path` at load): every region one after the other, region `i` at the sum of the
//!   sizes before it, sparse; a diff holds only the changed pages, at their offsets.
//!
//! Writing goes through `Snapshot::write_region[_diff]` either way (only pages with data, one
//! CRC32 per written run). Loading verifies every listed run and maps each region from a file
//! holding exactly it: the file itself when it is (one region at offset 0), else the region's
//! runs copied (copy_file_range, O(its data)) into an unnamed file beside it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use memory::{FileKind, FileRun, MemoryError, Snapshot, PAGE_SIZE};

use super::body::{RamFile, Run};
use super::error::{io, SnapshotError};
use super::runs::verify_runs;

/// Writes region `index` of `ram` into `out` (full, or what changed since `parent`). The
/// memory layer flattens a stack of too many runs into a new base: the pages changed since
/// the parent are then unknown, and the diff holds every data page of the region instead
/// (loaded over the parent like any diff file).
pub fn write_region(
    ram: &Snapshot,
    parent: Option<&Snapshot>,
    index: usize,
    out: &File,
) -> Result<Vec<FileRun>, SnapshotError> {
    match parent {
        None => ram.write_region(index, out),
        Some(p) => match ram.write_region_diff(p, index, out) {
            Err(MemoryError::NotADescendant { .. }) if ram.layout() == p.layout() => ram.write_region(index, out),
            written => written,
        },
    }
    .map_err(SnapshotError::Memory)
}

/// An unnamed file in `dir` (O_TMPFILE), or in the temporary directory if `dir` cannot have one.
fn unnamed_file(dir: &Path) -> Result<File, SnapshotError> {
    for dir in [dir, &std::env::temp_dir()] {
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io(dir)(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: open reads a NUL-terminated path; the result is a new fd or -1.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
        if fd >= 0 {
            // SAFETY: a new fd nothing else owns.
            return Ok(unsafe { File::from_raw_fd(fd) });
        }
    }
    Err(io(dir)(std::io::Error::last_os_error()))
}

/// Copies `len` bytes at `from_offset` of `from` to `to_offset` of `to`, in the kernel where it
/// can (copy_file_range), through a buffer where it cannot.
fn copy_range(from: &File, from_offset: u64, to: &File, to_offset: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let (mut off_in, mut off_out) = (
            i64::try_from(from_offset + done).map_err(std::io::Error::other)?,
            i64::try_from(to_offset + done).map_err(std::io::Error::other)?,
        );
        let chunk = usize::try_from((len - done).min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: copy_file_range between two fds we borrow, offsets passed by pointer to
        // locals; it moves no memory of ours.
        let n = unsafe { libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, chunk, 0) };
        match n {
            n if n > 0 => done += n.unsigned_abs() as u64,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let err = std::io::Error::last_os_error();
                if !matches!(err.raw_os_error(), Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)) {
                    return Err(err);
                }
                let mut buf = vec![0u8; usize::try_from((len - done).min(1 << 20)).unwrap_or(1 << 20)];
                from.read_exact_at(&mut buf, from_offset + done)?;
                to.write_all_at(&buf, to_offset + done)?;
                done += buf.len() as u64;
            }
        }
    }
    Ok(())
}

/// Writes all of `ram` into `out` (Firecracker's single memory file: regions one after the
/// other, sparse), or what changed since `parent` (not synced: the caller syncs). Returns each region's file offset
/// and runs. `scratch_dir` holds the unnamed file a region after the first passes through.
pub fn write_single(
    ram: &Snapshot,
    parent: Option<&Snapshot>,
    out: &File,
    scratch_dir: &Path,
) -> Result<Vec<(u64, Vec<FileRun>)>, SnapshotError> {
    let layout = ram.layout();
    if layout.len() == 1 {
        return Ok(vec![(0, write_region(ram, parent, 0, out)?)]);
    }
    let total: u64 = layout.iter().map(|&(_, size)| size as u64).sum();
    out.set_len(0).and_then(|()| out.set_len(total)).map_err(io(scratch_dir))?;
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(layout.len());
    for (index, &(_, size)) in layout.iter().enumerate() {
        let scratch = unnamed_file(scratch_dir)?;
        let runs = write_region(ram, parent, index, &scratch)?;
        for run in &runs {
            let (at, len) = ((run.first_page * PAGE_SIZE) as u64, (run.pages * PAGE_SIZE) as u64);
            copy_range(&scratch, at, out, offset + at, len).map_err(io(scratch_dir))?;
        }
        regions.push((offset, runs));
        offset += size as u64;
    }
    Ok(regions)
}

/// One region's verified RAM file, holding exactly the region at offset 0, and its runs.
pub struct RegionFile {
    pub file: File,
    pub runs: Vec<FileRun>,
    pub size: usize,
}

fn file_run(&Run(first, count, crc32): &Run) -> FileRun {
    // Validated: inside a region of at most MAX_MEM_MIB.
    FileRun {
        first_page: usize::try_from(first).unwrap_or(usize::MAX),
        pages: usize::try_from(count).unwrap_or(0),
        crc32,
    }
}

/// Verifies `file` (`path`), which holds `regions` (the body's entries naming it) of a `kind`
/// snapshot, and returns one `RegionFile` per region, in order.
pub fn open_regions(
    file: File,
    path: &Path,
    regions: &[&RamFile],
    kind: FileKind,
) -> Result<Vec<RegionFile>, SnapshotError> {
    let size_of = |r: &RamFile| {
        usize::try_from(r.size).map_err(|_| SnapshotError::RamFileSize {
            path: path.into(),
            expected: r.size,
            actual: 0,
        })
    };
    if let [region] = regions {
        if region.file_offset == 0 {
            let (size, runs) = (size_of(region)?, region.runs.iter().map(file_run).collect::<Vec<_>>());
            Snapshot::verify_file(&file, size, &runs, kind).map_err(|source| match source {
                MemoryError::FileSize { expected, actual } => {
                    SnapshotError::RamFileSize { path: path.into(), expected, actual }
                }
                source => SnapshotError::RamFile { path: path.into(), source },
            })?;
            return Ok(vec![RegionFile { file, runs, size }]);
        }
    }
    // Validated: offsets + sizes do not overflow, regions do not overlap in the file.
    let expected = regions.iter().map(|r| r.file_offset + r.size).max().unwrap_or(0);
    let actual = file.metadata().map_err(io(path))?.len();
    if actual != expected {
        return Err(SnapshotError::RamFileSize { path: path.into(), expected, actual });
    }
    let page = PAGE_SIZE as u64;
    let mut global: Vec<Run> = regions
        .iter()
        .flat_map(|r| r.runs.iter().map(|&Run(f, c, crc)| Run(r.file_offset / page + f, c, crc)))
        .collect();
    global.sort_by_key(|r| r.0);
    verify_runs(&file, path, expected, page, &global, kind == FileKind::Full)?;
    let scratch_dir = super::fsio::parent_dir(path);
    regions
        .iter()
        .map(|region| {
            let size = size_of(region)?;
            let own = unnamed_file(scratch_dir)?;
            own.set_len(region.size).map_err(io(path))?;
            for &Run(first, count, _) in &region.runs {
                copy_range(&file, region.file_offset + first * page, &own, first * page, count * page)
                    .map_err(io(path))?;
            }
            Ok(RegionFile { file: own, runs: region.runs.iter().map(file_run).collect(), size })
        })
        .collect()
}
