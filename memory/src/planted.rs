//! Bugs planted on purpose, so the fuzzer can prove it finds them (feature `planted-bugs`,
//! never in release artifacts). Each imitates a real failure of the fork/GUP history:
//!
//! - `wrong-way-cow`: at a clone the pinned page goes to the clone and the source keeps the
//!   copy, so DMA still in flight lands in the clone (the pre-2021 GUP-after-fork bug).
//! - `lost-dirty`: device (guard) writes are missing from `take_dirty`.
//! - `shared-pin`: pinned pages are shared with the clone instead of copied, so the source's
//!   DMA after the clone shows up in the clone too.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    WrongWayCow = 1,
    LostDirty = 2,
    SharedPin = 3,
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 3] = [PlantedBug::WrongWayCow, PlantedBug::LostDirty, PlantedBug::SharedPin];

    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::WrongWayCow => "wrong-way-cow",
            PlantedBug::LostDirty => "lost-dirty",
            PlantedBug::SharedPin => "shared-pin",
        }
    }

    pub fn from_name(name: &str) -> Option<PlantedBug> {
        PlantedBug::ALL.into_iter().find(|b| b.name() == name)
    }
}

static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Makes the whole memory layer of this process misbehave (None = behave).
pub fn plant(bug: Option<PlantedBug>) {
    ACTIVE.store(bug.map_or(0, |b| b as u8), Ordering::SeqCst);
}

pub(crate) fn active(bug: PlantedBug) -> bool {
    ACTIVE.load(Ordering::Relaxed) == bug as u8
}
