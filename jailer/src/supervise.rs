//! The jailer's side of the fork: it starts the VMM as PID 1 of a new PID namespace, learns
//! whether the VMM reached its exec (a CLOEXEC pipe: end of file means it did, bytes are the
//! step that failed), then waits for it, turning SIGINT, SIGTERM and SIGHUP into its SIGKILL
//! (a PID-namespace init ignores signals it has no handler for).

use std::fs::File;
use std::io::{Error, Read};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::cgroup::VmCgroups;
use crate::enter::{enter, Entry};

/// The signals the jailer answers by killing the VMM.
const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The VMM's pid once it runs, for the signal handler.
static VMM_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn kill_vmm(_: libc::c_int) {
    let pid = VMM_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes integers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The forwarding handler as sigaction takes it.
fn handler() -> libc::sighandler_t {
    kill_vmm as extern "C" fn(libc::c_int) as libc::sighandler_t
}

/// What failed starting the VMM.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}")]
    Setup(&'static str, #[source] Error),
    /// The child's own message: the step into the jail that failed, and why.
    #[error("{0}")]
    Child(String),
}

fn check(ret: libc::c_int, what: &'static str) -> Result<libc::c_int, SpawnError> {
    if ret == -1 {
        return Err(SpawnError::Setup(what, Error::last_os_error()));
    }
    Ok(ret)
}

/// A signal set holding the forwarded signals.
fn forwarded_set() -> libc::sigset_t {
    // SAFETY: all-zero bytes are a valid sigset_t for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for both calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

/// Sets the forwarded signals' action to `handler` and masks or unmasks them (`how`).
fn set_signals(handler: libc::sighandler_t, how: libc::c_int) {
    for sig in FORWARDED {
        // SAFETY: all-zero bytes are a valid sigaction (empty mask, no flags), filled in below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = handler;
        // No SA_RESTART: a signal interrupts waitpid, which the wait loop retries.
        // SAFETY: `action` is valid for the call; the old action is not asked for.
        unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) };
    }
    let set = forwarded_set();
    // SAFETY: `set` is a valid sigset_t; the old mask is not asked for.
    unsafe { libc::sigprocmask(how, &set, std::ptr::null_mut()) };
}

/// Forks the VMM into a new PID namespace and the jail; returns its pid once it has exec'd.
/// On a failed step the child has been reaped and its message is the error.
pub fn spawn(entry: &Entry, cgroups: &mut VmCgroups, netns: Option<&File>) -> Result<libc::pid_t, SpawnError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, "pipe2")?;
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // SAFETY: read_fd was just made and is owned by this File alone from here on.
    let mut report = unsafe { File::from_raw_fd(read_fd) };
    // SAFETY: unshare takes flags only; it affects the children made from now on.
    if let Err(e) = check(unsafe { libc::unshare(libc::CLONE_NEWPID) }, "new PID namespace") {
        // SAFETY: write_fd is ours and not used after.
        unsafe { libc::close(write_fd) };
        return Err(e);
    }
    // Masked across the fork, so a signal cannot come before the pid is known.
    set_signals(handler(), libc::SIG_BLOCK);
    // SAFETY: the jailer is single-threaded, so the child may run any code; it never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        set_signals(libc::SIG_DFL, libc::SIG_UNBLOCK);
        let failed = enter(entry, cgroups, netns, write_fd);
        let message = crate::one_line(&failed);
        // SAFETY: message outlives the call; write_fd is the pipe's open write end.
        unsafe { libc::write(write_fd, message.as_ptr().cast(), message.len()) };
        // SAFETY: _exit ends the child at once: no destructor of the parent's state runs here.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: write_fd is the parent's copy, not used after.
    unsafe { libc::close(write_fd) };
    if pid < 0 {
        let fork_error = Error::last_os_error();
        set_signals(libc::SIG_DFL, libc::SIG_UNBLOCK);
        return Err(SpawnError::Setup("fork", fork_error));
    }
    VMM_PID.store(pid, Ordering::SeqCst);
    set_signals(handler(), libc::SIG_UNBLOCK);
    let mut message = String::new();
    // A read error is taken as "no message": the wait below still tells how the child ended.
    let _ = report.read_to_string(&mut message);
    if !message.is_empty() {
        wait(pid);
        return Err(SpawnError::Child(message));
    }
    Ok(pid)
}

/// Waits for the VMM; its exit code, or 128 + the signal that killed it.
pub fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: `status` is valid for the call; pid is this process's child.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        if ret == -1 && Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
    VMM_PID.store(0, Ordering::SeqCst);
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// Kills the VMM (when the jailer cannot go on after starting it).
pub fn kill(pid: libc::pid_t) {
    // SAFETY: kill takes integers; pid is this process's unreaped child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
