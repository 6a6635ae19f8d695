//! The DSDT: the devices the guest cannot discover, in AML. Under `\_SB`:
//! - `COM1`, the 16550 UART (`PNP0501`: its ports and its interrupt). In hardware-reduced ACPI
//!   Linux has no legacy PIC and maps no ISA interrupt by itself: without this entry the
//!   8250 driver's IRQ 4 is never set up in the I/O APIC and user space cannot open the console;
//! - `Vnnn`, one per virtio-mmio device: `_HID "LNRO0005"` (Linux's virtio_mmio driver matches
//!   it), its register window and its edge-triggered interrupt;
//! - `VGEN`, the VM generation ID (`_CID "VM_GEN_COUNTER"`, which Linux's vmgenid driver
//!   matches): `ADDR`, a package of the ID's guest address (low, high 32 bits);
//! - `GED0`, a Generic Event Device (`ACPI0013`) on the generation ID's interrupt: its `_EVT`
//!   method, run by the guest on that interrupt with the GSI as argument, notifies `VGEN` with
//!   0x80, upon which the guest reads the new ID and reseeds its CRNG.

use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package, Path, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::vmgenid::{VmGenIdConfig, VMGENID_ADDR};
use crate::layout::SERIAL_PORT;

/// COM1's interrupt (the serial device's `SERIAL_GSI`; the builder's tests check they agree).
pub const COM1_GSI: u32 = 4;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Guest physical address and size of its register window (below 4 GiB).
    pub addr: u64,
    pub size: u64,
    /// Its I/O APIC pin (GSI), edge-triggered, active high.
    pub irq: u32,
}

const NOTIFY_NEW_ID: u8 = 0x80;
/// Device names are four characters: `V` and three hex digits.
pub const MAX_DEVICES: usize = 0x1000;

/// AML of COM1: eight ports from `SERIAL_PORT`, edge-triggered `COM1_GSI`.
fn com1() -> Vec<u8> {
    let ports = IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let interrupt = Interrupt::new(true, true, false, false, COM1_GSI);
    let crs = ResourceTemplate::new(vec![&ports, &interrupt]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &0u8);
    let crs = Name::new("_CRS".into(), &crs);
    let mut out = Vec::new();
    Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut out);
    out
}

/// AML of virtio-mmio device `index`.
fn mmio_device(index: usize, device: &MmioDeviceInfo) -> Vec<u8> {
    // The window is 32-bit: the MMIO gap sits below 4 GiB (checked by the device manager).
    let window = Memory32Fixed::new(true, device.addr as u32, device.size as u32);
    let interrupt = Interrupt::new(true, true, false, false, device.irq);
    let crs = ResourceTemplate::new(vec![&window, &interrupt]);
    let name = format!("V{index:03X}");
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid = Name::new("_UID".into(), &index);
    let crs = Name::new("_CRS".into(), &crs);
    let mut out = Vec::new();
    Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut out);
    out
}

/// AML of the generation ID device and its GED.
fn vmgenid_devices(config: &VmGenIdConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let (low, high) = (VMGENID_ADDR & 0xffff_ffff, VMGENID_ADDR >> 32);
    let addr = Package::new(vec![&low, &high]);
    let hid = Name::new("_HID".into(), &"VMGENCTR");
    let cid = Name::new("_CID".into(), &"VM_GEN_COUNTER");
    let ddn = Name::new("_DDN".into(), &"VM_Gen_Counter");
    let addr = Name::new("ADDR".into(), &addr);
    Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(&mut out);

    let interrupt = Interrupt::new(true, true, false, false, config.gsi);
    let crs = ResourceTemplate::new(vec![&interrupt]);
    let target: Path = "\\_SB_.VGEN".into();
    let notify = Notify::new(&target, &NOTIFY_NEW_ID);
    let gsi = config.gsi;
    let is_ours = Equal::new(&Arg(0), &gsi);
    let on_ours = If::new(&is_ours, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&on_ours]);
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let crs = Name::new("_CRS".into(), &crs);
    Device::new("GED0".into(), vec![&hid, &crs, &evt]).to_aml_bytes(&mut out);
    out
}

/// The whole DSDT.
pub fn dsdt(
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: u32,
    devices: &[MmioDeviceInfo],
    vmgenid: Option<&VmGenIdConfig>,
) -> Vec<u8> {
    let mut children = vec![com1()];
    children.extend(devices.iter().enumerate().map(|(i, d)| mmio_device(i, d)));
    if let Some(config) = vmgenid {
        children.push(vmgenid_devices(config));
    }
    let raw: Vec<RawAml> = children.into_iter().map(RawAml).collect();
    let refs: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    let mut body = Vec::new();
    Scope::new("\\_SB_".into(), refs).to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, oem_id, oem_table_id, oem_revision);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Already encoded AML, as a child of a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn names_every_device_and_the_generation_id() {
        let devices = [
            MmioDeviceInfo { addr: 0xd000_0000, size: 0x1000, irq: 5 },
            MmioDeviceInfo { addr: 0xd000_1000, size: 0x1000, irq: 6 },
        ];
        let table = dsdt(*b"ZYGOTE", *b"ZYGOTEVM", 1, &devices, Some(&VmGenIdConfig { gsi: 10 }));
        assert_eq!(&table[..4], b"DSDT");
        for needle in [
            &b"COM1"[..],
            b"V000",
            b"V001",
            b"LNRO0005",
            b"VGEN",
            b"VM_GEN_COUNTER",
            b"ADDR",
            b"GED0",
            b"ACPI0013",
            b"_EVT",
        ] {
            assert!(contains(&table, needle), "{}", String::from_utf8_lossy(needle));
        }
        // Memory32Fixed of the second window: tag 0x86, length 9, read-write, base, size.
        let mut window = vec![0x86, 9, 0, 1];
        window.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        window.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(&table, &window));
        let without = dsdt(*b"ZYGOTE", *b"ZYGOTEVM", 1, &devices, None);
        assert!(!contains(&without, b"VGEN"));
    }
}
