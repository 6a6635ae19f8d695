//! `Persist`: how every device (and the VMM's vCPUs, irqchip and RAM layout) saves itself to a
//! typed state and is rebuilt from one. The shape is Firecracker's `snapshot/persist.rs`:
//! `save` reads, `restore` builds a new instance from host resources plus the saved state.
//!
//! The trait has no default methods: a device that forgets its state fails to compile instead
//! of silently saving nothing. Saved state holds guest values only (registers, guest physical
//! addresses, requests in flight), never host pointers or file descriptors, and is input:
//! `restore` checks every value against what it builds (queue rings and descriptors inside
//! guest RAM, sectors inside the disk) before anything runs, and answers a bad value with an
//! error naming the field, never a panic.
//!
//! Devices that write guest RAM on threads of their own (virtio-blk completions, the DMA engine,
//! network and vsock receive) hold their lock around every guest-RAM access they make
//! themselves and around every used-ring publication. DMA the kernel does on their behalf
//! (io_uring, a `readv` from a TAP into guest buffers) goes only into pinned pages, and its
//! request stays in the device's in-flight state until its used entry is published. A capture
//! made under that lock therefore sees the device and RAM at one instant: every page the kernel
//! may still write is pinned (so a clone copies it eagerly and the DMA lands in the source),
//! and every request not yet published is in the saved state (so a clone re-executes it). The
//! device manager holds every such lock across the whole capture and the RAM freeze.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A thing that can be saved to `State` and rebuilt from it.
pub trait Persist: Sized {
    /// The saved form: plain data, guest values only.
    type State: Serialize + DeserializeOwned;
    /// The host resources a restore needs (guest RAM, interrupt line, backend, ...).
    type ConstructorArgs;
    /// Why a saved state was refused or the restore failed.
    type Error: std::error::Error;

    /// Saves the state. The caller holds the device's lock, so the device changes nothing
    /// meanwhile. A device whose state cannot be read (a host resource failed) says why
    /// instead of saving something partial.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// A new instance from `args` in `state`, after checking every value of `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
