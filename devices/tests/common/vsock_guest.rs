//! The guest side of virtio-vsock played by the test: RX and event buffers posted and reposted
//! the way Linux's driver does, packets sent on TX, received packets decoded. The host side is
//! real: Unix sockets in a temporary directory, and the device's host events are stepped by
//! the test (`host_step`), so every test is deterministic.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use devices::clock::ManualClock;
use devices::host_events::HostEvents;
use devices::virtio::MmioTransport;
use devices::vsock::{Header, VsockArgs, VsockDevice, EVQ, HOST_CID, PKT_HEADER_SIZE, RXQ, TXQ, TYPE_STREAM};
use devices::DeviceInterrupt;
use memory::{Bytes, GuestAddress, GuestRam};

use super::virtq::*;

pub const GUEST_CID: u64 = 3;
/// Data bytes of each RX buffer (Linux posts 4 KiB).
pub const RX_DATA: u32 = 4096;
pub const RX_BUFFERS: usize = 16;
pub const EVENT_BUFFERS: usize = 8;

/// A directory for the test's sockets, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("zygote-vsock-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

/// One received packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub head: u16,
    pub used_len: u32,
    pub header: Header,
    pub data: Vec<u8>,
}

/// A copy of the guest driver's state at a clone instant.
#[derive(Clone)]
pub struct GuestVsockState {
    driver: DriverState,
    rx: Vec<Option<(u64, u64)>>,
    ev: Vec<Option<u64>>,
}

/// The guest's vsock driver.
pub struct GuestVsock {
    pub d: GuestDriver<VsockDevice>,
    pub clock: Arc<ManualClock>,
    /// RX buffers by head: (header address, data address).
    rx: Vec<Option<(u64, u64)>>,
    /// Event buffers by head.
    ev: Vec<Option<u64>>,
}

pub fn device(ram: &Arc<GuestRam>, uds_path: &Path, clock: &Arc<ManualClock>) -> VsockDevice {
    let args = VsockArgs {
        ram: Arc::clone(ram),
        interrupt: DeviceInterrupt::polled(),
        uds_path: uds_path.to_path_buf(),
        clock: clock.clone(),
    };
    VsockDevice::new(args, GUEST_CID).unwrap()
}

impl GuestVsock {
    /// A device on `uds_path`, brought up with EVENT_IDX, RX and event buffers posted.
    pub fn new(uds_path: &Path) -> GuestVsock {
        Self::with_rx_buffers(uds_path, RX_BUFFERS)
    }

    /// Like `new`, with `rx_buffers` RX buffers posted.
    pub fn with_rx_buffers(uds_path: &Path, rx_buffers: usize) -> GuestVsock {
        let ram = new_ram();
        let clock = ManualClock::new();
        let d = GuestDriver::new(Arc::clone(&ram), device(&ram, uds_path, &clock), EVENT_IDX, 64);
        assert_ne!(d.features & EVENT_IDX, 0);
        let mut g = GuestVsock { d, clock, rx: vec![None; 64], ev: vec![None; 64] };
        for _ in 0..rx_buffers {
            g.post_rx();
        }
        g.d.kick(RXQ);
        for _ in 0..EVENT_BUFFERS {
            g.post_event();
        }
        g.d.kick(EVQ);
        g
    }

    /// The guest driver's state, to resume from on a clone.
    pub fn snapshot(&self) -> GuestVsockState {
        GuestVsockState { driver: self.d.driver_state(), rx: self.rx.clone(), ev: self.ev.clone() }
    }

    /// The guest as `at` was, on a restored device.
    pub fn resume(
        at: &GuestVsockState,
        ram: Arc<GuestRam>,
        transport: MmioTransport<VsockDevice>,
        clock: Arc<ManualClock>,
    ) -> GuestVsock {
        let d = GuestDriver::resume(ram, transport, &at.driver);
        GuestVsock { d, clock, rx: at.rx.clone(), ev: at.ev.clone() }
    }

    /// Posts one RX buffer (header and data in two descriptors), without kicking.
    pub fn post_rx(&mut self) -> u16 {
        let hdr = self.d.alloc(PKT_HEADER_SIZE as u64);
        let data = self.d.alloc(u64::from(RX_DATA));
        let head = self.d.offer(RXQ, &[(hdr, PKT_HEADER_SIZE as u32, true), (data, RX_DATA, true)]);
        self.rx[usize::from(head)] = Some((hdr, data));
        head
    }

    fn post_event(&mut self) -> u16 {
        let at = self.d.alloc(8);
        let head = self.d.offer(EVQ, &[(at, 8, true)]);
        self.ev[usize::from(head)] = Some(at);
        head
    }

    pub fn host_step(&mut self) {
        self.d.t().device_mut().process_host();
    }

    /// Packets the device put in RX since the last call; each buffer is posted again (and RX
    /// kicked if the device asks), as Linux refills.
    pub fn recv(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        for (head, used_len) in self.d.take_used(RXQ) {
            let (hdr_at, data_at) = self.rx[usize::from(head)].take().expect("an RX buffer we posted");
            let mut raw = [0u8; PKT_HEADER_SIZE];
            self.d.ram.read_slice(&mut raw, GuestAddress(hdr_at)).unwrap();
            let header = Header::from_bytes(&raw);
            let data = if used_len as usize > PKT_HEADER_SIZE {
                self.d.bytes(data_at, header.len as usize)
            } else {
                Vec::new()
            };
            out.push(Packet { head, used_len, header, data });
            self.post_rx();
        }
        self.d.kick(RXQ);
        out
    }

    /// Event ids delivered since the last call; each buffer is posted again and the queue
    /// kicked (Linux does both after handling an event).
    pub fn events(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        for (head, len) in self.d.take_used(EVQ) {
            let at = self.ev[usize::from(head)].take().expect("an event buffer we posted");
            assert_eq!(len, 4, "an event is 4 bytes");
            out.push(self.d.ram.read_obj::<u32>(GuestAddress(at)).unwrap());
            self.post_event();
        }
        if !out.is_empty() {
            self.d.kick(EVQ);
        }
        out
    }

    /// Reclaims the TX buffers the device has used, sends a packet (header, then payload in a
    /// second descriptor) and kicks TX if the device asks.
    pub fn send(&mut self, header: Header, data: &[u8]) -> u16 {
        self.d.take_used(TXQ);
        let head = self.offer_tx(header, data);
        self.d.kick(TXQ);
        head
    }

    /// Makes a packet available on TX without kicking.
    pub fn offer_tx(&mut self, header: Header, data: &[u8]) -> u16 {
        let hdr_at = self.d.alloc(PKT_HEADER_SIZE as u64);
        self.d.ram.write_slice(&header.to_bytes(), GuestAddress(hdr_at)).unwrap();
        if data.is_empty() {
            return self.d.offer(TXQ, &[(hdr_at, PKT_HEADER_SIZE as u32, false)]);
        }
        let data_at = self.d.alloc(data.len() as u64);
        self.d.ram.write_slice(data, GuestAddress(data_at)).unwrap();
        self.d.offer(TXQ, &[(hdr_at, PKT_HEADER_SIZE as u32, false), (data_at, data.len() as u32, false)])
    }

    /// TX buffers the device gave back since the last call.
    pub fn tx_used(&mut self) -> Vec<(u16, u32)> {
        self.d.take_used(TXQ)
    }
}
