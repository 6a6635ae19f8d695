//! `Snapshot`: a RAM's frozen bytes of one instant (one image stack per region), and resetting
//! a region back to them.

use vm_memory::GuestAddress;

use crate::freeze::RegionState;
use crate::region::RamRegion;
use crate::stack::ImageStack;
use crate::MemoryError;

/// The frozen RAM of one instant. Never changes, whatever any VM made from it does later.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub(crate) layout: Vec<(GuestAddress, usize)>,
    pub(crate) stacks: Vec<ImageStack>,
}

impl Snapshot {
    /// The (start, size) of each region.
    pub fn layout(&self) -> &[(GuestAddress, usize)] {
        &self.layout
    }

    /// Reads the snapshot's bytes at `addr` (for checks and tools).
    pub fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<(), MemoryError> {
        let (index, offset) = self
            .layout
            .iter()
            .position(|&(start, size)| {
                addr >= start && addr.0.checked_add(buf.len() as u64).is_some_and(|end| end <= start.0 + size as u64)
            })
            .map(|i| (i, (addr.0 - self.layout[i].0 .0) as usize))
            .ok_or(MemoryError::OutOfRange { addr: addr.0, len: buf.len() })?;
        self.stacks[index].read_to_slice(offset, buf)
    }

    pub(crate) fn stack(&self, region: usize) -> Result<&ImageStack, MemoryError> {
        self.stacks.get(region).ok_or(MemoryError::NoSuchRegion { region, regions: self.stacks.len() })
    }
}

/// Brings one region back to `target`'s bytes: when `target` is the bottom of the region's
/// stack, copies back only the private pages and the pages of the layers above it (pages stay
/// mapped, the next write is native); otherwise remaps the whole stack. The caller made sure
/// no pin or running vCPU uses the region.
pub(crate) fn reset_region(region: &RamRegion, st: &mut RegionState, target: &ImageStack) -> Result<(), MemoryError> {
    if st.stack.starts_with(target) {
        let mut pages = st.stack.pages_above(target.layers().len(), region.pages());
        pages.union_with(&st.private);
        target.read_pages_to_host(&pages, region.host())?;
    } else {
        target.map_onto(region.host())?;
    }
    st.settle_on(target.clone());
    Ok(())
}
