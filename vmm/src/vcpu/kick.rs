//! Kicking a vCPU out of KVM_RUN with a real-time signal.
//!
//! The handler is empty except for one store: it sets `immediate_exit` in the `kvm_run` of the
//! vCPU running on the signalled thread. A kick that lands while the thread is outside KVM_RUN
//! (handling an exit, or about to enter) therefore still makes the next KVM_RUN return EINTR at
//! once, so a command sent before the kick is always seen. No race, no lost wake-up.

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

thread_local! {
    /// The `kvm_run` of the vCPU this thread drives, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks (the first real-time signal, unused by the C runtime).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // `try_with`: during thread teardown the slot may be gone; then there is no vCPU to kick.
    let _ = KVM_RUN.try_with(|slot| {
        let run = slot.get();
        if !run.is_null() {
            // SAFETY: a non-null pointer is only stored by `KickableVcpu::register`, points
            // into the kvm_run mmap of a vCPU fd this thread holds a reference to, and
            // `KickableVcpu` clears it before dropping that reference (so before the fd closes). A volatile byte store is what KVM
            // expects of immediate_exit and is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
}

/// A vCPU fd shared between its thread (which runs it) and the VMM (which reads and writes its
/// state while the thread is paused, never holding the lock across a blocking wait).
pub type SharedVcpuFd = Arc<Mutex<VcpuFd>>;

/// Locks a shared vCPU fd; a thread that panicked holding it left no half-done KVM call behind.
pub fn lock_vcpu(fd: &SharedVcpuFd) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|e| e.into_inner())
}

/// A vCPU fd registered as its thread's kick target: kicks delivered to this thread set its
/// immediate_exit. Not `Send`: the registration lives in this thread's TLS, and `Drop` clears it
/// before this thread's reference to the fd (and its kvm_run mmap) goes away.
pub struct KickableVcpu {
    fd: SharedVcpuFd,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl KickableVcpu {
    /// Registers `fd` as the current thread's kick target.
    pub fn register(fd: SharedVcpuFd) -> KickableVcpu {
        let run: *mut kvm_run = lock_vcpu(&fd).get_kvm_run();
        KVM_RUN.with(|slot| slot.set(run));
        KickableVcpu { fd, _not_send: std::marker::PhantomData }
    }

    /// Locks the vCPU fd for one KVM_RUN and its exit handling. The kvm_run mmap does not move.
    pub fn lock(&self) -> MutexGuard<'_, VcpuFd> {
        lock_vcpu(&self.fd)
    }
}

impl Drop for KickableVcpu {
    fn drop(&mut self) {
        KVM_RUN.with(|slot| slot.set(std::ptr::null_mut()));
    }
}

/// Sends a kick to `thread`.
pub fn kick<T: Killable>(thread: &T) -> Result<(), vmm_sys_util::errno::Error> {
    thread.kill(kick_signal())
}
