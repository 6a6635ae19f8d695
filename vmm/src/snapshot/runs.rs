//! Checksummed runs of a sparse file (the disk file: sectors at their disk offsets), computed
//! over what was written and checked over what is listed: never over holes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use memory::sparse::data_extents;

use super::body::Run;
use super::error::{io, SnapshotError};

/// Bytes read at once.
const CHUNK: u64 = 1 << 20;

/// The CRC32 of `len` bytes at `offset` of `file`.
fn crc_of(file: &File, offset: u64, len: u64) -> std::io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let part = &mut buf[..usize::try_from(n).unwrap_or(0)];
        file.read_exact_at(part, offset + done)?;
        crc.update(part);
        done += n;
    }
    Ok(crc.finalize())
}

/// The (first, count) runs of `unit`-byte units of `file` (of `size` bytes) that hold data,
/// rounded out to whole units.
pub fn data_runs(file: &File, size: u64, unit: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (offset, len) in data_extents(file, size)? {
        let first = offset / unit;
        let end = (offset + len).div_ceil(unit);
        match runs.last_mut() {
            Some(last) if last.0 + last.1 >= first => last.1 = end.max(last.0 + last.1) - last.0,
            _ => runs.push((first, end - first)),
        }
    }
    Ok(runs)
}

/// The runs (first, count) of `unit`-byte units of `file`, each with its CRC32.
pub fn checksum_runs(file: &File, path: &Path, unit: u64, runs: &[(u64, u64)]) -> Result<Vec<Run>, SnapshotError> {
    runs.iter()
        .map(|&(first, count)| Ok(Run(first, count, crc_of(file, first * unit, count * unit).map_err(io(path))?)))
        .collect()
}

/// Checks `file` (`path`) against `runs` of `unit`-byte units (validated: inside the file):
/// each run's CRC32, and with `zero_elsewhere`, that the file holds only zeros outside them.
pub fn verify_runs(
    file: &File,
    path: &Path,
    size: u64,
    unit: u64,
    runs: &[Run],
    zero_elsewhere: bool,
) -> Result<(), SnapshotError> {
    for &Run(first, count, expected) in runs {
        let (offset, len) = (first * unit, count * unit);
        let actual = crc_of(file, offset, len).map_err(io(path))?;
        if actual != expected {
            return Err(SnapshotError::Corrupted { path: path.to_path_buf(), offset, len, expected, actual });
        }
    }
    if !zero_elsewhere {
        return Ok(());
    }
    let listed = |offset: u64| {
        runs.iter().any(|&Run(first, count, _)| offset >= first * unit && offset < (first + count) * unit)
    };
    let mut buf = vec![0u8; usize::try_from(unit).unwrap_or(0)];
    for (first, count) in data_runs(file, size, unit).map_err(io(path))? {
        for u in (first..first + count).filter(|&u| !listed(u * unit)) {
            file.read_exact_at(&mut buf, u * unit).map_err(io(path))?;
            if buf.iter().any(|&b| b != 0) {
                return Err(SnapshotError::DataOutsideRuns { path: path.to_path_buf(), offset: u * unit });
            }
        }
    }
    Ok(())
}
