//! VM-mode steps: what a schedule does to real VMs, drawn from the same seeded generator as
//! memory mode. VMs and snapshots are named by index modulo the live ones, so any subsequence
//! of a schedule is still a schedule (for shrinking).

use serde::{Deserialize, Serialize};

use super::{DATA_PAGES, DISK_SECTORS};
use crate::fuzz::schedule::{run_rng, Entropy};

/// One step. Page numbers count from the start of the data area every VM's oracle models.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VmStep {
    /// The guest's vCPU fills `len` bytes at `offset` of data page `page` with `byte`.
    GuestWrite {
        vm: u8,
        page: u8,
        offset: u16,
        len: u16,
        byte: u8,
    },
    /// The VMM writes the same through its own mapping of guest RAM.
    HostWrite {
        vm: u8,
        page: u8,
        offset: u16,
        len: u16,
        byte: u8,
    },
    /// A DMA-engine transfer of `pages` pages of `pattern` to data page `page`, `chunk` bytes
    /// per step, programmed by the guest (MMIO exits) or by the VMM (the same registers).
    DmaStart {
        vm: u8,
        page: u8,
        pages: u8,
        pattern: u64,
        chunk: u16,
        by_guest: bool,
    },
    /// The same, copying `pages` pages from data page `src_page` (read-pinned: each chunk
    /// reads what the source holds at that step). Overlapping ranges are refused by the engine.
    DmaCopy {
        vm: u8,
        page: u8,
        pages: u8,
        src_page: u8,
        chunk: u16,
        by_guest: bool,
    },
    /// The engine writes one chunk (the last one unpins and completes).
    DmaStep {
        vm: u8,
    },
    /// The engine writes every remaining chunk.
    DmaComplete {
        vm: u8,
    },
    /// virtio-blk reads `sectors` sectors at `sector` into data page `page`; the request is
    /// pinned and queued but held from the kernel until `BlkComplete`.
    BlkRead {
        vm: u8,
        sector: u8,
        sectors: u8,
        page: u8,
    },
    /// virtio-blk writes `sectors` sectors of data page `page` at `sector` (held likewise).
    BlkWrite {
        vm: u8,
        sector: u8,
        sectors: u8,
        page: u8,
    },
    /// The VM's held requests go to the kernel; wait until all are in the used ring.
    BlkComplete {
        vm: u8,
    },
    /// `capture_clone` + build: a clone (of any depth), possibly mid-DMA or mid-request.
    Clone {
        vm: u8,
    },
    /// `VmSnapshot::take`.
    Snapshot {
        vm: u8,
    },
    /// `VmSnapshot::restore` into a new VM.
    Restore {
        snap: u8,
    },
    /// `VmSnapshot::reset`: refused while anything is pinned.
    Reset {
        vm: u8,
        snap: u8,
    },
    DropVm {
        vm: u8,
    },
    DropSnapshot {
        snap: u8,
    },
    /// `GuestRam::take_dirty`: every page written since the last call must be in it.
    TakeDirty {
        vm: u8,
    },
    /// A pre-copy round (`GuestRam::precopy`), as a live clone does before its pause: copies
    /// changed pages ahead, and pinned ones untrusted; no VM may see a byte of it.
    Precopy {
        vm: u8,
    },
}

/// Relative weights: DMA steps and clones dominate, since their timing is the point.
const WEIGHTS: [u64; 17] = [6, 3, 5, 10, 3, 4, 3, 4, 6, 3, 1, 3, 1, 1, 3, 3, 3];

/// Draws one step.
pub fn draw_vm_step(e: &mut impl Entropy) -> VmStep {
    let total: u64 = WEIGHTS.iter().sum();
    let mut pick = e.below(total);
    let kind = WEIGHTS
        .iter()
        .position(|&w| {
            if pick < w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .unwrap_or(0);
    let mut b = |n: u64| e.below(n);
    let pages = u64::from(DATA_PAGES);
    match kind {
        0 | 1 => {
            let (vm, page, offset, len, byte) =
                (b(8) as u8, b(pages) as u8, b(4096) as u16, 1 + b(6000) as u16, b(256) as u8);
            match kind {
                0 => VmStep::GuestWrite { vm, page, offset, len, byte },
                _ => VmStep::HostWrite { vm, page, offset, len, byte },
            }
        }
        2 => VmStep::DmaStart {
            vm: b(8) as u8,
            page: b(pages) as u8,
            pages: 1 + b(4) as u8,
            pattern: (1 + b(1 << 16)).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            chunk: 256 << b(5),
            by_guest: b(2) == 0,
        },
        3 => VmStep::DmaStep { vm: b(8) as u8 },
        4 => VmStep::DmaComplete { vm: b(8) as u8 },
        5 | 6 => {
            let (vm, sectors) = (b(8) as u8, 1 + b(8) as u8);
            let sector = b(DISK_SECTORS - u64::from(sectors) + 1) as u8;
            let page = b(pages) as u8;
            match kind {
                5 => VmStep::BlkRead { vm, sector, sectors, page },
                _ => VmStep::BlkWrite { vm, sector, sectors, page },
            }
        }
        7 => VmStep::BlkComplete { vm: b(8) as u8 },
        8 => VmStep::Clone { vm: b(8) as u8 },
        9 => VmStep::Snapshot { vm: b(8) as u8 },
        10 => VmStep::Restore { snap: b(8) as u8 },
        11 => VmStep::Reset { vm: b(8) as u8, snap: b(8) as u8 },
        12 => VmStep::DropVm { vm: b(8) as u8 },
        13 => VmStep::DropSnapshot { snap: b(8) as u8 },
        14 => VmStep::TakeDirty { vm: b(8) as u8 },
        16 => VmStep::Precopy { vm: b(8) as u8 },
        _ => VmStep::DmaCopy {
            vm: b(8) as u8,
            page: b(pages) as u8,
            pages: 1 + b(4) as u8,
            src_page: b(pages) as u8,
            chunk: 256 << b(5),
            by_guest: b(2) == 0,
        },
    }
}

/// The schedule of run `run` of a campaign seeded with `seed`: 8 to 39 steps (each costs a
/// real VM operation, so runs are shorter than memory mode's).
pub fn generate_vm(seed: u64, run: u64) -> Vec<VmStep> {
    let mut rng = run_rng(seed, run);
    let len = 8 + rng.below(32) as usize;
    (0..len).map(|_| draw_vm_step(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_vm_schedule_and_it_round_trips() {
        assert_eq!(generate_vm(1, 7), generate_vm(1, 7));
        assert_ne!(generate_vm(1, 7), generate_vm(1, 8));
        let s = generate_vm(3, 0);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Vec<VmStep>>(&json).unwrap(), s);
    }
}
