//! Checks a saved VM state before anything is built from it: a snapshot file is input, and a
//! restore must refuse a bad value with an error naming it, never build half a VM first.

use super::{StateError, VmState};
use crate::device_manager::{DeviceManager, RestoreArgs};

/// Most vCPUs a VM may have (and a saved state may hold).
pub const MAX_VCPUS: u32 = 32;
/// Most guest RAM a VM may have, in bytes (64 GiB).
pub const MAX_RAM_BYTES: u64 = 64 << 30;

/// Refuses `state` unless a VM can be built from it on `args`: 1..=`MAX_VCPUS` vCPUs, each
/// accepted by `VcpuState::check` and with a LAPIC exactly when the VM has an irqchip, chips
/// accepted by `IrqchipState::check`, a RAM layout accepted by `RamLayout::check`, and every
/// device state accepted by its device's `check_saved`.
pub fn validate(state: &VmState, args: &RestoreArgs) -> Result<(), StateError> {
    let vcpus = state.vcpus.len();
    if vcpus == 0 || vcpus > MAX_VCPUS as usize {
        return Err(StateError::BadVcpuCount { count: vcpus, max: MAX_VCPUS });
    }
    for (index, vcpu) in state.vcpus.iter().enumerate() {
        vcpu.check(index)?;
        if vcpu.lapic.is_some() != state.irqchip.is_some() {
            return Err(StateError::LapicWithoutIrqchip { vcpu: index, lapic: vcpu.lapic.is_some() });
        }
    }
    if let Some(chips) = &state.irqchip {
        chips.check()?;
    }
    state.ram_layout.check_saved()?;
    DeviceManager::check_saved(&state.devices, args)?;
    Ok(())
}
