//! One connection between a guest vsock port and a host Unix stream: its state, credit
//! accounting both ways and the buffer of guest bytes the host has not taken yet.
//!
//! Credit (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` (its receive buffer) and
//! `fwd_cnt` (bytes it has consumed). The guest may have at most our `buf_alloc` bytes sent and
//! not yet counted in the `fwd_cnt` we reported; we read from the host at most what the
//! guest's figures leave. All counters are wrapping u32s, as on the wire.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::{ReadVolatile, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use super::{CONN_BUF_ALLOC, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Send a CREDIT_UPDATE once the guest's view of our free space is this much behind.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated: REQUEST queued for the guest, waiting for RESPONSE until `deadline`
    /// (`HANDSHAKE_TIMEOUT` for the REQUEST to reach the guest, which waits while the guest
    /// has not taken a TRANSPORT_RESET; then `REQUEST_TIMEOUT` from when it reaches it).
    LocalInit {
        deadline: Duration,
    },
    Established,
    /// The guest shut down both directions: flushing its last bytes to the host, then RST
    /// (at `deadline` at the latest).
    Draining {
        deadline: Duration,
    },
}

/// What a read from the host stream gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HostRead {
    Data(u32),
    /// The host will send nothing more.
    Eof,
    /// Nothing there now (or no credit).
    Nothing,
}

/// The host end of the connection failed (closed, reset): the guest gets an RST.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HostGone;

#[derive(Debug)]
pub(crate) struct Connection {
    /// The connection's epoll token (unique for the device's life, never reused).
    pub token: u64,
    pub stream: UnixStream,
    pub state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Guest bytes handed to the host stream.
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard from us.
    fwd_cnt_sent: u32,
    /// Guest bytes the host has not taken yet (at most CONN_BUF_ALLOC).
    tx_buf: VecDeque<u8>,
    /// Handshake bytes for the host (`OK <port>\n`), written before any data.
    to_host_control: Vec<u8>,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host stream gave EOF (we told the guest SHUTDOWN_SEND).
    pub host_eof: bool,
    host_write_shut: bool,
    /// epoll said the host stream is readable and we have not read it dry since.
    pub readable: bool,
    /// In the muxer's queue of connections with something for RX.
    pub rx_queued: bool,
    /// A CREDIT_REQUEST was sent and the guest has not answered with new figures since.
    pub credit_requested: bool,
    /// A CREDIT_UPDATE is in the control queue.
    pub credit_update_queued: bool,
    /// The interest the stream is registered with in the device's epoll set (empty: not
    /// registered, so a hung-up stream cannot wake the loop again and again).
    pub registered: EventSet,
}

impl Connection {
    pub fn new(token: u64, stream: UnixStream, state: ConnState) -> Connection {
        Connection {
            token,
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_buf: VecDeque::new(),
            to_host_control: Vec::new(),
            peer_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            readable: false,
            rx_queued: false,
            credit_requested: false,
            credit_update_queued: false,
            registered: EventSet::empty(),
        }
    }

    /// The guest's credit figures, from any packet it sent on this connection.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        if (buf_alloc, fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt) {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Our `buf_alloc` and `fwd_cnt` for a header going to the guest now.
    pub fn credit_figures(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        (CONN_BUF_ALLOC, self.fwd_cnt)
    }

    /// Whether the guest's view of our free space is far enough behind to tell it.
    pub fn wants_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Whether the device should read the host stream for the guest.
    pub fn can_read_host(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// What the stream should be watched for now.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.can_read_host() && !self.readable {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() || !self.to_host_control.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Queues `line` for the host ahead of any data (the handshake answer).
    pub fn send_control_to_host(&mut self, line: &[u8]) -> Result<(), HostGone> {
        self.to_host_control.extend_from_slice(line);
        self.flush_to_host()
    }

    /// Guest payload for the host: written now as far as the stream takes it, the rest
    /// buffered. Returns the credit it overran, if the guest sent more than we allowed.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<Result<(), u32>, HostGone> {
        let unacked = self.tx_buf.len() as u64 + u64::from(self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent));
        let credit = u64::from(CONN_BUF_ALLOC).saturating_sub(unacked);
        if data.len() as u64 > credit {
            return Ok(Err(credit as u32));
        }
        self.tx_buf.extend(data);
        self.flush_to_host().map(Ok)
    }

    /// Writes what is buffered for the host, as far as it takes it. Once the guest has shut
    /// down sending and everything is out, the host sees EOF.
    pub fn flush_to_host(&mut self) -> Result<(), HostGone> {
        while !self.to_host_control.is_empty() {
            match self.stream.write(&self.to_host_control) {
                Ok(n) => drop(self.to_host_control.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(HostGone),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(HostGone),
            }
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Whether every guest byte reached the host.
    pub fn flushed(&self) -> bool {
        self.tx_buf.is_empty() && self.to_host_control.is_empty()
    }

    /// Reads host bytes into `buf` (a pinned RX buffer), at most what the guest's credit
    /// allows.
    pub fn read_host(&mut self, buf: &mut VolatileSlice<'_, impl vm_memory::bitmap::BitmapSlice>) -> HostRead {
        let want = (self.peer_credit() as usize).min(buf.len());
        if want == 0 {
            return HostRead::Nothing;
        }
        let Ok(mut target) = buf.subslice(0, want) else { return HostRead::Nothing };
        loop {
            match self.stream.read_volatile(&mut target) {
                Ok(0) => {
                    self.readable = false;
                    self.host_eof = true;
                    return HostRead::Eof;
                }
                Ok(n) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    return HostRead::Data(n as u32);
                }
                Err(vm_memory::VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(vm_memory::VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return HostRead::Nothing;
                }
                // A reset stream reads as its end.
                Err(_) => {
                    self.readable = false;
                    self.host_eof = true;
                    return HostRead::Eof;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (UnixStream, Connection) {
        let (host, device_end) = UnixStream::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        (host, Connection::new(16, device_end, ConnState::Established))
    }

    #[test]
    fn peer_credit_follows_the_guest_figures_with_wrapping_counters() {
        let (_host, mut c) = pair();
        c.update_peer_credit(1000, 0);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt = 600;
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(1000, 500);
        assert_eq!(c.peer_credit(), 900);
        c.rx_cnt = 5u32.wrapping_sub(10);
        c.update_peer_credit(100, 5u32.wrapping_sub(60));
        assert_eq!(c.peer_credit(), 50, "across the u32 wrap");
        c.update_peer_credit(10, 0);
        assert_eq!(c.peer_credit(), 0, "figures that make no sense give no credit");
    }

    #[test]
    fn guest_bytes_are_buffered_within_our_buf_alloc_and_counted_when_the_host_takes_them() {
        let (mut host, mut c) = pair();
        assert_eq!(c.send_to_host(b"hello"), Ok(Ok(())));
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(c.fwd_cnt, 5);
        // The host stops reading: the socket fills (each write reported to the guest), then
        // the rest waits in tx_buf, and more than the advertised buf_alloc is refused.
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 5u64;
        while c.flushed() {
            assert_eq!(c.send_to_host(&chunk), Ok(Ok(())));
            c.credit_figures();
            sent += chunk.len() as u64;
        }
        assert!(c.interest().contains(EventSet::OUT));
        let overrun = loop {
            match c.send_to_host(&chunk) {
                Ok(Ok(())) => sent += chunk.len() as u64,
                Ok(Err(credit)) => break credit,
                Err(HostGone) => panic!("host is there"),
            }
        };
        assert!(overrun < chunk.len() as u32);
        assert!(!c.wants_credit_update());
        // The host drains everything; every byte arrives, in order.
        host.set_nonblocking(true).unwrap();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            c.flush_to_host().unwrap();
            match host.read(&mut buf) {
                Ok(n) => total += n as u64,
                Err(_) if c.flushed() => break,
                Err(_) => {}
            }
        }
        assert!(c.wants_credit_update(), "the guest has not heard of the bytes the host took");
        let (buf_alloc, fwd) = c.credit_figures();
        assert_eq!((buf_alloc, fwd), (CONN_BUF_ALLOC, c.fwd_cnt));
        assert_eq!(total, sent - 5);
    }

    #[test]
    fn the_host_sees_eof_after_the_guest_shuts_down_sending_and_the_buffer_is_out() {
        let (mut host, mut c) = pair();
        c.send_to_host(b"last").unwrap().unwrap();
        c.peer_shutdown |= SHUTDOWN_SEND;
        c.flush_to_host().unwrap();
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last");
        assert!(!c.can_read_host() || c.peer_shutdown & SHUTDOWN_RCV == 0);
    }

    #[test]
    fn a_closed_host_is_reported() {
        let (host, mut c) = pair();
        drop(host);
        assert_eq!(c.send_to_host(b"x"), Err(HostGone));
    }
}
