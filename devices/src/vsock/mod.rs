//! virtio-vsock in Firecracker's hybrid model: guest `AF_VSOCK` streams come out on the host as
//! `AF_UNIX` streams.
//!
//! - Host-initiated: a host program connects to `uds_path` and writes `CONNECT <port>\n`; the
//!   device sends the guest a REQUEST for that port and, when the guest accepts (RESPONSE),
//!   answers the host `OK <local port>\n`; from then on the stream carries the data.
//! - Guest-initiated: a guest REQUEST for host port P connects to `<uds_path>_P`.
//!
//! Packets are parsed with the rust-vmm `virtio-vsock` crate. Every connection has credit flow
//! control both ways (the guest may send at most the `buf_alloc` the device advertises beyond
//! the `fwd_cnt` it last reported, and the device reads from the host only what the guest's
//! credit allows), its own buffer for guest bytes the host has not taken yet, and timeouts for
//! requests the guest never answers and closes the host never finishes.
//!
//! DMA: an RX buffer is pinned for write from the first byte the device writes until its used
//! entry is published, a TX buffer is pinned for read while the device reads it. Both are
//! normally one call; in held mode (tests, the fuzzer) they stay in flight, pinned, until the
//! host releases them, so a capture can land in between. Buffers popped and not published are
//! in the saved state.
//!
//! Clone, snapshot and restore follow Firecracker: the restored device listens on its own
//! `uds_path`, starts with no connections, returns every buffer that was in flight at the
//! capture to the guest (used length 0: Linux drivers drop such buffers and refill), and sends
//! the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, which closes the guest's connections and keeps
//! its listeners. Until the guest has taken the event (it posts a fresh event buffer) nothing
//! goes to RX, so no packet of the new life can be overtaken by the reset. The VMM notifies
//! every queue on resume: a TX descriptor that was available but not processed at the capture
//! is served then, and with VIRTIO_RING_F_EVENT_IDX the device re-arms `avail_event`, without
//! which the guest would never notify TX again (Firecracker issue 5969).

mod connection;
mod device;
mod handshake;
mod muxer;
mod packet;
mod state;

use std::path::PathBuf;

pub use device::{VsockArgs, VsockDevice, VsockStats};
pub use muxer::{HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, REQUEST_TIMEOUT, SHUTDOWN_TIMEOUT};
pub use packet::{Header, PKT_HEADER_SIZE};
pub use state::VsockState;

/// Largest queue the device offers (each of the three).
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// The host's CID: the device answers for it.
pub const HOST_CID: u64 = 2;
/// The only socket type the device carries.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// The event-queue event that tells the guest its connections are gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Queue indices.
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;

/// Largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 << 10;
/// Bytes of guest data each connection buffers for a host that does not read: the
/// `buf_alloc` the device advertises.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;

/// What went wrong with a packet, a connection or a saved state. Packet errors are the
/// guest's: the buffer goes back to it and the device keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or too large: it must be in 3..{max}", max = u32::MAX)]
    BadCid(u64),
    #[error("cannot listen on {path:?}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the device's epoll set or timer")]
    Epoll(#[source] std::io::Error),
    #[error("descriptor chain at head {head} loops, leaves the table or is unreadable")]
    BrokenChain { head: u16 },
    #[error("descriptor chain at head {head} has {len} descriptors; a packet takes 1 or 2")]
    ChainTooLong { head: u16, len: usize },
    #[error("packet at head {head} is malformed: {source}")]
    BadPacket {
        head: u16,
        #[source]
        source: virtio_vsock::packet::Error,
    },
    #[error("packet from CID {src} to CID {dst}: the guest is CID {guest} and may only talk to the host (2)")]
    WrongCid { src: u64, dst: u64, guest: u64 },
    #[error("RX buffer at head {head} has no room for data")]
    NoRxRoom { head: u16 },
    #[error("event buffer at head {head} is not a device-writable buffer of 4 bytes or more inside guest RAM")]
    BadEventBuffer { head: u16 },
    #[error("cannot pin a packet buffer")]
    Pin(#[source] memory::MemoryError),
    #[error("the guest sent {len} bytes on {local}:{peer} with {credit} bytes of credit left")]
    CreditExceeded { local: u32, peer: u32, len: u32, credit: u32 },
    #[error("saved vsock state is invalid: {0}")]
    BadState(String),
}
