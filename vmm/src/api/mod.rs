//! The control API: HTTP/JSON on a Unix socket, answering as Firecracker does where Firecracker
//! has the endpoint (same bodies, status codes, defaults and `fault_message` errors), plus
//! Zygote's extensions (clone, reset, the VM tree); and the `zygote ctl` client.

pub mod client;
pub mod config_file;
pub mod controller;
pub mod http;
pub mod net;
pub mod preboot;
pub mod requests;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod vsock;

use memory::MemoryError;

use crate::snapshot::file::SnapshotError;
use crate::snapshot::VmSnapshotError;
pub use controller::Controller;
pub use requests::VmInfo;

/// What a control request did wrong, or what failed serving it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON body: {0}")]
    BadJson(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no VM with id {0}")]
    UnknownVm(u64),
    #[error("Invalid request method and/or path: {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("{what} is not supported by Zygote")]
    NotSupported { what: String },
    #[error("{0} is not allowed after VM 0 has started (pre-boot only)")]
    PreBootOnly(&'static str),
    #[error("{0} is not allowed before VM 0 has started (post-boot only)")]
    PostBootOnly(&'static str),
    #[error("VM {0} has no snapshot to reset to: take one with PUT /snapshot/create")]
    NoBase(u64),
    #[error("VM {vm}: {pages} page(s) are pinned for DMA (first at {first:#x}); retry, or pass wait_for_pins_ms")]
    Pinned { vm: u64, pages: usize, first: u64 },
    #[error("snapshot refused: {0}")]
    Snapshot(String),
    #[error("VM {0}: {1}")]
    Vm(u64, String),
    #[error("cannot serve the API socket {path}: {source}")]
    Socket { path: String, source: std::io::Error },
}

impl ApiError {
    /// The HTTP status this error answers with: 4xx when the request is at fault.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadJson(_)
            | ApiError::BadRequest(_)
            | ApiError::Snapshot(_)
            | ApiError::NoBase(_)
            | ApiError::NoRoute { .. }
            | ApiError::NotSupported { .. }
            | ApiError::PreBootOnly(_)
            | ApiError::PostBootOnly(_) => 400,
            ApiError::UnknownVm(_) => 404,
            ApiError::Pinned { .. } => 409,
            ApiError::Vm(..) | ApiError::Socket { .. } => 500,
        }
    }
}

impl From<SnapshotError> for ApiError {
    fn from(e: SnapshotError) -> ApiError {
        ApiError::Snapshot(chain(&e))
    }
}

impl From<VmSnapshotError> for ApiError {
    fn from(e: VmSnapshotError) -> ApiError {
        match e {
            VmSnapshotError::Memory { vm, source: MemoryError::Pinned { pages, first } } => {
                ApiError::Pinned { vm, pages, first }
            }
            VmSnapshotError::State { vm, .. }
            | VmSnapshotError::Build { vm, .. }
            | VmSnapshotError::Memory { vm, .. } => ApiError::Vm(vm, chain(&e)),
        }
    }
}

/// An error and its causes on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg
}
