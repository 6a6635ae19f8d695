//! The host side of the device: the listener on `uds_path`, handshakes in progress, the
//! connections, and the control packets waiting for an RX buffer. Everything the host side
//! waits on (listener, streams, timeout timer) is in one epoll set of the device's own, which
//! it changes itself as connections come and go, so a stream is never closed while an outside
//! loop still watches it; the VM's event loop watches only that set's fd.
//!
//! A stream is registered only with the interest it needs now: IN while the guest could take
//! its bytes and we do not already know it is readable, OUT while bytes wait for the host. A
//! stream with no interest is not in the set at all, so a hung-up host cannot make the loop
//! spin (epoll always reports HUP and ERR).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnState, Connection, HostGone, HostRead};
use super::handshake::{Handshake, HandshakeStep};
use super::packet::Header;
use super::*;
use crate::clock::{Clock, WakeTimer};

/// (host-side port, guest-side port).
pub(crate) type ConnKey = (u32, u32);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 16;
/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection the guest shut down may take to hand its last bytes to the host.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host has to send its `CONNECT <port>\n` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections and handshakes at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for RX buffers beyond which the device stops taking TX packets
/// (each may need an answer) until the guest posts RX buffers.
const MAX_CONTROL: usize = 256;
/// Host-initiated connections get host-side ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A control packet for the guest; its credit figures are filled in when it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

/// What the guest should get next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RxItem {
    Control,
    /// Bytes (or the end of them) of this connection's host stream.
    Data(ConnKey),
}

pub(crate) struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: WakeTimer,
    clock: Arc<dyn Clock>,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Control>,
    rx_ready: VecDeque<ConnKey>,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

/// `<uds_path>_<port>`, where guest-initiated connections to `port` go.
pub(crate) fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

impl Muxer {
    /// Listens on `uds_path` (which must not exist) for guest CID `cid`.
    pub fn new(cid: u64, uds_path: &Path, clock: Arc<dyn Clock>) -> Result<Muxer, VsockError> {
        let listen_err = |source| VsockError::Listen { path: uds_path.to_path_buf(), source };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = WakeTimer::new().map_err(VsockError::Epoll)?;
        for (fd, token) in [(listener.as_raw_fd(), TOKEN_LISTENER), (timer.as_raw_fd(), TOKEN_TIMER)] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).map_err(VsockError::Epoll)?;
        }
        Ok(Muxer {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            timer,
            clock,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether anything waits for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    /// Whether so many control packets wait that TX should pause.
    pub fn control_full(&self) -> bool {
        self.control.len() >= MAX_CONTROL
    }

    /// Drops every connection and handshake (a device reset); the listener stays.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        for (_, h) in self.handshakes.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, h.stream.as_raw_fd(), EpollEvent::default());
        }
        self.control.clear();
        self.rx_ready.clear();
        self.arm_timer();
    }

    fn new_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        self.control.push_back(Control { key, op, flags });
    }

    /// Registers `key`'s stream with the interest it needs now (none: not registered).
    fn update_interest(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let want = conn.interest();
        if want == conn.registered {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let op = match (conn.registered.is_empty(), want.is_empty()) {
            (true, _) => ControlOperation::Add,
            (false, true) => ControlOperation::Delete,
            (false, false) => ControlOperation::Modify,
        };
        // Failing here means the epoll set cannot grow (ENOMEM, max_user_watches): the stream
        // is then served only when something else wakes the device.
        if self.epoll.ctl(op, fd, EpollEvent::new(want, conn.token)).is_ok() {
            conn.registered = want;
        }
    }

    /// Puts a readable connection with credit in the RX queue.
    pub fn schedule_rx(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.readable && !conn.rx_queued && conn.can_read_host() {
                conn.rx_queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    /// Closes `key`'s host stream, forgets the connection and, if asked, tells the guest RST.
    fn kill(&mut self, key: ConnKey, send_rst: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            if !conn.registered.is_empty() {
                let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
            }
            self.tokens.remove(&conn.token);
        }
        if send_rst {
            self.queue_control(key, OP_RST, 0);
        }
    }

    /// A header from the host side of `key` to the guest, with the connection's credit
    /// figures (none for a connection that is gone).
    fn header(&mut self, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = self.conns.get_mut(&key).map_or((0, 0), Connection::credit_figures);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// A packet from the guest (checked by the device: from the guest's CID to the host).
    /// Returns an error the guest caused, if any; the device records it.
    pub fn handle_tx(&mut self, hdr: &Header, data: &[u8]) -> Option<VsockError> {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return None;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.connect_guest(key, hdr),
                OP_RST => {}
                _ => self.queue_control(key, OP_RST, 0),
            }
            return None;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let mut error = None;
        match (conn.state, hdr.op) {
            (_, OP_RST) => self.kill(key, false),
            (ConnState::LocalInit { .. }, OP_RESPONSE) => {
                conn.state = ConnState::Established;
                if conn.send_control_to_host(format!("OK {}\n", key.0).as_bytes()).is_err() {
                    self.kill(key, true);
                }
            }
            (ConnState::Established | ConnState::Draining { .. }, OP_RW) if conn.peer_shutdown & SHUTDOWN_SEND == 0 => {
                match conn.send_to_host(data) {
                    Ok(Ok(())) => self.after_flush(key),
                    Ok(Err(credit)) => {
                        error = Some(VsockError::CreditExceeded { local: key.0, peer: key.1, len: hdr.len, credit });
                        self.kill(key, true);
                    }
                    Err(HostGone) => self.kill(key, true),
                }
            }
            (ConnState::Established | ConnState::Draining { .. }, OP_CREDIT_UPDATE) => {}
            (ConnState::Established | ConnState::Draining { .. }, OP_CREDIT_REQUEST) => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            (ConnState::Established | ConnState::Draining { .. }, OP_SHUTDOWN) => {
                conn.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                let flushed = conn.flush_to_host().is_ok() && conn.flushed();
                if conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // A full close: the guest waits for our RST once its bytes are out.
                    if flushed {
                        self.kill(key, true);
                    } else {
                        conn.state = ConnState::Draining { deadline: self.clock.now() + SHUTDOWN_TIMEOUT };
                    }
                }
            }
            // A REQUEST or RESPONSE on a live connection, data after the guest shut down
            // sending, anything but RESPONSE or RST before the guest accepted, an unknown op.
            _ => self.kill(key, true),
        }
        self.schedule_rx(key);
        self.update_interest(key);
        self.arm_timer();
        error
    }

    /// A guest REQUEST for host port `key.0`: connects to `<uds_path>_<port>`; RESPONSE on
    /// success, RST when nobody listens there or there are too many connections.
    fn connect_guest(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            return self.queue_control(key, OP_RST, 0);
        }
        let Ok(stream) = connect_nonblocking(&port_path(&self.uds_path, key.0)) else {
            return self.queue_control(key, OP_RST, 0);
        };
        let token = self.new_token();
        let mut conn = Connection::new(token, stream, ConnState::Established);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.queue_control(key, OP_RESPONSE, 0);
        self.update_interest(key);
    }

    /// After guest bytes went out to the host: a drained full close ends with RST, and the
    /// guest hears of the room it has again.
    fn after_flush(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if matches!(conn.state, ConnState::Draining { .. }) && conn.flushed() {
            return self.kill(key, true);
        }
        if conn.wants_credit_update() && !conn.credit_update_queued {
            conn.credit_update_queued = true;
            self.queue_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// What the guest should get next, if anything.
    pub fn next_rx(&mut self) -> Option<RxItem> {
        if !self.control.is_empty() {
            return Some(RxItem::Control);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.rx_queued = false;
            if !conn.readable || !conn.can_read_host() {
                continue;
            }
            if conn.peer_credit() == 0 {
                // The guest's figures change with its next packet on this connection, which
                // schedules the connection again.
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    self.queue_control(key, OP_CREDIT_REQUEST, 0);
                    return Some(RxItem::Control);
                }
                continue;
            }
            return Some(RxItem::Data(key));
        }
        None
    }

    /// The next control packet's header.
    pub fn take_control(&mut self) -> Option<Header> {
        let c = self.control.pop_front()?;
        if c.op == OP_CREDIT_UPDATE {
            if let Some(conn) = self.conns.get_mut(&c.key) {
                conn.credit_update_queued = false;
            }
        }
        Some(self.header(c.key, c.op, c.flags, 0))
    }

    /// Reads `key`'s host bytes into `buf` (a pinned RX data buffer): the RW header for them,
    /// a SHUTDOWN(SEND) header at the end of the stream, or nothing.
    pub fn read_for_guest<B: BitmapSlice>(&mut self, key: ConnKey, buf: &mut VolatileSlice<'_, B>) -> Option<Header> {
        let conn = self.conns.get_mut(&key)?;
        let header = match conn.read_host(buf) {
            HostRead::Data(n) => Some(self.header(key, OP_RW, 0, n)),
            HostRead::Eof => Some(self.header(key, OP_SHUTDOWN, SHUTDOWN_SEND, 0)),
            HostRead::Nothing => None,
        };
        self.schedule_rx(key);
        self.update_interest(key);
        header
    }

    /// Serves what the host side has ready (without blocking), then the timeouts.
    pub fn process_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        // Again while something was ready (a stream accepted in one round is read in the
        // next), but a few rounds at most: level-triggered sources the device cannot clear
        // (accept failing for want of fds) come back on the next wake-up instead of spinning.
        for _ in 0..4 {
            let n = self.epoll.wait(0, &mut events).unwrap_or(0);
            if n == 0 {
                break;
            }
            for event in &events[..n] {
                self.handle_event(event.data(), event.event_set());
            }
        }
        self.expire();
        self.arm_timer();
    }

    fn handle_event(&mut self, token: u64, set: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_all(),
            TOKEN_TIMER => self.timer.acknowledge(),
            _ if self.handshakes.contains_key(&token) => self.continue_handshake(token),
            _ => {
                let Some(&key) = self.tokens.get(&token) else { return };
                let Some(conn) = self.conns.get_mut(&key) else { return };
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) && conn.can_read_host() {
                    conn.readable = true;
                }
                if !conn.flushed() {
                    match conn.flush_to_host() {
                        Ok(()) => self.after_flush(key),
                        Err(HostGone) => self.kill(key, true),
                    }
                }
                self.schedule_rx(key);
                self.update_interest(key);
            }
        }
    }

    fn accept_all(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.new_token();
            if self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token)).is_ok() {
                self.handshakes.insert(token, Handshake::new(stream, self.clock.now() + HANDSHAKE_TIMEOUT));
            }
        }
    }

    fn continue_handshake(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else { return };
        let port = match handshake.read_step() {
            HandshakeStep::Pending => return,
            HandshakeStep::Failed => None,
            HandshakeStep::Connect(port) => Some(port),
        };
        let handshake = self.handshakes.remove(&token).expect("looked up above");
        let _ = self.epoll.ctl(ControlOperation::Delete, handshake.stream.as_raw_fd(), EpollEvent::default());
        let Some(port) = port else { return };
        let key = (self.allocate_local_port(), port);
        let deadline = self.clock.now() + REQUEST_TIMEOUT;
        self.conns.insert(key, Connection::new(token, handshake.stream, ConnState::LocalInit { deadline }));
        self.tokens.insert(token, key);
        self.queue_control(key, OP_REQUEST, 0);
    }

    /// A host-side port no connection uses.
    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.0 == port) {
                return port;
            }
        }
    }

    /// Drops handshakes and connections whose time is up: requests the guest never answered
    /// and full closes whose bytes the host never took get an RST.
    fn expire(&mut self) {
        let now = self.clock.now();
        let stale: Vec<u64> = self.handshakes.iter().filter(|(_, h)| h.deadline <= now).map(|(&t, _)| t).collect();
        for token in stale {
            if let Some(h) = self.handshakes.remove(&token) {
                let _ = self.epoll.ctl(ControlOperation::Delete, h.stream.as_raw_fd(), EpollEvent::default());
            }
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, ConnState::LocalInit { deadline } | ConnState::Draining { deadline } if deadline <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in expired {
            self.kill(key, true);
        }
    }

    /// The earliest deadline of a handshake or connection.
    pub fn next_deadline(&self) -> Option<Duration> {
        let conns = self.conns.values().filter_map(|c| match c.state {
            ConnState::LocalInit { deadline } | ConnState::Draining { deadline } => Some(deadline),
            ConnState::Established => None,
        });
        self.handshakes.values().map(|h| h.deadline).chain(conns).min()
    }

    fn arm_timer(&mut self) {
        let deadline = self.next_deadline();
        let _ = self.timer.arm(&*self.clock, deadline);
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours (bind created it); a clone listens on a path of its own.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is full
/// answers EAGAIN (refused, for the guest) instead of stalling the device.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own; UnixStream closes it on drop.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un whose first `len` bytes hold the family and the
    // NUL-terminated path (checked to fit above); `fd` is open for the whole call.
    let ret = unsafe { libc::connect(stream.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}
