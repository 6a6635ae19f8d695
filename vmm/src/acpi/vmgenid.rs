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
