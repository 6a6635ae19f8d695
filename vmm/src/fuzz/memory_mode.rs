//! Memory mode: a schedule drives `GuestRam`s and pin guards directly, and an oracle checks
//! the rules of DESIGN.md §1 after every step against a shadow model (a byte vector per VM
//! and per snapshot, the pages each VM wrote since its last `take_dirty`).

use std::collections::BTreeSet;

use memory::{Access, Bytes, GuestAddress, GuestRam, PinGuard, Snapshot, PAGE_SIZE};

use super::schedule::Step;
use super::{ensure, pick, Violation};

/// Two regions with a hole between them; small, so a run takes microseconds.
pub const REGIONS: [(u64, usize); 2] = [(0, 32 * PAGE_SIZE), (0x20_0000, 8 * PAGE_SIZE)];
pub const PAGES: u16 = 40;
const MAX_VMS: usize = 6;

struct Vm {
    ram: GuestRam,
    bytes: Vec<u8>,
    /// Pages written since the last take_dirty: all must be reported.
    dirty: BTreeSet<usize>,
    /// Pages that may be reported besides (pinned now, or write-pinned since the last call).
    excused: BTreeSet<usize>,
    ever_pinned: bool,
}

struct Dma {
    vm: usize,
    guard: Option<PinGuard>,
    first: usize,
    len: usize,
    write: bool,
    pattern: u8,
    chunk: usize,
    done: usize,
}

/// The VMs, snapshots and DMAs of one run, with their shadow model.
#[derive(Default)]
pub struct MemoryWorld {
    vms: Vec<Option<Vm>>,
    snaps: Vec<(Snapshot, Vec<u8>)>,
    dmas: Vec<Dma>,
}

fn model_offset(page: usize) -> u64 {
    let first = REGIONS[0].1 / PAGE_SIZE;
    if page < first {
        (page * PAGE_SIZE) as u64
    } else {
        REGIONS[1].0 + ((page - first) * PAGE_SIZE) as u64
    }
}

/// Pages of the region holding `page` from `page` on (writes and pins stay in one region).
fn room(page: usize) -> usize {
    let first = REGIONS[0].1 / PAGE_SIZE;
    if page < first { first - page } else { usize::from(PAGES) - page }
}

fn layout() -> Vec<(GuestAddress, usize)> {
    REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect()
}

impl MemoryWorld {
    pub fn new() -> Result<Self, Violation> {
        let ram = GuestRam::new(&layout()).map_err(|e| Violation(format!("cannot create RAM: {e}")))?;
        let mut world = MemoryWorld::default();
        world.vms.push(Some(Vm::new(ram, vec![0; usize::from(PAGES) * PAGE_SIZE])));
        Ok(world)
    }

    /// Executes one step, then checks every invariant.
    pub fn apply(&mut self, step: &Step) -> Result<(), Violation> {
        self.execute(step)?;
        self.check()
    }

    fn execute(&mut self, step: &Step) -> Result<(), Violation> {
        let err = |what: &str, e: memory::MemoryError| Violation(format!("{what} failed: {e}"));
        match *step {
            Step::GuestWrite { vm, page, offset, len, byte } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                let page = usize::from(page) % usize::from(PAGES);
                let len = usize::from(len).min(room(page) * PAGE_SIZE - usize::from(offset));
                let start = page * PAGE_SIZE + usize::from(offset);
                let v = self.vms[vm].as_mut().expect("picked a live VM");
                v.ram
                    .write_slice(&vec![byte; len], GuestAddress(model_offset(page) + u64::from(offset)))
                    .map_err(|e| Violation(format!("guest write failed: {e}")))?;
                v.write(start, len, byte);
            }
            Step::DmaStart { vm, page, pages, write, pattern, chunk } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                let page = usize::from(page) % usize::from(PAGES);
                let len = usize::from(pages).min(room(page)) * PAGE_SIZE;
                let access = if write { Access::Write } else { Access::Read };
                let v = self.vms[vm].as_mut().expect("picked a live VM");
                let guard = v.ram.pin(GuestAddress(model_offset(page)), len, access).map_err(|e| err("pin", e))?;
                ensure!(v.ram.has_pinned(), "has_pinned is false after a pin");
                v.ever_pinned = true;
                let first = page * PAGE_SIZE;
                self.dmas.push(Dma { vm, guard: Some(guard), first, len, write, pattern, chunk: usize::from(chunk).max(1), done: 0 });
            }
            Step::DmaStep { dma } => self.dma_progress(dma, false)?,
            Step::DmaComplete { dma } => self.dma_progress(dma, true)?,
            Step::Unpin { dma } => {
                let Some(i) = pick(&self.dmas.iter().map(|d| d.guard.as_ref()).collect::<Vec<_>>(), dma) else { return Ok(()) };
                let d = &mut self.dmas[i];
                d.guard = None;
                if let Some(v) = self.vms.get_mut(d.vm).and_then(Option::as_mut) {
                    if d.write {
                        v.excused.extend(d.first / PAGE_SIZE..(d.first + d.len) / PAGE_SIZE);
                    }
                }
            }
            Step::Clone { vm } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                if self.vms.iter().flatten().count() >= MAX_VMS {
                    return Ok(());
                }
                let pinned = self.pinned_pages(vm).len() as u64;
                let v = self.vms[vm].as_ref().expect("picked a live VM");
                let before = v.ram.eager_copied_pages();
                let clone = v.ram.clone_cow().map_err(|e| err("clone", e))?;
                let copied = v.ram.eager_copied_pages() - before;
                let want = if v.ever_pinned { pinned } else { 0 };
                ensure!(copied == want, "clone copied {copied} pages eagerly, {want} were pinned");
                ensure!(!clone.has_pinned(), "a clone starts with has_pinned set");
                let dirty = clone.take_dirty();
                ensure!(dirty.is_empty(), "a clone starts with dirty pages {dirty:?}");
                let bytes = v.bytes.clone();
                self.vms.push(Some(Vm::new(clone, bytes)));
            }
            Step::Precopy { vm } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                let v = self.vms[vm].as_ref().expect("picked a live VM");
                let before = v.ram.eager_copied_pages();
                v.ram.precopy().map_err(|e| err("pre-copy", e))?;
                ensure!(v.ram.eager_copied_pages() == before, "a pre-copy round counted pinned pages as copied");
            }
            Step::Snapshot { vm } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                let v = self.vms[vm].as_ref().expect("picked a live VM");
                self.snaps.push((v.ram.snapshot().map_err(|e| err("snapshot", e))?, v.bytes.clone()));
            }
            Step::Restore { snap } => {
                if self.snaps.is_empty() || self.vms.iter().flatten().count() >= MAX_VMS {
                    return Ok(());
                }
                let (snap, bytes) = &self.snaps[usize::from(snap) % self.snaps.len()];
                let ram = GuestRam::from_snapshot(snap).map_err(|e| err("restore", e))?;
                self.vms.push(Some(Vm::new(ram, bytes.clone())));
            }
            Step::Reset { vm, snap } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                if self.snaps.is_empty() {
                    return Ok(());
                }
                let pinned = !self.pinned_pages(vm).is_empty();
                let (snap, bytes) = &self.snaps[usize::from(snap) % self.snaps.len()];
                let v = self.vms[vm].as_mut().expect("picked a live VM");
                match v.ram.reset_to(snap) {
                    Ok(()) => {
                        ensure!(!pinned, "reset went ahead while a DMA buffer was pinned");
                        v.bytes.clone_from(bytes);
                        v.dirty.clear();
                        v.excused.clear();
                    }
                    Err(memory::MemoryError::Pinned { .. }) => ensure!(pinned, "reset refused with nothing pinned"),
                    Err(e) => return Err(err("reset", e)),
                }
            }
            Step::DropVm { vm } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                self.vms[vm] = None;
            }
            Step::DropSnapshot { snap } => {
                if !self.snaps.is_empty() {
                    self.snaps.remove(usize::from(snap) % self.snaps.len());
                }
            }
            Step::TakeDirty { vm } => {
                let Some(vm) = pick(&self.vms, vm) else { return Ok(()) };
                let pinned = self.pinned_pages(vm);
                let v = self.vms[vm].as_mut().expect("picked a live VM");
                let got: BTreeSet<usize> = v.ram.take_dirty().into_iter().map(|a| model_page(a.0)).collect();
                let missed: Vec<_> = v.dirty.difference(&got).collect();
                ensure!(missed.is_empty(), "take_dirty missed written pages {missed:?}");
                let extra: Vec<_> = got.iter().filter(|p| !v.dirty.contains(p) && !v.excused.contains(p) && !pinned.contains(p)).collect();
                ensure!(extra.is_empty(), "take_dirty reported unwritten pages {extra:?}");
                v.dirty.clear();
                v.excused.clear();
            }
        }
        Ok(())
    }

    /// Moves one chunk (or all remaining) of a DMA through its guard.
    fn dma_progress(&mut self, dma: u8, all: bool) -> Result<(), Violation> {
        let Some(i) = pick(&self.dmas.iter().map(|d| d.guard.as_ref().filter(|_| d.done < d.len)).collect::<Vec<_>>(), dma)
        else {
            return Ok(());
        };
        let d = &mut self.dmas[i];
        let guard = d.guard.as_ref().expect("picked a pinned DMA");
        loop {
            let n = d.chunk.min(d.len - d.done);
            if d.write {
                guard.write_at(d.done, &vec![d.pattern; n]).map_err(|e| Violation(format!("DMA write failed: {e}")))?;
                if let Some(v) = self.vms.get_mut(d.vm).and_then(Option::as_mut) {
                    v.write(d.first + d.done, n, d.pattern);
                }
            } else if let Some(v) = self.vms.get(d.vm).and_then(Option::as_ref) {
                // A read pin must see exactly what its VM holds now.
                let mut buf = vec![0; n];
                guard.read_at(d.done, &mut buf).map_err(|e| Violation(format!("DMA read failed: {e}")))?;
                let want = &v.bytes[d.first + d.done..d.first + d.done + n];
                ensure!(buf == want, "a read-pinned buffer does not show its VM's bytes");
            }
            d.done += n;
            if !all || d.done == d.len {
                break;
            }
        }
        Ok(())
    }

    fn pinned_pages(&self, vm: usize) -> BTreeSet<usize> {
        self.dmas
            .iter()
            .filter(|d| d.vm == vm && d.guard.is_some())
            .flat_map(|d| d.first / PAGE_SIZE..(d.first + d.len) / PAGE_SIZE)
            .collect()
    }

    /// Every VM and snapshot holds exactly its model's bytes: isolation, clone-instant bytes,
    /// complete DMA in the right VM, immutable snapshots, no lost write.
    fn check(&self) -> Result<(), Violation> {
        let mut buf = vec![0u8; usize::from(PAGES) * PAGE_SIZE];
        for (i, v) in self.vms.iter().enumerate() {
            let Some(v) = v else { continue };
            read_all(&mut buf, |b, a| v.ram.read_slice(b, a).map_err(|e| e.to_string()))?;
            if let Some(page) = first_diff(&buf, &v.bytes) {
                return Err(Violation(format!("VM {i} differs from the model at page {page}")));
            }
        }
        for (i, (snap, bytes)) in self.snaps.iter().enumerate() {
            read_all(&mut buf, |b, a| snap.read_slice(b, a).map_err(|e| e.to_string()))?;
            if let Some(page) = first_diff(&buf, bytes) {
                return Err(Violation(format!("snapshot {i} changed at page {page}")));
            }
        }
        Ok(())
    }
}

impl Vm {
    fn new(ram: GuestRam, bytes: Vec<u8>) -> Self {
        Vm { ram, bytes, dirty: BTreeSet::new(), excused: BTreeSet::new(), ever_pinned: false }
    }

    fn write(&mut self, start: usize, len: usize, byte: u8) {
        self.bytes[start..start + len].fill(byte);
        self.dirty.extend(start / PAGE_SIZE..(start + len).div_ceil(PAGE_SIZE));
    }
}

fn model_page(addr: u64) -> usize {
    if addr >= REGIONS[1].0 {
        REGIONS[0].1 / PAGE_SIZE + ((addr - REGIONS[1].0) as usize) / PAGE_SIZE
    } else {
        addr as usize / PAGE_SIZE
    }
}

fn read_all(buf: &mut [u8], mut read: impl FnMut(&mut [u8], GuestAddress) -> Result<(), String>) -> Result<(), Violation> {
    let (a, b) = buf.split_at_mut(REGIONS[0].1);
    read(a, GuestAddress(REGIONS[0].0)).map_err(Violation)?;
    read(b, GuestAddress(REGIONS[1].0)).map_err(Violation)
}

/// The first page where the two differ (memcmp page by page: this runs after every step).
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.chunks(PAGE_SIZE).zip(b.chunks(PAGE_SIZE)).position(|(x, y)| x != y)
}
