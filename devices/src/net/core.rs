//! The serving half of virtio-net, behind the device's mutex (shared by the transport, which
//! the vCPUs and queue notifications reach, and by the TAP subscriber on the event loop): the
//! live queues, the backend, the chains in flight, and what receive and transmit share.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use memory::{Access, Bytes, GuestAddress, GuestRam, PinGuard};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_STATUS,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::chain::{parse_chain, ring_ranges, NetChain, QueueKind};
use super::tap::Tap;
use super::NetError;
use crate::interrupt::{DeviceInterrupt, INT_CONFIG, INT_USED_RING};

/// What the device did, for counters and tests. Never reset by the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    /// Frame bytes received (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames the kernel took off the TAP and could not place in the posted buffers.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames sent without a link, or refused by the TAP.
    pub tx_dropped: u64,
    /// Chains returned unused because the driver got them wrong.
    pub bad_chains: u64,
}

impl std::ops::Add for NetCounters {
    type Output = NetCounters;

    /// Two interfaces' counters summed (a VM's `net` metrics group).
    fn add(self, o: NetCounters) -> NetCounters {
        NetCounters {
            rx_frames: self.rx_frames.wrapping_add(o.rx_frames),
            rx_bytes: self.rx_bytes.wrapping_add(o.rx_bytes),
            rx_dropped: self.rx_dropped.wrapping_add(o.rx_dropped),
            tx_frames: self.tx_frames.wrapping_add(o.tx_frames),
            tx_bytes: self.tx_bytes.wrapping_add(o.tx_bytes),
            tx_dropped: self.tx_dropped.wrapping_add(o.tx_dropped),
            bad_chains: self.bad_chains.wrapping_add(o.bad_chains),
        }
    }
}

/// A receive chain the device claimed: its buffers stay pinned for write until its used entry
/// is published (or the claim is given back unfilled).
pub(crate) struct RxClaim {
    pub chain: NetChain,
    /// One per segment, in order. Dropping them unpins.
    pub pins: Vec<PinGuard>,
}

/// The transmit chain being sent: pinned for read until its used entry is published.
pub(crate) struct TxClaim {
    pub chain: NetChain,
    pub pins: Vec<PinGuard>,
    /// The frame went to the TAP (or was dropped for want of a link).
    pub sent: bool,
}

/// The live queues, once the driver set DRIVER_OK.
pub(crate) struct Queues {
    pub rx: Queue,
    pub tx: Queue,
    /// Guest ranges of both queues' rings: no receive buffer may overlap them.
    pub rings: Vec<(u64, u64)>,
}

impl Queues {
    pub fn new(rx: Queue, tx: Queue) -> Queues {
        let rings = rings_of(&rx, &tx);
        Queues { rx, tx, rings }
    }

    pub fn get_mut(&mut self, kind: QueueKind) -> &mut Queue {
        match kind {
            QueueKind::Rx => &mut self.rx,
            QueueKind::Tx => &mut self.tx,
        }
    }
}

/// Guest ranges of the rings of both queues.
pub(crate) fn rings_of(rx: &Queue, tx: &Queue) -> Vec<(u64, u64)> {
    [rx, tx].iter().flat_map(|q| ring_ranges(q.desc_table(), q.avail_ring(), q.used_ring(), q.size())).collect()
}

/// TUN_F_* offloads for the features the guest accepted: what it can receive. TSO and UFO
/// need checksum offload (virtio and the TAP both say so), so nothing without GUEST_CSUM.
pub(crate) fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
    ] {
        if has(bit) {
            flags |= flag;
        }
    }
    flags
}

pub(crate) struct NetCore {
    pub ram: Arc<GuestRam>,
    pub interrupt: Arc<DeviceInterrupt>,
    pub backend: Option<Tap>,
    /// The TAP went away under the device: the link is down and the TAP unused; the event
    /// subscriber stops watching it and drops it.
    pub backend_gone: bool,
    /// Features the driver accepted (0 until DRIVER_OK).
    pub features: u64,
    pub queues: Option<Queues>,
    /// The driver broke a queue (avail index jump): serve nothing until a reset.
    pub broken: bool,
    /// Only `step_rx` / `step_tx` move requests; notifications and TAP events do nothing.
    pub host_stepped: bool,
    /// Claimed receive chains, oldest first: always the last ones popped from the queue.
    pub rx_claims: VecDeque<RxClaim>,
    /// Bytes of a frame the kernel copied into the first claims, not yet published.
    pub rx_filled: Option<u32>,
    pub tx: Option<TxClaim>,
    pub counters: NetCounters,
    pub last_error: Option<NetError>,
    /// Used entries were published since the last interrupt.
    used_pending: bool,
}

impl NetCore {
    pub fn new(ram: Arc<GuestRam>, interrupt: Arc<DeviceInterrupt>, backend: Option<Tap>) -> NetCore {
        NetCore {
            ram,
            interrupt,
            backend,
            backend_gone: false,
            features: 0,
            queues: None,
            broken: false,
            host_stepped: false,
            rx_claims: VecDeque::new(),
            rx_filled: None,
            tx: None,
            counters: NetCounters::default(),
            last_error: None,
            used_pending: false,
        }
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    /// Whether frames can flow: a TAP that has not gone away.
    pub fn link_up(&self) -> bool {
        self.backend.is_some() && !self.backend_gone
    }

    /// The TAP, while the link is up.
    pub fn tap(&self) -> Option<&Tap> {
        self.backend.as_ref().filter(|_| !self.backend_gone)
    }

    /// Whether requests move on their own (not host-stepped, live, not broken).
    pub fn serving(&self) -> bool {
        !self.host_stepped && !self.broken && self.queues.is_some()
    }

    /// The TAP's name, or "" without one.
    pub fn tap_name(&self) -> String {
        self.backend.as_ref().map_or_else(String::new, |t| t.name().to_string())
    }

    /// Keeps `error` for `take_error` (the latest wins).
    pub fn record(&mut self, error: NetError) {
        self.last_error = Some(error);
    }

    /// A chain the driver got wrong: counted and kept, the device goes on.
    pub fn bad_chain(&mut self, error: NetError) {
        self.counters.bad_chains += 1;
        self.record(error);
    }

    /// Tells the driver the link changed (a configuration interrupt), if it negotiated STATUS
    /// and is running. `was_up` is what the driver last saw.
    pub fn link_changed(&self, was_up: bool) {
        if was_up != self.link_up() && self.queues.is_some() && self.has_feature(VIRTIO_NET_F_STATUS) {
            self.interrupt.raise(INT_CONFIG);
        }
    }

    /// The TAP failed for good (deleted, detached): link down for the guest.
    pub fn tap_gone(&mut self) {
        let was_up = self.link_up();
        let name = self.tap_name();
        self.backend_gone = true;
        self.record(NetError::TapGone { name });
        self.link_changed(was_up);
    }

    /// Sets the TAP's offloads to what the guest negotiated. A failure leaves the previous
    /// setting (none, from the open or a reset), which is always safe to receive.
    pub fn apply_offloads(&mut self) {
        let flags = tap_offloads(self.features);
        if let Some(Err(e)) = self.tap().map(|tap| tap.set_offloads(flags)) {
            self.record(e.into());
        }
    }

    /// Drops every chain in flight, unpinning it, without publishing anything.
    pub fn drop_in_flight(&mut self) {
        self.rx_claims.clear();
        self.rx_filled = None;
        self.tx = None;
    }

    /// The next chain the driver made available on `kind`, validated. `Ok(None)`: nothing
    /// available, or the driver broke the queue (then the device needs a reset). `Err`: a bad
    /// chain, with its head to return.
    pub fn pop(&mut self, kind: QueueKind) -> Result<Option<NetChain>, (u16, NetError)> {
        let Some(Queues { rx, tx, rings }) = self.queues.as_mut() else { return Ok(None) };
        let queue = match kind {
            QueueKind::Rx => rx,
            QueueKind::Tx => tx,
        };
        let chain = match queue.iter(&*self.ram) {
            Ok(mut avail) => avail.next(),
            Err(_) => {
                self.broken = true;
                self.record(NetError::AvailIndex { queue: kind.name() });
                return Ok(None);
            }
        };
        chain.map(|c| parse_chain(c, kind, &self.ram, rings)).transpose()
    }

    /// Pins every buffer of `chain` for `access`, in order.
    pub fn pin_chain(&self, chain: &NetChain, access: Access) -> Result<Vec<PinGuard>, NetError> {
        chain
            .segments
            .iter()
            .map(|s| {
                self.ram.pin(GuestAddress(s.addr), s.len as usize, access).map_err(|source| NetError::Pin {
                    head: chain.head,
                    addr: s.addr,
                    len: s.len,
                    source,
                })
            })
            .collect()
    }

    /// Writes `entries` (head, length) to `kind`'s used ring, then its index once, so the
    /// driver sees all of a merged frame's buffers at the same instant.
    pub fn publish(&mut self, kind: QueueKind, entries: &[(u16, u32)]) {
        let Some(queues) = self.queues.as_mut() else { return };
        self.used_pending = true;
        if publish_used(&self.ram, queues.get_mut(kind), entries).is_err() {
            // The rings were checked inside RAM at activation; only a bad saved ring gets here.
            self.broken = true;
            self.record(NetError::UsedRing { queue: kind.name() });
        }
    }

    /// Raises the used-ring interrupt once for everything published since the last call.
    pub fn flush_interrupt(&mut self) {
        if std::mem::take(&mut self.used_pending) {
            self.interrupt.raise(INT_USED_RING);
        }
    }
}

fn publish_used(ram: &GuestRam, queue: &mut Queue, entries: &[(u16, u32)]) -> Result<(), ()> {
    let size = queue.size();
    let mut next = queue.next_used();
    for &(head, len) in entries {
        let slot = u64::from(next % size);
        let addr = queue.used_ring().checked_add(4 + 8 * slot).ok_or(())?;
        // virtq_used_elem: le32 id, le32 len.
        ram.write_obj(u32::from(head).to_le(), GuestAddress(addr)).map_err(|_| ())?;
        ram.write_obj(len.to_le(), GuestAddress(addr.checked_add(4).ok_or(())?)).map_err(|_| ())?;
        next = next.wrapping_add(1);
    }
    queue.set_next_used(next);
    let idx = queue.used_ring().checked_add(2).ok_or(())?;
    // Release: the elements are visible before the index that hands them over.
    ram.store(next.to_le(), GuestAddress(idx), Ordering::Release).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_guest_features_and_need_checksums() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, &b| acc | 1 << b);
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(f(&[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_UFO])), 0, "TSO without CSUM");
        assert_eq!(tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM])), libc::TUN_F_CSUM);
        let all =
            f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO]);
        assert_eq!(tap_offloads(all), libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO);
    }
}
