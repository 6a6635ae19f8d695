//! `VsockDevice`: the three queues (RX, TX, event), the DMA pins of packets in flight, held
//! mode, and the interfaces the VMM uses (`VirtioDevice`, `HostEvents`, `Persist`).
//!
//! The device has no lock of its own: everything runs under the lock of its `MmioTransport`
//! (vCPU MMIO accesses, the queue notifier and the host-event subscriber all take it), so a
//! capture that holds it across `save` and the RAM freeze sees one instant (persist.rs).
//! The queue work (TX, RX, event queue) is in `queues.rs`, save and restore in `persist.rs`.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memory::{Access, Bytes, GuestAddress, GuestRam, PinGuard};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::muxer::{Muxer, RxItem};
use super::packet::{parse_rx, parse_tx, TxPacket, PKT_HEADER_SIZE};
use super::state::{check_cid, VsockState};
use super::*;
use crate::clock::Clock;
use crate::host_events::HostEvents;
use crate::interrupt::{DeviceInterrupt, INT_USED_RING};
use crate::persist::Persist;
use crate::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

mod persist;
mod queues;

const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

/// The host resources a new or restored vsock device needs: its backend is the Unix socket
/// path it listens on (a clone gets a path of its own).
#[derive(Debug)]
pub struct VsockArgs {
    pub ram: Arc<GuestRam>,
    pub interrupt: Arc<DeviceInterrupt>,
    /// Where host-initiated connections come in; guest-initiated ones go to `<uds_path>_<port>`.
    /// Must not exist; the device removes it when dropped.
    pub uds_path: PathBuf,
    /// Time for connection timeouts (`MonotonicClock::shared()` in a VM).
    pub clock: Arc<dyn Clock>,
}

/// What the device did, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Buffers given back to the guest unused (malformed, or a failed pin).
    pub bad_buffers: u64,
    /// Events (TRANSPORT_RESET) delivered.
    pub events: u64,
}

/// A TX packet popped and pinned for read, not yet handled and published (held mode).
struct HeldTx {
    packet: TxPacket,
    pins: Vec<PinGuard>,
}

/// An RX buffer filled and pinned for write, not yet published (held mode).
struct HeldRx {
    head: u16,
    len: u32,
    _pins: Vec<PinGuard>,
}

/// A virtio-vsock device.
pub struct VsockDevice {
    ram: Arc<GuestRam>,
    interrupt: Arc<DeviceInterrupt>,
    cid: u64,
    features: u64,
    /// RX, TX, event queue; empty until activated.
    queues: Vec<Queue>,
    muxer: Muxer,
    hold_tx: bool,
    hold_rx: bool,
    tx_held: VecDeque<HeldTx>,
    rx_held: VecDeque<HeldRx>,
    /// A TRANSPORT_RESET waits for an event buffer.
    event_pending: bool,
    /// The event queue's avail index when the reset went out: RX stays closed until the guest
    /// posts a fresh event buffer (it has handled the reset then).
    rx_gate: Option<u16>,
    /// TX stopped because too many control packets wait for RX buffers.
    tx_paused: bool,
    broken: bool,
    stats: VsockStats,
    last_error: Option<VsockError>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("cid", &self.cid)
            .field("muxer", &self.muxer)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Pins a TX packet's header and payload for read.
fn pin_tx(ram: &GuestRam, packet: &TxPacket) -> Result<Vec<PinGuard>, VsockError> {
    let mut pins =
        vec![ram.pin(GuestAddress(packet.header_at), PKT_HEADER_SIZE, Access::Read).map_err(VsockError::Pin)?];
    if let Some((addr, len)) = packet.data {
        pins.push(ram.pin(GuestAddress(addr), len as usize, Access::Read).map_err(VsockError::Pin)?);
    }
    Ok(pins)
}

impl VsockDevice {
    /// A device for guest CID `cid` listening on `args.uds_path`.
    pub fn new(args: VsockArgs, cid: u64) -> Result<VsockDevice, VsockError> {
        check_cid(cid)?;
        let muxer = Muxer::new(cid, &args.uds_path, args.clock)?;
        Ok(VsockDevice {
            ram: args.ram,
            interrupt: args.interrupt,
            cid,
            features: 0,
            queues: Vec::new(),
            muxer,
            hold_tx: false,
            hold_rx: false,
            tx_held: VecDeque::new(),
            rx_held: VecDeque::new(),
            event_pending: false,
            rx_gate: None,
            tx_paused: false,
            broken: false,
            stats: VsockStats::default(),
            last_error: None,
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// The last error the guest caused (a bad buffer, a credit overrun).
    pub fn last_error(&self) -> Option<&VsockError> {
        self.last_error.as_ref()
    }

    /// (TX packets, RX buffers) popped and not yet published.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.tx_held.len(), self.rx_held.len())
    }

    /// Whether a TRANSPORT_RESET is pending or not yet taken by the guest (RX is closed).
    pub fn reset_in_progress(&self) -> bool {
        self.event_pending || self.rx_gate.is_some()
    }

    /// While held, TX packets are popped and pinned but not read; releasing handles and
    /// publishes them in order. Lets a test or the fuzzer place a capture mid-transmit.
    pub fn hold_tx(&mut self, held: bool) {
        self.hold_tx = held;
        if !held && !self.tx_held.is_empty() {
            while let Some(HeldTx { packet, pins }) = self.tx_held.pop_front() {
                self.handle_tx(packet, pins);
            }
            self.signal_used(TXQ);
            self.run();
        }
    }

    /// While held, RX buffers are filled (pinned for write) but not published; releasing
    /// publishes them in order.
    pub fn hold_rx(&mut self, held: bool) {
        self.hold_rx = held;
        if !held && !self.rx_held.is_empty() {
            while let Some(held) = self.rx_held.pop_front() {
                self.publish(RXQ, held.head, held.len);
            }
            self.signal_used(RXQ);
            self.run();
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[VSOCK_QUEUE_SIZE; 3]
    }

    fn interrupt(&self) -> &Arc<DeviceInterrupt> {
        &self.interrupt
    }

    /// guest_cid (le64); the rest reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset.checked_add(i as u64).and_then(|o| config.get(o as usize)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mut queues: Vec<Queue>, features: u64) -> Result<(), VirtioError> {
        if queues.len() != 3 {
            return Err(VirtioError::QueueInvalid { queue: queues.len() });
        }
        for (index, queue) in queues.iter_mut().enumerate() {
            if !queue.is_valid(&*self.ram) {
                return Err(VirtioError::QueueInvalid { queue: index });
            }
            queue.set_event_idx(features & EVENT_IDX != 0);
        }
        self.queues = queues;
        self.features = features;
        self.broken = false;
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if usize::from(index) == EVQ {
            self.process_evq();
        }
        self.run();
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    /// Closes every connection (the listener stays) and forgets the queues. Nothing is ever
    /// in flight in the kernel on the device's behalf, so the held buffers are simply dropped.
    fn reset(&mut self) {
        self.muxer.reset();
        self.queues.clear();
        self.tx_held.clear();
        self.rx_held.clear();
        self.features = 0;
        self.event_pending = false;
        self.rx_gate = None;
        self.tx_paused = false;
        self.broken = false;
    }
}

impl HostEvents for VsockDevice {
    /// The device's own epoll set (listener, host streams, timeout timer).
    fn host_fd(&self) -> RawFd {
        self.muxer.epoll_fd()
    }

    fn process_host(&mut self) {
        self.muxer.process_host();
        self.run();
    }
}
