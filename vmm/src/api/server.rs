//! The API server: tiny_http on a Unix socket, one request at a time against the `Controller`
//! (`routes` says what each request does; `docs/openapi.yaml` documents them).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use tiny_http::{Header, Response, Server};

use super::routes::route;
use super::{ApiError, Controller};

/// Largest request body accepted.
const MAX_BODY: u64 = 1 << 20;

/// What a request asks of the serving loop beyond its answer.
enum Next {
    Continue,
    Shutdown,
}

/// The API socket.
pub struct ApiServer {
    server: Server,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file left by a dead process is replaced).
    pub fn bind(path: &Path) -> Result<ApiServer, ApiError> {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
            && std::os::unix::net::UnixStream::connect(path).is_err()
        {
            let _ = std::fs::remove_file(path);
        }
        let server = Server::http_unix(path).map_err(|e| ApiError::Socket {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(ApiServer { server })
    }

    /// Serves until a Shutdown action or until the root VM's guest ends it; returns the exit
    /// code for the process (the root guest's, or 0).
    pub fn serve(&self, controller: &mut Controller) -> u8 {
        loop {
            if let Some(code) = controller.root_exit_code() {
                return code;
            }
            let request = match self.server.recv_timeout(Duration::from_millis(50)) {
                Ok(Some(request)) => request,
                Ok(None) => continue,
                Err(_) => return 1,
            };
            if let Next::Shutdown = handle(controller, request) {
                return 0;
            }
        }
    }
}

fn handle(controller: &mut Controller, mut request: tiny_http::Request) -> Next {
    let mut body = Vec::new();
    let read = request.as_reader().take(MAX_BODY).read_to_end(&mut body);
    let method = request.method().to_string();
    let url = request.url().to_string();
    let reply = match read {
        Ok(_) => route(controller, &method, &url, &body),
        Err(e) => super::routes::Reply::error(&ApiError::BadRequest(format!("cannot read the body: {e}"))),
    };
    let header = Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    let text = reply.body.map(|b| b.to_string()).unwrap_or_default();
    let response = Response::from_string(text).with_status_code(reply.status).with_header(header);
    // The client may have gone; nothing to do about it.
    let _ = request.respond(response);
    if reply.shutdown {
        Next::Shutdown
    } else {
        Next::Continue
    }
}
