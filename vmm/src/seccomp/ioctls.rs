//! The ioctl request numbers the filters let through, each thread class its own list.
//!
//! Computed from `<linux/kvm.h>`'s definitions (direction, type 0xAE, number, argument struct)
//! with the kvm-bindings structs, the way kvm-ioctls defines them (its table is private), so a
//! struct size a kvm-bindings update changes moves the number with it.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_ioeventfd, kvm_irq_level, kvm_irqchip,
    kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

const KVMIO: u32 = 0xAE;

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

#[allow(clippy::cast_possible_truncation)]
const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size_of::<T>() as u32) as u64
}

#[allow(clippy::cast_possible_truncation)]
const fn iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, size_of::<T>() as u32) as u64
}

#[allow(clippy::cast_possible_truncation)]
const fn iowr<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size_of::<T>() as u32) as u64
}

pub const KVM_GET_API_VERSION: u64 = io(0x00);
pub const KVM_CREATE_VM: u64 = io(0x01);
pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr::<kvm_msr_list>(0x02);
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = io(0x04);
pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr::<kvm_cpuid2>(0x05);
pub const KVM_CREATE_VCPU: u64 = io(0x41);
pub const KVM_GET_DIRTY_LOG: u64 = iow::<kvm_dirty_log>(0x42);
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
pub const KVM_SET_TSS_ADDR: u64 = io(0x47);
pub const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow::<u64>(0x48);
pub const KVM_CREATE_IRQCHIP: u64 = io(0x60);
pub const KVM_GET_IRQCHIP: u64 = iowr::<kvm_irqchip>(0x62);
/// Raising the VM generation ID's interrupt (`acpi::vmgenid::notify`) after a clone, restore
/// or reset.
pub const KVM_IRQ_LINE: u64 = iow::<kvm_irq_level>(0x61);
pub const KVM_SET_IRQCHIP: u64 = ior::<kvm_irqchip>(0x63);
pub const KVM_IRQFD: u64 = iow::<kvm_irqfd>(0x76);
pub const KVM_CREATE_PIT2: u64 = iow::<kvm_pit_config>(0x77);
pub const KVM_IOEVENTFD: u64 = iow::<kvm_ioeventfd>(0x79);
pub const KVM_SET_CLOCK: u64 = iow::<kvm_clock_data>(0x7b);
pub const KVM_GET_CLOCK: u64 = ior::<kvm_clock_data>(0x7c);
pub const KVM_RUN: u64 = io(0x80);
pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
pub const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
pub const KVM_SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
pub const KVM_SET_MSRS: u64 = iow::<kvm_msrs>(0x89);
pub const KVM_GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
pub const KVM_SET_FPU: u64 = iow::<kvm_fpu>(0x8d);
pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
pub const KVM_SET_LAPIC: u64 = iow::<kvm_lapic_state>(0x8f);
pub const KVM_SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
pub const KVM_GET_CPUID2: u64 = iowr::<kvm_cpuid2>(0x91);
pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
pub const KVM_SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
pub const KVM_GET_PIT2: u64 = ior::<kvm_pit_state2>(0x9f);
pub const KVM_SET_PIT2: u64 = iow::<kvm_pit_state2>(0xa0);
pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
pub const KVM_SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
pub const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
pub const KVM_SET_DEBUGREGS: u64 = iow::<kvm_debugregs>(0xa2);
pub const KVM_SET_TSC_KHZ: u64 = io(0xa2);
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
pub const KVM_SET_XSAVE: u64 = iow::<kvm_xsave>(0xa5);
pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
pub const KVM_SET_XCRS: u64 = iow::<kvm_xcrs>(0xa7);
pub const KVM_KVMCLOCK_CTRL: u64 = io(0xad);
pub const KVM_GET_XSAVE2: u64 = ior::<kvm_xsave>(0xcf);

/// `<linux/fs.h>` `_IOWR('f', 16, struct pm_scan_arg)`: the page counts of `GET /vms`.
pub const PAGEMAP_SCAN: u64 = 0xc060_6610;
/// `<linux/if_tun.h>`: a TAP is attached and configured by the VMM thread; the offloads change
/// when the guest's driver accepts its features (a register write, on the vCPU thread).
pub const TUNSETIFF: u64 = libc::TUNSETIFF;
pub const TUNSETVNETHDRSZ: u64 = libc::TUNSETVNETHDRSZ;
pub const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
/// `if_nametoindex` (on a socket glibc opens): a TAP must exist before it is attached, since
/// TUNSETIFF would create it.
pub const SIOCGIFINDEX: u64 = libc::SIOCGIFINDEX;
/// What `set_nonblocking` issues (std's sockets, the vsock streams the event loop accepts).
pub const FIONBIO: u64 = libc::FIONBIO;

/// Everything the VMM thread asks of `/dev/kvm`, a VM fd and the vCPU fds it sets up, captures
/// and restores (boot, clone, snapshot load, reset).
pub const KVM_VMM: &[u64] = &[
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_GET_MSR_INDEX_LIST,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_VCPU,
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_IRQ_LINE,
    KVM_IRQFD,
    KVM_CREATE_PIT2,
    KVM_IOEVENTFD,
    KVM_SET_CLOCK,
    KVM_GET_CLOCK,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
    KVM_GET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_SET_TSC_KHZ,
    KVM_GET_TSC_KHZ,
    KVM_GET_XSAVE,
    KVM_SET_XSAVE,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
    KVM_KVMCLOCK_CTRL,
    KVM_GET_XSAVE2,
];

/// A vCPU thread runs its vCPU, reads its registers for the report of a guest fault, and tells
/// a kvm-clock guest it was paused (KVMCLOCK_CTRL).
pub const KVM_VCPU: &[u64] = &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_KVMCLOCK_CTRL];

/// The VMM thread's other ioctls: page counts, TAP setup, non-blocking sockets.
pub const HOST_VMM: &[u64] = &[PAGEMAP_SCAN, TUNSETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD, SIOCGIFINDEX, FIONBIO];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> as the kernel's own tools print them.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IRQ_LINE, 0x4008_ae61);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(TUNSETIFF, 0x4004_54ca);
    }

    #[test]
    fn the_vcpu_list_is_part_of_the_vmm_list_but_kvm_run() {
        // The VMM thread never enters a guest: only the vCPU threads do.
        assert!(!KVM_VMM.contains(&KVM_RUN));
        assert!(KVM_VCPU.iter().filter(|&&n| n != KVM_RUN).all(|n| KVM_VMM.contains(n)));
    }
}
