//! Sparse files: where their data is, and copying byte ranges between files at equal offsets.
//!
//! Snapshot RAM files (this crate) and the disk layer's overlays, frozen disks and disk files
//! (`devices::block`) are sparse files at offset = guest offset (or sector offset); both copy
//! through `copy_extent` and skip holes with `data_extents`.

use std::fs::File;
use std::io::{Error, ErrorKind, Result};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Largest buffer a checksummed copy reads at once.
const COPY_CHUNK: u64 = 1 << 20;

/// The (offset, length) runs of `file` below `size` that hold data (holes read as zeros),
/// from SEEK_DATA/SEEK_HOLE. Filesystems may report data at block granularity.
pub fn data_extents(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let seek = |offset: u64, whence| -> Result<Option<u64>> {
        let offset = i64::try_from(offset).map_err(Error::other)?;
        // SAFETY: lseek on a file we borrow; it only moves the (unused) file offset.
        match unsafe { libc::lseek(file.as_raw_fd(), offset, whence) } {
            n if n >= 0 => Ok(Some(n.unsigned_abs())),
            _ => match Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None), // no data past `offset`
                e => Err(e),
            },
        }
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let Some(data) = seek(offset, libc::SEEK_DATA)? else { break };
        if data >= size {
            break;
        }
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        extents.push((data, end - data));
        offset = end;
    }
    Ok(extents)
}

/// Copies `len` bytes at `offset` of `from` to the same offset of `to`. With `crc`, the bytes
/// pass through a buffer and are added to it (the checksum of what was written); without, the
/// kernel copies them (copy_file_range), falling back to the buffer across filesystems that
/// cannot.
pub fn copy_extent(from: &File, to: &File, offset: u64, len: u64, crc: Option<&mut crc32fast::Hasher>) -> Result<()> {
    offset
        .checked_add(len)
        .filter(|&end| i64::try_from(end).is_ok())
        .ok_or_else(|| Error::from(ErrorKind::InvalidInput))?;
    match crc {
        Some(crc) => copy_through_buffer(from, to, offset, len, Some(crc)),
        None => match copy_in_kernel(from, to, offset, len) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP)) => {
                copy_through_buffer(from, to, offset, len, None)
            }
            done => done,
        },
    }
}

fn copy_in_kernel(from: &File, to: &File, offset: u64, len: u64) -> Result<()> {
    // Both fit in i64: checked by `copy_extent`.
    let (mut off_in, mut off_out) = (offset as i64, offset as i64);
    let mut left = len;
    while left > 0 {
        let chunk = usize::try_from(left).unwrap_or(usize::MAX);
        // SAFETY: both fds are open files the caller borrows to us; the offsets are our own
        // locals, which the kernel advances.
        let n = unsafe { libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, chunk, 0) };
        match n {
            n if n > 0 => left -= n.unsigned_abs() as u64,
            0 => return Err(Error::new(ErrorKind::UnexpectedEof, "copy_file_range hit EOF")),
            _ => match Error::last_os_error() {
                e if e.kind() == ErrorKind::Interrupted => {}
                e => return Err(e),
            },
        }
    }
    Ok(())
}

fn copy_through_buffer(
    from: &File,
    to: &File,
    offset: u64,
    len: u64,
    mut crc: Option<&mut crc32fast::Hasher>,
) -> Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        from.read_exact_at(&mut buf[..n], offset + done)?;
        if let Some(crc) = crc.as_deref_mut() {
            crc.update(&buf[..n]);
        }
        to.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
