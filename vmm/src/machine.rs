//! `Vmm`: one running VM — its KVM VM and RAM, buses, and vCPU threads — and the controls the
//! rest of Zygote uses: start, pause (all vCPUs out of KVM_RUN, proven by a token), resume,
//! wait for the guest's outcome, stop.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::GuestRam;

use crate::bus::Bus;
use crate::device_manager::DeviceManager;
use crate::vcpu::{VcpuCommand, VcpuError, VcpuEvent, VcpuHandle, VcpuStop};
use crate::vm::Vm;

/// How long vCPUs get to leave KVM_RUN after a kick. Generous: under PVM a vCPU may be deep in
/// emulated guest-kernel code.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a VM ended.
#[derive(Debug)]
pub enum VmOutcome {
    /// The guest wrote this exit code to the exit port.
    Exited(u8),
    /// The guest asked for a reset or power-off (i8042 0xfe, or a KVM system event).
    Reset,
    /// Every vCPU parked itself: nothing will ever run again.
    AllParked,
    /// The VMM stopped it.
    Stopped,
    /// The guest faulted or KVM failed.
    Failed(VcpuError),
}

impl VmOutcome {
    /// The process exit code this outcome maps to: the guest's code, 0 for a clean end,
    /// 1 for a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmOutcome::Exited(code) => *code,
            VmOutcome::Reset | VmOutcome::Stopped => 0,
            VmOutcome::AllParked | VmOutcome::Failed(_) => 1,
        }
    }
}

/// Errors controlling a running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{missing} of {total} vCPUs did not leave KVM_RUN within {timeout:?}")]
    PauseTimeout { missing: usize, total: usize, timeout: Duration },
    #[error("all vCPU threads are gone")]
    VcpusGone,
}

/// Proof that every vCPU of a VM is out of KVM_RUN. Only [`Vmm::pause`] makes one; give it back
/// to [`Vmm::resume`].
#[derive(Debug)]
#[must_use = "a paused VM stays paused until the token is given to Vmm::resume"]
pub struct Paused {
    vm_id: u64,
}

impl Paused {
    /// The id of the VM that is paused.
    pub fn vm_id(&self) -> u64 {
        self.vm_id
    }
}

/// A built VM. Dropping it stops and joins its vCPU threads.
pub struct Vmm {
    id: u64,
    // Field order: vCPU threads end before the VM fd closes, and both before the RAM goes.
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    // The devices (and their threads) go before the VM fd their irqfds are registered on.
    devices: DeviceManager,
    vm: Vm,
    outcome: Option<VmOutcome>,
    parked: usize,
    /// Whether any vCPU was ever told to run. Until then every vCPU thread is blocked on its
    /// command channel (created paused), so a pause needs no handshake: under CPU contention
    /// the handshake waits for each new thread to be scheduled (hundreds of ms with 100 busy
    /// vCPUs), and every clone is paused right after it is built.
    ever_ran: bool,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").field("id", &self.id).field("vcpus", &self.vcpus.len()).finish_non_exhaustive()
    }
}

impl Vmm {
    /// Assembles a VM from its parts; the vCPU threads must be paused (as `spawn_vcpu` makes them).
    pub(crate) fn from_parts(
        id: u64,
        vm: Vm,
        vcpus: Vec<VcpuHandle>,
        events: Receiver<VcpuEvent>,
        devices: DeviceManager,
    ) -> Vmm {
        Vmm { id, vcpus, events, devices, vm, outcome: None, parked: 0, ever_ran: false }
    }

    /// This VM's id (the tiny guests get it in RDI).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The VM's RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vm.ram()
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The port-I/O and MMIO buses.
    pub fn buses(&self) -> (&Arc<Bus>, &Arc<Bus>) {
        self.devices.buses()
    }

    /// Every device of the VM.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The vCPU handles; their fds are free to use while the VM is paused.
    pub(crate) fn vcpu_handles(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// After state was restored into this paused VM: forgets how the guest had ended it and
    /// makes every vCPU runnable again on the next resume.
    pub(crate) fn rearm(&mut self, _token: &Paused) {
        self.broadcast(VcpuCommand::Rearm);
        self.outcome = None;
        self.parked = 0;
    }

    /// Lets every vCPU run (they are created paused).
    pub fn start(&mut self) {
        self.ever_ran = true;
        self.ram().set_vcpus_stopped(false);
        self.broadcast(VcpuCommand::Resume);
    }

    /// How the VM ended, if it has.
    pub fn outcome(&self) -> Option<&VmOutcome> {
        self.outcome.as_ref()
    }

    fn broadcast(&self, command: VcpuCommand) {
        for vcpu in &self.vcpus {
            vcpu.send(command);
        }
    }

    /// Records an event; returns true if it was a pause acknowledgement.
    fn record(&mut self, event: VcpuEvent) -> bool {
        match event {
            VcpuEvent::Paused(_) => return true,
            VcpuEvent::Parked(_) => {
                self.parked += 1;
                if self.parked == self.vcpus.len() {
                    self.outcome.get_or_insert(VmOutcome::AllParked);
                }
            }
            VcpuEvent::Stopped(_, stop) => {
                self.outcome.get_or_insert(match stop {
                    VcpuStop::Exit(code) => VmOutcome::Exited(code),
                    VcpuStop::Reset => VmOutcome::Reset,
                    VcpuStop::Failed(e) => VmOutcome::Failed(e),
                });
            }
        }
        false
    }

    /// Takes every vCPU out of KVM_RUN and waits until all have acknowledged (at once if no
    /// vCPU ever ran: they are all blocked on their channels).
    pub fn pause(&mut self) -> Result<Paused, VmmError> {
        if !self.ever_ran {
            self.ram().set_vcpus_stopped(true);
            return Ok(Paused { vm_id: self.id });
        }
        self.broadcast(VcpuCommand::Pause);
        let total = self.vcpus.len();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut acks = 0;
        while acks < total {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => acks += usize::from(self.record(event)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VmmError::PauseTimeout { missing: total - acks, total, timeout: PAUSE_TIMEOUT })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VmmError::VcpusGone),
            }
        }
        // Every vCPU is out of KVM_RUN and waits for a command: the RAM's page counts hold.
        self.ram().set_vcpus_stopped(true);
        Ok(Paused { vm_id: self.id })
    }

    /// Lets the vCPUs paused by `token` run again. Returns the instant the last vCPU was told
    /// (just before its command went out): the end of the pause. Waking a vCPU thread may let
    /// it take this thread's CPU at once, and that time is the guest's, not the pause's.
    pub fn resume(&mut self, token: Paused) -> Instant {
        debug_assert_eq!(token.vm_id, self.id, "resume with another VM's pause token");
        self.ever_ran = true;
        self.ram().set_vcpus_stopped(false);
        let mut told = Instant::now();
        for vcpu in &self.vcpus {
            told = Instant::now();
            vcpu.send(VcpuCommand::Resume);
        }
        told
    }

    /// Waits up to `timeout` for the guest to end the VM; returns whether it has.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.outcome.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.record(event);
                }
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => {
                    self.outcome = Some(VmOutcome::Stopped);
                }
            }
        }
        true
    }

    /// Runs the VM (if not started) until the guest ends it, then joins the vCPU threads.
    pub fn run(mut self) -> VmOutcome {
        self.start();
        while !self.wait_timeout(Duration::from_secs(3600)) {}
        self.stop()
    }

    /// Ends the VM now: finishes and joins every vCPU thread. Returns how the guest ended it,
    /// or `Stopped` if it had not.
    pub fn stop(mut self) -> VmOutcome {
        for vcpu in &mut self.vcpus {
            vcpu.finish();
        }
        while let Ok(event) = self.events.try_recv() {
            self.record(event);
        }
        self.outcome.take().unwrap_or(VmOutcome::Stopped)
    }
}
