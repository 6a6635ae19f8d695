//! The Intel MultiProcessor Specification 1.4 table: how Linux finds the vCPUs' APIC ids, the
//! I/O APIC and the ISA interrupt wiring without ACPI.
//!
//! The floating pointer sits at the start of the EBDA (`MPTABLE_ADDR`), where Linux scans for
//! it, and points at the configuration table right behind it. Entries mirror KVM's default IRQ
//! routing: ISA IRQ n goes to I/O APIC pin n for all 24 pins; LINT0 is ExtINT (the 8259),
//! LINT1 is NMI.

use memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use super::layout::MPTABLE_ADDR;
use super::LinuxBootError;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const IOAPIC_PINS: u8 = 24;
const BUS_ISA: u8 = 0;

// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and the FPU + APIC feature bits, as a BIOS would report them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 1 | (1 << 9);

/// Writes the floating pointer and configuration table for `vcpus` vCPUs (APIC ids
/// 0..vcpus, vCPU 0 the boot processor; the I/O APIC gets id `vcpus`).
pub fn write(ram: &GuestRam, vcpus: u8) -> Result<(), LinuxBootError> {
    ram.write_slice(&build(vcpus, MPTABLE_ADDR), GuestAddress(MPTABLE_ADDR))
        .map_err(LinuxBootError::write("MP table", MPTABLE_ADDR))
}

/// The table's bytes as they go at guest address `base`.
pub fn build(vcpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for apic_id in 0..vcpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, apic_id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        // Flags 0: polarity and trigger conform to the bus (ISA: active high, edge).
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, BUS_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = u16::try_from(MPC_HEADER_SIZE + entries.len()).expect("an MP table for 255 vCPUs is < 64 KiB");
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&table_len.to_le_bytes());
    table.extend_from_slice(&[MP_SPEC_REV, 0]);
    table.extend_from_slice(b"ZYGOTE  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = u32::try_from(base + MPF_SIZE as u64).expect("the MP table lives below 1 MiB");
    let mut out = Vec::with_capacity(MPF_SIZE + table.len());
    out.extend_from_slice(MPF_SIGNATURE);
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev, checksum, features
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// The byte that makes `bytes` sum to 0 mod 256 (computed with the checksum byte still 0).
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_sub(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    #[test]
    fn floating_pointer_and_table_check_out() {
        for vcpus in [1u8, 2, 32, 254] {
            let t = build(vcpus, MPTABLE_ADDR);
            assert_eq!(&t[..4], MPF_SIGNATURE);
            assert_eq!(sum(&t[..MPF_SIZE]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(ptr), MPTABLE_ADDR + MPF_SIZE as u64);
            let table = &t[MPF_SIZE..];
            assert_eq!(&table[..4], MPC_SIGNATURE);
            assert_eq!(usize::from(u16::from_le_bytes([table[4], table[5]])), table.len());
            assert_eq!(sum(table), 0);
            let entries = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(entries, u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2);
        }
    }

    #[test]
    fn cpu_entries_carry_apic_ids_and_one_bsp() {
        let t = build(3, MPTABLE_ADDR);
        let cpus: Vec<&[u8]> = t[MPF_SIZE + MPC_HEADER_SIZE..].chunks(20).take(3).collect();
        for (id, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu[0], MP_PROCESSOR);
            assert_eq!(usize::from(cpu[1]), id);
            assert_eq!(cpu[3] & CPU_BSP != 0, id == 0);
        }
    }
}
