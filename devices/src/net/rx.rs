//! Receive: claim buffers (pop and pin for write), let the kernel copy one frame from the TAP
//! into them (`readv`), publish their used entries, then unpin. Free-running, a pass goes on
//! until the TAP is empty or the driver runs out of buffers, and gives back the buffers it
//! claimed without filling them (rewinding the queue: claims are always the last chains
//! popped), so an idle device holds no pins. Host-stepped, each call moves one stage.

use memory::Access;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::QueueT;

use super::chain::QueueKind;
use super::core::{NetCore, RxClaim};
use super::device::NetStep;
use super::iovec::{PinnedIoVecs, IOV_MAX};
use super::{NetError, MAX_FRAME_LEN, MAX_SEGMENTS, MIN_RX_LEN, VNET_HDR_LEN};

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// What one `readv` from the TAP did.
enum Copy {
    /// A frame of this many bytes (header included) is in the claimed buffers.
    Frame(u32),
    /// The kernel consumed a frame it could not place (too big for the buffers): dropped.
    Dropped,
    /// Nothing to read (or no link).
    Empty,
    /// An unexpected error that consumed nothing: try again at the next event.
    Stop,
}

impl NetCore {
    fn guest_gso(&self) -> bool {
        [VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO].iter().any(|&b| self.has_feature(b))
    }

    /// Bytes of buffers to hold before reading a frame: any frame the TAP may hand over.
    fn rx_target(&self) -> u64 {
        u64::from(if self.guest_gso() { MAX_FRAME_LEN } else { MIN_RX_LEN })
    }

    /// Smallest usable receive chain: a header with mergeable buffers, else a whole frame.
    fn rx_min_chain(&self) -> u32 {
        if self.has_feature(VIRTIO_NET_F_MRG_RXBUF) {
            VNET_HDR_LEN
        } else if self.guest_gso() {
            MAX_FRAME_LEN
        } else {
            MIN_RX_LEN
        }
    }

    /// Claims chains until they can hold a frame (one chain without mergeable buffers).
    /// False if the driver has not posted enough yet; what is claimed stays claimed.
    fn claim_rx(&mut self) -> bool {
        let mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF);
        let target = self.rx_target();
        loop {
            let capacity: u64 = self.rx_claims.iter().map(|c| c.chain.len()).sum();
            let iovecs: usize = self.rx_claims.iter().map(|c| c.pins.len()).sum();
            let enough = !self.rx_claims.is_empty() && (!mergeable || capacity >= target);
            // A readv takes IOV_MAX iovecs: read with what fits rather than never.
            if enough || iovecs + MAX_SEGMENTS > IOV_MAX {
                return true;
            }
            let chain = match self.pop(QueueKind::Rx) {
                Ok(Some(chain)) => chain,
                Ok(None) => return false,
                Err((head, error)) => {
                    self.reject_rx(head, error);
                    continue;
                }
            };
            let min = self.rx_min_chain();
            if chain.len() < u64::from(min) {
                let error = NetError::TooShort { queue: QueueKind::Rx.name(), head: chain.head, len: chain.len(), min };
                self.reject_rx(chain.head, error);
                continue;
            }
            match self.pin_chain(&chain, Access::Write) {
                Ok(pins) => self.rx_claims.push_back(RxClaim { chain, pins }),
                Err(error) => self.reject_rx(chain.head, error),
            }
        }
    }

    /// Returns a bad chain with length 0. Used entries go out in the order chains were
    /// popped, so the unfilled claims before it go back first, with length 0 too: they are
    /// the driver's buffers, handed back empty, and the claims stay the last chains popped.
    fn reject_rx(&mut self, head: u16, error: NetError) {
        let mut entries: Vec<(u16, u32)> = self.rx_claims.drain(..).map(|c| (c.chain.head, 0)).collect();
        entries.push((head, 0));
        self.publish(QueueKind::Rx, &entries);
        self.bad_chain(error);
    }

    /// One `readv` from the TAP into the claimed buffers (all of them with mergeable
    /// buffers, else the first chain's).
    fn copy_rx(&mut self) -> Copy {
        let Some(tap) = self.tap() else { return Copy::Empty };
        let claims = if self.has_feature(VIRTIO_NET_F_MRG_RXBUF) { self.rx_claims.len() } else { 1 };
        let iov = PinnedIoVecs::new(self.rx_claims.iter().take(claims).flat_map(|c| &c.pins));
        let result = loop {
            match tap.readv(&iov) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                other => break other,
            }
        };
        drop(iov);
        match result {
            Ok(n) => match u32::try_from(n) {
                Ok(n) if n >= VNET_HDR_LEN => {
                    self.rx_filled = Some(n);
                    Copy::Frame(n)
                }
                _ => self.rx_dropped(n, "shorter than the virtio-net header"),
            },
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => Copy::Empty,
                Some(libc::EBADFD) => {
                    self.tap_gone();
                    Copy::Empty
                }
                // The kernel took the frame off the TAP and could not place it.
                Some(libc::EFAULT | libc::EINVAL) => self.rx_dropped(0, "larger than the posted buffers"),
                _ => {
                    self.record(NetError::TapIo { name: self.tap_name(), source: e });
                    Copy::Stop
                }
            },
        }
    }

    fn rx_dropped(&mut self, len: usize, reason: &str) -> Copy {
        self.counters.rx_dropped += 1;
        self.record(NetError::RxDropped { len, reason: reason.to_string() });
        Copy::Dropped
    }

    /// Publishes the frame copied into the first claims: `num_buffers`, the used entries and
    /// the used index, and only then unpins those claims. Returns how many chains it used.
    fn publish_rx(&mut self) -> usize {
        let Some(len) = self.rx_filled.take() else { return 0 };
        let mut left = len;
        let mut entries = Vec::new();
        for claim in &self.rx_claims {
            let take = u32::try_from(claim.chain.len()).unwrap_or(u32::MAX).min(left);
            entries.push((claim.chain.head, take));
            left -= take;
            if left == 0 {
                break;
            }
        }
        let count = u16::try_from(entries.len()).unwrap_or(u16::MAX);
        // The first chain holds the whole header (every chain is at least that long).
        if let Some(first) = self.rx_claims.front() {
            if let Err(e) = write_across(&first.pins, NUM_BUFFERS_OFFSET, &count.to_le_bytes()) {
                self.record(NetError::Pin { head: first.chain.head, addr: 0, len: VNET_HDR_LEN, source: e });
            }
        }
        self.publish(QueueKind::Rx, &entries);
        // Unpin after the used index is out.
        self.rx_claims.drain(..entries.len());
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += u64::from(len - VNET_HDR_LEN);
        entries.len()
    }

    /// Gives unfilled claims back to the queue: unpinned, and popped again next time.
    pub(crate) fn give_back_rx(&mut self) {
        debug_assert!(self.rx_filled.is_none(), "a filled frame is published, not given back");
        let count = self.rx_claims.len();
        self.rx_claims.clear();
        if let (Some(queues), Ok(count)) = (self.queues.as_mut(), u16::try_from(count)) {
            queues.rx.set_next_avail(queues.rx.next_avail().wrapping_sub(count));
        }
    }

    /// Receives every frame waiting on the TAP that the posted buffers can take.
    pub(crate) fn process_rx(&mut self) {
        if !self.serving() || self.tap().is_none() {
            return;
        }
        while !self.broken && self.claim_rx() {
            match self.copy_rx() {
                Copy::Frame(_) => {
                    self.publish_rx();
                }
                Copy::Dropped => {}
                Copy::Empty | Copy::Stop => break,
            }
        }
        self.give_back_rx();
        self.flush_interrupt();
    }

    /// One receive stage: publish a copied frame, else copy into claimed buffers, else claim.
    pub(crate) fn step_rx(&mut self) -> NetStep {
        if self.queues.is_none() || self.broken {
            return NetStep::Idle;
        }
        let step = if self.rx_filled.is_some() {
            NetStep::Published { chains: self.publish_rx() }
        } else if !self.rx_claims.is_empty() {
            match self.copy_rx() {
                Copy::Frame(bytes) => NetStep::Copied { bytes: bytes as usize },
                Copy::Dropped => NetStep::Dropped,
                Copy::Empty | Copy::Stop => NetStep::Idle,
            }
        } else if self.claim_rx() {
            let bytes = self.rx_claims.iter().map(|c| c.chain.len()).sum();
            NetStep::Claimed { chains: self.rx_claims.len(), bytes }
        } else {
            self.give_back_rx();
            NetStep::Idle
        };
        self.flush_interrupt();
        step
    }
}

/// Writes `data` at byte `offset` of the buffers `pins` cover, one after the other.
fn write_across(pins: &[memory::PinGuard], mut offset: usize, mut data: &[u8]) -> Result<(), memory::MemoryError> {
    for pin in pins {
        if data.is_empty() {
            break;
        }
        if offset >= pin.len() {
            offset -= pin.len();
            continue;
        }
        let n = data.len().min(pin.len() - offset);
        pin.write_at(offset, &data[..n])?;
        data = &data[n..];
        offset = 0;
    }
    Ok(())
}
