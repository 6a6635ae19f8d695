//! The VM generation ID (Microsoft's "Virtual Machine Generation ID" spec, as Linux's
//! `drivers/virt/vmgenid.c` reads it): 16 random bytes in guest memory that change whenever the
//! VM may have been duplicated or rolled back (every clone, snapshot restore and reset), and an
//! ACPI notification (0x80 to the `VGEN` device, through the Generic Event Device's interrupt)
//! telling the guest to read them. Linux mixes the new ID into its CRNG and reseeds it
//! (`add_vmfork_randomness`), so clones of one VM stop handing out the same random bytes.

use kvm_ioctls::VmFd;
use memory::{Bytes, GuestAddress, GuestRam};

/// Where the ID lives: in the BIOS area below 1 MiB, outside the RAM the kernel is given (so it
/// never reuses the page), 8-byte aligned and within one page as the spec asks.
pub const VMGENID_ADDR: u64 = 0xf_f000;
/// The ID's size.
pub const VMGENID_LEN: usize = 16;

/// The generation ID device of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmGenIdConfig {
    /// The I/O APIC pin (GSI) of the Generic Event Device that notifies the guest.
    pub gsi: u32,
}

/// What failed giving a VM a new generation.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot draw a generation ID from the host's random source")]
    Random(#[source] getrandom::Error),
    #[error("writing the generation ID at {addr:#x} into guest RAM failed")]
    GuestWrite {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("raising the generation ID interrupt (GSI {gsi}) failed")]
    Interrupt {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A fresh random ID from the host's `getrandom`.
pub fn fresh_id() -> Result<[u8; VMGENID_LEN], VmGenIdError> {
    let mut id = [0u8; VMGENID_LEN];
    getrandom::fill(&mut id).map_err(VmGenIdError::Random)?;
    Ok(id)
}

/// Writes a fresh ID at `addr` into `ram` (a VM's own: a clone's RAM is private once
/// written); returns it.
pub fn write_fresh_id(ram: &GuestRam, addr: u64) -> Result<[u8; VMGENID_LEN], VmGenIdError> {
    let id = fresh_id()?;
    ram.write_slice(&id, GuestAddress(addr)).map_err(|source| VmGenIdError::GuestWrite { addr, source })?;
    Ok(id)
}

/// Whether the guest listens on I/O APIC pin `gsi`: its redirection entry is unmasked, as
/// Linux's GED driver leaves it once bound. At boot every pin is masked; a guest that has not
/// bound the driver yet reads the fresh ID when it probes and needs no interrupt (and one
/// raised that early is one this nested PVM host's guests cannot take: a VM restored from a
/// snapshot taken at InstanceStart never printed a line). A pin beyond the I/O APIC's 24:
/// `true` (KVM routes it as it can).
pub fn guest_listens(vm: &VmFd, gsi: u32) -> Result<bool, VmGenIdError> {
    let mut chip = kvm_bindings::kvm_irqchip { chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(|source| VmGenIdError::Interrupt { gsi, source })?;
    // SAFETY: for chip_id KVM_IRQCHIP_IOAPIC, KVM fills the union's `ioapic` member; its
    // redirection entries are plain u64 bit fields, valid for every bit pattern.
    let entry = unsafe { chip.chip.ioapic.redirtbl.get(gsi as usize).map(|e| e.bits) };
    Ok(entry.is_none_or(|bits| bits & IOAPIC_ENTRY_MASKED == 0))
}

/// Bit 16 of an I/O APIC redirection entry: the pin is masked.
const IOAPIC_ENTRY_MASKED: u64 = 1 << 16;

/// Raises the Generic Event Device's edge-triggered interrupt once (KVM_IRQ_LINE up and down,
/// synchronously: the I/O APIC, and the PIC for a GSI below 16, have latched it on return), so
/// the guest runs `_EVT` and notifies its vmgenid driver. After the new ID is in RAM.
pub fn notify(vm: &VmFd, config: &VmGenIdConfig) -> Result<(), VmGenIdError> {
    let gsi = config.gsi;
    for level in [true, false] {
        vm.set_irq_line(gsi, level).map_err(|source| VmGenIdError::Interrupt { gsi, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_is_new_and_lands_at_its_address() {
        let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let a = write_fresh_id(&ram, VMGENID_ADDR).unwrap();
        let b = write_fresh_id(&ram, VMGENID_ADDR).unwrap();
        assert_ne!(a, b);
        let mut read = [0u8; VMGENID_LEN];
        ram.read_slice(&mut read, GuestAddress(VMGENID_ADDR)).unwrap();
        assert_eq!(read, b);
        assert_eq!(VMGENID_ADDR % 8, 0);
        assert_eq!(VMGENID_ADDR / 4096, (VMGENID_ADDR + VMGENID_LEN as u64 - 1) / 4096, "within one page");
    }
}
