//! The DMA test engine: an MMIO device that writes guest memory asynchronously, chunk by chunk,
//! through a `PinGuard`, the way a real device's DMA would. A guest, a test or the fuzzer
//! programs it (source pattern or guest address, destination, length, chunk size, pacing);
//! tests step it deterministically, running VMs drive it from a background thread (unless it
//! is host-stepped: then only explicit `step` calls move a transfer, so the fuzzer decides
//! every chunk's instant).
//!
//! Its state, including the transfer in flight, is plain data with guest physical addresses;
//! a clone restarts the transfer from the beginning against its own RAM (the clone has the
//! destination bytes of the clone instant, possibly part-written).

use serde::{Deserialize, Serialize};

mod doorbell;
mod engine;
mod registers;
mod runner;

pub use engine::{DmaArgs, DmaEngine};
pub use registers::*;
pub use runner::DmaRunner;

/// The longest pause between two chunks, in microseconds (100 ms). The PACING register
/// saturates at it, `DmaEngine::start` and a restore refuse more: without a cap a guest could
/// ask ~71 minutes per chunk (a u32 of µs) and a snapshot file any value, holding pins that
/// long. The runner's pause is interruptible either way, so a stop never waits for it.
pub const MAX_PACING_US: u64 = 100_000;

/// Where a transfer's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DmaSource {
    /// The 8 little-endian bytes of this value, repeated (byte i of the transfer is byte
    /// `i % 8` of the pattern).
    Pattern(u64),
    /// Guest memory at this physical address.
    Guest(u64),
}

/// One transfer, as plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSpec {
    pub source: DmaSource,
    /// Destination guest physical address.
    pub dst: u64,
    pub len: u64,
    /// Bytes written per step.
    pub chunk: u64,
    /// Pause between steps when run by the background thread, in microseconds; at most
    /// `MAX_PACING_US`.
    pub pacing_us: u64,
}

/// The engine's state as plain data (guest physical addresses only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaState {
    /// What the registers are programmed with.
    pub programmed: TransferSpec,
    /// The transfer in flight at capture; a restored engine restarts it from byte 0.
    pub in_flight: Option<TransferSpec>,
    /// Bytes of the in-flight transfer done at capture (informational; the clone redoes all).
    pub progress: u64,
    pub completed: bool,
    pub error: u32,
    pub interrupt_status: u32,
    /// Transfers move only when `DmaEngine::step` is called (the fuzzer), never from the
    /// background runner; a clone's engine inherits it.
    pub host_stepped: bool,
}

/// Why a transfer could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("a transfer is already in flight ({done:#x} of {len:#x} bytes done)")]
    Busy { done: u64, len: u64 },
    #[error("transfer length {len:#x} or chunk size {chunk:#x} is zero")]
    Empty { len: u64, chunk: u64 },
    #[error("source {src:#x} and destination {dst:#x} overlap over {len:#x} bytes")]
    Overlap { src: u64, dst: u64, len: u64 },
    #[error("pacing of {pacing_us} µs per chunk is above the maximum of {max} µs", max = MAX_PACING_US)]
    Pacing { pacing_us: u64 },
    #[error("cannot pin {len:#x} bytes at {addr:#x}")]
    Pin {
        addr: u64,
        len: u64,
        #[source]
        source: memory::MemoryError,
    },
}

impl DmaError {
    /// The value the guest reads from the ERROR register.
    pub fn code(&self) -> u32 {
        match self {
            DmaError::Busy { .. } => 1,
            DmaError::Empty { .. } => 2,
            DmaError::Overlap { .. } => 3,
            DmaError::Pin { .. } => 4,
            DmaError::Pacing { .. } => 5,
        }
    }
}
