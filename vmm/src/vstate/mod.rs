//! The whole state of a paused VM apart from its RAM: every vCPU, every device, the KVM clock
//! and the RAM's shape. Captured under the pause token, restored into a new KVM VM (clone,
//! snapshot restore) or into the same one (reset). Guest values only: no host pointer or fd.

pub mod clock;
pub mod irqchip;
pub mod msrs;
pub mod ram_layout;
pub mod validate;
pub mod vcpu;

use devices::persist::Persist;
use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use memory::{GuestAddress, GuestRam};
use serde::{Deserialize, Serialize};

use devices::block::{CowDisk, FrozenDisk};

use crate::device_manager::{CaptureMode, CapturedDisk, DeviceError, DevicesState};
use crate::machine::{Paused, Vmm};
use crate::vcpu::lock_vcpu;
pub use clock::ClockOnRestore;
pub use irqchip::{InKernelIrqchip, IrqchipState};
pub use ram_layout::{RamLayout, RamLayoutError, VmRam};
pub use vcpu::{KvmVcpu, VcpuArgs, VcpuState, VcpuStateError};

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
    #[error("state is for RAM regions {state:?} but the RAM has {ram:?}")]
    RamShape { state: Vec<(u64, usize)>, ram: Vec<(u64, usize)> },
    #[error("state has {state} vCPUs but the VM has {vm}")]
    VcpuCount { state: usize, vm: usize },
    #[error("saved state has {count} vCPUs: a VM has 1..={max}")]
    BadVcpuCount { count: usize, max: u32 },
    #[error("saved irqchip refused: {field}: {reason}")]
    BadIrqchip { field: &'static str, reason: String },
    #[error("saved vCPU {vcpu} {} a LAPIC but the VM {} an in-kernel irqchip", if *lapic { "has" } else { "lacks" }, if *lapic { "lacks" } else { "has" })]
    LapicWithoutIrqchip { vcpu: usize, lapic: bool },
    #[error("saved RAM layout {layout:?} is invalid")]
    BadRamLayout {
        layout: Vec<(u64, usize)>,
        #[source]
        source: RamLayoutError,
    },
    #[error("cannot capture, restore or reset the devices")]
    Devices(#[from] DeviceError),
    #[error("the saved clock has no host real-time stamp (the capturing host kept no KVM master clock): cannot advance it to the host's real time")]
    NoRealtimeStamp,
}

/// Everything but RAM bytes.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// (guest physical start, size) of each RAM region.
    pub ram_layout: RamLayout,
    pub vcpus: Vec<VcpuState>,
    /// Every device, requests in flight included (a snapshot saves the disk beside it).
    pub devices: DevicesState,
    pub clock: kvm_clock_data,
    /// PIC, IOAPIC and PIT, if the VM has an in-kernel irqchip (then every vCPU has a LAPIC).
    pub irqchip: Option<IrqchipState>,
}

/// A VM-level KVM call's result, its failure named by `op`.
pub(crate) fn vm_ioctl<T>(op: &'static str, result: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    result.map_err(|source| StateError::VmIoctl { op, source })
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
    pub fn capture_with<R>(
        vmm: &Vmm,
        token: &Paused,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(VmState, R), StateError> {
        Self::capture_devices_with(vmm, token, CaptureMode::Leave, freeze_ram).map(|(state, _, frozen)| (state, frozen))
    }

    /// `capture_with` for a clone: also clones the VM's disk copy-on-write at the same instant
    /// (`None` without a disk). The clone's devices re-execute what was in flight then.
    pub fn capture_for_clone<R>(
        vmm: &Vmm,
        token: &Paused,
        clone_ram: impl FnOnce() -> R,
    ) -> Result<(VmState, Option<CowDisk>, R), StateError> {
        let (state, disk, ram) = Self::capture_devices_with(vmm, token, CaptureMode::Clone, clone_ram)?;
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
        let (state, disk, ram) = Self::capture_devices_with(vmm, token, CaptureMode::Freeze, freeze_ram)?;
        let disk = match disk {
            Some(CapturedDisk::Frozen(disk)) => Some(disk),
            _ => None,
        };
        Ok((state, disk, ram))
    }

    fn capture_devices_with<R>(
        vmm: &Vmm,
        token: &Paused,
        mode: CaptureMode,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(VmState, Option<CapturedDisk>, R), StateError> {
        check_token(vmm, token)?;
        let fd = vmm.vm().fd();
        let irqchip = IrqchipState::capture(fd)?;
        let clock = clock::capture(fd)?;
        let vcpus = vmm
            .vcpu_handles()
            .iter()
            .map(|h| KvmVcpu { index: h.index(), fd: &lock_vcpu(h.fd()), lapic: irqchip.is_some() }.save())
            .collect::<Result<Vec<_>, _>>()?;
        // Every device stays locked across its capture and the freeze.
        let (devices, disk, frozen) = vmm.devices().capture(mode, freeze_ram)?;
        Ok((VmState { ram_layout: VmRam { ram: vmm.ram() }.save()?, vcpus, devices, clock, irqchip }, disk, frozen))
    }

    /// Writes this state's irqchip, vCPUs and clock back into `vmm` (same shape), which
    /// `token` proves paused, and makes its vCPUs runnable again even if the guest had ended
    /// the VM. RAM and devices are the caller's (`DeviceManager::reset`, which resets them at
    /// one instant).
    pub fn restore_into(&self, vmm: &mut Vmm, token: &Paused) -> Result<(), StateError> {
        check_token(vmm, token)?;
        self.check_shape(vmm.ram())?;
        if self.vcpus.len() != vmm.vcpu_count() {
            return Err(StateError::VcpuCount { state: self.vcpus.len(), vm: vmm.vcpu_count() });
        }
        if let Some(chip) = &self.irqchip {
            InKernelIrqchip::restore(vmm.vm().fd(), chip)?;
        }
        for (state, handle) in self.vcpus.iter().zip(vmm.vcpu_handles()) {
            KvmVcpu::restore(
                VcpuArgs { index: handle.index(), fd: &lock_vcpu(handle.fd()), with_cpuid: false },
                state,
            )?;
        }
        clock::restore(vmm.vm().fd(), &self.clock, ClockOnRestore::Resume)?;
        vmm.rearm(token);
        Ok(())
    }

    /// Whether `ram` has the regions this state was saved with (and they are a layout the
    /// builder could have made).
    pub fn check_shape(&self, ram: &GuestRam) -> Result<(), StateError> {
        VmRam::restore(ram, &self.ram_layout).map(drop)
    }

    /// The regions as the memory layer takes them.
    pub fn regions(&self) -> Vec<(GuestAddress, usize)> {
        self.ram_layout.regions()
    }
}

/// Sets the KVM clock a VM was saved with: the last step of every restore (after the VM
/// state, the devices and the vCPUs' TSC and kvm-clock MSRs, before they first run). The guest
/// resumes its clock where it stopped (`clock::restore`); `clock::advance_to_host_realtime`
/// moves it on afterwards when asked.
pub fn restore_clock(vm: &VmFd, clock: &kvm_clock_data) -> Result<(), StateError> {
    clock::restore(vm, clock, ClockOnRestore::Resume)
}
