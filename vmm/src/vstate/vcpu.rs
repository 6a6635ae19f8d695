//! One vCPU's complete architectural state: capture from a paused vCPU, restore into a fresh
//! (or paused) one. Everything is guest state; no host pointer is ever saved.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, KVM_MAX_CPUID_ENTRIES,
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

/// Which KVM call failed on which vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
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
    pub fn capture(index: usize, fd: &VcpuFd, lapic: bool) -> Result<VcpuState, VcpuStateError> {
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

    /// Writes this state into vCPU `index` (same host, same KVM: the xsave layout matches).
    /// `with_cpuid` is for a vCPU that never ran (KVM refuses CPUID changes after KVM_RUN).
    pub fn restore(&self, index: usize, fd: &VcpuFd, with_cpuid: bool) -> Result<(), VcpuStateError> {
        if with_cpuid {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::Ioctl {
                vcpu: index,
                op: "CPUID size",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
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
