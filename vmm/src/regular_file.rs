//! The one check that a path the user or a file names is a regular file: a kernel, initrd,
//! disk, config file, snapshot state or memory file. It is made on the opened file (fstat of
//! the fd, not a racy stat of the path), opened O_NONBLOCK so a FIFO cannot block the open;
//! a directory, FIFO, device or socket is refused naming what it is.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a path is not a usable regular file.
#[derive(Debug, thiserror::Error)]
pub enum RegularFileError {
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is a {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
}

/// Fails unless `file` (opened from `path`) is a regular file.
pub fn check_regular(file: &File, path: &Path) -> Result<(), RegularFileError> {
    let open_error = |source| RegularFileError::Open { path: path.to_path_buf(), source };
    let kind = file.metadata().map_err(open_error)?.file_type();
    let name = match kind {
        k if k.is_file() => return Ok(()),
        k if k.is_dir() => "directory",
        k if k.is_fifo() => "FIFO",
        k if k.is_char_device() => "character device",
        k if k.is_block_device() => "block device",
        k if k.is_socket() => "socket",
        _ => "special file",
    };
    Err(RegularFileError::NotRegular { path: path.to_path_buf(), kind: name })
}

/// Opens `path` read-only if it is a regular file.
pub fn open_regular(path: &Path) -> Result<File, RegularFileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| RegularFileError::Open { path: path.to_path_buf(), source })?;
    check_regular(&file, path)?;
    Ok(file)
}

/// Refuses `path` unless it is a regular file; the message starts with `what` (the flag or
/// field that named it).
pub fn require_regular(path: &Path, what: &str) -> Result<(), String> {
    open_regular(path).map(drop).map_err(|e| format!("{what} {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_pass_and_the_others_are_named() {
        assert!(require_regular(Path::new("Cargo.toml"), "--kernel").is_ok());
        assert_eq!(
            require_regular(Path::new("/"), "--initrd").unwrap_err(),
            "--initrd / is a directory, not a regular file"
        );
        let null = require_regular(Path::new("/dev/null"), "--disk").unwrap_err();
        assert_eq!(null, "--disk /dev/null is a character device, not a regular file");
        let missing = require_regular(Path::new("/nonexistent/k"), "kernel_image_path").unwrap_err();
        assert!(missing.starts_with("kernel_image_path /nonexistent/k: "), "{missing}");
    }
}
