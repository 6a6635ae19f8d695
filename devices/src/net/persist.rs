//! virtio-net's saved state, which `NetDevice`'s `Persist` impl saves and restores: the live
//! queues, the link the guest saw, and the chains popped and not published (host-stepped
//! devices only: a free-running device finishes every chain under its lock, so a capture never
//! sees one). The state is read from and put into the device's core, not the device, so this
//! module does not depend on `device`.
//!
//! A restore (a clone, or a VM loaded from a snapshot) attaches the TAP it is given, or none,
//! never the source's. It gives the claimed receive buffers back to the queue, to be filled
//! again (a frame that reached the source's TAP is the source's), and sends the transmit frame
//! in flight again, on its own TAP: both by rewinding the queue to the used index, since the
//! chains popped and not published are always the last ones popped. Its rings are then
//! exactly what the driver left: nothing it made available is lost, nothing is used twice.

use std::sync::Arc;

use memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::chain::{NetChain, QueueKind};
use super::core::{rings_of, NetCore, Queues};
use super::{MacAddr, NetError, Tap, MAX_FRAME_LEN, NET_QUEUE_SIZE, VNET_HDR_LEN};
use crate::interrupt::DeviceInterrupt;
use crate::virtio::VIRTIO_F_VERSION_1;

/// virtio-net's state as plain data (guest physical addresses only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: Option<MacAddr>,
    /// Features the driver accepted (0 before DRIVER_OK).
    pub features: u64,
    /// The live receive and transmit queues, once the driver set DRIVER_OK; else empty.
    #[serde(with = "crate::virtio::queue_serde::vec")]
    pub queues: Vec<QueueState>,
    /// The link status the guest could read at the capture.
    pub link_up: bool,
    pub needs_reset: bool,
    pub host_stepped: bool,
    /// Receive chains claimed (pinned), oldest first.
    pub rx_in_flight: Vec<NetChain>,
    /// Bytes of a frame copied into the first claimed chains, not yet published.
    pub rx_filled: Option<u32>,
    /// The transmit chain being sent.
    pub tx_in_flight: Option<NetChain>,
    /// Whether that frame already went to the source's TAP.
    pub tx_sent: bool,
}

/// The host resources a restore needs: the VM's RAM and interrupt, and its own TAP or none.
#[derive(Debug)]
pub struct NetArgs {
    pub ram: Arc<GuestRam>,
    pub interrupt: Arc<DeviceInterrupt>,
    pub backend: Option<Tap>,
}

/// Popped minus used: the chains a queue has in flight.
fn popped_unused(queue: &Queue) -> u16 {
    queue.next_avail().wrapping_sub(queue.next_used())
}

impl NetState {
    /// Checks a saved state (a snapshot file is input) against `ram` before anything is
    /// restored from it; returns its (receive, transmit) queues, validated.
    pub fn check(&self, ram: &GuestRam) -> Result<Option<(Queue, Queue)>, NetError> {
        let offered = super::offered_features(self.mac);
        if self.features & !offered != 0 {
            return Err(NetError::BadFeatures { features: self.features, offered });
        }
        if self.queues.is_empty() {
            if !self.rx_in_flight.is_empty() || self.rx_filled.is_some() || self.tx_in_flight.is_some() || self.tx_sent
            {
                return Err(NetError::bad_state("queues", "chains in flight without live queues"));
            }
            if self.features != 0 {
                return Err(NetError::bad_state(
                    "queues",
                    format!("features {:#x} accepted without live queues", self.features),
                ));
            }
            return Ok(None);
        }
        if self.features & VIRTIO_F_VERSION_1 == 0 {
            return Err(NetError::bad_state(
                "features",
                format!("{:#x} without VERSION_1 on live queues", self.features),
            ));
        }
        let [rx, tx] = <[QueueState; 2]>::try_from(self.queues.as_slice())
            .map_err(|_| NetError::bad_state("queues", format!("{} queues, the device has 2", self.queues.len())))?;
        let [rx, tx] = [rx, tx].map(|q| {
            if q.max_size != NET_QUEUE_SIZE {
                return Err(NetError::bad_state(
                    "queues",
                    format!("max size {}, the device has {NET_QUEUE_SIZE}", q.max_size),
                ));
            }
            let queue = Queue::try_from(q).map_err(|e| NetError::bad_state("queues", e.to_string()))?;
            if !queue.is_valid(ram) {
                return Err(NetError::bad_state("queues", "not ready, or a ring is outside guest RAM"));
            }
            Ok(queue)
        });
        let (rx, tx) = (rx?, tx?);
        let rings = rings_of(&rx, &tx);
        let claimed = self.rx_in_flight.len();
        if usize::from(popped_unused(&rx)) != claimed {
            return Err(NetError::bad_state(
                "rx_in_flight",
                format!("{claimed} chains, the queue has {} popped and unused", popped_unused(&rx)),
            ));
        }
        for chain in &self.rx_in_flight {
            chain.check_saved(QueueKind::Rx, rx.size(), ram, &rings)?;
        }
        if let Some(filled) = self.rx_filled {
            let capacity: u64 = self.rx_in_flight.iter().map(NetChain::len).sum();
            if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&filled) || u64::from(filled) > capacity {
                return Err(NetError::bad_state(
                    "rx_filled",
                    format!("{filled} bytes in {capacity} bytes of claimed buffers"),
                ));
            }
        }
        let sending = usize::from(self.tx_in_flight.is_some());
        if usize::from(popped_unused(&tx)) != sending || (self.tx_sent && sending == 0) {
            return Err(NetError::bad_state(
                "tx_in_flight",
                format!("{sending} chains, the queue has {} popped and unused", popped_unused(&tx)),
            ));
        }
        if let Some(chain) = &self.tx_in_flight {
            chain.check_saved(QueueKind::Tx, tx.size(), ram, &rings)?;
        }
        Ok(Some((rx, tx)))
    }
}

/// The state of `core` (locked by the caller) on a device with `mac`.
pub(crate) fn state_of(core: &NetCore, mac: Option<MacAddr>) -> NetState {
    NetState {
        mac,
        features: core.features,
        queues: core.queues.as_ref().map_or_else(Vec::new, |q| vec![q.rx.state(), q.tx.state()]),
        link_up: core.link_up(),
        needs_reset: core.broken,
        host_stepped: core.host_stepped,
        rx_in_flight: core.rx_claims.iter().map(|c| c.chain.clone()).collect(),
        rx_filled: core.rx_filled,
        tx_in_flight: core.tx.as_ref().map(|t| t.chain.clone()),
        tx_sent: core.tx.as_ref().is_some_and(|t| t.sent),
    }
}

/// Puts `state` (checked into `queues`) into `core`, which has nothing in flight: the queues
/// rewound to their used index, so the chains that were in flight are popped again (receive
/// buffers filled again, the transmit frame sent again); then, unless host-stepped, serves
/// both queues once (a notification the source had not served died with its eventfd).
pub(crate) fn apply_state(core: &mut NetCore, state: &NetState, queues: Option<(Queue, Queue)>) {
    core.features = state.features;
    core.broken = state.needs_reset;
    core.host_stepped = state.host_stepped;
    core.queues = queues.map(|(mut rx, mut tx)| {
        for q in [&mut rx, &mut tx] {
            q.set_next_avail(q.next_used());
        }
        Queues::new(rx, tx)
    });
    core.apply_offloads();
    core.link_changed(state.link_up);
    if core.serving() {
        core.process_tx();
        core.process_rx();
    }
}
