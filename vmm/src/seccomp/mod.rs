//! Seccomp filters per thread class: each thread of `zygote run` may make only the syscalls its
//! class makes (see `classes`), with ioctl commands and other arguments checked.
//!
//! `zygote run` compiles every class's filter once (`enable`) and installs the VMM thread's;
//! every other thread installs its class's filter as the first thing it runs (`thread_start`,
//! a one-line hook at each spawn point), before it touches guest-controlled data. A library's
//! threads (tiny_http's) are started under their filter by `start_under`. Library users (tests,
//! the bench, the fuzzer) install nothing unless they call `enable`.
//!
//! A new thread inherits its creator's filter and a filter can only be narrowed, so the VMM
//! thread, which spawns every other thread (vCPUs and device threads of clones and restored
//! snapshots too), holds the union of its own rules and every class it spawns; each spawned
//! thread then narrows to its class. A forbidden syscall kills the process (SIGSYS), or with
//! `--seccomp-log` is allowed and logged by the kernel (the audit log / dmesg, `type=1326`).

mod classes;
mod ioctls;
mod rules;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use rules::{merge, to_rule_map, Allow, Cond};

/// The kinds of thread `zygote run` has, one filter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadClass {
    /// The main thread: builds, clones, snapshots, restores and resets VMs, answers the API.
    Vmm,
    /// The API server's acceptor and connection threads.
    Api,
    /// One per vCPU.
    Vcpu,
    /// A device event loop (virtio-blk today; virtio-net, vsock and rng next).
    EventLoop,
    /// The DMA test engine's runner.
    Dma,
}

impl ThreadClass {
    pub const ALL: [ThreadClass; 5] =
        [ThreadClass::Vmm, ThreadClass::Api, ThreadClass::Vcpu, ThreadClass::EventLoop, ThreadClass::Dma];

    /// The class's name in messages, the README and the test hook's variable.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vmm => "vmm",
            ThreadClass::Api => "api",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::EventLoop => "event-loop",
            ThreadClass::Dma => "dma",
        }
    }

    /// The rules this class's threads install.
    fn allows(self) -> Vec<Allow> {
        let mut allows = classes::thread();
        match self {
            ThreadClass::Vmm => {
                allows.extend(classes::vmm());
                // Inherited by every thread it spawns, before they narrow to their class.
                for class in [ThreadClass::Api, ThreadClass::Vcpu, ThreadClass::EventLoop, ThreadClass::Dma] {
                    allows.extend(class.allows());
                }
            }
            ThreadClass::Api => allows.extend(classes::api()),
            ThreadClass::Vcpu => allows.extend(classes::vcpu()),
            ThreadClass::EventLoop => allows.extend(classes::event_loop()),
            ThreadClass::Dma => allows.extend(classes::dma()),
        }
        allows
    }

    /// The merged rules: syscall -> None (any arguments) or the argument rules allowing it.
    fn merged(self) -> BTreeMap<libc::c_long, Option<Vec<Vec<Cond>>>> {
        let mut map = BTreeMap::new();
        merge(&mut map, &self.allows());
        map
    }

    /// How many syscalls this class's filter allows (with or without argument checks).
    pub fn allowed_syscalls(self) -> usize {
        self.merged().len()
    }

    /// Whether the filter allows syscall `nr` with some arguments.
    pub fn allows_syscall(self, nr: libc::c_long) -> bool {
        self.merged().contains_key(&nr)
    }
}

/// What a forbidden syscall does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kills the process with SIGSYS (the default of `zygote run`).
    Kill,
    /// Allows it and has the kernel log it (`--seccomp-log`: finding a missing syscall).
    Log,
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot compile the seccomp filters")]
    Compile(#[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter of the {class} threads")]
    Program { class: &'static str, source: seccompiler::BackendError },
    #[error("cannot install the seccomp filter of the {class} threads (--no-seccomp runs without)")]
    Install { class: &'static str, source: seccompiler::Error },
    #[error("seccomp filters are already enabled")]
    AlreadyEnabled,
}

/// Every class's compiled program, in `ThreadClass::ALL` order; unset: filters are off.
static PROGRAMS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

/// Compiles every class's filter and installs the VMM thread's on the calling thread, which
/// must be the one that goes on to build and spawn everything else. Call before any thread.
pub fn enable(mode: SeccompMode) -> Result<(), SeccompError> {
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let programs =
        ThreadClass::ALL.iter().map(|&class| compile(class, mismatch.clone())).collect::<Result<Vec<_>, _>>()?;
    resolve_malloc_arena_limit();
    PROGRAMS.set(programs).map_err(|_| SeccompError::AlreadyEnabled)?;
    install(ThreadClass::Vmm)
}

fn compile(class: ThreadClass, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let program = |source| SeccompError::Program { class: class.name(), source };
    let rules = to_rule_map(&class.merged())?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64).map_err(program)?;
    filter.try_into().map_err(program)
}

/// glibc's malloc reads the CPU count from /sys the first time a thread makes the ninth arena;
/// under a filter without open that would kill the process. Setting the limit to the value
/// glibc would compute (8 per CPU) up front leaves malloc as it was, minus the file read.
fn resolve_malloc_arena_limit() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let limit = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc tunable; no memory is passed.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) };
    }
}

/// Installs `class`'s filter on the calling thread; nothing when filters are off.
pub fn install(class: ThreadClass) -> Result<(), SeccompError> {
    let Some(programs) = PROGRAMS.get() else {
        return Ok(());
    };
    let index = ThreadClass::ALL.iter().position(|&c| c == class).unwrap_or(0);
    let forbidden = test_hook::armed(class);
    seccompiler::apply_filter(&programs[index])
        .map_err(|source| SeccompError::Install { class: class.name(), source })?;
    if forbidden {
        test_hook::forbidden_syscall(class);
    }
    Ok(())
}

/// The hook at the start of a spawned thread: installs `class`'s filter, or ends the process,
/// since a thread that was to be filtered must not go on unfiltered.
pub fn thread_start(class: ThreadClass) {
    if let Err(e) = install(class) {
        eprintln!("zygote: {e}: {}", e.source_text());
        std::process::abort();
    }
}

/// `thread_start` of the DMA engine's runner (spawned by the devices crate, which takes a `fn()`).
pub fn dma_thread_start() {
    thread_start(ThreadClass::Dma);
}

/// Runs `f` on a new thread that installed `class`'s filter first, and returns what it returns:
/// threads that `f` starts (a library's own) inherit the filter from their first instruction.
pub fn start_under<T: Send>(class: ThreadClass, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            thread_start(class);
            f()
        });
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

impl SeccompError {
    fn source_text(&self) -> String {
        std::error::Error::source(self).map_or_else(String::new, ToString::to_string)
    }
}

/// Test-only (debug builds): `ZYGOTE_SECCOMP_TEST_FORBIDDEN=<class name>` makes the first
/// thread of that class issue a syscall its filter forbids right after installing it, so a
/// test can see the process die of SIGSYS for each class.
#[cfg(debug_assertions)]
mod test_hook {
    use super::ThreadClass;

    pub const VARIABLE: &str = "ZYGOTE_SECCOMP_TEST_FORBIDDEN";

    /// Read before the filter is in (the environment lock is a futex, but be plain about it).
    pub fn armed(class: ThreadClass) -> bool {
        std::env::var_os(VARIABLE).is_some_and(|v| v == class.name())
    }

    /// The VMM thread may open files, the others may not: each class gets a syscall only its
    /// own filter forbids (for the VMM, one refused by an argument check).
    pub fn forbidden_syscall(class: ThreadClass) {
        // SAFETY: plain syscalls with constant arguments; a result (if any) is closed.
        let fd = unsafe {
            match class {
                ThreadClass::Vmm => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
                _ => libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/dev/null".as_ptr(), libc::O_RDONLY),
            }
        };
        eprintln!("zygote: the {} thread's forbidden syscall was allowed ({fd})", class.name());
    }
}

#[cfg(not(debug_assertions))]
mod test_hook {
    use super::ThreadClass;

    pub fn armed(_: ThreadClass) -> bool {
        false
    }

    pub fn forbidden_syscall(_: ThreadClass) {}
}

#[cfg(test)]
mod tests;
