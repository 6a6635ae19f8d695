//! The client side of the control API (`zygote ctl`): one HTTP/1.1 request per connection over
//! the Unix socket; the response is parsed with `httparse`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// What failed talking to the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("the API answered something that is not HTTP: {0}")]
    BadResponse(String),
}

/// An HTTP answer: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    /// Whether the request succeeded (2xx).
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends `method path` with an optional JSON body and returns the answer.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<ApiResponse, ClientError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| ClientError::Connect { path: socket.to_path_buf(), source })?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let start = match response.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ClientError::BadResponse("incomplete header".into())),
        Err(e) => return Err(ClientError::BadResponse(e.to_string())),
    };
    let status = response.code.ok_or_else(|| ClientError::BadResponse("no status code".into()))?;
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
    let body = &raw[start..];
    let body = length.map_or(body, |n| &body[..n.min(body.len())]);
    Ok(ApiResponse { status, body: String::from_utf8_lossy(body).into_owned() })
}
