//! The RAM layout of a VM's state and its `Persist` (`VmRam`): where each guest RAM region
//! starts and how big it is. The RAM's bytes are not here: a clone maps its source's frozen
//! RAM, a snapshot restore its RAM files; what a restore takes from the state is the layout,
//! which must be one the builder could have made and the one the given RAM has.

use devices::persist::Persist;
use memory::{GuestAddress, GuestRam};
use serde::{Deserialize, Serialize};

use super::validate::MAX_RAM_BYTES;
use super::StateError;
use crate::layout::{HIGH_RAM_START, MMIO_GAP_START};

const PAGE: u64 = 4096;

/// What is wrong with a RAM layout (a snapshot file's, or a saved state's).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RamLayoutError {
    #[error("no RAM region")]
    NoRam,
    #[error("region {index} (start {start:#x} size {size:#x}) {reason}")]
    Region { index: usize, start: u64, size: u64, reason: &'static str },
    #[error("{bytes} bytes of RAM, more than {max}")]
    TooMuchRam { bytes: u64, max: u64 },
}

/// (guest physical start, size) of each RAM region, in address order. Saved as the bare list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RamLayout(pub Vec<(u64, usize)>);

impl RamLayout {
    /// The layout of `ram`.
    pub fn of(ram: &GuestRam) -> RamLayout {
        RamLayout(ram.layout().iter().map(|&(start, size)| (start.0, size)).collect())
    }

    /// The regions as the memory layer takes them.
    pub fn regions(&self) -> Vec<(GuestAddress, usize)> {
        self.0.iter().map(|&(start, size)| (GuestAddress(start), size)).collect()
    }

    /// Refuses a layout (a snapshot file is input) the builder could not have made: no region,
    /// a region empty, not page-aligned or wrapping, regions overlapping or out of order, one
    /// reaching into the MMIO gap, more than `MAX_RAM_BYTES` in all. The one layout check:
    /// the snapshot loader runs it before opening any file, a restore before building.
    pub fn check(&self) -> Result<(), RamLayoutError> {
        if self.0.is_empty() {
            return Err(RamLayoutError::NoRam);
        }
        let mut total: u64 = 0;
        let mut end_of_previous = 0;
        for (index, &(start, size)) in self.0.iter().enumerate() {
            let size = size as u64;
            let bad = |reason| Err(RamLayoutError::Region { index, start, size, reason });
            let Some(end) = start.checked_add(size) else {
                return bad("wraps around the address space");
            };
            if size == 0 || (start | size) & (PAGE - 1) != 0 {
                return bad("is empty or not page-aligned");
            }
            if start < end_of_previous {
                return bad("overlaps or precedes the region before it");
            }
            if start < HIGH_RAM_START && end > MMIO_GAP_START {
                return bad("reaches into the MMIO gap");
            }
            total = total.saturating_add(size);
            end_of_previous = end;
        }
        match total <= MAX_RAM_BYTES {
            true => Ok(()),
            false => Err(RamLayoutError::TooMuchRam { bytes: total, max: MAX_RAM_BYTES }),
        }
    }
}

impl RamLayout {
    /// `check` for a saved VM state about to be restored.
    pub fn check_saved(&self) -> Result<(), StateError> {
        self.check().map_err(|source| StateError::BadRamLayout { layout: self.0.clone(), source })
    }
}

impl std::ops::Deref for RamLayout {
    type Target = [(u64, usize)];

    fn deref(&self) -> &[(u64, usize)] {
        &self.0
    }
}

impl<'a> IntoIterator for &'a RamLayout {
    type Item = &'a (u64, usize);
    type IntoIter = std::slice::Iter<'a, (u64, usize)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A VM's guest RAM, as its layout is saved from it and checked on restore.
pub struct VmRam<'a> {
    pub ram: &'a GuestRam,
}

impl<'a> Persist for VmRam<'a> {
    type State = RamLayout;
    /// The RAM the restored VM runs on, already filled (from the snapshot or the clone).
    type ConstructorArgs = &'a GuestRam;
    type Error = StateError;

    fn save(&self) -> Result<RamLayout, StateError> {
        Ok(RamLayout::of(self.ram))
    }

    /// Checks `layout`, then that `ram` has exactly these regions.
    fn restore(ram: &'a GuestRam, layout: &RamLayout) -> Result<VmRam<'a>, StateError> {
        layout.check_saved()?;
        let has = RamLayout::of(ram);
        match has == *layout {
            true => Ok(VmRam { ram }),
            false => Err(StateError::RamShape { state: layout.0.clone(), ram: has.0 }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_layouts_the_builder_makes_pass_and_others_are_named() {
        assert!(RamLayout(vec![(0, 32 << 20)]).check().is_ok());
        assert!(RamLayout(vec![(0, MMIO_GAP_START as usize), (HIGH_RAM_START, 1 << 30)]).check().is_ok());
        for (layout, says) in [
            (vec![], "no RAM"),
            (vec![(0, 4097)], "page-aligned"),
            (vec![(0, 0)], "empty"),
            (vec![(u64::MAX - 4095, 8192)], "wraps"),
            (vec![(0, 8192), (4096, 4096)], "overlaps"),
            (vec![(0, MMIO_GAP_START as usize + 4096)], "MMIO gap"),
            (vec![(HIGH_RAM_START, (MAX_RAM_BYTES + 4096) as usize)], "more than"),
        ] {
            let err = RamLayout(layout.clone()).check().unwrap_err().to_string();
            assert!(err.contains(says), "{layout:?}: {err}");
        }
    }

    #[test]
    fn restore_takes_only_ram_of_the_saved_layout_and_save_reads_it_back() {
        let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let layout = VmRam { ram: &ram }.save().unwrap();
        assert_eq!(layout, RamLayout(vec![(0, 1 << 20)]));
        assert!(VmRam::restore(&ram, &layout).is_ok());
        let err = VmRam::restore(&ram, &RamLayout(vec![(0, 2 << 20)])).err().unwrap().to_string();
        assert!(err.contains("but the RAM has"), "{err}");
        assert_eq!(serde_json::to_string(&layout).unwrap(), "[[0,1048576]]", "saved as the bare list");
    }
}
