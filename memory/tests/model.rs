//! Model-based test: random sequences of RAM operations checked, step by step, against a plain
//! reference model (a byte vector per VM and per snapshot, a set of dirty pages per VM).
//!
//! Writers: the host (`Bytes`, marks vm-memory's bitmap), devices through guards, the kernel
//! into pinned buffers (no bitmap), and vCPUs (raw writes reported only through a
//! `VcpuDirtyLog`, as KVM's dirty log does). Pre-copy rounds run between any of them.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::FakeVcpuLog;
use memory::{Access, Bytes, GuestAddress, GuestRam, PinGuard, Snapshot, PAGE_SIZE};
use proptest::prelude::*;

/// Two regions with a hole between them, so cross-region rules get exercised.
const REGIONS: [(u64, usize); 2] = [(0, 12 * PAGE_SIZE), (0x10_0000, 4 * PAGE_SIZE)];
const PAGES: usize = 16;
const MAX_VMS: usize = 6;

/// Model page index → guest address.
fn page_addr(page: usize) -> u64 {
    if page < 12 {
        (page * PAGE_SIZE) as u64
    } else {
        0x10_0000 + ((page - 12) * PAGE_SIZE) as u64
    }
}

fn addr_page(addr: u64) -> usize {
    if addr >= 0x10_0000 {
        12 + ((addr - 0x10_0000) as usize) / PAGE_SIZE
    } else {
        addr as usize / PAGE_SIZE
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write { vm: usize, page: usize, off: usize, len: usize, byte: u8 },
    /// A guest write: only the VM's vCPU dirty log learns of it.
    VcpuWrite { vm: usize, page: usize, off: usize, len: usize, byte: u8 },
    /// A pre-copy round while the VM "runs".
    Precopy { vm: usize },
    Pin { vm: usize, page: usize, pages: usize, write: bool },
    GuardWrite { guard: usize, off: usize, len: usize, byte: u8 },
    /// A write the kernel makes into a pinned buffer behind the VMM's back (io_uring, O_DIRECT).
    KernelDma { guard: usize, off: usize, len: usize, byte: u8 },
    Unpin { guard: usize },
    Clone { vm: usize },
    /// A clone in two steps, the source writing `page` in between (as it does once resumed).
    CloneSplit { vm: usize, page: usize, byte: u8 },
    Snapshot { vm: usize },
    FromSnapshot { snap: usize },
    Reset { vm: usize, snap: usize },
    DropVm { vm: usize },
    DropSnapshot { snap: usize },
    TakeDirty { vm: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let idx = 0..8usize;
    prop_oneof![
        6 => (idx.clone(), 0..PAGES, 0..PAGE_SIZE, 1..6000usize, any::<u8>())
            .prop_map(|(vm, page, off, len, byte)| Op::Write { vm, page, off, len, byte }),
        4 => (idx.clone(), 0..PAGES, 0..PAGE_SIZE, 1..6000usize, any::<u8>())
            .prop_map(|(vm, page, off, len, byte)| Op::VcpuWrite { vm, page, off, len, byte }),
        4 => idx.clone().prop_map(|vm| Op::Precopy { vm }),
        2 => (idx.clone(), 0..PAGES, 1..3usize, any::<bool>()).prop_map(|(vm, page, pages, write)| Op::Pin { vm, page, pages, write }),
        4 => (idx.clone(), 0..8192usize, 1..3000usize, any::<u8>()).prop_map(|(guard, off, len, byte)| Op::GuardWrite { guard, off, len, byte }),
        2 => (idx.clone(), 0..8192usize, 1..3000usize, any::<u8>()).prop_map(|(guard, off, len, byte)| Op::KernelDma { guard, off, len, byte }),
        2 => idx.clone().prop_map(|guard| Op::Unpin { guard }),
        2 => idx.clone().prop_map(|vm| Op::Clone { vm }),
        2 => (idx.clone(), 0..PAGES, any::<u8>()).prop_map(|(vm, page, byte)| Op::CloneSplit { vm, page, byte }),
        2 => idx.clone().prop_map(|vm| Op::Snapshot { vm }),
        1 => idx.clone().prop_map(|snap| Op::FromSnapshot { snap }),
        2 => (idx.clone(), idx.clone()).prop_map(|(vm, snap)| Op::Reset { vm, snap }),
        1 => idx.clone().prop_map(|vm| Op::DropVm { vm }),
        1 => idx.clone().prop_map(|snap| Op::DropSnapshot { snap }),
        2 => idx.prop_map(|vm| Op::TakeDirty { vm }),
    ]
}

struct Vm {
    ram: GuestRam,
    vcpu_log: Arc<FakeVcpuLog>,
    bytes: Vec<u8>,
    /// Pages written since the last take_dirty (model of the must-report set).
    dirty: BTreeSet<usize>,
    /// Pages whose write pins ended since the last take_dirty (may be reported).
    unpinned: BTreeSet<usize>,
    ever_pinned: bool,
}

struct Guard {
    vm: Option<usize>, // None once its VM was dropped
    ghost: usize,      // index into World::ghosts once orphaned
    guard: PinGuard,
    first: usize,
    pages: usize,
    write: bool,
}

#[derive(Default)]
struct World {
    vms: Vec<Option<Vm>>,
    snaps: Vec<(Snapshot, Vec<u8>)>,
    guards: Vec<Guard>,
    /// Bytes of dropped VMs that guards still hold (shared by all guards of that VM).
    ghosts: Vec<Vec<u8>>,
}

fn new_vm(ram: GuestRam, bytes: Vec<u8>) -> Vm {
    let vcpu_log = Arc::new(FakeVcpuLog::new(REGIONS.len()));
    ram.set_vcpu_dirty_log(vcpu_log.clone());
    Vm { ram, vcpu_log, bytes, dirty: BTreeSet::new(), unpinned: BTreeSet::new(), ever_pinned: false }
}

fn layout() -> Vec<(GuestAddress, usize)> {
    REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect()
}

fn live(world: &World, i: usize) -> Option<usize> {
    let live: Vec<usize> = (0..world.vms.len()).filter(|&j| world.vms[j].is_some()).collect();
    (!live.is_empty()).then(|| live[i % live.len()])
}

fn pinned_pages(world: &World, vm: usize) -> BTreeSet<usize> {
    world.guards.iter().filter(|g| g.vm == Some(vm)).flat_map(|g| g.first..g.first + g.pages).collect()
}

/// Writes `len` bytes at model offset `pos` (bytes straddling into the hole are clipped to a page run).
fn clip(page: usize, off: usize, len: usize) -> (usize, usize) {
    // Stay inside the region holding `page`.
    let region_end = if page < 12 { 12 } else { PAGES };
    let start = page * PAGE_SIZE + off;
    let end = (start + len).min(region_end * PAGE_SIZE);
    (start, end - start)
}

fn step(world: &mut World, op: &Op) {
    match *op {
        Op::Write { vm, page, off, len, byte } => {
            let Some(vm) = live(world, vm) else { return };
            let (start, len) = clip(page, off, len);
            let v = world.vms[vm].as_mut().unwrap();
            v.ram.write_slice(&vec![byte; len], GuestAddress(page_addr(start / PAGE_SIZE) + (start % PAGE_SIZE) as u64)).unwrap();
            v.bytes[start..start + len].fill(byte);
            v.dirty.extend(start / PAGE_SIZE..(start + len).div_ceil(PAGE_SIZE));
        }
        Op::VcpuWrite { vm, page, off, len, byte } => {
            let Some(vm) = live(world, vm) else { return };
            let (start, len) = clip(page, off, len);
            let v = world.vms[vm].as_mut().unwrap();
            let (region, region_page) = if page < 12 { (0, 0) } else { (1, 12) };
            let host = v.ram.kvm_regions()[region].userspace_addr as *mut u8;
            // SAFETY: the range lies inside region `region` (clipped above), which the RAM keeps
            // mapped read-write at this host address; nothing else accesses it concurrently.
            unsafe { std::ptr::write_bytes(host.add(start - region_page * PAGE_SIZE), byte, len) };
            for p in start / PAGE_SIZE..(start + len).div_ceil(PAGE_SIZE) {
                v.vcpu_log.mark(region, p - region_page);
            }
            v.bytes[start..start + len].fill(byte);
            v.dirty.extend(start / PAGE_SIZE..(start + len).div_ceil(PAGE_SIZE));
        }
        Op::Precopy { vm } => {
            let Some(vm) = live(world, vm) else { return };
            let v = world.vms[vm].as_ref().unwrap();
            let before = v.ram.eager_copied_pages();
            v.ram.precopy().unwrap();
            assert_eq!(v.ram.eager_copied_pages(), before, "pre-copy counted pinned pages as copied");
        }
        Op::Pin { vm, page, pages, write } => {
            let Some(vm) = live(world, vm) else { return };
            let region_end = if page < 12 { 12 } else { PAGES };
            let pages = pages.min(region_end - page);
            let v = world.vms[vm].as_mut().unwrap();
            let access = if write { Access::Write } else { Access::Read };
            let guard = v.ram.pin(GuestAddress(page_addr(page)), pages * PAGE_SIZE, access).unwrap();
            assert!(v.ram.has_pinned());
            v.ever_pinned = true;
            world.guards.push(Guard { vm: Some(vm), ghost: 0, guard, first: page, pages, write });
        }
        Op::GuardWrite { guard, off, len, byte } => {
            if world.guards.is_empty() {
                return;
            }
            let n = world.guards.len();
            let g = &mut world.guards[guard % n];
            let glen = g.pages * PAGE_SIZE;
            let result = g.guard.write_at(off, &vec![byte; len]);
            if !g.write {
                assert!(result.is_err(), "a read-only pin accepted a DMA write");
                return;
            }
            if off + len > glen {
                assert!(result.is_err(), "guard accepted a write past its end");
                return;
            }
            result.unwrap();
            record_device_write(world, guard % n, off, len, byte);
        }
        Op::KernelDma { guard, off, len, byte } => {
            let n = world.guards.len();
            let Some(g) = world.guards.get_mut(guard % n.max(1)) else { return };
            if !g.write || off + len > g.pages * PAGE_SIZE {
                return;
            }
            // SAFETY: the guard pins pages*4096 bytes at host_ptr and keeps them mapped.
            unsafe { std::ptr::write_bytes(g.guard.host_ptr().add(off), byte, len) };
            // Invisible to the VMM's bitmaps, yet take_dirty must report it (pinned, then unpinned).
            record_device_write(world, guard % n, off, len, byte);
        }
        Op::Unpin { guard } => {
            if world.guards.is_empty() {
                return;
            }
            let g = world.guards.remove(guard % world.guards.len());
            if let (Some(vm), true) = (g.vm, g.write) {
                world.vms[vm].as_mut().unwrap().unpinned.extend(g.first..g.first + g.pages);
            }
        }
        Op::Clone { vm } => {
            let Some(vm) = live(world, vm) else { return };
            if world.vms.iter().flatten().count() >= MAX_VMS {
                return;
            }
            let pinned = pinned_pages(world, vm).len() as u64;
            let v = world.vms[vm].as_ref().unwrap();
            let before = v.ram.stats().eager_copied_pages;
            let clone = v.ram.clone_cow().unwrap();
            let copied = v.ram.stats().eager_copied_pages - before;
            if v.ever_pinned {
                assert_eq!(copied, pinned, "eager copies must be exactly the pinned pages");
            } else {
                assert_eq!(copied, 0, "a RAM that never pinned copied eagerly");
            }
            assert!(!clone.has_pinned());
            assert!(clone.take_dirty().is_empty(), "a clone starts clean");
            let bytes = v.bytes.clone();
            world.vms.push(Some(new_vm(clone, bytes)));
        }
        Op::CloneSplit { vm, page, byte } => {
            let Some(vm) = live(world, vm) else { return };
            if world.vms.iter().flatten().count() >= MAX_VMS {
                return;
            }
            let v = world.vms[vm].as_mut().unwrap();
            let (frozen, _) = v.ram.freeze().unwrap();
            let bytes = v.bytes.clone();
            v.ram.write_slice(&[byte; 8], GuestAddress(page_addr(page))).unwrap();
            v.bytes[page * PAGE_SIZE..page * PAGE_SIZE + 8].fill(byte);
            v.dirty.insert(page);
            let clone = v.ram.clone_from_frozen(&frozen).unwrap();
            assert!(clone.take_dirty().is_empty(), "a clone starts clean");
            world.vms.push(Some(new_vm(clone, bytes)));
        }
        Op::Snapshot { vm } => {
            let Some(vm) = live(world, vm) else { return };
            let v = world.vms[vm].as_ref().unwrap();
            let snap = v.ram.snapshot().unwrap();
            world.snaps.push((snap, v.bytes.clone()));
        }
        Op::FromSnapshot { snap } => {
            if world.snaps.is_empty() || world.vms.iter().flatten().count() >= MAX_VMS {
                return;
            }
            let (snap, bytes) = &world.snaps[snap % world.snaps.len()];
            let ram = GuestRam::from_snapshot(snap).unwrap();
            assert!(!ram.has_pinned());
            assert!(ram.take_dirty().is_empty());
            world.vms.push(Some(new_vm(ram, bytes.clone())));
        }
        Op::Reset { vm, snap } => {
            let Some(vm) = live(world, vm) else { return };
            if world.snaps.is_empty() {
                return;
            }
            let pinned = !pinned_pages(world, vm).is_empty();
            let (snap, bytes) = &world.snaps[snap % world.snaps.len()];
            let v = world.vms[vm].as_mut().unwrap();
            match v.ram.reset_to(snap) {
                Ok(()) => {
                    assert!(!pinned, "reset succeeded while pinned");
                    v.bytes = bytes.clone();
                    v.dirty.clear();
                    v.unpinned.clear();
                }
                Err(memory::MemoryError::Pinned { .. }) => assert!(pinned, "reset refused without pins"),
                Err(e) => panic!("reset failed: {e}"),
            }
        }
        Op::DropVm { vm } => {
            let Some(vm) = live(world, vm) else { return };
            let v = world.vms[vm].take().unwrap();
            world.ghosts.push(v.bytes);
            for g in world.guards.iter_mut().filter(|g| g.vm == Some(vm)) {
                g.vm = None;
                g.ghost = world.ghosts.len() - 1;
            }
        }
        Op::DropSnapshot { snap } => {
            if !world.snaps.is_empty() {
                world.snaps.remove(snap % world.snaps.len());
            }
        }
        Op::TakeDirty { vm } => {
            let Some(vm) = live(world, vm) else { return };
            let pinned = pinned_pages(world, vm);
            let v = world.vms[vm].as_mut().unwrap();
            let got: BTreeSet<usize> = v.ram.take_dirty().into_iter().map(|a| addr_page(a.0)).collect();
            assert!(v.dirty.is_subset(&got), "missed dirty pages {:?}", v.dirty.difference(&got).collect::<Vec<_>>());
            let allowed: BTreeSet<usize> = v.dirty.union(&pinned).chain(v.unpinned.iter()).copied().collect();
            assert!(got.is_subset(&allowed), "reported clean pages {:?}", got.difference(&allowed).collect::<Vec<_>>());
            v.dirty.clear();
            v.unpinned.clear();
        }
    }
}

/// A device wrote `len` bytes of `byte` at `off` of guard `index`: its VM (or, once the VM is
/// gone, the ghost its guards keep) holds them, and the VM must report the pages dirty.
fn record_device_write(world: &mut World, index: usize, off: usize, len: usize, byte: u8) {
    let g = &world.guards[index];
    let start = g.first * PAGE_SIZE + off;
    match g.vm {
        Some(vm) => {
            let v = world.vms[vm].as_mut().unwrap();
            v.bytes[start..start + len].fill(byte);
            v.dirty.extend(start / PAGE_SIZE..(start + len).div_ceil(PAGE_SIZE));
        }
        None => world.ghosts[g.ghost][start..start + len].fill(byte),
    }
}

/// Every VM, snapshot and orphaned guard holds exactly the model's bytes.
fn check(world: &World) {
    let mut buf = vec![0u8; PAGES * PAGE_SIZE];
    for (i, v) in world.vms.iter().enumerate() {
        let Some(v) = v else { continue };
        read_all(|b, a| v.ram.read_slice(b, a).unwrap(), &mut buf);
        assert!(buf == v.bytes, "VM {i} differs from its model at page {}", first_diff(&buf, &v.bytes));
    }
    for (i, (snap, bytes)) in world.snaps.iter().enumerate() {
        read_all(|b, a| snap.read_slice(b, a).unwrap(), &mut buf);
        assert!(buf == *bytes, "snapshot {i} changed at page {}", first_diff(&buf, bytes));
    }
    for g in world.guards.iter().filter(|g| g.vm.is_none()) {
        let mut b = vec![0u8; g.pages * PAGE_SIZE];
        g.guard.read_at(0, &mut b).unwrap();
        let want = &world.ghosts[g.ghost][g.first * PAGE_SIZE..(g.first + g.pages) * PAGE_SIZE];
        assert!(b == want, "an orphaned guard's bytes changed");
    }
}

fn read_all(mut read: impl FnMut(&mut [u8], GuestAddress), buf: &mut [u8]) {
    read(&mut buf[..12 * PAGE_SIZE], GuestAddress(0));
    read(&mut buf[12 * PAGE_SIZE..], GuestAddress(0x10_0000));
}

fn first_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0) / PAGE_SIZE
}

proptest! {
    // 256 cases × 32..96 steps ≈ 16 000 checked steps per run.
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn ram_matches_reference_model(ops in prop::collection::vec(op(), 32..96)) {
        let mut world = World::default();
        world.vms.push(Some(new_vm(GuestRam::new(&layout()).unwrap(), vec![0; PAGES * PAGE_SIZE])));
        for op in &ops {
            step(&mut world, op);
            check(&world);
        }
    }
}
