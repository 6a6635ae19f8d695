//! The host side of a host-initiated connection before it is one: a stream accepted on
//! `uds_path` that has not finished its `CONNECT <port>\n` line yet.
//!
//! The line is read one byte at a time so that no byte after the newline is taken from the
//! stream: anything the host sends after it is connection data for the guest.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Longest `CONNECT <port>\n` line accepted ("CONNECT " + 10 digits + "\n" fits).
const MAX_LINE: usize = 32;

/// Where a handshake stands after reading what the host sent so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HandshakeStep {
    /// The line is not complete yet.
    Pending,
    /// The host asked for guest port `.0`.
    Connect(u32),
    /// The host closed the stream, or sent something that is not a CONNECT line.
    Failed,
}

#[derive(Debug)]
pub(crate) struct Handshake {
    pub stream: UnixStream,
    line: Vec<u8>,
    /// Clock time after which the handshake is dropped.
    pub deadline: Duration,
}

impl Handshake {
    pub fn new(stream: UnixStream, deadline: Duration) -> Handshake {
        Handshake { stream, line: Vec::new(), deadline }
    }

    /// Reads what is there of the line, without blocking.
    pub fn read_step(&mut self) -> HandshakeStep {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return HandshakeStep::Failed,
                Ok(_) if byte[0] == b'\n' => {
                    return parse_connect(&self.line).map_or(HandshakeStep::Failed, HandshakeStep::Connect);
                }
                Ok(_) if self.line.len() == MAX_LINE => return HandshakeStep::Failed,
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return HandshakeStep::Pending,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return HandshakeStep::Failed,
            }
        }
    }
}

/// The port of a `CONNECT <port>` line (without its newline), if it is one.
pub(crate) fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"connect 52",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"CONNECT 5 2",
            b"CONNECT +5",
        ] {
            assert_eq!(parse_connect(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_line_in_pieces_and_the_bytes_after_it_stay_in_the_stream() {
        let (mut host, device_end) = UnixStream::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(device_end, Duration::ZERO);
        host.write_all(b"CONN").unwrap();
        assert_eq!(h.read_step(), HandshakeStep::Pending);
        host.write_all(b"ECT 1024\nhello").unwrap();
        assert_eq!(h.read_step(), HandshakeStep::Connect(1024));
        let mut rest = [0u8; 5];
        h.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn overlong_lines_and_closed_streams_fail() {
        let (mut host, device_end) = UnixStream::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(device_end, Duration::ZERO);
        host.write_all(&[b'7'; 40]).unwrap();
        assert_eq!(h.read_step(), HandshakeStep::Failed);
        let (host, device_end) = UnixStream::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        drop(host);
        assert_eq!(Handshake::new(device_end, Duration::ZERO).read_step(), HandshakeStep::Failed);
    }
}
