//! virtio-net over a TAP interface, with the DMA rule virtio-blk keeps.
//!
//! Two queues (receive 0, transmit 1), the features a Firecracker guest expects (VERSION_1,
//! MAC, CSUM / GUEST_CSUM, GUEST and HOST TSO4 / TSO6 / UFO, MRG_RXBUF) plus STATUS, so a device
//! without a backend (a clone given no TAP of its own) shows its link down.
//!
//! The kernel copies frames straight between the TAP and guest RAM (`readv` / `writev` on
//! iovecs over pinned guest pages), the network analogue of DMA. Receive buffers are pinned
//! for write from the moment the device claims them until their used entry is published;
//! transmit buffers are pinned for read while the frame is read out. Everything the device
//! does runs under its lock, so a capture (which takes the lock) sees every request either not
//! started or in the saved state: `NetState` lists the chains popped and not published, and a
//! restored device gives the receive buffers back to its queue (to be filled again) and sends
//! the transmit request again, on its own TAP.
//!
//! Tests and the fuzzer drive a host-stepped device one stage at a time (`NetDevice::step_rx`,
//! `step_tx`: claim and pin, copy, publish), so a capture can fall between any two stages
//! without racing a thread.

mod chain;
mod core;
mod device;
mod events;
mod iovec;
mod mac;
mod persist;
mod rx;
pub mod tap;
mod tx;

pub use self::core::NetCounters;
pub use chain::{NetChain, Segment};
pub use device::{NetDevice, NetStep};
pub use events::NetTapEvents;
pub use mac::{MacAddr, MacParseError};
pub use persist::{NetArgs, NetState};
pub use tap::{Tap, TapError};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};

use crate::virtio::VIRTIO_F_VERSION_1;

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;
/// Largest size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Bytes of `virtio_net_hdr_v1` in front of every frame (VERSION_1: always with `num_buffers`).
pub const VNET_HDR_LEN: u32 = 12;
/// Largest frame with its header: a 64 KiB GSO payload, an Ethernet header and the virtio-net
/// header (the bound Firecracker uses too).
pub const MAX_FRAME_LEN: u32 = 65_562;
/// Smallest receive buffer without GSO offloads: the header and a 1514-byte Ethernet frame.
pub const MIN_RX_LEN: u32 = 1526;
/// Most descriptors in one chain (no indirect descriptors are offered).
pub const MAX_SEGMENTS: usize = 64;

/// What went wrong serving the device. Chain errors answer that chain (used length 0) and the
/// device keeps serving; state errors refuse a restore before anything is built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("TAP backend")]
    Tap(#[from] TapError),
    #[error("{queue} chain at head {head} leaves the descriptor table or is unreadable")]
    BrokenChain { queue: &'static str, head: u16 },
    #[error("{queue} chain at head {head} loops back to descriptor {index}")]
    ChainLoop { queue: &'static str, head: u16, index: u16 },
    #[error("{queue} chain at head {head} has more than {MAX_SEGMENTS} descriptors")]
    ChainTooLong { queue: &'static str, head: u16 },
    #[error("{queue} chain at head {head}: buffer {addr:#x}+{len:#x} is {found} (the device {wants} it)")]
    WrongDirection { queue: &'static str, head: u16, addr: u64, len: u32, found: &'static str, wants: &'static str },
    #[error("{queue} chain at head {head}: buffer {addr:#x} is empty")]
    EmptyBuffer { queue: &'static str, head: u16, addr: u64 },
    #[error("{queue} chain at head {head}: buffer {addr:#x}+{len:#x} is not inside guest RAM")]
    OutsideRam { queue: &'static str, head: u16, addr: u64, len: u32 },
    #[error("{queue} chain at head {head}: buffer {addr:#x}+{len:#x} overlaps a queue ring at {ring:#x}")]
    OverRing { queue: &'static str, head: u16, addr: u64, len: u32, ring: u64 },
    #[error("{queue} chain at head {head} holds {len} bytes, more than a frame ({MAX_FRAME_LEN})")]
    FrameTooLarge { queue: &'static str, head: u16, len: u64 },
    #[error("{queue} chain at head {head} holds {len} bytes, fewer than the {min} it needs")]
    TooShort { queue: &'static str, head: u16, len: u64, min: u32 },
    #[error("cannot pin buffer {addr:#x}+{len:#x} of chain {head}")]
    Pin {
        head: u16,
        addr: u64,
        len: u32,
        #[source]
        source: memory::MemoryError,
    },
    #[error("the driver's {queue} avail index jumped by more than the queue size")]
    AvailIndex { queue: &'static str },
    #[error("cannot write the used ring of the {queue} queue")]
    UsedRing { queue: &'static str },
    #[error("received frame of {len} bytes dropped: {reason}")]
    RxDropped { len: usize, reason: String },
    #[error("TAP {name} read or write failed")]
    TapIo {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TAP {name} went away (deleted or detached): link down")]
    TapGone { name: String },
    #[error("saved state refused: {field}: {reason}")]
    BadState { field: &'static str, reason: String },
    #[error("driver features {features:#x} include features the device does not offer ({offered:#x})")]
    BadFeatures { features: u64, offered: u64 },
}

/// The features a device with `mac` offers (the device offers them; a saved state is checked
/// against them).
pub(crate) fn offered_features(mac: Option<MacAddr>) -> u64 {
    let bits = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
    ];
    let mac_bit = mac.map_or(0, |_| 1u64 << VIRTIO_NET_F_MAC);
    bits.iter().fold(VIRTIO_F_VERSION_1 | mac_bit, |acc, &b| acc | 1u64 << b)
}

impl NetError {
    fn bad_state(field: &'static str, reason: impl Into<String>) -> NetError {
        NetError::BadState { field, reason: reason.into() }
    }
}
