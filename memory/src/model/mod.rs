//! The reference model of the memory contract (feature `model`, for tests and fuzzers).
//!
//! `RamModel` drives real `GuestRam`s, pin guards and snapshots and keeps, beside each, what
//! the rules of `docs/DESIGN.md` say it must hold: a byte vector per VM, per snapshot and per
//! VM that pins outlived, and the pages each VM must (and may) report dirty. Every step checks
//! what it can on the spot (eager copies, refused resets, guard errors, dirty sets); `check`
//! compares every byte. The proptest suite (`memory/tests/model.rs`) and the fuzzer's memory
//! mode drive it with their own step types, resolving their indices with `pick_vm`, `pick_pin`
//! and `pick_snapshot`.
//!
//! Pages are numbered across the regions, in layout order ("model pages"); a write or a pin
//! never crosses the end of the region holding its first page.

mod steps;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;

use crate::pages::PAGE_SIZE;
use crate::{Bytes, GuestRam, PinGuard, Snapshot, VcpuDirtyLog};

/// A broken rule, saying which and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelViolation(pub String);

/// The result of a model step: a rule held, or the violation.
pub type Checked<T = ()> = Result<T, ModelViolation>;

/// Fails the step with `format!(...)` unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::model::ModelViolation(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

/// A vCPU dirty log the model writes into, standing in for KVM's: `mark` is what KVM does
/// when a vCPU writes a page, `fetch` returns and clears the bits (bit i = page i of a region).
#[derive(Debug, Default)]
pub struct ScriptedVcpuLog {
    regions: Mutex<Vec<Vec<u64>>>,
}

impl ScriptedVcpuLog {
    pub fn mark(&self, region: usize, page: usize) {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        if regions.len() <= region {
            regions.resize(region + 1, Vec::new());
        }
        let words = &mut regions[region];
        if words.len() <= page / 64 {
            words.resize(page / 64 + 1, 0);
        }
        words[page / 64] |= 1 << (page % 64);
    }
}

impl VcpuDirtyLog for ScriptedVcpuLog {
    fn fetch(&self, index: usize, _pages: usize) -> std::io::Result<Vec<u64>> {
        Ok(self
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(index)
            .map(std::mem::take)
            .unwrap_or_default())
    }
}

/// One VM and what it must hold.
struct ModelVm {
    ram: GuestRam,
    vcpu_log: Arc<ScriptedVcpuLog>,
    bytes: Vec<u8>,
    /// Pages written since the last take_dirty: all must be reported.
    dirty: BTreeSet<usize>,
    /// Pages that may be reported besides (write-pinned since the last take_dirty).
    excused: BTreeSet<usize>,
    ever_pinned: bool,
}

/// One pin, live or ended, and whose bytes it holds.
struct ModelPin {
    /// Its VM, or `None` once the VM was dropped (the guard then keeps `ghost` alive).
    vm: Option<usize>,
    ghost: usize,
    /// `None` once unpinned.
    guard: Option<PinGuard>,
    first: usize,
    pages: usize,
    write: bool,
}

/// A pin as callers see it when picking one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinInfo {
    pub live: bool,
    pub write: bool,
    pub len: usize,
}

/// The VMs, snapshots and pins of one run, with what each must hold.
pub struct RamModel {
    layout: Vec<(GuestAddress, usize)>,
    max_vms: usize,
    vms: Vec<Option<ModelVm>>,
    snaps: Vec<(Snapshot, Vec<u8>)>,
    pins: Vec<ModelPin>,
    /// Bytes of dropped VMs that pins still hold (shared by all pins of that VM).
    ghosts: Vec<Vec<u8>>,
}

impl RamModel {
    /// One fresh VM of `layout`; clones and restores stop at `max_vms` live VMs.
    pub fn new(layout: &[(GuestAddress, usize)], max_vms: usize) -> Checked<RamModel> {
        let ram = GuestRam::new(layout).map_err(|e| ModelViolation(format!("cannot create RAM: {e}")))?;
        let layout = ram.layout();
        let pages = layout.iter().map(|r| r.1 / PAGE_SIZE).sum::<usize>();
        let mut model =
            RamModel { layout, max_vms, vms: Vec::new(), snaps: Vec::new(), pins: Vec::new(), ghosts: Vec::new() };
        model.add_vm(ram, vec![0; pages * PAGE_SIZE]);
        Ok(model)
    }

    /// Model pages of all regions.
    pub fn pages(&self) -> usize {
        self.layout.iter().map(|r| r.1 / PAGE_SIZE).sum()
    }

    /// The region holding model page `page` (modulo the page count): (index, its first model
    /// page, its page count).
    fn region_of(&self, page: usize) -> (usize, usize, usize) {
        let page = page % self.pages();
        let mut first = 0;
        for (index, &(_, size)) in self.layout.iter().enumerate() {
            if page < first + size / PAGE_SIZE {
                return (index, first, size / PAGE_SIZE);
            }
            first += size / PAGE_SIZE;
        }
        unreachable!("page {page} is below the page count")
    }

    /// Pages from `page` to the end of its region.
    pub fn room(&self, page: usize) -> usize {
        let (_, first, count) = self.region_of(page);
        first + count - page % self.pages()
    }

    /// The guest address of model page `page`.
    pub fn page_addr(&self, page: usize) -> GuestAddress {
        let (index, first, _) = self.region_of(page);
        GuestAddress(self.layout[index].0 .0 + ((page % self.pages() - first) * PAGE_SIZE) as u64)
    }

    /// The model page of a guest address inside the layout.
    fn page_of(&self, addr: GuestAddress) -> Option<usize> {
        let mut first = 0;
        for &(start, size) in &self.layout {
            if addr >= start && addr.0 < start.0 + size as u64 {
                return Some(first + ((addr.0 - start.0) as usize) / PAGE_SIZE);
            }
            first += size / PAGE_SIZE;
        }
        None
    }

    /// Live VMs.
    pub fn live_vms(&self) -> usize {
        self.vms.iter().flatten().count()
    }

    /// The live VM `i` picks: the (i mod live)-th, in creation order.
    pub fn pick_vm(&self, i: usize) -> Option<usize> {
        pick((0..self.vms.len()).filter(|&j| self.vms[j].is_some()), i)
    }

    /// The snapshot `i` picks, if there is any.
    pub fn pick_snapshot(&self, i: usize) -> Option<usize> {
        (!self.snaps.is_empty()).then(|| i % self.snaps.len())
    }

    /// The pin `i` picks among those `wanted` accepts, in creation order.
    pub fn pick_pin(&self, i: usize, wanted: impl Fn(PinInfo) -> bool) -> Option<usize> {
        pick((0..self.pins.len()).filter(|&j| wanted(self.pin_info(j))), i)
    }

    pub fn pin_info(&self, pin: usize) -> PinInfo {
        let p = &self.pins[pin];
        PinInfo { live: p.guard.is_some(), write: p.write, len: p.pages * PAGE_SIZE }
    }

    /// Model pages pinned now in VM `vm`.
    pub fn pinned_pages(&self, vm: usize) -> BTreeSet<usize> {
        self.pins
            .iter()
            .filter(|p| p.vm == Some(vm) && p.guard.is_some())
            .flat_map(|p| p.first..p.first + p.pages)
            .collect()
    }

    fn add_vm(&mut self, ram: GuestRam, bytes: Vec<u8>) -> usize {
        let vcpu_log = Arc::new(ScriptedVcpuLog::default());
        ram.set_vcpu_dirty_log(vcpu_log.clone());
        let vm = ModelVm { ram, vcpu_log, bytes, dirty: BTreeSet::new(), excused: BTreeSet::new(), ever_pinned: false };
        self.vms.push(Some(vm));
        self.vms.len() - 1
    }

    fn vm(&mut self, vm: usize) -> Checked<&mut ModelVm> {
        self.vms.get_mut(vm).and_then(Option::as_mut).ok_or_else(|| ModelViolation(format!("VM {vm} is not live")))
    }

    /// Every VM, snapshot and orphaned pin holds exactly its model's bytes: isolation,
    /// clone-instant bytes, complete DMA in the right VM, immutable snapshots, no lost write.
    pub fn check(&self) -> Checked {
        let mut buf = vec![0u8; self.pages() * PAGE_SIZE];
        for (i, v) in self.vms.iter().enumerate() {
            let Some(v) = v else { continue };
            self.read_all(&mut buf, |b, a| v.ram.read_slice(b, a).map_err(|e| e.to_string()))?;
            if let Some(page) = first_diff(&buf, &v.bytes) {
                return Err(ModelViolation(format!("VM {i} differs from the model at page {page}")));
            }
        }
        for (i, (snap, bytes)) in self.snaps.iter().enumerate() {
            self.read_all(&mut buf, |b, a| snap.read_slice(b, a).map_err(|e| e.to_string()))?;
            if let Some(page) = first_diff(&buf, bytes) {
                return Err(ModelViolation(format!("snapshot {i} changed at page {page}")));
            }
        }
        for p in self.pins.iter().filter(|p| p.vm.is_none()) {
            let Some(guard) = &p.guard else { continue };
            let mut got = vec![0u8; p.pages * PAGE_SIZE];
            guard.read_at(0, &mut got).map_err(|e| ModelViolation(format!("orphaned guard read failed: {e}")))?;
            let want = &self.ghosts[p.ghost][p.first * PAGE_SIZE..(p.first + p.pages) * PAGE_SIZE];
            ensure!(got == want, "an orphaned guard's bytes changed (a pin must keep its bytes alive)");
        }
        Ok(())
    }

    /// Reads every region of the layout into `buf` (model page order).
    fn read_all(&self, buf: &mut [u8], mut read: impl FnMut(&mut [u8], GuestAddress) -> Result<(), String>) -> Checked {
        let mut at = 0;
        for &(start, size) in &self.layout {
            read(&mut buf[at..at + size], start).map_err(ModelViolation)?;
            at += size;
        }
        Ok(())
    }
}

fn pick(candidates: impl Iterator<Item = usize>, i: usize) -> Option<usize> {
    let live: Vec<usize> = candidates.collect();
    (!live.is_empty()).then(|| live[i % live.len()])
}

/// The first page where the two differ (memcmp page by page: this runs after every step).
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.chunks(PAGE_SIZE).zip(b.chunks(PAGE_SIZE)).position(|(x, y)| x != y)
}
