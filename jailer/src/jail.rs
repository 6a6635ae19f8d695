//! The jail directory, `<base>/<exec name>/<id>`, and its `root/`: the one tree the VMM sees.
//!
//! ```text
//! <base>/<exec name>/<id>/         root:root 0700   (other users cannot reach the jail)
//!     <exec name>.pid              the VMM's pid, once it runs
//!     root/                        uid:gid  0700    the VMM's "/" (its API socket, snapshots)
//!         <exec name>              root 0755        a copy of --exec-file
//!         lib/..., lib64/...       root 0755        its loader and libraries, at their host paths
//!         dev/kvm, dev/net/tun     uid:gid 0600     device nodes (removed when the VM ends)
//!         proc/                    root 0555        a procfs of the VM's PID namespace
//!         tmp/                     uid:gid 0700     where disk overlays are made
//!         <--copy-file names>      uid:gid 0600     copies
//!         <--link-file names>      as the source    hard links
//! ```
//!
//! Everything is made before the VMM starts; on failure the jail directory is removed whole.
//! After the VM ends the jail stays (it holds what the VM wrote: snapshots), less its device
//! nodes.

use std::ffi::CString;
use std::fs::{DirBuilder, Permissions};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{Config, Placement};

/// Host device nodes the jail gets, as (path in the jail, host node).
const DEVICES: [(&str, &str); 2] = [("dev/kvm", "/dev/kvm"), ("dev/net/tun", "/dev/net/tun")];

/// What failed building the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail {0:?} already exists (a VM with this --id runs, or its jail was not removed)")]
    Exists(PathBuf),
    #[error("--chroot-base-dir: {0:?} is on a nodev mount, where /dev/kvm in the jail cannot be opened")]
    NoDev(PathBuf),
    #[error("host device {path:?} (needed in every jail)")]
    HostDevice {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("--link-file {0:?} is on another filesystem than the jail: give it with --copy-file")]
    CrossDevice(PathBuf),
    #[error("cannot {what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    /// True when the command line asked for what cannot be (exit 2), not a host failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, JailError::Exists(_) | JailError::NoDev(_) | JailError::CrossDevice(_))
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io { what, path, source }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io("chown", path))
}

fn chmod(path: &Path, mode: u32) -> Result<(), JailError> {
    std::fs::set_permissions(path, Permissions::from_mode(mode)).map_err(io("chmod", path))
}

/// Makes `dir` (whose parent exists) with exactly `mode`, whatever the umask.
fn make_dir(dir: &Path, mode: u32) -> Result<(), JailError> {
    DirBuilder::new().mode(mode).create(dir).map_err(io("create", dir))?;
    chmod(dir, mode)
}

/// Makes every missing directory from `root` down to `root/rel`, each root:root 0755.
fn make_dirs(root: &Path, rel: &Path) -> Result<(), JailError> {
    let mut dir = root.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        if !dir.is_dir() {
            make_dir(&dir, 0o755)?;
        }
    }
    Ok(())
}

/// Copies `from` to `to` (which must not exist) with `mode`.
fn copy_new(from: &Path, to: &Path, mode: u32) -> Result<(), JailError> {
    if to.symlink_metadata().is_ok() {
        return Err(JailError::Io { what: "place", path: to.to_path_buf(), source: ErrorKind::AlreadyExists.into() });
    }
    std::fs::copy(from, to).map_err(io("copy into the jail", from))?;
    chmod(to, mode)
}

/// A character device node like host node `host`, at `path`, owned by uid:gid, mode 0600.
fn mknod_like(host: &'static str, path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    let meta = std::fs::metadata(host).map_err(|source| JailError::HostDevice { path: host, source })?;
    if !meta.file_type().is_char_device() {
        return Err(JailError::HostDevice { path: host, source: std::io::Error::other("not a character device") });
    }
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io("mknod", path)(ErrorKind::InvalidInput.into()))?;
    // SAFETY: c_path is a NUL-terminated path that outlives the call; mknod reads nothing else.
    let made = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) };
    if made != 0 {
        return Err(io("mknod", path)(std::io::Error::last_os_error()));
    }
    chmod(path, 0o600)?;
    chown(path, uid, gid)
}

/// True when `dir` is on a mount that ignores device nodes.
fn on_nodev_mount(dir: &Path) -> Result<bool, JailError> {
    let c_dir =
        CString::new(dir.as_os_str().as_bytes()).map_err(|_| io("statvfs", dir)(ErrorKind::InvalidInput.into()))?;
    // SAFETY: all-zero bytes are a valid statvfs (plain integers), which statvfs overwrites.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_dir is NUL-terminated and `stat` is a valid, writable statvfs for the call.
    if unsafe { libc::statvfs(c_dir.as_ptr(), &mut stat) } != 0 {
        return Err(io("statvfs", dir)(std::io::Error::last_os_error()));
    }
    Ok(stat.f_flag & libc::ST_NODEV != 0)
}

/// The jail directory of one VM; removed whole when dropped, unless kept.
#[derive(Debug)]
pub struct JailDir {
    dir: PathBuf,
    /// <base>/<exec name>, if this jailer made it (removed with the jail when empty).
    made_parent: Option<PathBuf>,
    keep: bool,
}

impl JailDir {
    /// Builds the jail of `config`, with `runtime` (the loader and libraries the exec file
    /// needs, absolute host paths) at the same paths inside.
    pub fn create(config: &Config, runtime: &[PathBuf]) -> Result<JailDir, JailError> {
        let parent = config.jail_dir.parent().expect("<base>/<exec name>/<id> has a parent");
        if let Some(base) = parent.parent().filter(|b| !b.exists()) {
            DirBuilder::new().mode(0o755).recursive(true).create(base).map_err(io("create", base))?;
        }
        let made_parent = match DirBuilder::new().mode(0o755).create(parent) {
            Ok(()) => Some(parent.to_path_buf()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => None,
            Err(source) => return Err(JailError::Io { what: "create", path: parent.to_path_buf(), source }),
        };
        let mut jail = JailDir { dir: config.jail_dir.clone(), made_parent, keep: false };
        match DirBuilder::new().mode(0o700).create(&jail.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // Not ours: never remove it.
                jail.keep = true;
                return Err(JailError::Exists(jail.dir.clone()));
            }
            Err(source) => return Err(JailError::Io { what: "create", path: jail.dir.clone(), source }),
        }
        chmod(&jail.dir, 0o700)?;
        if on_nodev_mount(&jail.dir)? {
            return Err(JailError::NoDev(jail.dir.clone()));
        }
        let root = jail.root();
        make_dir(&root, 0o700)?;
        copy_new(&config.exec_file, &root.join(&config.exec_name), 0o755)?;
        for lib in runtime {
            let rel = lib.strip_prefix("/").map_err(|_| io("place", lib)(ErrorKind::InvalidInput.into()))?;
            make_dirs(&root, rel.parent().unwrap_or(Path::new("")))?;
            // Executable: the kernel maps the loader only if it may execute it.
            copy_new(lib, &root.join(rel), 0o755)?;
        }
        for (inside, host) in DEVICES {
            let path = root.join(inside);
            make_dirs(&root, path.parent().and_then(|p| p.strip_prefix(&root).ok()).unwrap_or(Path::new("")))?;
            mknod_like(host, &path, config.uid, config.gid)?;
        }
        make_dir(&root.join("proc"), 0o555)?;
        make_dir(&root.join("tmp"), 0o700)?;
        chown(&root.join("tmp"), config.uid, config.gid)?;
        for file in &config.files {
            let to = root.join(&file.name);
            match file.placement {
                Placement::Copy => {
                    copy_new(&file.source, &to, 0o600)?;
                    chown(&to, config.uid, config.gid)?;
                }
                Placement::HardLink => match std::fs::hard_link(&file.source, &to) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                        return Err(JailError::CrossDevice(file.source.clone()))
                    }
                    Err(source) => {
                        return Err(JailError::Io {
                            what: "hard-link into the jail",
                            path: file.source.clone(),
                            source,
                        })
                    }
                },
            }
        }
        chown(&root, config.uid, config.gid)?;
        Ok(jail)
    }

    /// `<jail dir>/root`.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The jail directory, `<base>/<exec name>/<id>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VMM started: the jail stays from now on.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Removes the device nodes (after the VM ended: they would give the uid KVM and TUN
    /// outside any jail).
    pub fn remove_devices(&self) {
        for (inside, _) in DEVICES {
            let _ = std::fs::remove_file(self.root().join(inside));
        }
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
            if let Some(parent) = &self.made_parent {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}
