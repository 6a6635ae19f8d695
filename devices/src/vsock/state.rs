//! The vsock device's saved form and its checks. Connections are not in it: Firecracker's
//! policy, which the restored device keeps by sending the guest TRANSPORT_RESET.

use std::collections::HashSet;

use memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{VsockError, VSOCK_QUEUE_SIZE};

/// Guest values only: the CID the guest was given, the live queues, and the buffers popped
/// and not yet published at the capture (a restored device gives them back to the guest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    pub features: u64,
    /// RX, TX, event queue; empty until the driver activated the device.
    #[serde(with = "crate::virtio::queue_serde::vec")]
    pub queues: Vec<QueueState>,
    /// Heads of TX packets popped and not yet published (held, or mid-read).
    pub tx_in_flight: Vec<u16>,
    /// Heads of RX buffers popped and not yet published (held after filling).
    pub rx_in_flight: Vec<u16>,
    /// Held mode, which a clone inherits (as the DMA engine's host stepping).
    pub hold_tx: bool,
    pub hold_rx: bool,
}

/// Checks a CID the guest will be given: 0-2 are reserved, u32::MAX is VMADDR_CID_ANY, and
/// Linux keeps CIDs in 32 bits.
pub(crate) fn check_cid(cid: u64) -> Result<(), VsockError> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err(VsockError::BadCid(cid))
    }
}

fn check_heads(what: &str, heads: &[u16], queue: &Queue) -> Result<(), VsockError> {
    let mut seen = HashSet::new();
    for &head in heads {
        if head >= queue.size() {
            return Err(VsockError::BadState(format!("{what} head {head} outside a queue of {}", queue.size())));
        }
        if !seen.insert(head) {
            return Err(VsockError::BadState(format!("{what} head {head} in flight twice")));
        }
    }
    Ok(())
}

impl VsockState {
    /// Checks a saved state (a snapshot file is input) against `ram` before anything is
    /// built from it; returns its queues, validated.
    pub fn check(&self, ram: &GuestRam) -> Result<Vec<Queue>, VsockError> {
        check_cid(self.cid)?;
        if self.queues.is_empty() {
            if !self.tx_in_flight.is_empty() || !self.rx_in_flight.is_empty() {
                return Err(VsockError::BadState("buffers in flight without queues".into()));
            }
            return Ok(Vec::new());
        }
        if self.queues.len() != 3 {
            return Err(VsockError::BadState(format!("{} queues, the device has 3", self.queues.len())));
        }
        let mut queues = Vec::with_capacity(3);
        for (index, &saved) in self.queues.iter().enumerate() {
            if saved.max_size != VSOCK_QUEUE_SIZE {
                return Err(VsockError::BadState(format!(
                    "queue {index} max size {}, the device has {VSOCK_QUEUE_SIZE}",
                    saved.max_size
                )));
            }
            let queue = Queue::try_from(saved).map_err(|e| VsockError::BadState(format!("queue {index}: {e}")))?;
            if !queue.is_valid(ram) {
                return Err(VsockError::BadState(format!("queue {index} rings are not inside guest RAM")));
            }
            queues.push(queue);
        }
        check_heads("RX", &self.rx_in_flight, &queues[super::RXQ])?;
        check_heads("TX", &self.tx_in_flight, &queues[super::TXQ])?;
        Ok(queues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids() {
        for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(check_cid(bad).is_err(), "{bad}");
        }
        assert!(check_cid(3).is_ok());
        assert!(check_cid(u64::from(u32::MAX) - 1).is_ok());
    }
}
