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
//!
//! What the guest sends and takes is in `guest.rs`, what the host side does (accepts,
//! handshakes, timeouts) in `host.rs`.

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

mod guest;
mod host;

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
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours (bind created it); a clone listens on a path of its own.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
