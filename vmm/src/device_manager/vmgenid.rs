//! The VM generation ID in a VM (`crate::acpi::vmgenid`): the 16-byte ID's guest address and
//! the Generic Event Device's interrupt on a GSI of its own. A fresh VM gets an ID at
//! build; [`VmGenIdSlot::new_generation`] writes a fresh one and raises the interrupt, and the
//! builder and the reset path call it (through `DeviceManager::new_generation`) for every clone,
//! restored VM and reset once the vCPUs and the irqchip hold their restored state (an edge
//! raised before would be overwritten by the saved local APIC state). Only VMs with an
//! in-kernel irqchip have one: without it nothing could tell the guest.

use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use kvm_ioctls::VmFd;
use memory::{Bytes, GuestAddress, GuestRam};
use serde::{Deserialize, Serialize};

use super::device::{
    AttachConfig, CaptureMode, Captured, DeviceDescription, DeviceHost, DeviceMetrics, ResetArgs, RestoreArgs, VmDevice,
};
use super::mmio::{DeviceSpace, MmioSlot, Wiring};
use super::DeviceError;
use crate::acpi::vmgenid::{guest_listens, notify, write_fresh_id, VmGenIdConfig, VMGENID_ADDR, VMGENID_LEN};

/// The saved form: where the ID lives and the GED's GSI. The ID itself is not saved: every VM
/// built from the state gets a fresh one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    pub addr: u64,
    pub gsi: u32,
}

/// A VM's generation ID.
pub struct VmGenIdSlot {
    ram: Arc<GuestRam>,
    state: VmGenIdState,
    /// IDs written and interrupts raised since the device was built.
    generations: AtomicU64,
    notifications: AtomicU64,
}

impl VmGenIdSlot {
    fn plug(
        space: &mut DeviceSpace,
        wiring: Wiring,
        ram: &Arc<GuestRam>,
        addr: u64,
    ) -> Result<Option<Self>, DeviceError> {
        let Wiring::Irqchip(_) = wiring else { return Ok(None) };
        let state = VmGenIdState { addr, gsi: space.gsi(Self::KIND)? };
        let (generations, notifications) = (AtomicU64::new(0), AtomicU64::new(0));
        Ok(Some(VmGenIdSlot { ram: Arc::clone(ram), state, generations, notifications }))
    }

    /// What the ACPI tables say about this device.
    pub fn config(&self) -> VmGenIdConfig {
        VmGenIdConfig { gsi: self.state.gsi }
    }

    /// The ID in guest RAM now.
    pub fn id(&self) -> Result<[u8; VMGENID_LEN], DeviceError> {
        let mut id = [0u8; VMGENID_LEN];
        let addr = self.state.addr;
        self.ram.read_slice(&mut id, GuestAddress(addr)).map_err(|e| DeviceError::BadState {
            kind: Self::KIND,
            reason: format!("reading the ID at {addr:#x}: {e}"),
        })?;
        Ok(id)
    }

    /// Interrupts raised so far.
    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }

    fn write_id(&self) -> Result<(), DeviceError> {
        write_fresh_id(&self.ram, self.state.addr)?;
        self.generations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a fresh ID and, if the guest listens (`guest_listens`: its GED driver bound),
    /// raises the GED interrupt on `vm` (this VM's), upon which the guest reads the ID and
    /// reseeds its CRNG; a guest not listening yet reads the ID when its driver probes. Call
    /// with the vCPUs and the irqchip in their final state.
    pub fn new_generation(&self, vm: &VmFd) -> Result<(), DeviceError> {
        self.write_id()?;
        let config = self.config();
        if guest_listens(vm, config.gsi)? {
            notify(vm, &config)?;
            self.notifications.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl VmDevice for VmGenIdSlot {
    const KIND: &'static str = "vmgenid";
    const FIXED_SLOT: Option<MmioSlot> = None;
    type State = VmGenIdState;

    /// A VM with an in-kernel irqchip gets one unless `config.vmgenid` is off; its first ID is
    /// written now (the guest reads it when its driver probes, no interrupt needed).
    fn attach(space: &mut DeviceSpace, host: &DeviceHost, config: &AttachConfig) -> Result<Option<Self>, DeviceError> {
        if !config.vmgenid {
            return Ok(None);
        }
        let slot = VmGenIdSlot::plug(space, host.wiring, host.ram, VMGENID_ADDR)?;
        if let Some(slot) = &slot {
            slot.write_id()?;
        }
        Ok(slot)
    }

    fn capture<R>(
        &self,
        _mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<VmGenIdState, R>, DeviceError> {
        Ok(Captured { state: self.state.clone(), disk: None, inner: inner()? })
    }

    /// The ID must lie in the VM's RAM, 8-byte aligned, within one page (the spec's rules).
    fn check_saved(state: &VmGenIdState, args: &RestoreArgs) -> Result<(), DeviceError> {
        let bad = |reason: String| Err(DeviceError::BadState { kind: Self::KIND, reason });
        let addr = state.addr;
        let len = VMGENID_LEN as u64;
        let Some(last) = addr.checked_add(len - 1) else { return bad(format!("addr {addr:#x} overflows")) };
        if !addr.is_multiple_of(8) || addr / 4096 != last / 4096 {
            return bad(format!("addr {addr:#x} is not 8-byte aligned within one page"));
        }
        let in_ram = |&(start, size): &(GuestAddress, usize)| start.0 <= addr && last - start.0 < size as u64;
        if !args.host.ram.layout().iter().any(in_ram) {
            return bad(format!("addr {addr:#x} is not in guest RAM"));
        }
        Ok(())
    }

    /// The device where the source's was (same GSI); the fresh ID is written, and the guest
    /// told, by `new_generation` once the vCPUs are restored.
    fn restore(space: &mut DeviceSpace, state: &VmGenIdState, args: &mut RestoreArgs) -> Result<Self, DeviceError> {
        let slot = VmGenIdSlot::plug(space, args.host.wiring, args.host.ram, state.addr)?
            .ok_or_else(|| DeviceError::Mismatch("the saved state has a vmgenid, the VM has no irqchip".into()))?;
        if slot.state.gsi != state.gsi {
            let (saved, here) = (state.gsi, slot.state.gsi);
            return Err(DeviceError::Mismatch(format!("vmgenid saved on GSI {saved}, placed on GSI {here}")));
        }
        Ok(slot)
    }

    /// Nothing to bring back (the RAM reset restores the old ID; `new_generation` replaces it).
    fn reset(
        &self,
        state: &VmGenIdState,
        _args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        if *state != self.state {
            return Err(DeviceError::Mismatch(format!("vmgenid: saved {state:?}, the VM has {:?}", self.state)));
        }
        inner()
    }

    fn in_flight(_state: &VmGenIdState) -> u64 {
        0
    }

    fn description(&self) -> DeviceDescription {
        DeviceDescription { kind: Self::KIND, mmio: None, virtio: false }
    }

    fn metrics(&self) -> Option<DeviceMetrics> {
        let counters = vec![
            ("generations", self.generations.load(Ordering::Relaxed)),
            ("notifications", self.notifications.load(Ordering::Relaxed)),
        ];
        Some(DeviceMetrics { group: "vmgenid", counters })
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};

    use super::*;
    use crate::builder::{build_tiny_vm, VmConfig};
    use crate::clone::capture_clone;
    use crate::device_manager::Console;
    use crate::machine::Vmm;

    fn spin(id: u64, vmgenid: bool) -> Vmm {
        let console = Console::capture().0;
        let config = VmConfig { vm_id: id, console, irqchip: true, vmgenid, ..VmConfig::default() };
        build_tiny_vm(&config, crate::guests::find("spin").unwrap(), 0).unwrap()
    }

    /// Whether the VM's master PIC has latched an edge on `gsi` (below 8) and not delivered it:
    /// the tiny guest runs with interrupts off, so a raised line stays in the IRR.
    fn pic_latched(vmm: &Vmm, gsi: u32) -> bool {
        let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_PIC_MASTER, ..Default::default() };
        vmm.vm().fd().get_irqchip(&mut chip).unwrap();
        // SAFETY: for chip_id KVM_IRQCHIP_PIC_MASTER KVM fills the union's `pic` member, plain
        // bytes for which every bit pattern is valid.
        let irr = unsafe { chip.chip.pic.irr };
        irr & (1 << gsi) != 0
    }

    /// Unmasks I/O APIC pin `gsi` of `vmm`'s VM (what a guest's driver does when it binds).
    fn unmask_ioapic_pin(vmm: &Vmm, gsi: u32) {
        let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
        vmm.vm().fd().get_irqchip(&mut chip).unwrap();
        // SAFETY: for chip_id KVM_IRQCHIP_IOAPIC KVM fills the union's `ioapic` member, plain
        // u64 redirection entries valid for every bit pattern; gsi < 24 is checked by indexing.
        unsafe { chip.chip.ioapic.redirtbl[gsi as usize].bits &= !(1 << 16) };
        vmm.vm().fd().set_irqchip(&chip).unwrap();
        assert!(guest_listens(vmm.vm().fd(), gsi).unwrap());
    }

    #[test]
    fn a_clone_gets_a_fresh_id_and_the_interrupt_its_source_did_not() {
        let mut source = spin(1, true);
        let device = source.devices().vmgenid().expect("a VM with an irqchip has a vmgenid");
        let (first, gsi) = (device.id().unwrap(), device.config().gsi);
        assert_eq!(gsi, 7, "the first free GSI (so the master PIC latches it)");
        assert_ne!(first, [0; VMGENID_LEN]);
        assert!(!pic_latched(&source, gsi));
        source.start();
        let token = source.pause().unwrap();
        // The tiny guest never binds a GED driver: its pin is masked, as a booting Linux's is.
        // A clone then gets a fresh ID and no interrupt (the guest reads the ID when it probes).
        let early = capture_clone(&source, &token).unwrap().build(3, &Console::capture().0).unwrap();
        let early_id = early.devices().vmgenid().unwrap();
        assert_ne!(early_id.id().unwrap(), first);
        assert_eq!(early_id.notifications(), 0);
        assert!(!pic_latched(&early, gsi), "no interrupt while the guest does not listen");
        drop(early);
        // Unmasked, as Linux's GED driver leaves it once bound: the clone is notified.
        unmask_ioapic_pin(&source, gsi);
        let image = capture_clone(&source, &token).unwrap();
        let clone = image.build(2, &Console::capture().0).unwrap();
        let cloned = clone.devices().vmgenid().unwrap();
        assert_ne!(cloned.id().unwrap(), first, "the clone's ID is fresh");
        assert_eq!(source.devices().vmgenid().unwrap().id().unwrap(), first, "the source keeps its ID");
        assert_eq!((cloned.notifications(), source.devices().vmgenid().unwrap().notifications()), (1, 0));
        assert!(pic_latched(&clone, gsi), "the clone got the GED interrupt");
        assert!(!pic_latched(&source, gsi), "the source did not");
        // The metrics group counts the IDs each device drew (the source its first, at build)
        // and the notifications it raised (what a `PUT /metrics` flush reports).
        let group = |vmm: &Vmm| vmm.devices().metrics().into_iter().find(|m| m.group == "vmgenid").unwrap().counters;
        assert_eq!(group(&clone), [("generations", 1), ("notifications", 1)]);
        assert_eq!(group(&source), [("generations", 1), ("notifications", 0)]);
        source.resume(token);
    }

    #[test]
    fn a_saved_address_outside_ram_misaligned_or_across_a_page_is_refused() {
        let ram = Arc::new(GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let console = Console::capture().0;
        let host = super::super::DeviceHost { ram: &ram, wiring: Wiring::Polled, console: &console };
        let reason = super::super::RestoreReason::Snapshot;
        let args = RestoreArgs { reason, overrides: Default::default(), host, disk: None };
        let check = |addr| VmGenIdSlot::check_saved(&VmGenIdState { addr, gsi: 7 }, &args);
        assert!(check(VMGENID_ADDR).is_ok());
        for (addr, says) in [(1 << 20, "not in guest RAM"), (0xf_f004, "aligned"), (0xf_fff8, "one page")] {
            let err = check(addr).unwrap_err().to_string();
            assert!(err.contains(says), "{addr:#x}: {err}");
        }
        assert!(check(u64::MAX - 3).unwrap_err().to_string().contains("overflows"));
    }

    #[test]
    fn without_the_device_a_clone_keeps_the_id_bytes_and_gets_no_interrupt() {
        let mut source = spin(3, false);
        assert!(source.devices().vmgenid().is_none());
        source.start();
        let token = source.pause().unwrap();
        let clone = capture_clone(&source, &token).unwrap().build(4, &Console::capture().0).unwrap();
        assert!(clone.devices().vmgenid().is_none());
        assert!(!pic_latched(&clone, 7));
        source.resume(token);
    }
}
