//! One vCPU's complete architectural state and its `Persist`: saved from a paused vCPU
//! (`KvmVcpu`), checked (a snapshot file is input) and restored into a fresh (or paused) one.
//! Everything is guest state; no host pointer is ever saved.

use std::sync::OnceLock;

use devices::persist::Persist;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_AP_RESET_HOLD, KVM_MP_STATE_SIPI_RECEIVED,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::msrs::{read_msrs, saved_msr_indices, write_msrs};

/// How many bytes KVM_SET_XSAVE copies on this host: KVM_CAP_XSAVE2's answer, or 0 (the
/// legacy 4 KiB) when the capability is absent or /dev/kvm cannot be asked. Probed once.
fn xsave_size_needed() -> usize {
    static NEEDED: OnceLock<usize> = OnceLock::new();
    *NEEDED.get_or_init(|| {
        Kvm::new().map_or(0, |kvm| usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(usize::MAX))
    })
}

/// Which KVM call failed on which vCPU, or which saved value of which vCPU was refused.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {vcpu}: {count} CPUID entries saved, KVM takes at most {max}", max = KVM_MAX_CPUID_ENTRIES)]
    TooManyCpuidEntries { vcpu: usize, count: usize },
    #[error("vCPU {vcpu}: multiprocessing state {mp_state} is not one an x86 vCPU can be in")]
    BadMpState { vcpu: usize, mp_state: u32 },
    #[error("vCPU {vcpu}: MSR {index:#x} is saved twice")]
    DuplicateMsr { vcpu: usize, index: u32 },
    #[error("vCPU {vcpu}: this host's XSAVE area is {needed} bytes, more than the {have} a saved state holds")]
    XsaveTooLarge { vcpu: usize, needed: usize, have: usize },
    #[error("vCPU {vcpu}: {op} failed")]
    Ioctl {
        vcpu: usize,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM_GET_MSRS read {read} of {wanted} MSRs, stopping at {stopped_at:#x}")]
    MsrRead { vcpu: usize, read: usize, wanted: usize, stopped_at: u32 },
    #[error("vCPU {vcpu}: KVM_SET_MSRS wrote {written} of {wanted} MSRs, refusing {refused:#x}")]
    MsrWrite { vcpu: usize, written: usize, wanted: usize, refused: u32 },
}

/// A vCPU's state, in the order KVM needs it restored (see [`VcpuState::restore`]).
/// Not `Clone`: `kvm_xsave` is not (share it behind an `Arc`).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The FPU/SSE/AVX state (a superset of KVM_GET_FPU's).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// The in-kernel LAPIC's registers, when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// (index, value), every MSR of `msrs::saved_msr_indices`.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs and the interrupt shadow.
    pub events: kvm_vcpu_events,
}

fn ioctl<T>(vcpu: usize, op: &'static str, result: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    result.map_err(|source| VcpuStateError::Ioctl { vcpu, op, source })
}

impl VcpuState {
    /// Reads every piece of state of vCPU `index` (its LAPIC too if `lapic`: the VM has an
    /// in-kernel irqchip). The caller holds the VM's pause token: the vCPU is out of KVM_RUN,
    /// so the pieces are of one instant.
    fn read_from(index: usize, fd: &VcpuFd, lapic: bool) -> Result<VcpuState, VcpuStateError> {
        let cpuid = ioctl(index, "KVM_GET_CPUID2", fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        let wanted = ioctl(index, "KVM_GET_MSR_INDEX_LIST", saved_msr_indices())?;
        let msrs = ioctl(index, "KVM_GET_MSRS", read_msrs(fd, wanted))?;
        if msrs.len() != wanted.len() {
            return Err(VcpuStateError::MsrRead {
                vcpu: index,
                read: msrs.len(),
                wanted: wanted.len(),
                stopped_at: wanted[msrs.len()],
            });
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: ioctl(index, "KVM_GET_MP_STATE", fd.get_mp_state())?,
            regs: ioctl(index, "KVM_GET_REGS", fd.get_regs())?,
            sregs: ioctl(index, "KVM_GET_SREGS", fd.get_sregs())?,
            xsave: ioctl(index, "KVM_GET_XSAVE", fd.get_xsave())?,
            xcrs: ioctl(index, "KVM_GET_XCRS", fd.get_xcrs())?,
            debugregs: ioctl(index, "KVM_GET_DEBUGREGS", fd.get_debug_regs())?,
            lapic: if lapic { Some(ioctl(index, "KVM_GET_LAPIC", fd.get_lapic())?) } else { None },
            msrs,
            events: ioctl(index, "KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?,
        })
    }

    /// Refuses a saved state (a snapshot file is input) KVM could not take or would take for
    /// something else: more CPUID entries than KVM holds, a multiprocessing state an x86 vCPU
    /// is never in, an MSR saved twice (the later value would silently win). `index` names the
    /// vCPU in the error.
    pub fn check(&self, index: usize) -> Result<(), VcpuStateError> {
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(VcpuStateError::TooManyCpuidEntries { vcpu: index, count: self.cpuid.len() });
        }
        let mp_state = self.mp_state.mp_state;
        if mp_state > KVM_MP_STATE_SIPI_RECEIVED && mp_state != KVM_MP_STATE_AP_RESET_HOLD {
            return Err(VcpuStateError::BadMpState { vcpu: index, mp_state });
        }
        let mut seen = std::collections::BTreeSet::new();
        match self.msrs.iter().find(|(msr, _)| !seen.insert(*msr)) {
            Some(&(msr, _)) => Err(VcpuStateError::DuplicateMsr { vcpu: index, index: msr }),
            None => Ok(()),
        }
    }

    /// Writes this state into vCPU `index` (same host, same KVM: the xsave layout matches).
    /// `with_cpuid` is for a vCPU that never ran (KVM refuses CPUID changes after KVM_RUN).
    fn write_into(&self, index: usize, fd: &VcpuFd, with_cpuid: bool) -> Result<(), VcpuStateError> {
        if with_cpuid {
            let count = self.cpuid.len();
            let cpuid = CpuId::from_entries(&self.cpuid)
                .map_err(|_| VcpuStateError::TooManyCpuidEntries { vcpu: index, count })?;
            ioctl(index, "KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
        }
        ioctl(index, "KVM_SET_MP_STATE", fd.set_mp_state(self.mp_state))?;
        ioctl(index, "KVM_SET_REGS", fd.set_regs(&self.regs))?;
        ioctl(index, "KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        let needed = xsave_size_needed();
        if needed > std::mem::size_of::<kvm_xsave>() {
            return Err(VcpuStateError::XsaveTooLarge { vcpu: index, needed, have: std::mem::size_of::<kvm_xsave>() });
        }
        // SAFETY: KVM_SET_XSAVE copies as many bytes as KVM_CAP_XSAVE2 reports (4 KiB when the
        // capability is absent), and that size was just checked to fit in `kvm_xsave`, so
        // KVM reads only inside `self.xsave`.
        ioctl(index, "KVM_SET_XSAVE", unsafe { fd.set_xsave(&self.xsave) })?;
        ioctl(index, "KVM_SET_XCRS", fd.set_xcrs(&self.xcrs))?;
        ioctl(index, "KVM_SET_DEBUGREGS", fd.set_debug_regs(&self.debugregs))?;
        if let Some(lapic) = &self.lapic {
            ioctl(index, "KVM_SET_LAPIC", fd.set_lapic(lapic))?;
        }
        let written = ioctl(index, "KVM_SET_MSRS", write_msrs(fd, &self.msrs))?;
        if written != self.msrs.len() {
            return Err(VcpuStateError::MsrWrite {
                vcpu: index,
                written,
                wanted: self.msrs.len(),
                refused: self.msrs[written].0,
            });
        }
        ioctl(index, "KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&self.events))
    }
}

/// One vCPU's KVM file, as its state is saved from it and restored into it.
pub struct KvmVcpu<'a> {
    /// Its index in the VM (names it in errors).
    pub index: usize,
    pub fd: &'a VcpuFd,
    /// Whether it has an in-kernel LAPIC (the VM has an in-kernel irqchip).
    pub lapic: bool,
}

/// What a vCPU's state is restored into: a vCPU created in the new (or the same, paused) VM.
pub struct VcpuArgs<'a> {
    pub index: usize,
    pub fd: &'a VcpuFd,
    /// The vCPU never ran, so its CPUID is set too (KVM refuses CPUID changes after KVM_RUN).
    pub with_cpuid: bool,
}

impl<'a> Persist for KvmVcpu<'a> {
    type State = VcpuState;
    type ConstructorArgs = VcpuArgs<'a>;
    type Error = VcpuStateError;

    /// Reads every piece of state. The caller holds the VM's pause token: the vCPU is out of
    /// KVM_RUN, so the pieces are of one instant.
    fn save(&self) -> Result<VcpuState, VcpuStateError> {
        VcpuState::read_from(self.index, self.fd, self.lapic)
    }

    /// Checks `state`, then writes it into `args.fd` in the order KVM needs.
    fn restore(args: VcpuArgs<'a>, state: &VcpuState) -> Result<KvmVcpu<'a>, VcpuStateError> {
        state.check(args.index)?;
        state.write_into(args.index, args.fd, args.with_cpuid)?;
        Ok(KvmVcpu { index: args.index, fd: args.fd, lapic: state.lapic.is_some() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VcpuState {
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2::default(); 4],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: None,
            msrs: vec![(0x10, 1), (0xc000_0080, 0x500)],
            events: kvm_vcpu_events::default(),
        }
    }

    #[test]
    fn check_passes_a_captured_shape_and_names_each_bad_value() {
        assert!(state().check(0).is_ok());
        let mut halted = state();
        halted.mp_state.mp_state = kvm_bindings::KVM_MP_STATE_HALTED;
        assert!(halted.check(0).is_ok());
        let mut cpuid = state();
        cpuid.cpuid = vec![kvm_cpuid_entry2::default(); KVM_MAX_CPUID_ENTRIES + 1];
        let mut mp = state();
        mp.mp_state.mp_state = kvm_bindings::KVM_MP_STATE_STOPPED;
        let mut msrs = state();
        msrs.msrs.push((0x10, 2));
        for (bad, says) in
            [(cpuid, "CPUID entries"), (mp, "multiprocessing state 5"), (msrs, "MSR 0x10 is saved twice")]
        {
            let err = bad.check(3).unwrap_err().to_string();
            assert!(err.contains(says) && err.starts_with("vCPU 3"), "{err}");
        }
    }
}
