//! HTTP/1.1 on one client connection: reads whole requests (headers parsed by `httparse`) under
//! a deadline and a size limit, and writes answers. Every client has its own thread (see
//! `server`), so a client that stalls or sends too much affects only its own connection.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Largest request body accepted (Firecracker's default limit is 50 kB; Zygote's bodies are
/// small too, so 1 MiB leaves room without letting a client make the server buffer much).
pub const MAX_BODY: usize = 1 << 20;
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// How long a request may take to arrive once its first byte has.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may sit idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long writing an answer may take (a client that never reads).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADERS: usize = 64;

/// One complete request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub body: Vec<u8>,
    /// Whether the client keeps the connection for another request.
    pub keep_alive: bool,
}

/// Why no request could be read; answered with `status`, then the connection is closed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

fn http_error(status: u16, message: impl Into<String>) -> HttpError {
    HttpError { status, message: message.into() }
}

/// A client connection and the bytes read from it but not used yet (pipelined requests).
pub struct Connection {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl Connection {
    pub fn new(stream: UnixStream) -> Connection {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        Connection { stream, pending: Vec::new() }
    }

    /// Reads more bytes before `deadline`; Ok(false) at end of stream.
    fn fill(&mut self, deadline: Instant) -> Result<bool, HttpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(http_error(408, "request timeout: the request did not arrive in time"));
        }
        self.stream.set_read_timeout(Some(left)).map_err(|e| http_error(500, format!("socket: {e}")))?;
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(http_error(408, "request timeout: the request did not arrive in time"));
                }
                Err(e) => return Err(http_error(400, format!("cannot read the request: {e}"))),
            }
        }
    }

    /// The next request; None when the client closed the connection between requests.
    pub fn read_request(&mut self) -> Result<Option<Request>, HttpError> {
        let idle_deadline = Instant::now() + IDLE_TIMEOUT;
        while self.pending.is_empty() {
            match self.fill(idle_deadline) {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                // An idle connection closes quietly.
                Err(e) if e.status == 408 => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let (head_len, method, url, length, keep_alive, expect_continue) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&self.pending) {
                Ok(httparse::Status::Complete(n)) => break head(&request, n)?,
                Ok(httparse::Status::Partial) if self.pending.len() > MAX_HEAD => {
                    return Err(http_error(431, format!("request head larger than {MAX_HEAD} bytes")));
                }
                Ok(httparse::Status::Partial) => {
                    if !self.fill(deadline)? {
                        return Err(http_error(400, "the client closed the connection mid-request"));
                    }
                }
                Err(e) => return Err(http_error(400, format!("not an HTTP request: {e}"))),
            }
        };
        if length > MAX_BODY {
            return Err(http_error(413, format!("body too large: {length} bytes, at most {MAX_BODY}")));
        }
        if expect_continue && self.pending.len() < head_len + length {
            self.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n").map_err(|e| http_error(400, e.to_string()))?;
        }
        while self.pending.len() < head_len + length {
            if !self.fill(deadline)? {
                return Err(http_error(400, "the client closed the connection mid-body"));
            }
        }
        let body = self.pending[head_len..head_len + length].to_vec();
        self.pending.drain(..head_len + length);
        Ok(Some(Request { method, url, body, keep_alive }))
    }

    fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes an answer: `body` is JSON (none: 204-style, no body).
    pub fn respond(&mut self, status: u16, body: Option<&str>, close: bool) -> std::io::Result<()> {
        let mut text = format!("HTTP/1.1 {status} {}\r\nServer: Zygote\r\n", reason(status));
        if let Some(body) = body {
            text.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        if close {
            text.push_str("Connection: close\r\n");
        }
        text.push_str("\r\n");
        text.push_str(body.unwrap_or(""));
        self.write_raw(text.as_bytes())
    }

    /// Answers `err` and closes the connection (what is left of the request is not read).
    pub fn refuse(mut self, err: &HttpError) {
        let body = serde_json::json!({ "fault_message": err.message }).to_string();
        let _ = self.respond(err.status, Some(&body), true);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Method, URL, body length, keep-alive and 100-continue of a parsed head `n` bytes long.
fn head(request: &httparse::Request, n: usize) -> Result<(usize, String, String, usize, bool, bool), HttpError> {
    let method = request.method.unwrap_or_default().to_string();
    let url = request.path.unwrap_or_default().to_string();
    let mut keep_alive = request.version == Some(1);
    let (mut length, mut expect_continue) = (0usize, false);
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            length =
                value.parse().map_err(|_| http_error(400, format!("Content-Length {value:?} is not a byte count")))?;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(http_error(411, format!("Transfer-Encoding {value:?} is not accepted: send a Content-Length")));
        } else if header.name.eq_ignore_ascii_case("connection") {
            keep_alive =
                !value.eq_ignore_ascii_case("close") && (keep_alive || value.eq_ignore_ascii_case("keep-alive"));
        } else if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    Ok((n, method, url, length, keep_alive, expect_continue))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}
