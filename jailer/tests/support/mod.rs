//! Running zygote-jailer in tests: a jailed VM that is always stopped and cleaned up (its
//! jail, its cgroups), and what a test reads of a process from the host.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use zygote_tests::{scratch_dir, zygote_bin};

/// The unprivileged user and group the tests jail their VMs as (no account needed).
pub const UID: u32 = 64201;
pub const GID: u32 = 64202;

/// Hang guard for anything a test waits for: generous, since CI machines are loaded.
const PATIENCE: Duration = Duration::from_secs(120);

pub fn require_root() {
    // SAFETY: geteuid has no arguments and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the jail tests need root (namespaces, mknod, cgroups), as CI has");
}

/// Every cgroup hierarchy mounted here: (mount point, its v1 controllers; empty for v2).
pub fn cgroup_mounts() -> Vec<(PathBuf, Vec<String>)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = PathBuf::from(left.split(' ').nth(4)?);
            let fields: Vec<&str> = right.split(' ').collect();
            match *fields.first()? {
                "cgroup2" => Some((point, Vec::new())),
                "cgroup" => Some((point, fields.get(2)?.split(',').map(str::to_string).collect())),
                _ => None,
            }
        })
        .collect()
}

/// The directory of process `pid`'s cgroup in the hierarchy holding `controller` (v1 if the
/// host keeps it there, else v2).
pub fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let mounts = cgroup_mounts();
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, listed, path) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        if listed.split(',').any(|c| c == controller) {
            let (mount, _) = mounts.iter().find(|(_, c)| c.iter().any(|c| c == controller)).unwrap();
            return mount.join(path.trim_start_matches('/'));
        }
    }
    let (v2, _) = mounts.iter().find(|(_, c)| c.is_empty()).expect("cgroup v2 mounted");
    let path = text.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line");
    v2.join(path.trim_start_matches('/'))
}

/// A field of /proc/<pid>/status, whitespace-normalised.
pub fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap_or_default();
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// (device, inode) of `path`, following links.
pub fn identity(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.dev(), meta.ino())
}

/// Waits until `path` exists (panics after the hang guard).
pub fn wait_for_path(path: &Path, jailer: &mut Child) {
    let deadline = Instant::now() + PATIENCE;
    while !path.exists() {
        if let Some(status) = jailer.try_wait().unwrap() {
            panic!("the jailer ended ({status}) before {} appeared", path.display());
        }
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `zygote ctl --api-sock <socket> <args>` and returns its JSON answer.
pub fn ctl(socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(zygote_bin()).arg("ctl").arg("--api-sock").arg(socket).args(args).output().unwrap();
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A scratch directory removed on drop, whether the test passed or not.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        Scratch(scratch_dir(name))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One zygote-jailer run in a scratch chroot base; on drop (pass or fail) the jailer is
/// stopped (SIGTERM: it kills the VMM and removes the cgroups), and the base directory and
/// any cgroup left under <hierarchy>/<parent>/<id> are removed.
pub struct Jailed {
    pub child: Child,
    pub id: String,
    pub base: PathBuf,
    pub parent_cgroup: String,
    /// Remove <hierarchy>/<parent> too (a parent only this test uses).
    own_parent: bool,
}

/// How a jailed run is set up.
pub struct JailSpec<'a> {
    pub name: &'a str,
    /// None: the jailer's default (the exec file's name), shared with other runs.
    pub parent_cgroup: Option<&'a str>,
    pub jailer_args: Vec<String>,
    pub run_args: &'a [&'a str],
    pub stdout: Stdio,
}

impl Jailed {
    pub fn start(spec: JailSpec) -> Jailed {
        require_root();
        let base = scratch_dir(spec.name);
        let id = format!("{}-{}", spec.name, std::process::id());
        let own_parent = spec.parent_cgroup.is_some();
        let parent_cgroup = spec.parent_cgroup.map_or("zygote".to_string(), |p| format!("{p}-{}", std::process::id()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_zygote-jailer"));
        command.args(["--id", &id, "--uid", &UID.to_string(), "--gid", &GID.to_string()]);
        command.arg("--exec-file").arg(zygote_bin()).arg("--chroot-base-dir").arg(&base);
        if own_parent {
            command.args(["--parent-cgroup", &parent_cgroup]);
        }
        command.args(&spec.jailer_args).arg("--").args(spec.run_args);
        let child = command.stdout(spec.stdout).stderr(Stdio::piped()).spawn().unwrap();
        Jailed { child, id, base, parent_cgroup, own_parent }
    }

    /// `<base>/zygote/<id>`.
    pub fn jail_dir(&self) -> PathBuf {
        self.base.join("zygote").join(&self.id)
    }

    pub fn root(&self) -> PathBuf {
        self.jail_dir().join("root")
    }

    /// The VMM's pid (host view), once it runs.
    pub fn vmm_pid(&mut self) -> u32 {
        let pid_file = self.jail_dir().join("zygote.pid");
        wait_for_path(&pid_file, &mut self.child);
        std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap()
    }

    /// Waits for the jailer to end (panics after the hang guard); its status and stderr.
    pub fn wait(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the jailer did not end");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (status, stderr)
    }

    /// The VM's cgroup directories that still exist, in every hierarchy.
    pub fn cgroups_left(&self) -> Vec<PathBuf> {
        let dirs = cgroup_mounts().into_iter().map(|(m, _)| m.join(&self.parent_cgroup).join(&self.id));
        dirs.filter(|d| d.exists()).collect()
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill takes integers; the pid is our unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + PATIENCE;
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for (mount, _) in cgroup_mounts() {
            let parent = mount.join(&self.parent_cgroup);
            let _ = std::fs::remove_dir(parent.join(&self.id));
            if self.own_parent {
                let _ = std::fs::remove_dir(&parent);
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}
