//! The whole state of a paused VM apart from its RAM: every vCPU, every device, the KVM clock
//! and the RAM's shape. Captured under the pause token, restored into a new KVM VM (clone,
//! snapshot restore) or into the same one (reset). Guest values only: no host pointer or fd.

pub mod clock;
pub mod irqchip;
pub mod msrs;
pub mod vcpu;

use std::sync::{mpsc, Arc};

use kvm_bindings::kvm_clock_data;
use memory::{GuestAddress, GuestRam};
use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use devices::block::{CowDisk, FrozenDisk};

use crate::devices::{
    attach_legacy_devices, attach_mmio_devices, restore_mmio_devices, CapturedDisk, Console, DeviceError, DeviceStateError, DiskCapture,
    LegacyDevicesState, MmioDevicesState, Wiring,
};
use crate::machine::{Paused, Vmm};
use crate::vcpu::{lock_vcpu, spawn_vcpu, VcpuContext, VcpuError};
use crate::vm::{Vm, VmError};
pub use clock::ClockOnRestore;
pub use irqchip::IrqchipState;
pub use vcpu::{VcpuState, VcpuStateError};

/// What failed capturing or restoring a VM's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("pause token of VM {token} given for VM {vm}")]
    WrongToken { token: u64, vm: u64 },
    #[error("{op} failed")]
    VmIoctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error("restoring device state failed")]
    Device(#[from] DeviceStateError),
    #[error("state is for RAM regions {state:?} but the RAM has {ram:?}")]
    RamShape { state: Vec<(u64, usize)>, ram: Vec<(u64, usize)> },
    #[error("state has {state} vCPUs but the VM has {vm}")]
    VcpuCount { state: usize, vm: usize },
    #[error("cannot create the KVM VM")]
    Vm(#[from] VmError),
    #[error("cannot attach the legacy devices")]
    Devices(#[from] DeviceError),
    #[error("cannot start a vCPU")]
    VcpuThread(#[from] VcpuError),
    #[error("the saved clock has no host real-time stamp (the capturing host kept no KVM master clock): cannot advance it to the host's real time")]
    NoRealtimeStamp,
}

/// Everything but RAM bytes.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// (guest physical start, size) of each RAM region.
    pub ram_layout: Vec<(u64, usize)>,
    pub vcpus: Vec<VcpuState>,
    pub devices: LegacyDevicesState,
    /// virtio-blk and the DMA engine, requests in flight included (a snapshot saves the disk
    /// beside it).
    pub mmio: Option<MmioDevicesState>,
    pub clock: kvm_clock_data,
    /// PIC, IOAPIC and PIT, if the VM has an in-kernel irqchip (then every vCPU has a LAPIC).
    pub irqchip: Option<IrqchipState>,
}

/// (start, size) of each region of `ram`, as saved.
pub fn ram_shape(ram: &GuestRam) -> Vec<(u64, usize)> {
    ram.layout().iter().map(|&(start, size)| (start.0, size)).collect()
}

fn check_token(vmm: &Vmm, token: &Paused) -> Result<(), StateError> {
    match token.vm_id() == vmm.id() {
        true => Ok(()),
        false => Err(StateError::WrongToken { token: token.vm_id(), vm: vmm.id() }),
    }
}

impl VmState {
    /// Captures the state of `vmm`, which `token` proves paused.
    pub fn capture(vmm: &Vmm, token: &Paused) -> Result<VmState, StateError> {
        Self::capture_with(vmm, token, || ()).map(|(state, ())| state)
    }

    /// Captures the state of `vmm` and freezes its RAM with `freeze_ram` at one instant with
    /// respect to the devices: device state is saved and `freeze_ram` runs while no device
    /// can complete a request in between (devices doing DMA on their own threads take their
    /// lock around both, e.g. virtio-blk's `capture_and_clone`). The disk is left alone.
    pub fn capture_with<R>(vmm: &Vmm, token: &Paused, freeze_ram: impl FnOnce() -> R) -> Result<(VmState, R), StateError> {
        Self::capture_devices_with(vmm, token, DiskCapture::Leave, freeze_ram).map(|(state, _, frozen)| (state, frozen))
    }

    /// `capture_with` for a clone: also clones the VM's disk copy-on-write at the same instant
    /// (`None` without a disk). The clone's devices re-execute what was in flight then.
    pub fn capture_for_clone<R>(
        vmm: &Vmm,
        token: &Paused,
        clone_ram: impl FnOnce() -> R,
    ) -> Result<(VmState, Option<CowDisk>, R), StateError> {
        let (state, disk, ram) = Self::capture_devices_with(vmm, token, DiskCapture::Clone, clone_ram)?;
        let disk = match disk {
            Some(CapturedDisk::Clone(disk)) => Some(disk),
            _ => None,
        };
        Ok((state, disk, ram))
    }

    /// `capture_with` for a snapshot: also freezes the VM's disk at the same instant (`None`
    /// without a disk). What restores or resets to the snapshot re-executes what was in flight.
    pub fn capture_for_snapshot<R>(
        vmm: &Vmm,
        token: &Paused,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(VmState, Option<FrozenDisk>, R), StateError> {
        let (state, disk, ram) = Self::capture_devices_with(vmm, token, DiskCapture::Freeze, freeze_ram)?;
        let disk = match disk {
            Some(CapturedDisk::Frozen(disk)) => Some(disk),
            _ => None,
        };
        Ok((state, disk, ram))
    }

    fn capture_devices_with<R>(
        vmm: &Vmm,
        token: &Paused,
        disk: DiskCapture,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(VmState, Option<CapturedDisk>, R), StateError> {
        check_token(vmm, token)?;
        let fd = vmm.vm().fd();
        let irqchip = IrqchipState::capture(fd)?;
        let clock = clock::capture(fd)?;
        let vcpus = vmm
            .vcpu_handles()
            .iter()
            .map(|h| VcpuState::capture(h.index(), &lock_vcpu(h.fd()), irqchip.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        // The MMIO devices lock themselves around the legacy devices' capture and the freeze.
        let legacy = vmm.devices();
        let ((devices, frozen), mmio, disk) = match &legacy.mmio {
            Some(mmio) => {
                let (state, disk, inner) = mmio
                    .save_state_with(disk, || legacy.save_state_with(freeze_ram))
                    .map_err(DeviceError::from)?;
                (inner, Some(state), disk)
            }
            None => (legacy.save_state_with(freeze_ram), None, None),
        };
        Ok((VmState { ram_layout: ram_shape(vmm.ram()), vcpus, devices, mmio, clock, irqchip }, disk, frozen))
    }

    /// Writes this state back into `vmm` (same shape), which `token` proves paused, and makes
    /// its vCPUs runnable again even if the guest had ended the VM. RAM is the caller's.
    pub fn restore_into(&self, vmm: &mut Vmm, token: &Paused) -> Result<(), StateError> {
        check_token(vmm, token)?;
        self.check_shape(vmm.ram())?;
        if self.vcpus.len() != vmm.vcpu_count() {
            return Err(StateError::VcpuCount { state: self.vcpus.len(), vm: vmm.vcpu_count() });
        }
        if let Some(chip) = &self.irqchip {
            chip.restore(vmm.vm().fd())?;
        }
        for (state, handle) in self.vcpus.iter().zip(vmm.vcpu_handles()) {
            state.restore(handle.index(), &lock_vcpu(handle.fd()), false)?;
        }
        vmm.devices().restore_state(&self.devices)?;
        clock::restore(vmm.vm().fd(), &self.clock, ClockOnRestore::Resume)?;
        vmm.rearm(token);
        Ok(())
    }

    /// Whether `ram` has the regions this state was saved with.
    pub fn check_shape(&self, ram: &GuestRam) -> Result<(), StateError> {
        let shape = ram_shape(ram);
        match shape == self.ram_layout {
            true => Ok(()),
            false => Err(StateError::RamShape { state: self.ram_layout.clone(), ram: shape }),
        }
    }

    /// The regions as the memory layer takes them.
    pub fn regions(&self) -> Vec<(GuestAddress, usize)> {
        self.ram_layout.iter().map(|&(start, size)| (GuestAddress(start), size)).collect()
    }
}

/// Builds a new, paused VM with id `vm_id` on `ram` (a clone's or a restored snapshot's) in
/// `state`: a KVM VM with the same memslots, devices and vCPUs. Start it with `Vmm::start`.
/// `disk` is the VM's own copy-on-write disk (a clone's, from `capture_for_clone`, or one over a
/// snapshot's frozen disk); the MMIO devices re-execute the requests and the DMA transfer in
/// flight in `state` against `ram`.
pub fn build_from_state(
    ram: Arc<GuestRam>,
    state: &VmState,
    vm_id: u64,
    console: &Console,
    disk: Option<CowDisk>,
) -> Result<Vmm, StateError> {
    state.check_shape(&ram)?;
    let vm = Vm::new(Arc::clone(&ram))?;
    if let Some(chip) = &state.irqchip {
        chip.create_on(vm.fd())?;
    }
    let fds = (0..state.vcpus.len()).map(|index| vm.create_vcpu(index as u64)).collect::<Result<Vec<_>, _>>()?;
    if let Some(chip) = &state.irqchip {
        chip.restore(vm.fd())?;
    }
    let mut pio = Bus::new();
    let mut devices = attach_legacy_devices(&mut pio, console)?;
    devices.restore_state(&state.devices)?;
    let mut mmio = Bus::new();
    // A VM with an irqchip had its devices on irqfds and ioeventfds; the clone gets the same.
    let wiring = match state.irqchip {
        Some(_) => {
            devices.wire_serial_irqfd(vm.fd())?;
            Wiring::Irqchip(vm.fd())
        }
        None => Wiring::Polled,
    };
    devices.mmio = Some(match &state.mmio {
        Some(saved) => restore_mmio_devices(&mut mmio, &ram, saved, disk, wiring)?,
        None => attach_mmio_devices(&mut mmio, &ram, None, wiring)?,
    });
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let (events_tx, events) = mpsc::channel();
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, (vcpu_state, fd)) in state.vcpus.iter().zip(fds).enumerate() {
        vcpu_state.restore(index, &fd, true)?;
        let fd = Arc::new(std::sync::Mutex::new(fd));
        let ctx = VcpuContext { index, fd, pio: Arc::clone(&pio), mmio: Arc::clone(&mmio), ram: Arc::clone(&ram) };
        vcpus.push(spawn_vcpu(ctx, events_tx.clone())?);
    }
    // After the vCPUs' TSC and kvm-clock MSRs, before they first run (they start paused).
    clock::restore(vm.fd(), &state.clock, ClockOnRestore::Resume)?;
    Ok(Vmm::from_parts(vm_id, vm, vcpus, events, (pio, mmio), devices))
}
