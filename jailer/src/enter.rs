//! The VMM's side of the fork: from the jailer's world into the jail, then the exec. Runs in
//! the child, PID 1 of its new PID namespace; every step is a plain syscall, and the first
//! that fails ends the child with a message for the jailer.

use std::ffi::CString;
use std::fs::File;
use std::io::Error;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

use crate::cgroup::VmCgroups;
use crate::config::{Config, ResourceLimit};

/// The exec and everything the jail steps need as C strings, built before the fork.
pub struct Entry {
    root: CString,
    exec: CString,
    argv: Vec<CString>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    limits: Vec<ResourceLimit>,
}

/// A step into the jail that failed.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct StepError {
    step: String,
    #[source]
    source: Error,
}

fn c_string(bytes: &[u8]) -> CString {
    // Paths and arguments come from the OS (no NUL inside); an empty one stands in otherwise
    // and fails its syscall.
    CString::new(bytes).unwrap_or_default()
}

impl Entry {
    pub fn new(config: &Config, root: &Path) -> Entry {
        let exec = c_string(Path::new("/").join(&config.exec_name).as_os_str().as_bytes());
        let mut argv = vec![c_string(config.exec_name.as_bytes()), c_string(b"run")];
        argv.extend(config.run_args.iter().map(|a| c_string(a.as_bytes())));
        Entry {
            root: c_string(root.as_os_str().as_bytes()),
            exec,
            argv,
            uid: config.uid,
            gid: config.gid,
            limits: config.resource_limits.clone(),
        }
    }
}

/// `ret` of a libc call as a Result naming `step`.
fn check(ret: libc::c_long, step: impl FnOnce() -> String) -> Result<(), StepError> {
    if ret == -1 {
        return Err(StepError { step: step(), source: Error::last_os_error() });
    }
    Ok(())
}

/// mount(2) with optional source/fstype.
fn mount(source: Option<&CString>, target: &CString, fstype: Option<&CString>, flags: libc::c_ulong) -> libc::c_long {
    let c = |s: Option<&CString>| s.map_or(ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is NUL-terminated or null, and outlives the call; no data argument.
    libc::c_long::from(unsafe { libc::mount(c(source), target.as_ptr(), c(fstype), flags, ptr::null()) })
}

/// Moves the calling process into its cgroups and namespaces and its root to the jail, drops
/// to uid:gid and execs the VMM. Returns only the step that failed. `keep_fd` (the jailer's
/// CLOEXEC report pipe) is the one fd above stderr left open until the exec.
pub fn enter(entry: &Entry, cgroups: &mut VmCgroups, netns: Option<&File>, keep_fd: RawFd) -> StepError {
    match steps(entry, cgroups, netns, keep_fd) {
        Err(e) => e,
        Ok(()) => StepError { step: "exec".into(), source: Error::other("returned") },
    }
}

fn steps(entry: &Entry, cgroups: &mut VmCgroups, netns: Option<&File>, keep_fd: RawFd) -> Result<(), StepError> {
    cgroups.enter().map_err(|e| StepError { step: "entering the VM's cgroups".into(), source: Error::other(e) })?;
    match netns {
        Some(ns) => {
            // SAFETY: setns on an open namespace fd the caller owns; no memory is passed.
            check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }.into(), || "joining --netns".into())?
        }
        // SAFETY: unshare takes flags only.
        None => check(unsafe { libc::unshare(libc::CLONE_NEWNET) }.into(), || "new network namespace".into())?,
    }
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }.into(), || "new mount namespace".into())?;
    let slash = c_string(b"/");
    let dot = c_string(b".");
    // Nothing done below may propagate back to the host's mounts.
    check(mount(None, &slash, None, libc::MS_REC | libc::MS_PRIVATE), || "making / private".into())?;
    // pivot_root needs the new root to be a mount point.
    check(mount(Some(&entry.root), &entry.root, None, libc::MS_BIND), || "bind-mounting the jail root".into())?;
    // SAFETY: root is NUL-terminated and outlives the call.
    check(unsafe { libc::chdir(entry.root.as_ptr()) }.into(), || "chdir to the jail root".into())?;
    // pivot_root(".", "."): the old root is stacked under the new one, then detached, so the
    // jail needs no directory for it.
    // SAFETY: both arguments are NUL-terminated and outlive the call.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) }, || "pivot_root".into())?;
    // SAFETY: dot is NUL-terminated and outlives the call.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }.into(), || "detaching the host's root".into())?;
    // SAFETY: slash is NUL-terminated and outlives the call.
    check(unsafe { libc::chdir(slash.as_ptr()) }.into(), || "chdir /".into())?;
    // A procfs of the new PID namespace: the VMM reopens its disk through /proc/self/fd and
    // reads its own smaps; it shows no process outside the jail.
    let (proc_, proc_dir) = (c_string(b"proc"), c_string(b"/proc"));
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    check(mount(Some(&proc_), &proc_dir, Some(&proc_), proc_flags), || "mounting /proc".into())?;
    for limit in &entry.limits {
        let (resource, value, name) = match *limit {
            ResourceLimit::NoFile(n) => (libc::RLIMIT_NOFILE, n, "no-file"),
            ResourceLimit::FileSize(n) => (libc::RLIMIT_FSIZE, n, "fsize"),
        };
        let rlimit = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: rlimit is a valid struct that outlives the call.
        check(unsafe { libc::setrlimit(resource, &rlimit) }.into(), || format!("--resource-limit {name}={value}"))?;
    }
    // SAFETY: an empty group list (no pointer read for size 0).
    check(unsafe { libc::setgroups(0, ptr::null()) }.into(), || "dropping supplementary groups".into())?;
    let (uid, gid) = (entry.uid, entry.gid);
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) }.into(), || format!("--gid {gid}"))?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) }.into(), || format!("--uid {uid}"))?;
    // After the uid change, which clears it: the VM dies with the jailer (which forwards
    // SIGTERM and SIGINT as SIGKILL, and is the one to remove the cgroups after).
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }.into(), || "PR_SET_PDEATHSIG".into())?;
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into(), || "PR_SET_NO_NEW_PRIVS".into())?;
    close_inherited_fds(keep_fd)?;
    let mut argv: Vec<*const libc::c_char> = entry.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(ptr::null());
    let envp: [*const libc::c_char; 1] = [ptr::null()];
    // SAFETY: exec, argv and envp are NUL-terminated strings and null-terminated arrays that
    // outlive the call. An empty environment: nothing of the jailer's leaks into the VMM.
    check(unsafe { libc::execve(entry.exec.as_ptr(), argv.as_ptr(), envp.as_ptr()) }.into(), || "exec".into())?;
    Ok(())
}

/// Closes every fd above stderr but `keep` (CLOEXEC, it closes at the exec).
fn close_inherited_fds(keep: RawFd) -> Result<(), StepError> {
    let keep = libc::c_uint::try_from(keep).unwrap_or(0);
    let ranges = match keep {
        0..=2 => vec![(3, libc::c_uint::MAX)],
        3 => vec![(4, libc::c_uint::MAX)],
        _ => vec![(3, keep - 1), (keep + 1, libc::c_uint::MAX)],
    };
    for (first, last) in ranges {
        // SAFETY: close_range takes integers; it closes only fds of this process, none of
        // which anything here uses afterwards but `keep`.
        check(unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) }, || "closing inherited fds".into())?;
    }
    Ok(())
}
