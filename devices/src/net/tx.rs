//! Transmit: claim one chain (pop and pin for read), let the kernel read the frame out of
//! guest RAM into the TAP (`writev`), publish its used entry, then unpin. Without a link the
//! frame is dropped, as a NIC without carrier drops it, and the chain still comes back.

use memory::Access;

use super::chain::QueueKind;
use super::core::{NetCore, TxClaim};
use super::device::NetStep;
use super::iovec::PinnedIoVecs;
use super::{NetError, VNET_HDR_LEN};

impl NetCore {
    /// Claims the next valid transmit chain; bad chains on the way are returned (length 0).
    fn claim_tx(&mut self) -> bool {
        loop {
            let chain = match self.pop(QueueKind::Tx) {
                Ok(None) => return false,
                Ok(Some(chain)) => chain,
                Err((head, error)) => {
                    self.reject_tx(head, error);
                    continue;
                }
            };
            match self.pin_chain(&chain, Access::Read) {
                Ok(pins) => {
                    self.tx = Some(TxClaim { chain, pins, sent: false });
                    return true;
                }
                Err(error) => self.reject_tx(chain.head, error),
            }
        }
    }

    fn reject_tx(&mut self, head: u16, error: NetError) {
        self.publish(QueueKind::Tx, &[(head, 0)]);
        self.bad_chain(error);
    }

    /// Hands the claimed frame to the TAP. Returns the step it made.
    fn send_tx(&mut self) -> NetStep {
        let Some(mut claim) = self.tx.take() else { return NetStep::Idle };
        let result = self.tap().map(|tap| tap.writev(&PinnedIoVecs::new(&claim.pins)));
        claim.sent = true;
        self.tx = Some(claim);
        match result {
            Some(Ok(n)) => {
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += (n as u64).saturating_sub(u64::from(VNET_HDR_LEN));
                NetStep::Copied { bytes: n }
            }
            None => {
                self.counters.tx_dropped += 1;
                NetStep::Dropped
            }
            Some(Err(e)) => {
                self.counters.tx_dropped += 1;
                if e.raw_os_error() == Some(libc::EBADFD) {
                    self.tap_gone();
                } else {
                    // The kernel refused this frame (bad GSO header, interface down, ...).
                    self.record(NetError::TapIo { name: self.tap_name(), source: e });
                }
                NetStep::Dropped
            }
        }
    }

    /// Publishes the sent chain's used entry (length 0: the device wrote nothing), then
    /// unpins it.
    fn publish_tx(&mut self) -> NetStep {
        let Some(claim) = self.tx.take() else { return NetStep::Idle };
        self.publish(QueueKind::Tx, &[(claim.chain.head, 0)]);
        drop(claim);
        NetStep::Published { chains: 1 }
    }

    /// Sends every frame the driver made available.
    pub(crate) fn process_tx(&mut self) {
        if !self.serving() {
            return;
        }
        while !self.broken && self.claim_tx() {
            self.send_tx();
            self.publish_tx();
        }
        self.flush_interrupt();
    }

    /// One transmit stage: publish a sent frame, else send the claimed one, else claim.
    pub(crate) fn step_tx(&mut self) -> NetStep {
        if self.queues.is_none() || self.broken {
            return NetStep::Idle;
        }
        let sent = self.tx.as_ref().map(|claim| claim.sent);
        let step = match sent {
            Some(true) => self.publish_tx(),
            Some(false) => self.send_tx(),
            None if self.claim_tx() => {
                let claim = self.tx.as_ref().map(|c| &c.chain);
                NetStep::Claimed { chains: 1, bytes: claim.map_or(0, |c| c.len()) }
            }
            None => NetStep::Idle,
        };
        self.flush_interrupt();
        step
    }
}
