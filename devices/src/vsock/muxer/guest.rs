//! The muxer facing the guest: TX packets from it (connection requests to host ports, data,
//! credit, shutdown, reset), and what it gets next on RX (control packets, connection data).

use super::*;

impl Muxer {
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
    pub(super) fn connect_guest(&mut self, key: ConnKey, hdr: &Header) {
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
    pub(super) fn after_flush(&mut self, key: ConnKey) {
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
        // A REQUEST reaching the guest: it has REQUEST_TIMEOUT from now to answer.
        if c.op == OP_REQUEST {
            let now = self.clock.now();
            if let Some(conn) = self.conns.get_mut(&c.key) {
                if let ConnState::LocalInit { deadline } = &mut conn.state {
                    *deadline = now + REQUEST_TIMEOUT;
                }
            }
            self.arm_timer();
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
