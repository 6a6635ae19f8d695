//! Schedules: the steps a fuzz run executes, drawn deterministically from a seed or decoded
//! from arbitrary bytes (cargo fuzz). Steps name VMs, DMAs and snapshots by index modulo the
//! number alive, so any subsequence of a schedule is still a valid schedule (for shrinking).

use serde::{Deserialize, Serialize};

/// One step. Indices are taken modulo the live objects of their kind; a step whose kind has
/// no live object is a no-op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// A guest (vCPU or host-side emulation) write of `len` bytes of `byte`.
    GuestWrite {
        vm: u8,
        page: u16,
        offset: u16,
        len: u16,
        byte: u8,
    },
    /// A device pins `pages` pages and starts a transfer of `pattern` in `chunk`-byte chunks
    /// (a DMA to memory when `write`, else a read of memory that must see the VM's writes).
    DmaStart {
        vm: u8,
        page: u16,
        pages: u8,
        write: bool,
        pattern: u8,
        chunk: u16,
    },
    /// The device moves one chunk.
    DmaStep {
        dma: u8,
    },
    /// The device moves every remaining chunk and signals completion.
    DmaComplete {
        dma: u8,
    },
    /// The device releases the buffer (unpin), whether or not the transfer finished.
    Unpin {
        dma: u8,
    },
    /// Clone a VM (of any depth) while its DMAs may be in flight.
    Clone {
        vm: u8,
    },
    Snapshot {
        vm: u8,
    },
    Restore {
        snap: u8,
    },
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
    TakeDirty {
        vm: u8,
    },
    /// A pre-copy round of a VM, which then goes on being written (and DMA'd into).
    Precopy {
        vm: u8,
    },
}

/// A deterministic generator (splitmix64): the same seed gives the same schedule everywhere.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Where steps get their numbers from: a seeded generator or fuzzer bytes.
pub trait Entropy {
    fn below(&mut self, n: u64) -> u64;
}

impl Entropy for SplitMix {
    fn below(&mut self, n: u64) -> u64 {
        SplitMix::below(self, n)
    }
}

/// Fuzzer input bytes; exhausted input reads as zeros, which ends the schedule.
pub struct ByteEntropy<'a>(pub &'a [u8]);

impl Entropy for ByteEntropy<'_> {
    fn below(&mut self, n: u64) -> u64 {
        let take = self.0.len().min(2);
        let (head, rest) = self.0.split_at(take);
        self.0 = rest;
        head.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)) % n
    }
}

/// Relative weights of the step kinds: DMA and clones dominate, since their timing is the point.
const WEIGHTS: [(u8, u64); 13] =
    [(0, 8), (1, 4), (2, 10), (3, 3), (4, 3), (5, 5), (6, 2), (7, 1), (8, 2), (9, 1), (10, 1), (11, 3), (12, 4)];

/// Draws one step for a RAM of `pages` pages.
pub fn draw_step(e: &mut impl Entropy, pages: u16) -> Step {
    let total: u64 = WEIGHTS.iter().map(|w| w.1).sum();
    let mut pick = e.below(total);
    let kind = WEIGHTS
        .iter()
        .find(|w| {
            if pick < w.1 {
                true
            } else {
                pick -= w.1;
                false
            }
        })
        .map_or(0, |w| w.0);
    let mut b = |n: u64| e.below(n);
    match kind {
        0 => Step::GuestWrite {
            vm: b(8) as u8,
            page: b(u64::from(pages)) as u16,
            offset: b(4096) as u16,
            len: 1 + b(6000) as u16,
            byte: b(256) as u8,
        },
        1 => Step::DmaStart {
            vm: b(8) as u8,
            page: b(u64::from(pages)) as u16,
            pages: 1 + b(3) as u8,
            write: b(4) != 0,
            pattern: b(256) as u8,
            chunk: 256 << b(5),
        },
        2 => Step::DmaStep { dma: b(8) as u8 },
        3 => Step::DmaComplete { dma: b(8) as u8 },
        4 => Step::Unpin { dma: b(8) as u8 },
        5 => Step::Clone { vm: b(8) as u8 },
        6 => Step::Snapshot { vm: b(8) as u8 },
        7 => Step::Restore { snap: b(8) as u8 },
        8 => Step::Reset { vm: b(8) as u8, snap: b(8) as u8 },
        9 => Step::DropVm { vm: b(8) as u8 },
        10 => Step::DropSnapshot { snap: b(8) as u8 },
        11 => Step::TakeDirty { vm: b(8) as u8 },
        _ => Step::Precopy { vm: b(8) as u8 },
    }
}

/// The generator of run `run` of a campaign seeded with `seed` (every mode draws from it).
pub fn run_rng(seed: u64, run: u64) -> SplitMix {
    SplitMix::new(seed ^ run.wrapping_mul(0xd134_2543_de82_ef95))
}

/// The schedule of run `run` of a campaign seeded with `seed`.
pub fn generate(seed: u64, run: u64, pages: u16) -> Vec<Step> {
    let mut rng = run_rng(seed, run);
    let len = 16 + rng.below(64) as usize;
    (0..len).map(|_| draw_step(&mut rng, pages)).collect()
}

/// A schedule from fuzzer bytes: steps until the input runs out (at most 256).
pub fn from_bytes(bytes: &[u8], pages: u16) -> Vec<Step> {
    let mut e = ByteEntropy(bytes);
    let mut steps = Vec::new();
    while !e.0.is_empty() && steps.len() < 256 {
        steps.push(draw_step(&mut e, pages));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(generate(1, 7, 40), generate(1, 7, 40));
        assert_ne!(generate(1, 7, 40), generate(1, 8, 40));
        let s = generate(3, 0, 40);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Step>>(&json).unwrap(), s);
    }
}
