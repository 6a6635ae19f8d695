//! The API server: tiny_http on a Unix socket, one request at a time against the `Controller`.
//!
//! Endpoints (bodies are JSON; `vm_id` defaults to the root VM):
//! - `GET /` — the root VM (or `?vm_id=N`); `GET /vms` — the clone tree
//! - `PATCH /vm` `{"state": "Paused" | "Resumed", "vm_id"?}`
//! - `PUT /clone` `{"vm_id"?}` — `{"vm_id": new, "report": CloneReport}`
//! - `PUT /snapshot/create` `{"snapshot_path", "mem_dir"?, "snapshot_type"?: "Full" | "Diff", "vm_id"?}`
//! - `PUT /snapshot/load` `{"snapshot_path", "resume_vm"?: bool, "clock_realtime"?: bool}` — a new VM: `{"vm_id"}`
//! - `PUT /reset` `{"vm_id"?, "wait_for_pins_ms"?}` — back to the VM's base snapshot
//! - `PUT /actions` `{"action_type": "Shutdown" | "InstanceStart"}`
//! - before VM 0 exists (`zygote run --api-sock` alone, see `preboot`): `PUT /boot-source`
//!   `{"kernel_image_path", "initrd_path"?, "boot_args"?}`, `PUT /machine-config`
//!   `{"vcpu_count", "mem_size_mib"}`, `PUT /drives/{id}` `{"drive_id", "path_on_host", ...}`
//!
//! Errors answer 4xx (the request's fault) or 5xx with `{"fault_message": "..."}`, and leave the
//! VMs as they were.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::{Header, Method, Response, Server};

use super::preboot::{BootSource, Drive, MachineConfig};
use super::{ApiError, Controller};
use crate::snapshot::file::SnapshotKind;
use crate::vstate::ClockOnRestore;

/// Largest request body accepted.
const MAX_BODY: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmTarget {
    vm_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
enum RunState {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchVm {
    state: RunState,
    vm_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreate {
    snapshot_path: PathBuf,
    mem_dir: Option<PathBuf>,
    snapshot_type: Option<SnapshotKind>,
    vm_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoad {
    snapshot_path: PathBuf,
    #[serde(default)]
    resume_vm: bool,
    /// Advance the guest's clock to the host's real time (Firecracker's `clock_realtime`).
    #[serde(default)]
    clock_realtime: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reset {
    vm_id: Option<u64>,
    wait_for_pins_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
enum ActionType {
    Shutdown,
    InstanceStart,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: ActionType,
}

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
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) && std::os::unix::net::UnixStream::connect(path).is_err() {
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
    let method = request.method().clone();
    let url = request.url().to_string();
    let result = match read {
        Ok(_) => route(controller, &method, &url, &body),
        Err(e) => Err(ApiError::BadRequest(format!("cannot read the body: {e}"))),
    };
    let (status, value, next) = match result {
        Ok((value, next)) => (200, value, next),
        Err(e) => (e.status(), json!({ "fault_message": e.to_string() }), Next::Continue),
    };
    let header = Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    let response = Response::from_string(value.to_string()).with_status_code(status).with_header(header);
    // The client may have gone; nothing to do about it.
    let _ = request.respond(response);
    next
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))
}

fn query_vm_id(query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("vm_id=") {
            return value.parse().map(Some).map_err(|_| ApiError::BadRequest(format!("vm_id {value:?} is not a number")));
        }
    }
    Ok(None)
}

fn route(controller: &mut Controller, method: &Method, url: &str, body: &[u8]) -> Result<(Value, Next), ApiError> {
    let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
    let root = controller.root_id();
    let ok = |value: Value| Ok((value, Next::Continue));
    match (method, path) {
        (Method::Get, "/") => match query_vm_id(query)? {
            None if controller.is_empty() => ok(json!({ "id": 0, "state": "Not started" })),
            id => ok(serde_json::to_value(controller.info(id.unwrap_or(root))?).expect("VmInfo serializes")),
        },
        (Method::Put, "/boot-source") => {
            let source: BootSource = parse(body)?;
            controller.preboot()?.set_boot_source(source);
            ok(json!({}))
        }
        (Method::Put, "/machine-config") => {
            let machine: MachineConfig = parse(body)?;
            controller.preboot()?.set_machine(machine)?;
            ok(json!({}))
        }
        (Method::Put, drive) if drive.starts_with("/drives/") => {
            let drive_id = &drive["/drives/".len()..];
            let drive: Drive = parse(body)?;
            controller.preboot()?.set_drive(drive_id, drive)?;
            ok(json!({}))
        }
        (Method::Get, "/vms") => ok(serde_json::to_value(controller.list()).expect("VmInfo serializes")),
        (Method::Patch, "/vm") => {
            let req: PatchVm = parse(body)?;
            controller.set_paused(req.vm_id.unwrap_or(root), matches!(req.state, RunState::Paused))?;
            ok(json!({}))
        }
        (Method::Put, "/clone") => {
            let req: VmTarget = parse(body)?;
            let (vm_id, report) = controller.clone_vm(req.vm_id.unwrap_or(root))?;
            ok(json!({ "vm_id": vm_id, "report": report }))
        }
        (Method::Put, "/snapshot/create") => {
            let req: SnapshotCreate = parse(body)?;
            let mem_dir = req.mem_dir.clone().unwrap_or_else(|| {
                req.snapshot_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
            });
            let kind = req.snapshot_type.unwrap_or(SnapshotKind::Full);
            controller.snapshot_create(req.vm_id.unwrap_or(root), &req.snapshot_path, &mem_dir, kind)?;
            ok(json!({}))
        }
        (Method::Put, "/snapshot/load") => {
            let req: SnapshotLoad = parse(body)?;
            let clock = match req.clock_realtime {
                true => ClockOnRestore::AdvanceToHostRealtime,
                false => ClockOnRestore::Resume,
            };
            ok(json!({ "vm_id": controller.snapshot_load_with_clock(&req.snapshot_path, req.resume_vm, clock)? }))
        }
        (Method::Put, "/reset") => {
            let req: Reset = parse(body)?;
            let wait = req.wait_for_pins_ms.map(Duration::from_millis);
            ok(json!({ "reset_us": controller.reset(req.vm_id.unwrap_or(root), wait)? }))
        }
        (Method::Put, "/actions") => match parse::<Action>(body)?.action_type {
            ActionType::Shutdown => Ok((json!({}), Next::Shutdown)),
            ActionType::InstanceStart => {
                controller.instance_start()?;
                ok(json!({}))
            }
        },
        _ => Err(ApiError::NoRoute { method: method.to_string(), path: path.to_string() }),
    }
}
