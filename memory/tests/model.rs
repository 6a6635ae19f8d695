//! Model-based test: random sequences of RAM operations checked, step by step, against the
//! reference model of the memory contract (`memory::model`, the one the fuzzer's memory mode
//! drives too).
//!
//! Writers: the host (`Bytes`, marks vm-memory's bitmap), devices through guards, the kernel
//! into pinned buffers (no bitmap), and vCPUs (raw writes reported only through a
//! `VcpuDirtyLog`, as KVM's dirty log does). Pre-copy rounds run between any of them.

use memory::model::{Checked, RamModel};
use memory::{Access, GuestAddress, PAGE_SIZE};
use proptest::prelude::*;

/// Two regions with a hole between them, so cross-region rules get exercised.
const REGIONS: [(u64, usize); 2] = [(0, 12 * PAGE_SIZE), (0x10_0000, 4 * PAGE_SIZE)];
const PAGES: usize = 16;
const MAX_VMS: usize = 6;

#[derive(Clone, Debug)]
enum Op {
    Write {
        vm: usize,
        page: usize,
        off: usize,
        len: usize,
        byte: u8,
    },
    /// A guest write: only the VM's vCPU dirty log learns of it.
    VcpuWrite {
        vm: usize,
        page: usize,
        off: usize,
        len: usize,
        byte: u8,
    },
    /// A pre-copy round while the VM "runs".
    Precopy {
        vm: usize,
    },
    Pin {
        vm: usize,
        page: usize,
        pages: usize,
        write: bool,
    },
    GuardWrite {
        guard: usize,
        off: usize,
        len: usize,
        byte: u8,
    },
    /// A write the kernel makes into a pinned buffer behind the VMM's back (io_uring, O_DIRECT).
    KernelDma {
        guard: usize,
        off: usize,
        len: usize,
        byte: u8,
    },
    Unpin {
        guard: usize,
    },
    Clone {
        vm: usize,
    },
    /// A clone in two steps, the source writing `page` in between (as it does once resumed).
    CloneSplit {
        vm: usize,
        page: usize,
        byte: u8,
    },
    Snapshot {
        vm: usize,
    },
    FromSnapshot {
        snap: usize,
    },
    Reset {
        vm: usize,
        snap: usize,
    },
    DropVm {
        vm: usize,
    },
    DropSnapshot {
        snap: usize,
    },
    TakeDirty {
        vm: usize,
    },
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

fn layout() -> Vec<(GuestAddress, usize)> {
    REGIONS.iter().map(|&(a, s)| (GuestAddress(a), s)).collect()
}

fn step(model: &mut RamModel, op: &Op) -> Checked {
    let live_pin = |model: &RamModel, i: usize| model.pick_pin(i, |p| p.live);
    match *op {
        Op::Write { vm, page, off, len, byte } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.host_write(vm, page, off, len, byte)
        }
        Op::VcpuWrite { vm, page, off, len, byte } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.vcpu_write(vm, page, off, len, byte)
        }
        Op::Precopy { vm } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.precopy(vm)
        }
        Op::Pin { vm, page, pages, write } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.pin(vm, page, pages, if write { Access::Write } else { Access::Read }).map(drop)
        }
        Op::GuardWrite { guard, off, len, byte } => {
            let Some(pin) = live_pin(model, guard) else { return Ok(()) };
            model.dma_write(pin, off, len, byte)
        }
        Op::KernelDma { guard, off, len, byte } => {
            let Some(pin) = live_pin(model, guard) else { return Ok(()) };
            model.kernel_dma(pin, off, len, byte)
        }
        Op::Unpin { guard } => {
            let Some(pin) = live_pin(model, guard) else { return Ok(()) };
            model.unpin(pin)
        }
        Op::Clone { vm } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.clone_vm(vm).map(drop)
        }
        Op::CloneSplit { vm, page, byte } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.clone_split(vm, page, byte).map(drop)
        }
        Op::Snapshot { vm } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.snapshot(vm).map(drop)
        }
        Op::FromSnapshot { snap } => {
            let Some(snap) = model.pick_snapshot(snap) else { return Ok(()) };
            model.restore(snap).map(drop)
        }
        Op::Reset { vm, snap } => {
            let (Some(vm), Some(snap)) = (model.pick_vm(vm), model.pick_snapshot(snap)) else { return Ok(()) };
            model.reset(vm, snap)
        }
        Op::DropVm { vm } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.drop_vm(vm)
        }
        Op::DropSnapshot { snap } => {
            if let Some(snap) = model.pick_snapshot(snap) {
                model.drop_snapshot(snap);
            }
            Ok(())
        }
        Op::TakeDirty { vm } => {
            let Some(vm) = model.pick_vm(vm) else { return Ok(()) };
            model.take_dirty(vm)
        }
    }
}

proptest! {
    // 256 cases × 32..96 steps ≈ 16 000 checked steps per run.
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn ram_matches_reference_model(ops in prop::collection::vec(op(), 32..96)) {
        let mut model = RamModel::new(&layout(), MAX_VMS).unwrap();
        for (i, op) in ops.iter().enumerate() {
            if let Err(violation) = step(&mut model, op).and_then(|()| model.check()) {
                prop_assert!(false, "step {i} ({op:?}): {violation}");
            }
        }
    }
}
