//! Checks a saved VM state before anything is built from it: a snapshot file is input, and a
//! restore must refuse a bad value with an error naming it, never build half a VM first.

use super::{StateError, VmState};
use crate::device_manager::{DeviceManager, RestoreArgs};
use crate::layout::{HIGH_RAM_START, MMIO_GAP_START};

/// Most vCPUs a VM may have (and a saved state may hold).
pub const MAX_VCPUS: u32 = 32;
/// Most guest RAM a VM may have, in bytes (64 GiB).
pub const MAX_RAM_BYTES: u64 = 64 << 30;
const PAGE: u64 = 4096;

/// Refuses `state` unless a VM can be built from it on `args`: 1..=`MAX_VCPUS` vCPUs, each
/// accepted by `VcpuState::check` and with a LAPIC exactly when the VM has an irqchip, a RAM
/// layout the builder itself could have made (page-aligned regions, in order, not overlapping,
/// none in the MMIO gap, at most `MAX_RAM_BYTES`), and every device state accepted by its
/// device's `check_saved`.
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
    check_ram_layout(&state.ram_layout)?;
    DeviceManager::check_saved(&state.devices, args)?;
    Ok(())
}

/// The rules of `validate` for the RAM layout.
pub fn check_ram_layout(layout: &[(u64, usize)]) -> Result<(), StateError> {
    let bad = |reason: String| Err(StateError::BadRamLayout { layout: layout.to_vec(), reason });
    if layout.is_empty() {
        return bad("no RAM region".into());
    }
    let mut total: u64 = 0;
    let mut end_of_previous = 0;
    for &(start, size) in layout {
        let size = size as u64;
        let Some(end) = start.checked_add(size) else {
            return bad(format!("region {start:#x}+{size:#x} wraps around"));
        };
        if size == 0 || (start | size) & (PAGE - 1) != 0 {
            return bad(format!("region {start:#x}+{size:#x} is empty or not page-aligned"));
        }
        if start < end_of_previous {
            return bad(format!("region {start:#x} overlaps or precedes the one before"));
        }
        if start < HIGH_RAM_START && end > MMIO_GAP_START {
            return bad(format!("region {start:#x}+{size:#x} reaches into the MMIO gap"));
        }
        total = total.saturating_add(size);
        end_of_previous = end;
    }
    match total <= MAX_RAM_BYTES {
        true => Ok(()),
        false => bad(format!("{total} bytes of RAM, more than {MAX_RAM_BYTES}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_layouts_the_builder_makes_pass_and_others_are_named() {
        assert!(check_ram_layout(&[(0, 32 << 20)]).is_ok());
        assert!(check_ram_layout(&[(0, MMIO_GAP_START as usize), (HIGH_RAM_START, 1 << 30)]).is_ok());
        for (layout, says) in [
            (vec![], "no RAM"),
            (vec![(0, 4097)], "page-aligned"),
            (vec![(0, 0)], "empty"),
            (vec![(u64::MAX - 4095, 8192)], "wraps"),
            (vec![(0, 8192), (4096, 4096)], "overlaps"),
            (vec![(0, MMIO_GAP_START as usize + 4096)], "MMIO gap"),
            (vec![(HIGH_RAM_START, (MAX_RAM_BYTES + 4096) as usize)], "more than"),
        ] {
            let err = check_ram_layout(&layout).unwrap_err().to_string();
            assert!(err.contains(says), "{layout:?}: {err}");
        }
    }
}
