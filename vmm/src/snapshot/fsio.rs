//! Opening and writing snapshot files as untrusted paths: names from a state file resolve
//! inside its directory (openat2 RESOLVE_BENEATH: no absolute path, no `..` above it, no
//! symlink leading out), only regular files are used (checked with fstat on the opened fd, and
//! opened O_NONBLOCK so a FIFO cannot block the open), and files are only ever created
//! exclusively (O_EXCL|O_NOFOLLOW), so a planted symlink is never followed. What a failed
//! write created is removed (`Created`).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use super::error::{io, SnapshotError};
use crate::regular_file;

/// The directory holding `path` ("." for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Fails unless `file` (opened from `path`) is a regular file (`crate::regular_file`).
fn check_regular(file: &File, path: &Path) -> Result<(), SnapshotError> {
    regular_file::check_regular(file, path).map_err(SnapshotError::from)
}

/// Opens `path` (given by the user) read-only if it is a regular file.
pub fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    regular_file::open_regular(path).map_err(SnapshotError::from)
}

/// Opens directory `path`.
pub fn open_dir(path: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(path).map_err(io(path))
}

/// Opens `name` (from a state file at `state_path`) read-only inside directory `dir` (opened
/// from `dir_path`), if it is a regular file there.
pub fn open_beneath(dir: &File, dir_path: &Path, name: &Path, state_path: &Path) -> Result<File, SnapshotError> {
    let shown = dir_path.join(name);
    let escapes = || SnapshotError::Escapes {
        path: state_path.to_path_buf(),
        name: name.to_path_buf(),
        dir: dir_path.to_path_buf(),
    };
    if name.as_os_str().is_empty() || !name.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(escapes());
    }
    let cname = std::ffi::CString::new(name.as_os_str().as_bytes()).map_err(|_| escapes())?;
    // SAFETY: open_how is plain data; zeroed is its documented "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads `cname` (NUL-terminated, alive) and `how` (size passed) and
    // returns a new fd or -1; `dir` is an open directory fd we borrow.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            cname.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EXDEV | libc::ELOOP) => escapes(),
            _ => SnapshotError::Io { path: shown, source: err },
        });
    }
    let fd = i32::try_from(fd).map_err(|_| escapes())?;
    // SAFETY: openat2 returned a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    check_regular(&file, &shown)?;
    Ok(file)
}

/// Reads all of `file` (from `path`), refusing one longer than `limit` before reading it.
pub fn read_limited(file: &File, path: &Path, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    let size = file.metadata().map_err(io(path))?.len();
    let too_large = |size| SnapshotError::Format {
        path: path.to_path_buf(),
        source: super::format::FormatError::TooLarge { size },
    };
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // The file may grow between fstat and read: never read past the limit.
    let mut limited = file.take(limit + 1);
    limited.read_to_end(&mut bytes).map_err(io(path))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Files a snapshot write created, removed unless the write completes (`keep`).
#[derive(Debug, Default)]
pub struct Created {
    paths: Vec<PathBuf>,
}

impl Created {
    /// Creates `path` exclusively for writing: fails if anything (a symlink included) is there.
    pub fn create(&mut self, path: &Path) -> Result<File, SnapshotError> {
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        self.paths.push(path.to_path_buf());
        Ok(file)
    }

    /// The write completed: the files stay.
    pub fn keep(mut self) {
        self.paths.clear();
    }

    /// Counts `path` (renamed into place) as created.
    pub fn track(&mut self, path: &Path) {
        self.paths.push(path.to_path_buf());
    }

    /// Forgets `path` (renamed away).
    pub fn forget(&mut self, path: &Path) {
        self.paths.retain(|p| p != path);
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes `bytes` to `path` so that `path` holds either its old content or all of the new:
/// through a temporary file created exclusively beside it, fsynced and renamed over it.
/// `with` (the files the new content refers to) are fsynced at the same time, before the
/// rename: concurrent fsyncs share the filesystem's journal commits. `before_rename` runs
/// between the fsyncs and the rename.
pub fn write_atomically(
    created: &mut Created,
    path: &Path,
    bytes: &[u8],
    with: &[(&File, &Path)],
    before_rename: impl FnOnce(&mut Created) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    use std::io::Write;
    let dir = parent_dir(path);
    let name = path.file_name().map_or("snapshot".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), nonce()));
    let mut file = created.create(&tmp)?;
    file.write_all(bytes).map_err(io(&tmp))?;
    let all: Vec<(&File, &Path)> = with.iter().copied().chain([(&file, tmp.as_path())]).collect();
    std::thread::scope(|scope| {
        let syncs: Vec<_> = all.iter().map(|&(f, p)| scope.spawn(move || f.sync_all().map_err(io(p)))).collect();
        syncs.into_iter().try_for_each(|s| {
            s.join().unwrap_or_else(|_| Err(io(path)(std::io::Error::other("fsync thread panicked"))))
        })
    })?;
    before_rename(created)?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    created.forget(&tmp);
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// A value no earlier write in this process used (time and a counter).
pub fn nonce() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos}-{}", COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zygote-fsio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        dir
    }

    #[test]
    fn names_resolve_only_beneath_the_directory_and_only_to_regular_files() {
        let dir = scratch("beneath");
        std::fs::write(dir.join("sub/ok.raw"), b"x").unwrap();
        std::fs::write(dir.join("../zygote-fsio-outside"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../zygote-fsio-outside", dir.join("up-link")).unwrap();
        std::os::unix::fs::symlink("sub/ok.raw", dir.join("in-link")).unwrap();
        nix_mkfifo(&dir.join("fifo"));
        let d = open_dir(&dir).unwrap();
        let open = |name: &str| open_beneath(&d, &dir, Path::new(name), Path::new("s.json"));
        assert!(open("sub/ok.raw").is_ok());
        assert!(open("in-link").is_ok(), "a symlink that stays inside is followed");
        for name in [
            "/etc/passwd",
            "../zygote-fsio-outside",
            "sub/../../zygote-fsio-outside",
            "abs-link",
            "up-link",
            "",
            "./sub/ok.raw",
        ] {
            assert!(matches!(open(name), Err(SnapshotError::Escapes { .. })), "{name}: {:?}", open(name));
        }
        assert!(matches!(open("sub"), Err(SnapshotError::NotRegular { kind: "directory", .. })));
        assert!(
            matches!(open("fifo"), Err(SnapshotError::NotRegular { kind: "FIFO", .. })),
            "and the open did not block"
        );
        assert!(matches!(
            open_regular(Path::new("/dev/zero")),
            Err(SnapshotError::NotRegular { kind: "character device", .. })
        ));
        assert!(matches!(open_regular(&dir.join("fifo")), Err(SnapshotError::NotRegular { kind: "FIFO", .. })));
    }

    #[test]
    fn writes_never_follow_a_planted_link_and_a_failed_write_leaves_nothing() {
        let dir = scratch("create");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("planted")).unwrap();
        let mut created = Created::default();
        assert!(created.create(&dir.join("planted")).is_err());
        let mut file = created.create(&dir.join("new.raw")).unwrap();
        std::io::Write::write_all(&mut file, b"data").unwrap();
        drop(created);
        assert!(!dir.join("new.raw").exists(), "dropped without keep: removed");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let mut created = Created::default();
        write_atomically(&mut created, &dir.join("s.json"), b"state", &[], |_| Ok(())).unwrap();
        created.keep();
        assert_eq!(std::fs::read(dir.join("s.json")).unwrap(), b"state");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4, "sub, victim, planted, s.json: no temporary file left");
    }

    #[test]
    fn reads_stop_at_the_limit() {
        let dir = scratch("limit");
        let path = dir.join("big");
        let file = File::create(&path).unwrap();
        file.set_len(2 << 30).unwrap();
        let file = open_regular(&path).unwrap();
        assert!(matches!(read_limited(&file, &path, 1 << 20), Err(SnapshotError::Format { .. })));
    }

    fn nix_mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
