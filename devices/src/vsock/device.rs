//! `VsockDevice`: the three queues (RX, TX, event), the DMA pins of packets in flight, held
//! mode, and the interfaces the VMM uses (`VirtioDevice`, `HostEvents`, `Persist`).
//!
//! The device has no lock of its own: everything runs under the lock of its `MmioTransport`
//! (vCPU MMIO accesses, the queue notifier and the host-event subscriber all take it), so a
//! capture that holds it across `save` and the RAM freeze sees one instant (persist.rs).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memory::{Access, GuestAddress, GuestRam, PinGuard};
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

/// Largest queue the device offers (each of the three).
pub const VSOCK_QUEUE_SIZE: u16 = 256;
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
        f.debug_struct("VsockDevice").field("cid", &self.cid).field("muxer", &self.muxer).field("stats", &self.stats).finish_non_exhaustive()
    }
}

/// Pins a TX packet's header and payload for read.
fn pin_tx(ram: &GuestRam, packet: &TxPacket) -> Result<Vec<PinGuard>, VsockError> {
    let mut pins = vec![ram.pin(GuestAddress(packet.header_at), PKT_HEADER_SIZE, Access::Read).map_err(VsockError::Pin)?];
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

    fn record(&mut self, error: VsockError) {
        self.stats.bad_buffers += 1;
        self.last_error = Some(error);
    }

    fn publish(&mut self, q: usize, head: u16, len: u32) {
        if self.queues[q].add_used(&*self.ram, head, len).is_err() {
            self.broken = true;
        }
    }

    fn signal_used(&mut self, q: usize) {
        if self.queues.get_mut(q).is_some_and(|queue| queue.needs_notification(&*self.ram).unwrap_or(true)) {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// The next chain of queue `q`, or `None`; an avail index that jumped breaks the device.
    fn pop(&mut self, q: usize, ram: &Arc<GuestRam>) -> Option<DescriptorChain<Arc<GuestRam>>> {
        match self.queues[q].iter(Arc::clone(ram)) {
            Ok(mut iter) => iter.next(),
            Err(_) => {
                self.broken = true;
                None
            }
        }
    }

    /// Serves TX until the ring is empty (re-arming EVENT_IDX notifications on the way out),
    /// or until control packets pile up for want of RX buffers.
    fn process_tx(&mut self) {
        if self.queues.is_empty() || self.broken {
            return;
        }
        self.tx_paused = false;
        let ram = Arc::clone(&self.ram);
        loop {
            while !self.broken {
                if self.muxer.control_full() {
                    self.tx_paused = true;
                    break;
                }
                let Some(chain) = self.pop(TXQ, &ram) else {
                    break;
                };
                let head = chain.head_index();
                let pinned = parse_tx(&ram, chain).and_then(|packet| Ok((packet, pin_tx(&ram, &packet)?)));
                match pinned {
                    Ok((packet, pins)) if self.hold_tx => self.tx_held.push_back(HeldTx { packet, pins }),
                    Ok((packet, pins)) => self.handle_tx(packet, pins),
                    Err(e) => {
                        self.record(e);
                        self.publish(TXQ, head, 0);
                    }
                }
            }
            if self.tx_paused || self.broken || !self.queues[TXQ].enable_notification(&*ram).unwrap_or(false) {
                break;
            }
        }
        self.signal_used(TXQ);
    }

    /// Reads a pinned TX packet, hands it to the muxer and publishes it (then unpins).
    fn handle_tx(&mut self, packet: TxPacket, pins: Vec<PinGuard>) {
        let h = packet.header;
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.record(VsockError::WrongCid { src: h.src_cid, dst: h.dst_cid, guest: self.cid });
        } else {
            let mut data = vec![0u8; pins.get(1).map_or(0, PinGuard::len)];
            let read = pins.get(1).map_or(Ok(()), |pin| pin.read_at(0, &mut data));
            match read {
                Ok(()) => {
                    if let Some(e) = self.muxer.handle_tx(&h, &data) {
                        self.last_error = Some(e);
                    }
                    self.stats.tx_packets += 1;
                }
                Err(e) => self.record(VsockError::Pin(e)),
            }
        }
        self.publish(TXQ, packet.head, 0);
        drop(pins);
    }

    /// Whether RX may carry packets: not before the guest took a pending TRANSPORT_RESET.
    fn rx_open(&mut self) -> bool {
        if self.event_pending {
            return false;
        }
        if let Some(at) = self.rx_gate {
            let now = self.queues[EVQ].avail_idx(&*self.ram, std::sync::atomic::Ordering::Acquire);
            if now.is_ok_and(|idx| idx.0 != at) {
                self.rx_gate = None;
            }
        }
        self.rx_gate.is_none()
    }

    /// Fills RX buffers with what the muxer has for the guest: control packets first, then
    /// connection data, each buffer pinned for write before the first byte lands in it.
    fn process_rx(&mut self) {
        if self.queues.is_empty() || self.broken || !self.rx_open() {
            return;
        }
        let ram = Arc::clone(&self.ram);
        let mut used = false;
        while !self.broken {
            let Some(chain) = self.pop(RXQ, &ram) else {
                // Out of buffers: have the guest notify when it posts more.
                if self.queues[RXQ].enable_notification(&*ram).unwrap_or(false) && self.muxer.has_rx_work() {
                    continue;
                }
                break;
            };
            let Some(item) = self.muxer.next_rx() else {
                self.queues[RXQ].go_to_previous_position();
                break;
            };
            let head = chain.head_index();
            match self.fill_rx(&ram, chain, item) {
                Ok(Some((len, pins))) => {
                    self.stats.rx_packets += 1;
                    if self.hold_rx {
                        self.rx_held.push_back(HeldRx { head, len, _pins: pins });
                    } else {
                        self.publish(RXQ, head, len);
                        used = true;
                    }
                }
                // The stream had nothing after all: the buffer stays the guest's.
                Ok(None) => self.queues[RXQ].go_to_previous_position(),
                Err(e) => {
                    if let RxItem::Data(key) = item {
                        self.muxer.schedule_rx(key);
                    }
                    self.record(e);
                    self.publish(RXQ, head, 0);
                    used = true;
                }
            }
        }
        if used {
            self.signal_used(RXQ);
        }
    }

    /// Writes `item` into the RX chain: pins the header (and for data the data buffer) for
    /// write, reads host bytes into the pinned buffer, then writes the header through the
    /// crate. Returns the used length and the pins (dropped after publication).
    fn fill_rx(&mut self, ram: &GuestRam, chain: DescriptorChain<Arc<GuestRam>>, item: RxItem) -> Result<Option<(u32, Vec<PinGuard>)>, VsockError> {
        let head = chain.head_index();
        let (layout, mut packet) = parse_rx(ram, chain)?;
        let mut pins = vec![ram.pin(GuestAddress(layout.header_at), PKT_HEADER_SIZE, Access::Write).map_err(VsockError::Pin)?];
        let header = match item {
            RxItem::Control => self.muxer.take_control(),
            RxItem::Data(key) => {
                let (data_at, capacity) = layout.data;
                let Some(&slice) = packet.data_slice().filter(|_| capacity > 0) else {
                    return Err(VsockError::NoRxRoom { head });
                };
                pins.push(ram.pin(GuestAddress(data_at), capacity as usize, Access::Write).map_err(VsockError::Pin)?);
                let mut slice = slice.subslice(0, capacity as usize).map_err(|_| VsockError::NoRxRoom { head })?;
                self.muxer.read_for_guest(key, &mut slice)
            }
        };
        let Some(header) = header else {
            return Ok(None);
        };
        packet.set_header_from_raw(&header.to_bytes()).map_err(|source| VsockError::BadPacket { head, source })?;
        Ok(Some((PKT_HEADER_SIZE as u32 + header.len, pins)))
    }

    /// Delivers a pending TRANSPORT_RESET into the next event buffer.
    fn process_evq(&mut self) {
        if self.queues.is_empty() || self.broken || !self.event_pending {
            return;
        }
        let ram = Arc::clone(&self.ram);
        while self.event_pending && !self.broken {
            let Some(chain) = self.pop(EVQ, &ram) else {
                let _ = self.queues[EVQ].enable_notification(&*ram);
                break;
            };
            let head = chain.head_index();
            let first: Option<Descriptor> = chain.into_iter().next();
            let written = first
                .filter(|d| d.is_write_only() && d.len() >= 4)
                .ok_or(VsockError::BadEventBuffer { head })
                .and_then(|d| ram.pin(d.addr(), 4, Access::Write).map_err(VsockError::Pin))
                .and_then(|pin| pin.write_at(0, &EVENT_TRANSPORT_RESET.to_le_bytes()).map_err(VsockError::Pin).map(|()| pin));
            match written {
                Ok(pin) => {
                    self.publish(EVQ, head, 4);
                    drop(pin);
                    self.event_pending = false;
                    self.stats.events += 1;
                    let idx = self.queues[EVQ].avail_idx(&*ram, std::sync::atomic::Ordering::Acquire);
                    self.rx_gate = Some(idx.map_or(0, |i| i.0));
                }
                Err(e) => {
                    self.record(e);
                    self.publish(EVQ, head, 0);
                }
            }
        }
        self.signal_used(EVQ);
    }

    /// TX, then RX, again while TX waited only for RX to drain.
    fn run(&mut self) {
        for _ in 0..4 {
            self.process_tx();
            self.process_rx();
            if !self.tx_paused || self.muxer.control_full() {
                break;
            }
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

impl Persist for VsockDevice {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockError;

    /// The state at this instant; the caller holds the transport's lock across this and the
    /// RAM freeze, so no buffer is published or pinned in between.
    fn save(&self) -> Result<VsockState, VsockError> {
        Ok(VsockState {
            cid: self.cid,
            features: self.features,
            queues: self.queues.iter().map(Queue::state).collect(),
            tx_in_flight: self.tx_held.iter().map(|h| h.packet.head).collect(),
            rx_in_flight: self.rx_held.iter().map(|h| h.head).collect(),
            hold_tx: self.hold_tx,
            hold_rx: self.hold_rx,
        })
    }

    /// A clone's or restored VM's device on its own `uds_path`, with no connections: the
    /// buffers that were in flight go back to the guest unused, and the guest is sent
    /// TRANSPORT_RESET (now if it has an event buffer posted, else when it posts one). The VMM
    /// then notifies every queue on resume.
    fn restore(args: VsockArgs, state: &VsockState) -> Result<VsockDevice, VsockError> {
        let queues = state.check(&args.ram)?;
        let mut device = VsockDevice::new(args, state.cid)?;
        device.features = state.features;
        device.hold_tx = state.hold_tx;
        device.hold_rx = state.hold_rx;
        if queues.is_empty() {
            return Ok(device);
        }
        device.queues = queues;
        for &head in &state.tx_in_flight {
            device.publish(TXQ, head, 0);
        }
        for &head in &state.rx_in_flight {
            device.publish(RXQ, head, 0);
        }
        device.signal_used(TXQ);
        device.signal_used(RXQ);
        device.event_pending = true;
        device.process_evq();
        Ok(device)
    }
}
