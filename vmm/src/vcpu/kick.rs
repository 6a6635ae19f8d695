//! Kicking a vCPU out of KVM_RUN with a real-time signal.
//!
//! The handler is empty except for one store: it sets `immediate_exit` in the `kvm_run` of the
//! vCPU running on the signalled thread. A kick that lands while the thread is outside KVM_RUN
//! (handling an exit, or about to enter) therefore still makes the next KVM_RUN return EINTR at
//! once, so a command sent before the kick is always seen. No race, no lost wake-up.

use std::cell::Cell;
use std::sync::OnceLock;

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
            // into the kvm_run mmap of the vCPU fd this thread owns, and `KickableVcpu` clears it
            // before that fd is closed. A volatile byte store is what KVM
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

/// A vCPU fd registered as its thread's kick target: kicks delivered to this thread set its
/// immediate_exit. Not `Send`: the registration lives in this thread's TLS, and `Drop` clears it
/// before the fd (and its kvm_run mmap) goes away.
pub struct KickableVcpu {
    fd: VcpuFd,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl KickableVcpu {
    /// Registers `fd` as the current thread's kick target.
    pub fn register(mut fd: VcpuFd) -> KickableVcpu {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|slot| slot.set(run));
        KickableVcpu { fd, _not_send: std::marker::PhantomData }
    }

    /// The vCPU fd. The kvm_run mmap does not move when the fd does.
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
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
