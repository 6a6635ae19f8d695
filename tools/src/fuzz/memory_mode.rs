//! Memory mode: a schedule drives `GuestRam`s and pin guards directly through the memory
//! layer's reference model (`memory::model`, the one its proptest suite drives too), which
//! checks the rules of DESIGN.md §1 after every step against its shadow bytes (per VM, per
//! snapshot, per VM its pins outlived) and the pages each VM must report dirty.

use memory::model::{Checked, ModelViolation, RamModel};
use memory::{Access, GuestAddress, PAGE_SIZE};

use super::schedule::Step;
use super::{pick, Violation};

/// Two regions with a hole between them; small, so a run takes microseconds.
pub const REGIONS: [(u64, usize); 2] = [(0, 32 * PAGE_SIZE), (0x20_0000, 8 * PAGE_SIZE)];
pub const PAGES: u16 = 40;
const MAX_VMS: usize = 6;

/// A device transfer through one pin of the model, moved chunk by chunk.
struct Dma {
    pin: usize,
    len: usize,
    write: bool,
    pattern: u8,
    chunk: usize,
    done: usize,
}

/// The model of one run and the DMAs the schedule started in it.
pub struct MemoryWorld {
    model: RamModel,
    dmas: Vec<Dma>,
}

fn violation(v: ModelViolation) -> Violation {
    Violation(v.0)
}

impl MemoryWorld {
    pub fn new() -> Result<Self, Violation> {
        let layout: Vec<_> = REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        Ok(MemoryWorld { model: RamModel::new(&layout, MAX_VMS).map_err(violation)?, dmas: Vec::new() })
    }

    /// Executes one step, then checks every invariant.
    pub fn apply(&mut self, step: &Step) -> Result<(), Violation> {
        self.execute(step).and_then(|()| self.model.check()).map_err(violation)
    }

    fn execute(&mut self, step: &Step) -> Checked {
        let m = &mut self.model;
        let vm = |m: &RamModel, vm: u8| m.pick_vm(usize::from(vm));
        match *step {
            Step::GuestWrite { vm: v, page, offset, len, byte } => {
                let Some(v) = vm(m, v) else { return Ok(()) };
                m.host_write(v, usize::from(page), usize::from(offset), usize::from(len), byte)
            }
            Step::DmaStart { vm: v, page, pages, write, pattern, chunk } => {
                let Some(v) = vm(m, v) else { return Ok(()) };
                let access = if write { Access::Write } else { Access::Read };
                let pin = m.pin(v, usize::from(page), usize::from(pages), access)?;
                let len = m.pin_info(pin).len;
                self.dmas.push(Dma { pin, len, write, pattern, chunk: usize::from(chunk).max(1), done: 0 });
                Ok(())
            }
            Step::DmaStep { dma } => self.dma_progress(dma, false),
            Step::DmaComplete { dma } => self.dma_progress(dma, true),
            Step::Unpin { dma } => {
                let Some(i) = self.pick_dma(dma, |_| true) else { return Ok(()) };
                self.model.unpin(self.dmas[i].pin)
            }
            Step::Clone { vm: v } => {
                let Some(v) = vm(m, v) else { return Ok(()) };
                m.clone_vm(v).map(drop)
            }
            Step::Precopy { vm: v } => {
                let Some(v) = vm(m, v) else { return Ok(()) };
                m.precopy(v)
            }
            Step::Snapshot { vm: v } => {
                let Some(v) = vm(m, v) else { return Ok(()) };
                m.snapshot(v).map(drop)
            }
            Step::Restore { snap } => {
                let Some(snap) = m.pick_snapshot(usize::from(snap)) else { return Ok(()) };
                m.restore(snap).map(drop)
            }
            Step::Reset { vm: v, snap } => {
                let (Some(v), Some(snap)) = (vm(m, v), m.pick_snapshot(usize::from(snap))) else { return Ok(()) };
                m.reset(v, snap)
            }
            Step::DropVm { vm: v } => {
                let Some(v) = vm(m, v) else { return Ok(()) };
                m.drop_vm(v)
            }
            Step::DropSnapshot { snap } => {
                if let Some(snap) = m.pick_snapshot(usize::from(snap)) {
                    m.drop_snapshot(snap);
                }
                Ok(())
            }
            Step::TakeDirty { vm: v } => {
                let Some(v) = vm(m, v) else { return Ok(()) };
                m.take_dirty(v)
            }
        }
    }

    /// The DMA `i` picks among those still pinned that `wanted` accepts.
    fn pick_dma(&self, i: u8, wanted: impl Fn(&Dma) -> bool) -> Option<usize> {
        let live: Vec<Option<()>> =
            self.dmas.iter().map(|d| (self.model.pin_info(d.pin).live && wanted(d)).then_some(())).collect();
        pick(&live, i)
    }

    /// Moves one chunk (or all remaining) of a DMA through its guard: a write lands in its VM,
    /// a read must see exactly what its VM holds now.
    fn dma_progress(&mut self, dma: u8, all: bool) -> Checked {
        let Some(i) = self.pick_dma(dma, |d| d.done < d.len) else { return Ok(()) };
        let d = &mut self.dmas[i];
        loop {
            let n = d.chunk.min(d.len - d.done);
            if d.write {
                self.model.dma_write(d.pin, d.done, n, d.pattern)?;
            } else {
                self.model.dma_read(d.pin, d.done, n)?;
            }
            d.done += n;
            if !all || d.done == d.len {
                return Ok(());
            }
        }
    }
}
