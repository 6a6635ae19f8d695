//! One descriptor chain turned into a validated list of guest buffers, as plain data (guest
//! physical addresses only) so chains in flight can be saved and checked again on restore.
//!
//! Everything here is guest input: a loop, a `next` past the table, too many descriptors, a
//! buffer in the wrong direction, empty, outside guest RAM or over a queue ring is an error
//! for that chain, never a panic or a host access outside guest RAM.

use std::ops::Deref;

use memory::{GuestAddress, GuestRam};
use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

use super::{NetError, MAX_FRAME_LEN, MAX_SEGMENTS, VNET_HDR_LEN};

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// A chain the device popped and has not published yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetChain {
    /// Head descriptor index: what goes back in the used ring.
    pub head: u16,
    pub segments: Vec<Segment>,
}

impl NetChain {
    /// Total bytes of the chain's buffers.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// Which queue a chain came from, and so which way its buffers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueueKind {
    /// Receive: the device writes every buffer.
    Rx,
    /// Transmit: the device reads every buffer.
    Tx,
}

impl QueueKind {
    pub fn name(self) -> &'static str {
        match self {
            QueueKind::Rx => "receive",
            QueueKind::Tx => "transmit",
        }
    }
}

/// Guest ranges (address, length) of a queue's rings, which no receive buffer may overlap.
pub(crate) fn ring_ranges(desc_table: u64, avail_ring: u64, used_ring: u64, size: u16) -> [(u64, u64); 3] {
    let size = u64::from(size);
    [(desc_table, 16 * size), (avail_ring, 6 + 2 * size), (used_ring, 6 + 8 * size)]
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// Bounds of one buffer: non-empty, inside guest RAM, and (for receive) off every ring.
fn check_segment(
    kind: QueueKind,
    head: u16,
    seg: Segment,
    ram: &GuestRam,
    rings: &[(u64, u64)],
) -> Result<(), NetError> {
    let queue = kind.name();
    let Segment { addr, len } = seg;
    if len == 0 {
        return Err(NetError::EmptyBuffer { queue, head, addr });
    }
    if !ram.check_range(GuestAddress(addr), len as usize) {
        return Err(NetError::OutsideRam { queue, head, addr, len });
    }
    if kind == QueueKind::Rx {
        if let Some(&(ring, _)) = rings.iter().find(|&&r| overlaps((addr, u64::from(len)), r)) {
            return Err(NetError::OverRing { queue, head, addr, len, ring });
        }
    }
    Ok(())
}

/// The length bounds of a transmit chain: a header, and no more than a frame.
fn check_tx_len(head: u16, len: u64) -> Result<(), NetError> {
    let queue = QueueKind::Tx.name();
    if len > u64::from(MAX_FRAME_LEN) {
        return Err(NetError::FrameTooLarge { queue, head, len });
    }
    if len < u64::from(VNET_HDR_LEN) {
        return Err(NetError::TooShort { queue, head, len, min: VNET_HDR_LEN });
    }
    Ok(())
}

/// Reads and validates `chain`. `rings` are the guest ranges of the device's rings. On error,
/// the head to return to the driver and why.
pub(crate) fn parse_chain<M>(
    chain: DescriptorChain<M>,
    kind: QueueKind,
    ram: &GuestRam,
    rings: &[(u64, u64)],
) -> Result<NetChain, (u16, NetError)>
where
    M: Deref<Target = GuestRam>,
{
    let head = chain.head_index();
    let queue = kind.name();
    let bad = |error| (head, error);
    // One more than allowed tells a chain that is too long.
    let descs: Vec<Descriptor> = chain.take(MAX_SEGMENTS + 1).collect();
    let mut visited = vec![head];
    for desc in descs.iter().filter(|d| d.has_next()) {
        if visited.contains(&desc.next()) {
            return Err(bad(NetError::ChainLoop { queue, head, index: desc.next() }));
        }
        visited.push(desc.next());
    }
    // The iterator ends early, silently, on a `next` past the table or an unreadable
    // descriptor: the last one it gave then still says "next".
    match descs.last() {
        None => return Err(bad(NetError::BrokenChain { queue, head })),
        Some(_) if descs.len() > MAX_SEGMENTS => return Err(bad(NetError::ChainTooLong { queue, head })),
        Some(last) if last.has_next() => return Err(bad(NetError::BrokenChain { queue, head })),
        Some(_) => {}
    }
    let mut segments = Vec::with_capacity(descs.len());
    for desc in &descs {
        let seg = Segment { addr: desc.addr().0, len: desc.len() };
        let device_writes = kind == QueueKind::Rx;
        if desc.is_write_only() != device_writes {
            let (found, wants) = if device_writes { ("read-only", "writes") } else { ("write-only", "reads") };
            return Err(bad(NetError::WrongDirection { queue, head, addr: seg.addr, len: seg.len, found, wants }));
        }
        check_segment(kind, head, seg, ram, rings).map_err(bad)?;
        segments.push(seg);
    }
    let chain = NetChain { head, segments };
    if kind == QueueKind::Tx {
        check_tx_len(head, chain.len()).map_err(bad)?;
    }
    Ok(chain)
}

impl NetChain {
    /// The checks a popped chain passed, for one read back from a saved state (a snapshot file
    /// is input): head inside a queue of `queue_size`, descriptor count, every buffer's bounds.
    pub(crate) fn check_saved(
        &self,
        kind: QueueKind,
        queue_size: u16,
        ram: &GuestRam,
        rings: &[(u64, u64)],
    ) -> Result<(), NetError> {
        let field = match kind {
            QueueKind::Rx => "rx_in_flight",
            QueueKind::Tx => "tx_in_flight",
        };
        if self.head >= queue_size {
            return Err(NetError::bad_state(field, format!("head {} outside a queue of {queue_size}", self.head)));
        }
        if self.segments.is_empty() || self.segments.len() > MAX_SEGMENTS {
            return Err(NetError::bad_state(
                field,
                format!("chain {} has {} buffers, 1..={MAX_SEGMENTS} allowed", self.head, self.segments.len()),
            ));
        }
        for &seg in &self.segments {
            check_segment(kind, self.head, seg, ram, rings).map_err(|e| NetError::bad_state(field, e.to_string()))?;
        }
        if kind == QueueKind::Tx {
            check_tx_len(self.head, self.len()).map_err(|e| NetError::bad_state(field, e.to_string()))?;
        }
        Ok(())
    }
}
