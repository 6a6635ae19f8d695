//! The API server on a Unix socket: an accept thread, one thread per client connection that
//! reads whole requests (`http`: deadline, body limit), and the serving loop, which owns the
//! `Controller` and answers one complete request at a time (`routes` says what each does;
//! `docs/openapi.yaml` documents them). A client that stalls mid-request, sends too much or
//! never reads holds only its own thread.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::http::{Connection, HttpError, Request};
use super::routes::{route, Reply};
use super::telemetry::Telemetry;
use super::{ApiError, Controller};

/// Most client connections served at once; more are answered 503 and closed.
pub const MAX_CLIENTS: usize = 64;
/// How often the serving loop looks at the root VM between requests.
const POLL: Duration = Duration::from_millis(50);

/// A complete request handed to the serving loop, and where its answer goes.
struct Incoming {
    request: Request,
    reply: mpsc::Sender<Reply>,
    /// Signalled once the answer is written (or given up): the loop waits for it before
    /// stopping the process on a Shutdown action.
    written: mpsc::Receiver<()>,
}

/// The API socket.
pub struct ApiServer {
    listener: UnixListener,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file left by a dead process is replaced).
    pub fn bind(path: &Path) -> Result<ApiServer, ApiError> {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|source| ApiError::Socket { path: path.display().to_string(), source })?;
        Ok(ApiServer { listener })
    }

    /// Starts the accept thread, then serves until a Shutdown action or until the root VM's
    /// guest ends it; returns the exit code for the process (the root guest's, or 0) and, if
    /// the root VM failed, what failed.
    pub fn serve(&self, controller: &mut Controller) -> (u8, Option<String>) {
        let (requests, incoming) = mpsc::channel();
        let listener = match self.listener.try_clone() {
            Ok(listener) => listener,
            Err(e) => return (1, Some(format!("cannot serve the API socket: {e}"))),
        };
        if let Err(e) = spawn_api_thread("api-accept", move || {
            // Client threads start from this one, so they inherit the API filter.
            crate::seccomp::thread_start(crate::seccomp::ThreadClass::Api);
            accept(&listener, &requests)
        }) {
            return (1, Some(format!("cannot start the API thread: {e}")));
        }
        let mut telemetry = Telemetry::default();
        // A logger or metrics destination from `--config-file`.
        let resources = controller.resources().clone();
        if let Some(Err(e)) = resources.logger.as_ref().map(|l| telemetry.set_logger(l)) {
            return (1, Some(format!("logger: {e}")));
        }
        if let Some(Err(e)) = resources.metrics.as_ref().map(|m| telemetry.set_metrics(m)) {
            return (1, Some(format!("metrics: {e}")));
        }
        loop {
            if let Some(end) = controller.root_end() {
                let _ = telemetry.flush(controller);
                return end;
            }
            if telemetry.flush_due() {
                let _ = telemetry.flush(controller);
            }
            let Incoming { request, reply, written } = match incoming.recv_timeout(POLL) {
                Ok(incoming) => incoming,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return (1, Some("the API accept thread ended".into())),
            };
            let answer = route(controller, &mut telemetry, &request.method, &request.url, &request.body);
            let shutdown = answer.shutdown;
            if reply.send(answer).is_ok() && shutdown {
                // Stop once the client has its answer (or its thread has given up writing it).
                let _ = written.recv_timeout(super::http::WRITE_TIMEOUT + POLL);
            }
            if shutdown {
                let _ = telemetry.flush(controller);
                return (0, None);
            }
        }
    }
}

/// Every thread of the API server starts here (one place for per-thread setup, such as a
/// seccomp filter).
fn spawn_api_thread(name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new().name(name.to_string()).spawn(body).map(drop)
}

/// Accepts clients, each on its own thread, at most `MAX_CLIENTS` at once.
fn accept(listener: &UnixListener, requests: &mpsc::Sender<Incoming>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let connection = Connection::new(stream);
        if clients.load(Ordering::Acquire) >= MAX_CLIENTS {
            connection.refuse(&HttpError { status: 503, message: format!("more than {MAX_CLIENTS} clients at once") });
            continue;
        }
        clients.fetch_add(1, Ordering::AcqRel);
        let (requests, count) = (requests.clone(), Arc::clone(&clients));
        let spawned = spawn_api_thread("api-client", move || {
            serve_client(connection, &requests);
            count.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Reads requests from one client and writes their answers until it closes, asks to close,
/// or sends something that is not a request it can be answered.
fn serve_client(mut connection: Connection, requests: &mpsc::Sender<Incoming>) {
    loop {
        let request = match connection.read_request() {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => return connection.refuse(&e),
        };
        let keep_alive = request.keep_alive;
        let (reply, answer) = mpsc::channel();
        let (done, written) = mpsc::channel();
        if requests.send(Incoming { request, reply, written }).is_err() {
            return;
        }
        let Ok(answer) = answer.recv() else { return };
        let body = answer.body.map(|b| b.to_string());
        let close = !keep_alive || answer.shutdown;
        let sent = connection.respond(answer.status, body.as_deref(), close);
        let _ = done.send(());
        if sent.is_err() || close {
            return;
        }
    }
}
