//! The in-kernel interrupt controllers of a VM that has them (KVM_CREATE_IRQCHIP, as Linux
//! guests get): PIC master and slave, IOAPIC, and the PIT if one was created. The LAPICs are
//! per vCPU (`VcpuState::lapic`).

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{vm_ioctl, StateError};

/// The saved chips. Not `Clone`: the KVM structs are not.
#[derive(Debug, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: Option<kvm_pit_state2>,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, kvm_ioctls::Error> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map(|()| chip)
}

impl IrqchipState {
    /// The chips of `vm`, or `None` if it has no in-kernel irqchip (KVM answers ENXIO).
    pub fn capture(vm: &VmFd) -> Result<Option<IrqchipState>, StateError> {
        let pic_master = match get_chip(vm, KVM_IRQCHIP_PIC_MASTER) {
            Ok(chip) => chip,
            Err(e) if e.errno() == libc::ENXIO => return Ok(None),
            Err(source) => return Err(StateError::VmIoctl { op: "KVM_GET_IRQCHIP", source }),
        };
        let pit = match vm.get_pit2() {
            Ok(pit) => Some(pit),
            Err(e) if e.errno() == libc::ENXIO => None,
            Err(source) => return Err(StateError::VmIoctl { op: "KVM_GET_PIT2", source }),
        };
        Ok(Some(IrqchipState {
            pic_master,
            pic_slave: vm_ioctl("KVM_GET_IRQCHIP", get_chip(vm, KVM_IRQCHIP_PIC_SLAVE))?,
            ioapic: vm_ioctl("KVM_GET_IRQCHIP", get_chip(vm, KVM_IRQCHIP_IOAPIC))?,
            pit,
        }))
    }

    /// Creates the chips (and the PIT, with a dummy speaker port as Zygote's Linux set-up does)
    /// on a new VM; must come before its first vCPU.
    pub fn create_on(&self, vm: &VmFd) -> Result<(), StateError> {
        vm_ioctl("KVM_CREATE_IRQCHIP", vm.create_irq_chip())?;
        if self.pit.is_some() {
            let config = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            vm_ioctl("KVM_CREATE_PIT2", vm.create_pit2(config))?;
        }
        Ok(())
    }

    /// Writes the saved chip state into `vm`, which has the same chips.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm_ioctl("KVM_SET_IRQCHIP", vm.set_irqchip(chip))?;
        }
        if let Some(pit) = &self.pit {
            vm_ioctl("KVM_SET_PIT2", vm.set_pit2(pit))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use memory::{Bytes, GuestAddress};

    use super::*;
    use crate::builder::{build_tiny_vm, VmConfig};
    use crate::clone::capture_clone;
    use crate::device_manager::Console;
    use crate::layout::COUNTERS_ADDR;
    use crate::machine::Vmm;
    use crate::vstate::VmState;

    /// `spin` on a VM with an in-kernel PIC/IOAPIC/LAPIC and PIT, as Linux guests get.
    fn spin_with_irqchip(id: u64) -> Vmm {
        let config = VmConfig { vm_id: id, console: Console::capture().0, irqchip: true, ..VmConfig::default() };
        build_tiny_vm(&config, crate::guests::find("spin").unwrap(), 0).unwrap()
    }

    fn counter(vmm: &Vmm) -> u64 {
        vmm.ram().read_obj(GuestAddress(COUNTERS_ADDR)).unwrap()
    }

    fn wait_past(vmm: &Vmm, value: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(vmm) <= value {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn json<T: Serialize>(value: &T) -> serde_json::Value {
        serde_json::to_value(value).unwrap()
    }

    #[test]
    fn a_clone_gets_the_irqchip_pit_and_lapic_of_the_instant() {
        let mut source = spin_with_irqchip(5);
        source.start();
        assert!(wait_past(&source, 0));
        let token = source.pause().unwrap();
        let image = capture_clone(&source, &token).unwrap();
        let chip = image.state.irqchip.as_ref().expect("irqchip captured");
        assert!(chip.pit.is_some(), "PIT captured");
        assert!(image.state.vcpus[0].lapic.is_some(), "LAPIC captured");
        source.resume(token);
        let at_instant = json(&image.state);
        let mut clone = image.build(6, &Console::capture().0).unwrap();
        let token = clone.pause().unwrap();
        let restored = VmState::capture(&clone, &token).unwrap();
        let restored = json(&restored);
        for chip in ["pic_master", "pic_slave", "ioapic"] {
            assert_eq!(at_instant["irqchip"][chip], restored["irqchip"][chip], "{chip}");
        }
        assert_eq!(at_instant["vcpus"][0]["lapic"], restored["vcpus"][0]["lapic"]);
        assert_eq!(at_instant["vcpus"][0]["regs"], restored["vcpus"][0]["regs"]);
        let before = counter(&clone);
        clone.resume(token);
        assert!(wait_past(&clone, before), "the clone runs");
        assert!(wait_past(&source, before), "the source runs");
    }
}
