//! The in-kernel interrupt controllers of a VM that has them (KVM_CREATE_IRQCHIP, as Linux
//! guests get): PIC master and slave, IOAPIC, and the PIT if one was created, and their
//! `Persist` (`InKernelIrqchip`). The LAPICs are per vCPU (`VcpuState::lapic`).

use devices::persist::Persist;
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

/// Highest 8254 counter mode (KVM folds the aliases 6 and 7 into 2 and 3).
const MAX_PIT_MODE: u8 = 5;
/// The mode KVM gives a counter no guest has programmed yet (`kvm_pit_reset`).
const PIT_MODE_UNPROGRAMMED: u8 = 0xff;

impl IrqchipState {
    /// The chips of `vm`, or `None` if it has no in-kernel irqchip (KVM answers ENXIO).
    pub fn capture(vm: &VmFd) -> Result<Option<IrqchipState>, StateError> {
        match (InKernelIrqchip { vm }).save() {
            Ok(chips) => Ok(Some(chips)),
            Err(StateError::VmIoctl { source, .. }) if source.errno() == libc::ENXIO => Ok(None),
            Err(e) => Err(e),
        }
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

    /// Refuses saved chips (a snapshot file is input) KVM would take for something else: a
    /// chip under another chip's name (KVM_SET_IRQCHIP writes whichever `chip_id` says), or a
    /// PIT counter in a mode neither the 8254 nor KVM's reset gives it.
    pub fn check(&self) -> Result<(), StateError> {
        let named = [
            ("pic_master", &self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            ("pic_slave", &self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            ("ioapic", &self.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        for (field, chip, id) in named {
            if chip.chip_id != id {
                return Err(StateError::BadIrqchip { field, reason: format!("chip_id {} (it is {id})", chip.chip_id) });
            }
        }
        for (index, channel) in self.pit.iter().flat_map(|pit| pit.channels.iter().enumerate()) {
            if channel.mode > MAX_PIT_MODE && channel.mode != PIT_MODE_UNPROGRAMMED {
                return Err(StateError::BadIrqchip {
                    field: "pit",
                    reason: format!("channel {index} in mode {} (the 8254 has 0 to {MAX_PIT_MODE}, KVM {PIT_MODE_UNPROGRAMMED} before programming)", channel.mode),
                });
            }
        }
        Ok(())
    }
}

/// A VM's in-kernel irqchip (and PIT), as its state is saved from it and restored into it.
pub struct InKernelIrqchip<'a> {
    pub vm: &'a VmFd,
}

impl<'a> Persist for InKernelIrqchip<'a> {
    type State = IrqchipState;
    /// The VM, its chips already created (`IrqchipState::create_on`, before its vCPUs).
    type ConstructorArgs = &'a VmFd;
    type Error = StateError;

    /// Reads the chips; a VM without them fails with ENXIO (`IrqchipState::capture` takes that
    /// as "no irqchip").
    fn save(&self) -> Result<IrqchipState, StateError> {
        let vm = self.vm;
        let pit = match vm.get_pit2() {
            Ok(pit) => Some(pit),
            Err(e) if e.errno() == libc::ENXIO => None,
            Err(source) => return Err(StateError::VmIoctl { op: "KVM_GET_PIT2", source }),
        };
        Ok(IrqchipState {
            pic_master: vm_ioctl("KVM_GET_IRQCHIP", get_chip(vm, KVM_IRQCHIP_PIC_MASTER))?,
            pic_slave: vm_ioctl("KVM_GET_IRQCHIP", get_chip(vm, KVM_IRQCHIP_PIC_SLAVE))?,
            ioapic: vm_ioctl("KVM_GET_IRQCHIP", get_chip(vm, KVM_IRQCHIP_IOAPIC))?,
            pit,
        })
    }

    /// Checks `state`, then writes it into `vm`'s chips.
    fn restore(vm: &'a VmFd, state: &IrqchipState) -> Result<InKernelIrqchip<'a>, StateError> {
        state.check()?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            vm_ioctl("KVM_SET_IRQCHIP", vm.set_irqchip(chip))?;
        }
        if let Some(pit) = &state.pit {
            vm_ioctl("KVM_SET_PIT2", vm.set_pit2(pit))?;
        }
        Ok(InKernelIrqchip { vm })
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

    /// `spin` on a VM with an in-kernel PIC/IOAPIC/LAPIC and PIT, as Linux guests get, without
    /// the generation ID, whose interrupt a clone gets on top of the irqchip of the instant
    /// (`device_manager::vmgenid`'s tests).
    fn spin_with_irqchip(id: u64) -> Vmm {
        let console = Console::capture().0;
        let config = VmConfig { vm_id: id, console, irqchip: true, vmgenid: false, ..VmConfig::default() };
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

    #[test]
    fn check_passes_named_chips_and_refuses_a_swapped_chip_or_a_bad_pit_mode() {
        let chip = |chip_id| kvm_irqchip { chip_id, ..Default::default() };
        let good = || IrqchipState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit: Some(kvm_pit_state2::default()),
        };
        assert!(good().check().is_ok());
        let mut swapped = good();
        swapped.pic_slave.chip_id = KVM_IRQCHIP_IOAPIC;
        let mut unprogrammed = good();
        unprogrammed.pit.as_mut().unwrap().channels[0].mode = 0xff;
        assert!(unprogrammed.check().is_ok(), "as KVM creates the PIT");
        let mut pit = good();
        pit.pit.as_mut().unwrap().channels[2].mode = 6;
        for (bad, says) in [(swapped, "pic_slave: chip_id 2 (it is 1)"), (pit, "pit: channel 2 in mode 6")] {
            let err = bad.check().unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
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
