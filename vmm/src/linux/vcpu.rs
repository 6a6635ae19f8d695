//! Making a vCPU ready to boot Linux: CPUID, MSRs, FPU, LAPIC, and for vCPU 0 the entry state.

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use super::{regs, BootEntry, LinuxBootError};

const CPUID_HYPERVISOR: u32 = 1 << 31;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
/// CPUID 0x8000_0007 EDX: the TSC is invariant (constant rate, runs in deep C-states).
const CPUID_INVARIANT_TSC: u32 = 1 << 8;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Prepares vCPU `index` (its APIC id) to boot: CPUID, boot MSRs, FPU, LINT0 = ExtINT and
/// LINT1 = NMI. vCPU 0 also gets the entry registers of `entry`; the others wait in the
/// in-kernel LAPIC for the guest's INIT/SIPI. The VM needs its in-kernel irqchip
/// ([`super::create_irqchip_and_pit`]) first.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, kvm: &Kvm, entry: &BootEntry, index: u8) -> Result<(), LinuxBootError> {
    set_cpuid(vcpu, kvm, index)?;
    set_boot_msrs(vcpu)?;
    vcpu.set_fpu(&regs::boot_fpu()).map_err(LinuxBootError::kvm("KVM_SET_FPU"))?;
    set_lint(vcpu)?;
    if index == 0 {
        let sregs = vcpu.get_sregs().map_err(LinuxBootError::kvm("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&regs::boot_sregs(sregs, entry.protocol)).map_err(LinuxBootError::kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&regs::boot_regs(entry)).map_err(LinuxBootError::kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// KVM's supported CPUID with this vCPU's APIC id and the hypervisor bit, without the PV IPI
/// and PV sched-yield hypercalls: under PVM a guest sending IPIs through KVM_HC_SEND_IPI never
/// brings its APs up (seen as a hang at "x86: Booting SMP configuration"). On PVM hosts the
/// guest sees the host's own values for some leaves whatever we set here (the command line
/// masks those), but the KVM leaves 0x4000_00xx and 0x8000_0007 are ours.
///
/// Without the invariant-TSC bit: Linux then keeps kvm-clock (rating 400) as its clocksource
/// instead of preferring the TSC (it drops kvm-clock to 299 when the TSC is invariant). A
/// guest that keeps time with the TSC cannot be restored without its clock jumping: this
/// host's KVM ignores writes of the guest TSC (KVM_SET_MSRS of IA32_TSC and KVM_VCPU_TSC_OFFSET
/// succeed and change nothing; the guest TSC is the host's), so a restored TSC-clocked guest
/// found its clock moved on by the snapshot's age and replayed every missed tick (issue 13).
/// kvm-clock is set from the saved value (`crate::vstate::clock`) and continues from it.
fn set_cpuid(vcpu: &VcpuFd, kvm: &Kvm, index: u8) -> Result<(), LinuxBootError> {
    let mut cpuid =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(LinuxBootError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    for leaf in cpuid.as_mut_slice() {
        match leaf.function {
            1 => {
                leaf.ebx = (leaf.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
                leaf.ecx |= CPUID_HYPERVISOR;
            }
            KVM_CPUID_FEATURES => leaf.eax &= !(KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD),
            0x8000_0007 => leaf.edx &= !CPUID_INVARIANT_TSC,
            // Extended topology: EDX is the x2APIC id.
            0xb | 0x1f => leaf.edx = u32::from(index),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(LinuxBootError::kvm("KVM_SET_CPUID2"))
}

/// The MSRs a BIOS would leave set. Not IA32_ARCH_CAPABILITIES (0x10a): PVM refuses it.
fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), LinuxBootError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).expect("a dozen MSRs fit KVM_MAX_MSR_ENTRIES");
    let set = vcpu.set_msrs(&msrs).map_err(LinuxBootError::kvm("KVM_SET_MSRS"))?;
    if set < entries.len() {
        return Err(LinuxBootError::SetMsrs { set, total: entries.len(), index: entries[set].index });
    }
    Ok(())
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, c) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *b = c.to_ne_bytes()[0];
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (c, b) in lapic.regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *c = std::os::raw::c_char::from_ne_bytes([b]);
    }
}

/// Sets the delivery mode (bits 8–10) of an LVT entry.
fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// LINT0 takes the 8259's ExtINT, LINT1 is NMI, as a PC wires them.
fn set_lint(vcpu: &VcpuFd) -> Result<(), LinuxBootError> {
    let mut lapic = vcpu.get_lapic().map_err(LinuxBootError::kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(&mut lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(LinuxBootError::kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_register_round_trip() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(with_delivery_mode(0x0001_0000, APIC_MODE_NMI), 0x0001_0400);
    }

    #[test]
    fn boot_msrs_leave_out_arch_capabilities() {
        assert!(boot_msr_entries().iter().all(|e| e.index != 0x10a));
    }
}
