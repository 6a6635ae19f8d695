//! virtio-blk: a file-backed, copy-on-write disk served asynchronously through io_uring.
//!
//! Every request pins its guest data buffers (`Access::Write` for reads from disk,
//! `Access::Read` for writes to disk) from submission until its completion is in the used
//! ring, so a clone made meanwhile gets an eager copy and the DMA lands, complete, in the
//! source. The requests in flight are part of the device state; a clone re-executes them
//! against its own RAM and disk.

mod completion;
mod core;
mod device;
pub mod disk;
mod frozen;
mod frozen_diff;
pub mod request;
mod uring;

use std::path::PathBuf;

pub use completion::BlockCompletions;
pub use device::{BlockArgs, BlockDevice, BlockState, BLOCK_QUEUE_SIZE};
pub use disk::{CowDisk, SECTOR_SIZE};
pub use frozen::FrozenDisk;
pub use request::{BlockRequest, RequestKind, Segment};

/// What went wrong opening a disk or serving one request; request errors become
/// VIRTIO_BLK_S_IOERR for the guest and the device keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path:?} has {len} bytes: it must be a non-zero multiple of 512")]
    DiskSize { path: PathBuf, len: u64 },
    #[error("cannot create or fill a copy-on-write overlay in {dir:?}")]
    Overlay {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("saved disk has {sectors} sectors, the VM's disk {disk_sectors}")]
    DiskMismatch { sectors: u64, disk_sectors: u64 },
    #[error("saved request at head {head} is invalid for this disk and queue: {reason}")]
    BadSavedRequest { head: u16, reason: String },
    #[error("captured queue state is invalid: {0}")]
    BadState(String),
    #[error("cannot set up io_uring")]
    Uring(#[source] std::io::Error),
    #[error("descriptor chain at head {head} loops, leaves the table or is unreadable")]
    BrokenChain { head: u16 },
    #[error("descriptor chain at head {head} has more than {max} descriptors")]
    ChainTooLong { head: u16, max: usize },
    #[error("descriptor chain at head {head} ends without a device-writable status byte")]
    NoStatus { head: u16 },
    #[error("request header of chain {head} has {len} bytes (write-only: {write_only}); it needs 16 readable bytes")]
    BadHeader { head: u16, len: u32, write_only: bool },
    #[error("buffer {addr:#x}+{len:#x} has the wrong direction (write-only: {write_only})")]
    WrongDirection { addr: u64, len: u32, write_only: bool },
    #[error("buffer {addr:#x} has length {len:#x}: segments need 1..={max:#x} bytes")]
    BadSegmentLength { addr: u64, len: u32, max: u32 },
    #[error("buffer {addr:#x}+{len:#x} is not inside guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    #[error("buffers at {first:#x} and {second:#x} overlap (each other or the queue rings)")]
    Overlap { first: u64, second: u64, len: u64 },
    #[error("request carries {bytes} data bytes: IN and OUT need a non-zero multiple of 512")]
    UnalignedLength { bytes: u64 },
    #[error("request carries {bytes} data bytes, more than {max}")]
    TooLarge { bytes: u64, max: u64 },
    #[error("{count} sectors at sector {sector} run past the disk end ({disk_sectors} sectors)")]
    PastDiskEnd { sector: u64, count: u64, disk_sectors: u64 },
    #[error("cannot pin a request buffer")]
    Pin(#[source] memory::MemoryError),
    #[error("disk I/O failed with result {result}")]
    Io { result: i32 },
}
