//! The boot vCPU's segments, control registers and general registers for each protocol, and
//! the GDT and page tables in guest memory they point at.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, PAGE_SIZE, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR};
use super::{BootEntry, BootProtocol, LinuxBootError};
use crate::regs::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};

/// RFLAGS bit 1 is reserved and always set; IF stays clear.
const RFLAGS_RESERVED: u64 = 2;
/// Page-table entry bits: present, writable, and (in a PD) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M: u64 = 0x83;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// A GDT descriptor from `flags` (access byte in bits 0–7, G/DB/L/AVL in bits 12–15), base and
/// 20-bit limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Null, code, data, TSS: flat 4 GiB 32-bit segments for PVH, a 64-bit code segment for Linux64.
fn gdt(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::Pvh => {
            [0, gdt_entry(0xc09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)]
        }
        BootProtocol::Linux64 => {
            [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
        }
    }
}

/// The hidden part of a segment register loaded from `entry` with `selector`.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| u8::from(entry >> n & 1 == 1);
    let base = (entry >> 16 & 0x00ff_ffff) | (entry >> 32 & 0xff00_0000);
    let mut limit = (entry & 0xffff) | (entry >> 32 & 0x000f_0000);
    if bit(55) == 1 {
        limit = limit << 12 | 0xfff;
    }
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: u8::try_from(entry >> 40 & 0xf).unwrap_or(0),
        present: bit(47),
        dpl: u8::try_from(entry >> 45 & 0x3).unwrap_or(0),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: 1 - bit(47),
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT (both protocols enter with interrupts off).
pub fn write_gdt(ram: &GuestRam, protocol: BootProtocol) -> Result<(), LinuxBootError> {
    for (i, entry) in (0u64..).zip(gdt(protocol)) {
        let addr = GDT_ADDR + i * 8;
        ram.write_obj(entry, GuestAddress(addr)).map_err(LinuxBootError::write("GDT", addr))?;
    }
    ram.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(LinuxBootError::write("IDT", IDT_ADDR))
}

/// Identity-maps the first `PD_COUNT` GiB with 2 MiB pages for the 64-bit entry.
pub fn write_long_mode_tables(ram: &GuestRam) -> Result<(), LinuxBootError> {
    let put = |value: u64, addr: u64| {
        ram.write_obj(value, GuestAddress(addr)).map_err(LinuxBootError::write("page table", addr))
    };
    put(PDPT_ADDR | PTE_PRESENT_RW, PML4_ADDR)?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * PAGE_SIZE;
        put(pd_addr | PTE_PRESENT_RW, PDPT_ADDR + pd * 8)?;
        for i in 0..512u64 {
            put(((pd * 512 + i) << 21) | PDE_2M, pd_addr + i * 8)?;
        }
    }
    Ok(())
}

/// Sets segments, descriptor tables and control registers for `protocol` on top of `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs, protocol: BootProtocol) -> kvm_sregs {
    let table = gdt(protocol);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&table) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(table[1], CODE_SELECTOR);
    let data = segment(table[2], DATA_SELECTOR);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(table[3], TSS_SELECTOR);
    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers at the entry: RIP, and the boot-info pointer in RBX (PVH) or RSI (Linux64).
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    let mut regs = kvm_regs { rflags: RFLAGS_RESERVED, rip: entry.entry.0, ..Default::default() };
    match entry.protocol {
        BootProtocol::Pvh => regs.rbx = entry.boot_info.0,
        BootProtocol::Linux64 => {
            regs.rsi = entry.boot_info.0;
            regs.rsp = BOOT_STACK_ADDR;
            regs.rbp = BOOT_STACK_ADDR;
        }
    }
    regs
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_segments_are_flat_32_bit() {
        let s = boot_sregs(kvm_sregs::default(), BootProtocol::Pvh);
        assert_eq!((s.cs.base, s.cs.limit, s.cs.db, s.cs.l, s.cs.type_), (0, 0xffff_ffff, 1, 0, 0xb));
        assert_eq!((s.ds.limit, s.ds.type_, s.ds.present), (0xffff_ffff, 0x3, 1));
        assert_eq!((s.tr.type_, s.tr.limit, s.tr.s), (0xb, 0x67, 0));
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
    }

    #[test]
    fn linux64_enters_long_mode() {
        let s = boot_sregs(kvm_sregs::default(), BootProtocol::Linux64);
        assert_eq!((s.cs.l, s.cs.db), (1, 0));
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
    }
}
