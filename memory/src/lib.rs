//! Zygote's guest memory: RAM that clones copy-on-write the way fork() clones a process.
//!
//! The rules (see `docs/DESIGN.md`): a write reuses a page only when this VM is its sole owner;
//! pages pinned for DMA at a clone are copied eagerly into the clone and stay with the source;
//! a RAM that never pinned pays nothing for pins; a pin keeps its bytes alive; nothing in flight
//! is ever remapped or reset. This crate knows nothing of KVM: the VMM registers regions from
//! [`GuestRam::kvm_regions`] and feeds vCPU dirty bits through [`VcpuDirtyLog`].

mod cow;
mod error;
mod file;
mod image;
mod mapping;
mod pages;
mod pin;
mod precopy;
#[cfg(feature = "planted-bugs")]
pub mod planted;
mod ram;
mod region;
mod stats;

pub use cow::{FreezeReport, Snapshot, MAX_LAYER_RUNS};
pub use error::MemoryError;
pub use image::{Image, ImageStack, Layer};
pub use pages::{PageSet, PAGE_SIZE};
pub use pin::{Access, PinGuard};
pub use precopy::PrecopyReport;
pub use ram::{GuestRam, KvmRegion, VcpuDirtyLog};
pub use region::{GuestRegions, RamRegion};
pub use stats::MemoryStats;
pub use vm_memory::{Bytes, GuestAddress};
