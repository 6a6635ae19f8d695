//! virtio-net test fixtures: a network namespace of the test's own with real TAPs in it, a
//! packet socket on each TAP as the far end of the wire, and a virtio driver played by the
//! test over both queues of a real `GuestRam`.
//!
//! The namespace belongs to one thread that unshared it; it is never named, so nothing is left
//! behind however the test ends: the kernel frees it, and the TAPs in it, when that thread and
//! the last fd opened in it are gone (even on a panic or a kill).

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::net::{MacAddr, NetDevice, Tap};
use devices::virtio::MmioTransport;
use devices::BusDevice;
use memory::{Bytes, GuestAddress, GuestRam};

pub const QUEUE_SIZE: u16 = 128;
pub const RAM_SIZE: usize = 4 << 20;
/// Where tests put frames and buffers.
pub const SCRATCH: u64 = 0x10_0000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const RX: u16 = 0;
pub const TX: u16 = 1;
/// virtio_net_hdr_v1.
pub const HDR: usize = 12;
pub const VERSION_1: u64 = 1 << 32;
pub const MAC_F: u64 = 1 << 5;
pub const MRG_RXBUF: u64 = 1 << 15;
pub const STATUS: u64 = 1 << 16;
/// What the tests' driver negotiates unless it says otherwise.
pub const BASE: u64 = VERSION_1 | MAC_F | STATUS;
pub const MAC: MacAddr = MacAddr([0x06, 0, 0xac, 0x10, 0, 0x02]);
/// Interrupt status bits.
pub const INT_USED: u32 = 1;
pub const INT_CONFIG: u32 = 2;
/// An EtherType for local experiments (IEEE 802): the kernel ignores it.
pub const ETHERTYPE: u16 = 0x88b5;

pub fn new_ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(&[(GuestAddress(0), RAM_SIZE)]).unwrap())
}

type Job = Box<dyn FnOnce() + Send>;

/// A network namespace of this test's own, held by one thread that runs jobs in it.
pub struct NetNs {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    tid: libc::pid_t,
}

impl NetNs {
    pub fn new() -> NetNs {
        let (jobs, inbox) = channel::<Job>();
        let (tid_tx, tid_rx) = channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare changes only this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            // No IPv6: a TAP going up would send router solicitations and MLD reports.
            for knob in ["all", "default"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
            }
            // SAFETY: gettid has no arguments and cannot fail.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            for job in inbox {
                job();
            }
        });
        let tid = tid_rx.recv().expect("the namespace thread started");
        NetNs { jobs: Some(jobs), thread: Some(thread), tid }
    }

    /// Runs `f` on the namespace's thread and returns what it returns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.as_ref().unwrap().send(job).unwrap();
        rx.recv().expect("the namespace job ran (a panic in it fails the test)")
    }

    /// The namespace as a file, for `Tap::open_in_netns` and `ip -n`-like tools.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/task/{}/ns/net", std::process::id(), self.tid))
    }

    /// Runs `ip ARGS` in the namespace, asserting it worked.
    pub fn ip(&self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let shown = args.join(" ");
        let out = self.run(move || Command::new("ip").args(&args).output());
        let out = out.unwrap_or_else(|e| panic!("cannot run ip {shown}: {e}"));
        assert!(out.status.success(), "ip {shown}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Creates TAP `name` in the namespace and sets it up, as a user would for Firecracker.
    pub fn add_tap(&self, name: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Opens TAP `name` in this namespace, as the VMM would (a thread that enters it).
    pub fn open_tap(&self, name: &str) -> Tap {
        Tap::open_in_netns(name, &self.path()).unwrap()
    }

    /// A packet socket on `name`: the far end of the TAP's wire.
    pub fn peer(&self, name: &str) -> Peer {
        let name = name.to_string();
        self.run(move || Peer::open(&name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An AF_PACKET socket bound to one interface: what it sends goes out on that interface (into
/// the TAP's reader, the device), what the interface receives (the device's writes) it reads.
pub struct Peer {
    fd: OwnedFd,
    /// Reused for every receive (a fresh 70 kB buffer per frame would cost more than the frame).
    buf: std::cell::RefCell<Vec<u8>>,
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

impl Peer {
    fn open(name: &str) -> Peer {
        let c_name = std::ffi::CString::new(name).unwrap();
        // SAFETY: a NUL-terminated string alive across the call.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert!(index > 0, "no interface {name}");
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned right below.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::c_int::from(protocol)) };
        check(raw, "packet socket");
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `addr` is a sockaddr_ll of `len` bytes, alive across the call.
        check(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) }, "bind");
        // Straight to the TAP's transmit, no qdisc: the frame is readable on the TAP when
        // send returns.
        Self::set(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &1i32);
        let timeout = libc::timeval { tv_sec: 20, tv_usec: 0 };
        Self::set(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout);
        Self::set(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(4i32 << 20));
        Peer { fd, buf: std::cell::RefCell::new(vec![0u8; 70_000]) }
    }

    fn set<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) {
        let len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: `value` points at `len` readable bytes for the call.
        check(
            unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, std::ptr::from_ref(value).cast(), len) },
            "setsockopt",
        );
    }

    /// Sends one Ethernet frame out on the interface (to the device).
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is readable for its length during the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }

    fn recv_with(&self, flags: libc::c_int) -> Option<Vec<u8>> {
        let mut buf = self.buf.borrow_mut();
        loop {
            // SAFETY: as above, plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length, `from` for `from_len` bytes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                    std::ptr::from_mut(&mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "recv: {e}");
                return None;
            }
            // Our own sends show up too, as outgoing: skip them.
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                return Some(buf[..n.unsigned_abs()].to_vec());
            }
        }
    }

    /// The next frame the interface received (from the device); waits up to 20 s.
    pub fn recv(&self) -> Vec<u8> {
        self.recv_with(0).expect("a frame from the device within 20 s")
    }

    /// A frame already received, if any (never waits).
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.recv_with(libc::MSG_DONTWAIT)
    }
}

/// A descriptor as the driver writes it: (addr, len, flags, next).
pub type Desc = (u64, u32, u16, u16);

/// An Ethernet frame of `len` bytes (at least 14) whose payload is numbered by `tag`.
pub fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = tag.wrapping_add((i % 251) as u8);
    }
    f
}

/// Guest addresses of one queue's rings.
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

pub const RINGS: [Rings; 2] =
    [Rings { desc: 0x1000, avail: 0x2000, used: 0x3000 }, Rings { desc: 0x4000, avail: 0x5000, used: 0x6000 }];

/// A driver's position in one queue.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueuePos {
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
}

pub fn reg_read(t: &mut MmioTransport<NetDevice>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

pub fn reg_write(t: &mut MmioTransport<NetDevice>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// The driver side of both queues of one virtio-net device.
pub struct NetDriver {
    pub ram: Arc<GuestRam>,
    pub transport: MmioTransport<NetDevice>,
    pub pos: [QueuePos; 2],
}

impl NetDriver {
    /// Negotiates `features` and sets both queues up through the MMIO registers.
    pub fn new(ram: Arc<GuestRam>, device: NetDevice, features: u64) -> NetDriver {
        let mut t = MmioTransport::new(device);
        for status in [1, 3] {
            reg_write(&mut t, 0x70, status);
        }
        for (sel, half) in [(0, features as u32), (1, (features >> 32) as u32)] {
            reg_write(&mut t, 0x24, sel);
            reg_write(&mut t, 0x20, half);
        }
        reg_write(&mut t, 0x70, 3 | 8);
        for (q, rings) in RINGS.iter().enumerate() {
            reg_write(&mut t, 0x30, q as u32);
            reg_write(&mut t, 0x38, u32::from(QUEUE_SIZE));
            reg_write(&mut t, 0x80, rings.desc as u32);
            reg_write(&mut t, 0x90, rings.avail as u32);
            reg_write(&mut t, 0xa0, rings.used as u32);
            reg_write(&mut t, 0x44, 1);
        }
        reg_write(&mut t, 0x70, 3 | 8 | 4);
        assert_eq!(reg_read(&mut t, 0x70), 15, "{:?}", t.last_error());
        NetDriver { ram, transport: t, pos: [QueuePos::default(); 2] }
    }

    /// A driver for a transport restored elsewhere (a clone), continuing at `pos`.
    pub fn resume(ram: Arc<GuestRam>, transport: MmioTransport<NetDevice>, pos: [QueuePos; 2]) -> NetDriver {
        NetDriver { ram, transport, pos }
    }

    pub fn device(&self) -> &NetDevice {
        self.transport.device()
    }

    /// Writes raw descriptors (addr, len, flags, next) of `queue` at table index `first..`
    /// and makes `head` available, without notifying.
    pub fn offer_raw(&mut self, queue: u16, first: u16, descs: &[(u64, u32, u16, u16)], head: u16) {
        let rings = RINGS[usize::from(queue)];
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = rings.desc + 16 * u64::from((first + i as u16) % QUEUE_SIZE);
            self.ram.write_obj(addr, GuestAddress(at)).unwrap();
            self.ram.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.ram.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.ram.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let pos = &mut self.pos[usize::from(queue)];
        let slot = u64::from(pos.avail_idx % QUEUE_SIZE);
        self.ram.write_obj(head, GuestAddress(rings.avail + 4 + 2 * slot)).unwrap();
        pos.avail_idx = pos.avail_idx.wrapping_add(1);
        self.ram.write_obj(pos.avail_idx, GuestAddress(rings.avail + 2)).unwrap();
    }

    /// Chains `bufs` (addr, len) on `queue` (device-writable on RX) and makes the chain
    /// available; returns its head. Descriptors are used round the table.
    pub fn offer(&mut self, queue: u16, bufs: &[(u64, u32)]) -> u16 {
        let first = self.pos[usize::from(queue)].next_desc;
        let flags = if queue == RX { F_WRITE } else { 0 };
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| {
                let last = i + 1 == bufs.len();
                (addr, len, flags | if last { 0 } else { F_NEXT }, (first + i as u16 + 1) % QUEUE_SIZE)
            })
            .collect();
        self.offer_raw(queue, first, &descs, first);
        self.pos[usize::from(queue)].next_desc = (first + bufs.len() as u16) % QUEUE_SIZE;
        first
    }

    /// Posts one receive buffer of `len` bytes at `addr`; returns its head.
    pub fn post_rx(&mut self, addr: u64, len: u32) -> u16 {
        self.offer(RX, &[(addr, len)])
    }

    /// Writes a zero virtio-net header and `frame` at `addr` and offers it for transmit in one
    /// descriptor; returns its head.
    pub fn post_tx(&mut self, addr: u64, frame: &[u8]) -> u16 {
        self.ram.write_slice(&[0u8; HDR], GuestAddress(addr)).unwrap();
        self.ram.write_slice(frame, GuestAddress(addr + HDR as u64)).unwrap();
        self.offer(TX, &[(addr, (HDR + frame.len()) as u32)])
    }

    pub fn notify(&mut self, queue: u16) {
        reg_write(&mut self.transport, 0x50, u32::from(queue));
    }

    /// The used index in guest RAM.
    pub fn used_idx(&self, queue: u16) -> u16 {
        self.ram.read_obj(GuestAddress(RINGS[usize::from(queue)].used + 2)).unwrap()
    }

    /// Used entries (id, len) of `queue` added since the last call.
    pub fn take_used(&mut self, queue: u16) -> Vec<(u32, u32)> {
        let rings = RINGS[usize::from(queue)];
        let idx = self.used_idx(queue);
        let pos = &mut self.pos[usize::from(queue)];
        let mut out = Vec::new();
        while pos.used_seen != idx {
            let slot = u64::from(pos.used_seen % QUEUE_SIZE);
            let id: u32 = self.ram.read_obj(GuestAddress(rings.used + 4 + 8 * slot)).unwrap();
            let len: u32 = self.ram.read_obj(GuestAddress(rings.used + 8 + 8 * slot)).unwrap();
            out.push((id, len));
            pos.used_seen = pos.used_seen.wrapping_add(1);
        }
        out
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.ram.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// The interrupt status register, acknowledged.
    pub fn take_interrupt(&mut self) -> u32 {
        let status = reg_read(&mut self.transport, 0x60);
        reg_write(&mut self.transport, 0x64, status);
        status
    }

    /// `num_buffers` and the frame the device put in a buffer at `addr` of `len` used bytes.
    pub fn received(&self, addr: u64, len: u32) -> (u16, Vec<u8>) {
        let header = self.bytes(addr, HDR);
        (u16::from_le_bytes([header[10], header[11]]), self.bytes(addr + HDR as u64, len as usize - HDR))
    }

    /// The config space's status field (VIRTIO_NET_S_LINK_UP = 1).
    pub fn link_status(&mut self) -> u16 {
        let mut data = [0u8; 2];
        self.transport.read(0x100 + 6, &mut data);
        u16::from_le_bytes(data)
    }
}
