//! The guest's clock across a clone, a snapshot restore and a reset.
//!
//! A Linux guest keeps time with kvm-clock (its clocksource when it does not see an invariant
//! TSC: `crate::linux` hides that CPUID bit, see there): per vCPU a pvclock page that KVM fills
//! with a system time and the guest TSC it was taken at. KVM_GET_CLOCK / KVM_SET_CLOCK read and
//! set that system time for the whole VM, so a restored guest's clock continues from the value
//! saved at the capture instant: no time passes for the guest while it is not running, and its
//! `CLOCK_MONOTONIC` does not jump (a jump is what made restores stall: the guest's periodic
//! tick then replays every missed tick in emulated kernel code, ~2 ms each under nested PVM).
//!
//! KVM_GET_CLOCK also returns the host's real time of the reading (`realtime`, flag
//! `KVM_CLOCK_REALTIME`, when KVM keeps a master clock). Handed back to KVM_SET_CLOCK with that
//! flag, KVM advances the clock by the host real time passed since: the guest's real time is
//! the host's again, and its monotonic time jumps by the snapshot's age. That is
//! [`ClockOnRestore::AdvanceToHostRealtime`], an option; the default resumes.

use kvm_bindings::{kvm_clock_data, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};
use kvm_ioctls::VmFd;

use super::StateError;
use crate::machine::Vmm;
use crate::vcpu::lock_vcpu;

/// What a VM built from saved state does about the time it did not run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockOnRestore {
    /// The guest's clock continues from the saved instant (clones, resets, and restores unless
    /// asked otherwise): monotonic time does not jump; real time lags the host's by the time
    /// the VM did not run.
    #[default]
    Resume,
    /// The guest's clock moves forward by the host real time passed since the capture
    /// (KVM_CLOCK_REALTIME), so the guest's `CLOCK_REALTIME` matches the host's; its monotonic
    /// time moves forward by the same amount. Firecracker's `clock_realtime`.
    AdvanceToHostRealtime,
}

/// The VM's clock now, as saved: with KVM's host real-time stamp when the host gives one.
pub fn capture(vm: &VmFd) -> Result<kvm_clock_data, StateError> {
    let mut clock = vm.get_clock().map_err(|source| StateError::VmIoctl { op: "KVM_GET_CLOCK", source })?;
    // An output flag: kernels before 5.16 refuse it in KVM_SET_CLOCK.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    Ok(clock)
}

/// What KVM_SET_CLOCK gets for `saved` under `mode`: only the clock value, or the clock value
/// with the real-time stamp KVM should advance it from. Fails if `mode` asks to advance and
/// `saved` has no real-time stamp (the capturing host's KVM kept no master clock).
pub fn to_set(saved: &kvm_clock_data, mode: ClockOnRestore) -> Result<kvm_clock_data, StateError> {
    let stamped = saved.flags & KVM_CLOCK_REALTIME != 0;
    let flags = match mode {
        ClockOnRestore::Resume => 0,
        ClockOnRestore::AdvanceToHostRealtime if stamped => KVM_CLOCK_REALTIME,
        ClockOnRestore::AdvanceToHostRealtime => return Err(StateError::NoRealtimeStamp),
    };
    Ok(kvm_clock_data { clock: saved.clock, flags, realtime: saved.realtime, ..Default::default() })
}

/// Sets the VM's clock from `saved` under `mode`. Call it after the vCPUs' state (their TSC and
/// kvm-clock MSRs) is restored, just before they run: KVM derives each vCPU's pvclock page from
/// the VM clock and the vCPU's TSC at its next entry.
pub fn restore(vm: &VmFd, saved: &kvm_clock_data, mode: ClockOnRestore) -> Result<(), StateError> {
    let clock = to_set(saved, mode)?;
    vm.set_clock(&clock).map_err(|source| StateError::VmIoctl { op: "KVM_SET_CLOCK", source })
}

/// [`ClockOnRestore::AdvanceToHostRealtime`] for `vmm`, just built from state whose clock was
/// `saved` and not started yet: sets the clock again, advanced, and tells each vCPU's guest
/// that it was stopped ([`crate::vcpu::tell_guest_it_was_stopped`]), so that its lockup watchdogs do not take
/// the jump for a hang.
pub fn advance_to_host_realtime(vmm: &Vmm, saved: &kvm_clock_data) -> Result<(), StateError> {
    restore(vmm.vm().fd(), saved, ClockOnRestore::AdvanceToHostRealtime)?;
    for handle in vmm.vcpu_handles() {
        crate::vcpu::tell_guest_it_was_stopped(&lock_vcpu(handle.fd()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(flags: u32) -> kvm_clock_data {
        kvm_clock_data { clock: 5_000_000_000, flags, realtime: 1_700_000_000_000_000_000, ..Default::default() }
    }

    #[test]
    fn resume_never_hands_kvm_the_real_time_stamp() {
        // The stamp made every restore jump by the snapshot's age.
        let set = to_set(&saved(KVM_CLOCK_REALTIME | 8), ClockOnRestore::Resume).unwrap();
        assert_eq!((set.clock, set.flags), (5_000_000_000, 0));
    }

    #[test]
    fn advancing_needs_the_stamp() {
        let set = to_set(&saved(KVM_CLOCK_REALTIME), ClockOnRestore::AdvanceToHostRealtime).unwrap();
        assert_eq!(
            (set.clock, set.flags, set.realtime),
            (5_000_000_000, KVM_CLOCK_REALTIME, 1_700_000_000_000_000_000)
        );
        assert!(matches!(to_set(&saved(0), ClockOnRestore::AdvanceToHostRealtime), Err(StateError::NoRealtimeStamp)));
    }

    #[test]
    fn a_set_clock_resumes_where_it_was_read() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let mut before = capture(&vm).unwrap();
        // Pretend the capture was an hour ago: resuming must ignore that.
        before.flags |= KVM_CLOCK_REALTIME;
        before.realtime = before.realtime.saturating_sub(3600 * 1_000_000_000);
        restore(&vm, &before, ClockOnRestore::Resume).unwrap();
        let after = capture(&vm).unwrap();
        let moved = after.clock - before.clock;
        assert!(moved < 1_000_000_000, "the clock moved {moved} ns across a resume");
    }
}
