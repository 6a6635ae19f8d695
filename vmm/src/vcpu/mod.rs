//! vCPU threads: each is a small state machine driven by a command channel.
//!
//! States: `Running` (in and out of KVM_RUN), `Paused` (blocked on the channel, will run again),
//! `Idle` (parked by the guest or stopped for good: never runs again, still answers commands),
//! `Finished` (thread exits). Every `Pause` command is answered with exactly one
//! `VcpuEvent::Paused` by a thread that is out of KVM_RUN, whatever its state, so the VMM can
//! count acknowledgements without races. `Pause` and `Finish`, the commands a thread in
//! KVM_RUN must act on, are followed by a kick (see `kick`).

mod kick;
mod report;

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use memory::GuestRam;

use crate::bus::Bus;
use crate::exit::{handle_exit, ExitAction, StopReason};
use kick::KickableVcpu;
pub use kick::{install_kick_handler, lock_vcpu, SharedVcpuFd};
pub use report::{exception_name, RegisterDump, TrapFrame, VcpuError};

/// What the VMM tells a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave KVM_RUN and wait; answered by `VcpuEvent::Paused`.
    Pause,
    /// Run again (if paused).
    Resume,
    /// The VMM restored this vCPU's state: a vCPU the guest had parked or stopped is paused
    /// again, ready for `Resume`. Sent only under a pause token; needs no answer.
    Rearm,
    /// End the thread.
    Finish,
}

/// How a vCPU ended the VM.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest wrote this exit code.
    Exit(u8),
    /// The guest asked for a reset or power-off.
    Reset,
    /// The guest died or KVM failed.
    Failed(VcpuError),
}

/// What a vCPU thread tells the VMM.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Answer to `Pause`: vCPU `.0` is out of KVM_RUN.
    Paused(usize),
    /// vCPU `.0` parked itself (nothing to do); the VM goes on.
    Parked(usize),
    /// vCPU `.0` stopped the VM.
    Stopped(usize, VcpuStop),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Idle,
    Finished,
}

/// Everything a vCPU thread owns.
pub struct VcpuContext {
    pub index: usize,
    /// The VMM keeps a clone of this to capture and restore state while the vCPU is paused.
    pub fd: SharedVcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// Keeps the RAM behind the memslots mapped while this vCPU fd exists.
    pub ram: Arc<GuestRam>,
}

/// The VMM's end of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: usize,
    fd: SharedVcpuFd,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `command` and, if a running thread must act on it, kicks the thread out of
    /// KVM_RUN. A thread that has already gone needs neither, so failures to deliver are not
    /// errors.
    pub fn send(&self, command: VcpuCommand) {
        if self.commands.send(command).is_ok() && needs_kick(command) {
            if let Some(thread) = &self.thread {
                // ESRCH if the thread just exited: nothing to kick.
                let _ = kick::kick(thread);
            }
        }
    }

    /// Finishes the thread and waits for it.
    pub fn finish(&mut self) {
        self.send(VcpuCommand::Finish);
        if let Some(thread) = self.thread.take() {
            // A panicking vCPU thread already printed its panic; the VM is over either way.
            let _ = thread.join();
        }
    }

    /// This vCPU's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The vCPU fd. Its thread holds the lock only inside one KVM_RUN and exit handling, so
    /// locking it while the VM is paused never blocks.
    pub fn fd(&self) -> &SharedVcpuFd {
        &self.fd
    }
}

/// Whether a thread in KVM_RUN must leave it to act on `command`. `Resume` and `Rearm` find
/// their thread blocked on the channel (a running vCPU ignores `Resume`; `Rearm` is sent only
/// under a pause), and a kick would only cost a signal in the pause and make the resumed vCPU's
/// first KVM_RUN return at once (the handler sets immediate_exit).
fn needs_kick(command: VcpuCommand) -> bool {
    matches!(command, VcpuCommand::Pause | VcpuCommand::Finish)
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Starts the thread of `ctx`, initially paused; it reports on `events`.
pub fn spawn_vcpu(ctx: VcpuContext, events: Sender<VcpuEvent>) -> Result<VcpuHandle, VcpuError> {
    install_kick_handler().map_err(VcpuError::KickHandler)?;
    let index = ctx.index;
    let fd = Arc::clone(&ctx.fd);
    let (commands, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || run_thread(ctx, &rx, &events))
        .map_err(|source| VcpuError::Spawn { vcpu: index, source })?;
    Ok(VcpuHandle { index, fd, commands, thread: Some(thread) })
}

/// How much nicer than the thread that spawned it a vCPU thread runs. A spinning guest is
/// always runnable; at equal priority the control path (the API thread building a clone, the
/// kernel's per-VM workers it waits for) queues behind every busy vCPU at each wake-up: a clone
/// took 300 ms beside 30 spinning clones on 2 CPUs, against 1.3 ms beside none. A few steps
/// of nice let the (mostly sleeping) control path preempt vCPUs when it wakes, while vCPUs
/// still get all the CPU it leaves.
pub const VCPU_NICE_OFFSET: i32 = 5;

/// Lowers this thread's priority by `VCPU_NICE_OFFSET` (up to nice 19). Raising one's own
/// nice value needs no privilege; a failure only leaves the thread at its creator's priority.
fn lower_priority() {
    // SAFETY: gettid takes nothing and cannot fail.
    let tid = unsafe { libc::gettid() };
    let Ok(tid) = libc::id_t::try_from(tid) else { return };
    // SAFETY: getpriority/setpriority read and set this thread's nice value; no memory is
    // passed. getpriority returns the nice value itself (-1 is a valid one, so no check).
    unsafe {
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (nice + VCPU_NICE_OFFSET).min(19));
    }
}

fn run_thread(ctx: VcpuContext, commands: &Receiver<VcpuCommand>, events: &Sender<VcpuEvent>) {
    // Before the seccomp filter, which has no reason to allow setpriority.
    lower_priority();
    crate::seccomp::thread_start(crate::seccomp::ThreadClass::Vcpu);
    let VcpuContext { index, fd, pio, mmio, ram } = ctx;
    let vcpu = KickableVcpu::register(fd);
    let mut state = State::Paused;
    while state != State::Finished {
        let command = if state == State::Running {
            match commands.try_recv() {
                Ok(command) => Some(command),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(VcpuCommand::Finish),
            }
        } else {
            Some(commands.recv().unwrap_or(VcpuCommand::Finish))
        };
        state = match command {
            Some(command) => {
                if (command, state) == (VcpuCommand::Pause, State::Running) {
                    // Before the acknowledgement: the guest learns of every pause, however long.
                    tell_guest_it_was_stopped(&vcpu.lock());
                }
                apply(state, command, index, events)
            }
            None => run_once(index, &vcpu, &pio, &mmio, &ram, events),
        };
    }
    // `vcpu` drops here: the kick registration is cleared, then the fd closes, then `ram`.
}

/// The state after `command`; acknowledges pauses.
fn apply(state: State, command: VcpuCommand, index: usize, events: &Sender<VcpuEvent>) -> State {
    match (command, state) {
        (VcpuCommand::Finish, _) => State::Finished,
        (VcpuCommand::Pause, state) => {
            // If the VMM is gone nobody waits for the answer.
            let _ = events.send(VcpuEvent::Paused(index));
            if state == State::Running {
                State::Paused
            } else {
                state
            }
        }
        (VcpuCommand::Resume, State::Paused) => State::Running,
        (VcpuCommand::Resume, state) => state,
        (VcpuCommand::Rearm, State::Idle) => State::Paused,
        (VcpuCommand::Rearm, state) => state,
    }
}

/// Enters the guest once and handles the exit.
fn run_once(
    index: usize,
    vcpu: &KickableVcpu,
    pio: &Bus,
    mmio: &Bus,
    ram: &GuestRam,
    events: &Sender<VcpuEvent>,
) -> State {
    let mut fd = vcpu.lock();
    let action = match fd.run() {
        Ok(exit) => handle_exit(exit, pio, mmio),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // Kicked: clear the flag and go back to look at the commands.
            fd.set_kvm_immediate_exit(0);
            return State::Running;
        }
        Err(source) => return stop(events, index, VcpuStop::Failed(VcpuError::Run { vcpu: index, source })),
    };
    let reason = match action {
        ExitAction::Continue => return State::Running,
        ExitAction::Stop(reason) => reason,
    };
    let fd = &*fd;
    let outcome = match reason {
        StopReason::Park => {
            let _ = events.send(VcpuEvent::Parked(index));
            return State::Idle;
        }
        StopReason::Exit(code) => VcpuStop::Exit(code),
        StopReason::Reset => VcpuStop::Reset,
        StopReason::Trap(vector) => VcpuStop::Failed(report::exception_report(index, fd, ram, vector)),
        StopReason::Shutdown => VcpuStop::Failed(VcpuError::TripleFault { vcpu: index, regs: RegisterDump::read(fd) }),
        StopReason::Halt => VcpuStop::Failed(VcpuError::Halted { vcpu: index, regs: RegisterDump::read(fd) }),
        StopReason::Unhandled(exit) => {
            VcpuStop::Failed(VcpuError::UnhandledExit { vcpu: index, exit, regs: RegisterDump::read(fd) })
        }
    };
    stop(events, index, outcome)
}

fn stop(events: &Sender<VcpuEvent>, index: usize, outcome: VcpuStop) -> State {
    let _ = events.send(VcpuEvent::Stopped(index, outcome));
    State::Idle
}

/// KVM_KVMCLOCK_CTRL: KVM sets PVCLOCK_GUEST_STOPPED in the vCPU's kvm-clock page at its next
/// entry, and a Linux guest then resets its soft-lockup and RCU-stall watchdogs instead of
/// reporting the time it did not run as a hang. For a paused vCPU (out of KVM_RUN). A guest
/// that has not enabled kvm-clock (tiny guests, early boot) has nothing to tell: KVM answers
/// EINVAL, and any failure only costs a watchdog warning in the guest, so none is returned.
pub fn tell_guest_it_was_stopped(vcpu: &kvm_ioctls::VcpuFd) {
    let _ = vcpu.kvmclock_ctrl();
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn every_pause_is_acknowledged_in_every_state() {
        let (tx, rx) = mpsc::channel();
        assert_eq!(apply(State::Running, VcpuCommand::Pause, 3, &tx), State::Paused);
        assert_eq!(apply(State::Paused, VcpuCommand::Pause, 3, &tx), State::Paused);
        assert_eq!(apply(State::Idle, VcpuCommand::Pause, 3, &tx), State::Idle);
        assert_eq!(rx.try_iter().filter(|e| matches!(e, VcpuEvent::Paused(3))).count(), 3);
    }

    #[test]
    fn resume_runs_only_a_paused_vcpu() {
        let (tx, _rx) = mpsc::channel();
        assert_eq!(apply(State::Paused, VcpuCommand::Resume, 0, &tx), State::Running);
        assert_eq!(apply(State::Idle, VcpuCommand::Resume, 0, &tx), State::Idle);
        assert_eq!(apply(State::Running, VcpuCommand::Resume, 0, &tx), State::Running);
        assert_eq!(apply(State::Idle, VcpuCommand::Finish, 0, &tx), State::Finished);
        assert_eq!(apply(State::Idle, VcpuCommand::Rearm, 0, &tx), State::Paused);
        assert_eq!(apply(State::Paused, VcpuCommand::Rearm, 0, &tx), State::Paused);
    }
}
