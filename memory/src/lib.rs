//! Zygote's guest memory: RAM that clones copy-on-write the way fork() clones a process.
//!
//! The rules (see `docs/DESIGN.md`): a write reuses a page only when this VM is its sole owner;
//! pages pinned for DMA at a clone are copied eagerly into the clone and stay with the source;
//! a RAM that never pinned pays nothing for pins; a pin keeps its bytes alive; nothing in flight
//! is ever remapped or reset. This crate knows nothing of KVM: the VMM registers regions from
//! [`GuestRam::kvm_regions`] and feeds vCPU dirty bits through [`VcpuDirtyLog`].
//!
//! The contract is [`GuestRam`] (clone, freeze, pre-copy, snapshot, reset, pin, dirty pages,
//! statistics), [`PinGuard`], [`Snapshot`] (and its RAM files), their reports and
//! [`MemoryError`]. Images, stacks and mappings are how it is done, and stay inside.

mod blockset;
mod error;
mod file;
mod freeze;
mod image;
mod mapping;
#[cfg(feature = "model")]
pub mod model;
mod pages;
mod pin;
#[cfg(feature = "planted-bugs")]
pub mod planted;
mod ram;
mod region;
mod snapshot;
pub mod sparse;
mod stack;
mod stats;

pub use blockset::BlockSet;
pub use error::MemoryError;
pub use file::{FileKind, FileRun};
pub use freeze::{FreezeReport, PrecopyReport};
pub use pages::PAGE_SIZE;
pub use pin::{Access, PinGuard};
pub use ram::{GuestRam, KvmRegion, VcpuDirtyLog};
pub use region::RamRegion;
pub use snapshot::Snapshot;
pub use stats::MemoryStats;
pub use vm_memory::{Bytes, GuestAddress};
