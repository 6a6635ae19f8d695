//! vCPU register state for entering a tiny guest at CPL3 in long mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

use crate::layout::{GDT_ADDR, GUEST_CODE_ADDR, IDT_ADDR, PML4_ADDR, STACKS_TOP, STACK_SIZE, TSS_ADDR};
use crate::longmode::{GDT_ENTRIES, IDT_VECTORS, TSS_LIMIT, TSS_SEL, USER_CS, USER_DS};

// Architectural control-register bits, shared with the Linux boot path (`crate::linux::regs`).
pub(crate) const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
pub(crate) const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
/// Reserved bit 1 plus IOPL = 3, interrupts off.
pub const ENTRY_RFLAGS: u64 = 0x2 | 3 << 12;

/// What a tiny guest finds in its registers at entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryArgs {
    /// RDI: the VM's id (tells clones apart).
    pub vm_id: u64,
    /// RSI: this vCPU's index.
    pub vcpu: u64,
    /// RDX: the guest's argument (e.g. `exitcode`'s code).
    pub arg: u64,
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 }, // accessed exec/read, or accessed read/write
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

#[allow(clippy::cast_possible_truncation)] // table limits are small constants (see longmode tests)
/// Long mode, CPL3 code/stack segments, the VMM's GDT/IDT/TSS and page tables.
pub fn user_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(USER_CS, true);
    let data = segment(USER_DS, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT as u32,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment { type_: 0x2, present: 1, unusable: 1, ..Default::default() };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (IDT_VECTORS * 16 - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Entry RIP/RSP/RFLAGS and the argument registers.
pub fn entry_regs(args: EntryArgs) -> kvm_regs {
    kvm_regs {
        rip: GUEST_CODE_ADDR,
        rsp: STACKS_TOP - args.vcpu * STACK_SIZE,
        rflags: ENTRY_RFLAGS,
        rdi: args.vm_id,
        rsi: args.vcpu,
        rdx: args.arg,
        ..Default::default()
    }
}

/// Puts `vcpu` at a tiny guest's entry point.
pub fn setup_tiny_guest_vcpu(vcpu: &VcpuFd, args: EntryArgs) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_sregs(&user_sregs(vcpu.get_sregs()?))?;
    vcpu.set_regs(&entry_regs(args))?;
    vcpu.set_fpu(&kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_run_at_cpl3() {
        let s = user_sregs(kvm_sregs::default());
        assert_eq!((s.cs.dpl, s.cs.l, s.cs.selector & 3), (3, 1, 3));
        assert_eq!((s.ss.dpl, s.ss.selector & 3), (3, 3));
        assert_eq!(s.efer & EFER_LMA, EFER_LMA);
        let r = entry_regs(EntryArgs { vm_id: 9, vcpu: 2, arg: 5 });
        assert_eq!(r.rflags >> 12 & 3, 3, "IOPL 3");
        assert_eq!((r.rdi, r.rsi, r.rdx), (9, 2, 5));
        assert_eq!(r.rsp, STACKS_TOP - 2 * STACK_SIZE);
    }
}
