//! ACPI tables for an x86 Linux guest, written with rust-vmm's `acpi_tables` into the BIOS area
//! below 1 MiB (never in the RAM map the kernel is given, so it stays untouched): RSDP, XSDT,
//! a hardware-reduced FADT, a MADT (local APICs and the I/O APIC: what the MP table says) and a
//! DSDT describing the virtio-mmio devices (`LNRO0005`, so the command line needs no
//! `virtio_mmio.device=`) and the VM generation ID device ([`vmgenid`]) with the Generic Event
//! Device (`ACPI0013`) whose interrupt tells the guest the ID changed.
//!
//! The PVH boot protocol hands the kernel the RSDP's address (`hvm_start_info.rsdp_paddr`); the
//! RSDP also sits on a 16-byte boundary in 0xE0000..0xFFFFF, where a kernel booted otherwise
//! scans for it.

mod dsdt;
pub mod vmgenid;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use memory::{Bytes, GuestAddress, GuestRam};

pub use dsdt::{MmioDeviceInfo, COM1_GSI};
pub use vmgenid::VmGenIdConfig;

/// First byte of the tables (the RSDP).
pub const ACPI_START: u64 = 0xe_0000;
/// First byte past the tables: the generation ID lives from here ([`vmgenid::VMGENID_ADDR`]).
pub const ACPI_END: u64 = vmgenid::VMGENID_ADDR;
const OEM_ID: [u8; 6] = *b"ZYGOTE";
const OEM_TABLE_ID: [u8; 8] = *b"ZYGOTEVM";
const OEM_REVISION: u32 = 1;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// What failed writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables for {vcpus} vCPUs and {devices} devices take {len} bytes: more than the {room} below 1 MiB")]
    TooBig { vcpus: u8, devices: usize, len: u64, room: u64 },
    #[error("{devices} virtio-mmio devices: the DSDT names at most {max} (V000..VFFF)")]
    TooManyDevices { devices: usize, max: usize },
    #[error("writing the ACPI tables at {addr:#x} into guest RAM failed")]
    GuestWrite {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig<'a> {
    /// vCPUs, with APIC ids 0..vcpus; the I/O APIC takes id `vcpus`.
    pub vcpus: u8,
    pub mmio_devices: &'a [MmioDeviceInfo],
    /// The generation ID device, if the VM has one.
    pub vmgenid: Option<VmGenIdConfig>,
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn align8(addr: u64) -> u64 {
    (addr + 7) & !7
}

/// The MADT: one enabled local APIC per vCPU (ACPI processor uid = APIC id) and the I/O APIC
/// at its usual address with GSIs from 0. No interrupt source overrides: in hardware-reduced
/// mode Linux has no legacy PIC and routes ISA IRQs 0-15 to the same I/O APIC pins.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDR, 0));
    bytes(&madt)
}

/// The tables as (guest address, bytes), RSDP first, for `config`; the FADT points at the
/// DSDT and the XSDT at the FADT and MADT.
pub fn tables(config: &AcpiConfig) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    if config.mmio_devices.len() > dsdt::MAX_DEVICES {
        return Err(AcpiError::TooManyDevices { devices: config.mmio_devices.len(), max: dsdt::MAX_DEVICES });
    }
    let dsdt_addr = align8(ACPI_START + Rsdp::len() as u64);
    let dsdt = dsdt::dsdt(OEM_ID, OEM_TABLE_ID, OEM_REVISION, config.mmio_devices, config.vmgenid.as_ref());
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = bytes(
        &FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).flag(Flags::HwReducedAcpi).dsdt_64(dsdt_addr).finalize(),
    );
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(config.vcpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_END {
        let (vcpus, devices) = (config.vcpus, config.mmio_devices.len());
        return Err(AcpiError::TooBig { vcpus, devices, len: end - ACPI_START, room: ACPI_END - ACPI_START });
    }
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![(ACPI_START, rsdp), (dsdt_addr, dsdt), (fadt_addr, fadt), (madt_addr, madt), (xsdt_addr, xsdt)])
}

/// Writes the tables for `config` into `ram`; returns the RSDP's address.
pub fn write_tables(ram: &GuestRam, config: &AcpiConfig) -> Result<GuestAddress, AcpiError> {
    for (addr, table) in tables(config)? {
        ram.write_slice(&table, GuestAddress(addr)).map_err(|source| AcpiError::GuestWrite { addr, source })?;
    }
    Ok(GuestAddress(ACPI_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
    }

    fn config(devices: &[MmioDeviceInfo]) -> AcpiConfig<'_> {
        AcpiConfig { vcpus: 2, mmio_devices: devices, vmgenid: Some(VmGenIdConfig { gsi: 10 }) }
    }

    #[test]
    fn every_table_sums_to_zero_and_says_its_length() {
        let devices = [MmioDeviceInfo { addr: 0xd000_0000, size: 0x1000, irq: 5 }];
        let tables = tables(&config(&devices)).unwrap();
        let (rsdp_addr, rsdp) = &tables[0];
        assert_eq!((*rsdp_addr, &rsdp[..8]), (ACPI_START, &b"RSD PTR "[..]));
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        for (addr, table) in &tables[1..] {
            assert_eq!(sum(table), 0, "{} checksum", String::from_utf8_lossy(&table[..4]));
            assert_eq!(u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize, table.len());
            assert_eq!(addr % 8, 0);
        }
        let signatures: Vec<&[u8]> = tables[1..].iter().map(|(_, t)| &t[..4]).collect();
        assert_eq!(signatures, [&b"DSDT"[..], b"FACP", b"APIC", b"XSDT"]);
        assert_eq!(tables[4].0, xsdt_addr, "the RSDP points at the XSDT");
    }

    #[test]
    fn the_madt_lists_each_vcpu_and_the_ioapic() {
        let madt = madt(3);
        // Header 44 bytes; local APIC entries are type 0, 8 bytes; the I/O APIC type 1, 12 bytes.
        assert_eq!(madt.len(), 44 + 3 * 8 + 12);
        assert_eq!((madt[44], madt[44 + 3], madt[44 + 16 + 3]), (0, 0, 2), "APIC ids 0.. in order");
        assert_eq!((madt[68], madt[70]), (1, 3), "the I/O APIC has id 3");
    }

    #[test]
    fn too_many_devices_do_not_fit() {
        let devices: Vec<_> =
            (0..4000).map(|i| MmioDeviceInfo { addr: 0xd000_0000 + i * 0x1000, size: 0x1000, irq: 5 }).collect();
        assert!(matches!(tables(&config(&devices)), Err(AcpiError::TooBig { devices: 4000, .. })));
        let devices = vec![MmioDeviceInfo { addr: 0xd000_0000, size: 0x1000, irq: 5 }; 0x1001];
        assert!(matches!(tables(&config(&devices)), Err(AcpiError::TooManyDevices { devices: 0x1001, .. })));
    }
}
