//! What each thread class may call: found by tracing every feature (`strace -f`: run, clone,
//! snapshot create and load, reset, the API, tiny guests with and without a disk, a Linux guest
//! with a disk) and by reading the devices' event handlers, then narrowed by argument where the
//! kernel lets a filter see it (ioctl commands, mmap/mprotect flags, fcntl commands, socket
//! domains, futex operations, madvise advice, io_uring register opcodes).

use libc::c_long;

use super::ioctls;
use super::rules::{any, arg_in, eq, masked, when, Allow};

/// A Rust thread's own life after its filter is in: heap (glibc malloc maps and trims arenas),
/// locks and channels (futex), signals and its exit (unmapping its alternate signal stack).
pub fn thread() -> Vec<Allow> {
    vec![
        any(libc::SYS_exit),
        any(libc::SYS_exit_group),
        futex(),
        any(libc::SYS_rt_sigprocmask),
        any(libc::SYS_rt_sigreturn),
        any(libc::SYS_sigaltstack),
        any(libc::SYS_sched_yield),
        any(libc::SYS_clock_gettime),
        any(libc::SYS_clock_nanosleep),
        any(libc::SYS_nanosleep),
        any(libc::SYS_gettid),
        any(libc::SYS_munmap),
        // Any thread may allocate from glibc's main arena (once a thread's own arena is busy or
        // the arena limit is reached), and the main arena grows with brk: the API's client
        // thread was killed for it under load.
        any(libc::SYS_brk),
        // realloc of a large allocation (glibc moves it with mremap, e.g. a growing read buffer).
        any(libc::SYS_mremap),
        no_exec(libc::SYS_mprotect),
        mmap(&[libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE]),
        arg_in(libc::SYS_madvise, 2, &[libc::MADV_DONTNEED as u64]),
        // Error messages on stderr (a device loop's, a panic's).
        any(libc::SYS_write),
        // Debug builds check an fd is open before closing it (std's IO-safety assertion).
        arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]),
    ]
}

/// What runs in a new thread before its first line (clone, glibc and std's thread start): a
/// thread that spawns others needs it, since they start under its filter.
pub fn spawning() -> Vec<Allow> {
    vec![
        any(libc::SYS_clone3),
        // glibc falls back to clone without clone3: only for threads.
        when(libc::SYS_clone, vec![vec![masked(0, libc::CLONE_THREAD as u64, libc::CLONE_THREAD as u64)]]),
        any(libc::SYS_rseq),
        any(libc::SYS_set_robust_list),
        any(libc::SYS_sched_getaffinity),
        arg_in(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]),
        mmap(&[libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK]),
        // A vCPU thread lowers its own priority before its own filter is in (vcpu::lower_priority).
        arg_in(libc::SYS_getpriority, 0, &[libc::PRIO_PROCESS as u64]),
        arg_in(libc::SYS_setpriority, 0, &[libc::PRIO_PROCESS as u64]),
    ]
}

/// A vCPU thread: KVM_RUN and the exits it serves itself (serial output, and without an
/// irqchip the devices' queue notifications: io_uring submits, pins, TAP frames, entropy).
pub fn vcpu() -> Vec<Allow> {
    let mut ioctls = ioctls::KVM_VCPU.to_vec();
    ioctls.push(ioctls::TUNSETOFFLOAD);
    vec![
        arg_in(libc::SYS_ioctl, 1, &ioctls),
        any(libc::SYS_io_uring_enter),
        arg_in(libc::SYS_madvise, 2, &[libc::MADV_POPULATE_WRITE as u64]),
        // Dropping the last handle of a VM's RAM or a device unmaps and closes it.
        any(libc::SYS_close),
        any(libc::SYS_readv),
        any(libc::SYS_writev),
        any(libc::SYS_getrandom),
        // virtio-rng's rate limit arms its timer when it defers a request.
        any(libc::SYS_timerfd_settime),
    ]
}

/// A device event loop: epoll, eventfds (notifications in, interrupts out), io_uring
/// completions and submits, and the new devices' traffic: TAP frames (virtio-net), AF_UNIX
/// streams (vsock: accept, connect, send, receive), entropy (virtio-rng), deadline timers.
pub fn event_loop() -> Vec<Allow> {
    vec![
        any(libc::SYS_epoll_wait),
        any(libc::SYS_epoll_pwait),
        arg_in(
            libc::SYS_epoll_ctl,
            1,
            &[libc::EPOLL_CTL_ADD as u64, libc::EPOLL_CTL_MOD as u64, libc::EPOLL_CTL_DEL as u64],
        ),
        any(libc::SYS_read),
        any(libc::SYS_readv),
        any(libc::SYS_writev),
        any(libc::SYS_close),
        any(libc::SYS_io_uring_enter),
        arg_in(libc::SYS_madvise, 2, &[libc::MADV_POPULATE_WRITE as u64]),
        any(libc::SYS_getrandom),
        any(libc::SYS_timerfd_settime),
        arg_in(libc::SYS_ioctl, 1, &[ioctls::FIONBIO]),
        arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]),
        any(libc::SYS_connect),
        any(libc::SYS_accept4),
        any(libc::SYS_recvfrom),
        any(libc::SYS_recvmsg),
        any(libc::SYS_sendto),
        any(libc::SYS_sendmsg),
        any(libc::SYS_shutdown),
        arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFL as u64, libc::F_SETFL as u64, libc::F_GETFD as u64]),
    ]
}

/// The DMA engine's runner: writes guest memory through pins, sleeps on its doorbell.
pub fn dma() -> Vec<Allow> {
    vec![arg_in(libc::SYS_madvise, 2, &[libc::MADV_POPULATE_WRITE as u64]), any(libc::SYS_close)]
}

/// The API server's threads (tiny_http's acceptor and its connection workers): accept on the
/// listening socket, read requests, hand them to the VMM thread, close.
pub fn api() -> Vec<Allow> {
    let mut allows = spawning();
    allows.extend([
        any(libc::SYS_accept4),
        // tiny_http asks the listener for its address as it starts.
        any(libc::SYS_getsockname),
        any(libc::SYS_read),
        any(libc::SYS_recvfrom),
        any(libc::SYS_sendto),
        any(libc::SYS_shutdown),
        any(libc::SYS_close),
        any(libc::SYS_poll),
        arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64, libc::F_GETFD as u64]),
        // Read and write timeouts on a client's socket.
        when(
            libc::SYS_setsockopt,
            vec![
                vec![eq(1, libc::SOL_SOCKET as u64), eq(2, libc::SO_RCVTIMEO as u64)],
                vec![eq(1, libc::SOL_SOCKET as u64), eq(2, libc::SO_SNDTIMEO as u64)],
            ],
        ),
    ]);
    allows
}

/// The VMM (control) thread's own work: building VMs (files, memfds, KVM), clones, snapshot
/// files, resets, the API socket's answers, TAPs and vsock sockets of new devices.
pub fn vmm() -> Vec<Allow> {
    let mut ioctls = ioctls::KVM_VMM.to_vec();
    ioctls.extend_from_slice(ioctls::HOST_VMM);
    let mut allows = spawning();
    allows.extend([
        arg_in(libc::SYS_ioctl, 1, &ioctls),
        // Guest RAM (memfd images mapped private at fixed addresses over its reservation), kvm_run
        // and io_uring rings (shared), RAM files read while loading a snapshot.
        mmap(&[
            libc::MAP_PRIVATE,
            libc::MAP_SHARED,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ]),
        arg_in(
            libc::SYS_madvise,
            2,
            &[libc::MADV_POPULATE_WRITE as u64, libc::MADV_DONTNEED as u64, libc::MADV_REMOVE as u64],
        ),
        any(libc::SYS_getpid),
        any(libc::SYS_getrandom),
        any(libc::SYS_rt_sigaction),
        // The vCPU kick signal (`vcpu::kick`: the first real-time signal).
        arg_in(libc::SYS_tgkill, 2, &[u64::from(vmm_sys_util::signal::SIGRTMIN().unsigned_abs())]),
        // Files: kernels, disks, snapshot state and RAM files (written through temporary
        // files, renamed or linked into place), /dev/kvm, /dev/net/tun.
        any(libc::SYS_openat),
        // Snapshot files are opened beneath their directory (RESOLVE_BENEATH).
        any(libc::SYS_openat2),
        any(libc::SYS_close),
        any(libc::SYS_read),
        any(libc::SYS_write),
        any(libc::SYS_pread64),
        any(libc::SYS_pwrite64),
        any(libc::SYS_preadv),
        any(libc::SYS_pwritev),
        any(libc::SYS_lseek),
        any(libc::SYS_fstat),
        any(libc::SYS_newfstatat),
        any(libc::SYS_statx),
        any(libc::SYS_fsync),
        any(libc::SYS_fdatasync),
        any(libc::SYS_ftruncate),
        any(libc::SYS_fallocate),
        any(libc::SYS_copy_file_range),
        any(libc::SYS_rename),
        any(libc::SYS_renameat),
        any(libc::SYS_renameat2),
        any(libc::SYS_linkat),
        any(libc::SYS_unlink),
        any(libc::SYS_unlinkat),
        any(libc::SYS_mkdir),
        any(libc::SYS_mkdirat),
        any(libc::SYS_readlink),
        any(libc::SYS_readlinkat),
        any(libc::SYS_getdents64),
        any(libc::SYS_getcwd),
        arg_in(
            libc::SYS_fcntl,
            1,
            &[
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
            ],
        ),
        any(libc::SYS_memfd_create),
        any(libc::SYS_eventfd2),
        any(libc::SYS_timerfd_create),
        any(libc::SYS_epoll_create1),
        any(libc::SYS_epoll_ctl),
        any(libc::SYS_poll),
        any(libc::SYS_io_uring_setup),
        any(libc::SYS_io_uring_enter),
        // IORING_REGISTER_EVENTFD and its undo: completions wake the device's event loop.
        arg_in(libc::SYS_io_uring_register, 1, &[4, 5]),
        // The API socket (and its stale-socket probe), vsock's host-side sockets.
        arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]),
        any(libc::SYS_bind),
        any(libc::SYS_listen),
        any(libc::SYS_connect),
        any(libc::SYS_getsockname),
        any(libc::SYS_recvfrom),
        any(libc::SYS_sendto),
        any(libc::SYS_shutdown),
        // A TAP in another network namespace is opened by a helper thread that joins it.
        arg_in(libc::SYS_setns, 1, &[libc::CLONE_NEWNET as u64]),
        // Each new thread installs its own class's filter.
        arg_in(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]),
        arg_in(libc::SYS_seccomp, 0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)]),
    ]);
    allows
}

/// futex with the operations std's locks, channels, condvars and thread joins use.
fn futex() -> Allow {
    // FUTEX_CMD_MASK: ~(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME), a 32-bit int.
    const CMD_MASK: u64 = 0xffff_fe7f;
    let cmds = [
        libc::FUTEX_WAIT,
        libc::FUTEX_WAKE,
        libc::FUTEX_WAIT_BITSET,
        libc::FUTEX_WAKE_BITSET,
        libc::FUTEX_REQUEUE,
        libc::FUTEX_CMP_REQUEUE,
    ];
    when(libc::SYS_futex, cmds.iter().map(|&cmd| vec![masked(1, CMD_MASK, u64::from(cmd.unsigned_abs()))]).collect())
}

/// mmap never executable, and only with one of `flags` (the whole flags word).
fn mmap(flags: &[libc::c_int]) -> Allow {
    let no_exec = masked(2, libc::PROT_EXEC as u64, 0);
    when(libc::SYS_mmap, flags.iter().map(|&f| vec![no_exec, eq(3, u64::from(f.unsigned_abs()))]).collect())
}

/// mprotect never to executable: no thread writes code.
fn no_exec(nr: c_long) -> Allow {
    when(nr, vec![vec![masked(2, libc::PROT_EXEC as u64, 0)]])
}
