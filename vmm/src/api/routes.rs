//! Which request does what: one function from (method, path, body) to an answer, independent of
//! the transport (`server`). Firecracker's endpoints answer as Firecracker does: 204 with no
//! body on success where Firecracker gives it, 400 with `{"fault_message"}` for every request
//! at fault (an unknown path or method included). Zygote's extensions (`vm_id` fields and
//! queries, `GET /vms`, `PUT /clone`, `PUT /reset`, the `Shutdown` action) answer 200 with a
//! body, and 404 for an unknown VM id.
//!
//! `ROUTES` lists every (method, path) served; `docs/openapi.yaml` is checked against it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::net::{self, CloneRequest, NetworkInterface, PartialNetworkInterface};
use super::requests::{
    Action, ActionType, BootSource, Drive, InstanceInfo, LoggerConfig, MachineConfig, MachineConfigPatch,
    MetricsConfig, PartialDrive, PatchVm, Reset, RunState, SnapshotCreate, SnapshotLoad,
};
use super::telemetry::{request_metric, Level, Telemetry};
use super::vsock::{self, Vsock};
use super::{ApiError, Controller};
use crate::device_manager::EntropyConfig;
use crate::snapshot::file::{LoadOptions, MemTarget, SnapshotKind};

/// The Firecracker API version whose endpoints Zygote answers (`GET /version`).
pub const FIRECRACKER_API_VERSION: &str = "1.7.0";

/// Every (method, path template) the server answers other than with "Invalid request method
/// and/or path"; `{id}` stands for one path segment.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/vm/config"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/vsock"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/entropy"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("GET", "/vms"),
    ("PUT", "/clone"),
    ("PUT", "/reset"),
];

/// Firecracker's endpoints for features Zygote does not have: any method answers 400 saying so.
pub const REFUSED: &[&str] = &[
    "/balloon",
    "/balloon/statistics",
    "/balloon/hinting/start",
    "/balloon/hinting/status",
    "/balloon/hinting/stop",
    "/cpu-config",
    "/hotplug/memory",
    "/mmds",
    "/mmds/config",
    "/pmem/{id}",
    "/serial",
];

/// An answer: its status, its JSON body (none for 204), and whether the server stops after it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub shutdown: bool,
}

impl Reply {
    fn no_content() -> Reply {
        Reply { status: 204, body: None, shutdown: false }
    }

    fn json(body: Value) -> Reply {
        Reply { status: 200, body: Some(body), shutdown: false }
    }

    /// A failed request's answer.
    pub fn error(err: &ApiError) -> Reply {
        Reply { status: err.status(), body: Some(json!({ "fault_message": err.to_string() })), shutdown: false }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))
}

fn query_vm_id(query: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("vm_id=") {
            return value
                .parse()
                .map(Some)
                .map_err(|_| ApiError::BadRequest(format!("vm_id {value:?} is not a number")));
        }
    }
    Ok(None)
}

/// Whether `path` matches `template` (`{x}` matching one non-empty segment).
pub fn matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return false;
                }
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return false,
        }
    }
}

/// Answers one request; counts and logs it.
pub fn route(controller: &mut Controller, telemetry: &mut Telemetry, method: &str, url: &str, body: &[u8]) -> Reply {
    let path = url.split_once('?').map_or(url, |(p, _)| p);
    telemetry.log(Level::Info, "api", &format!("The API server received a {method} request on {path:?}."));
    let result = answer(controller, telemetry, method, url, body);
    if let Some((group, name)) = request_metric(method, path) {
        telemetry.count(group, &format!("{name}_count"), 1);
        if result.is_err() {
            telemetry.count(group, &format!("{name}_fails"), 1);
        }
    }
    match result {
        Ok(reply) => reply,
        Err(e) => {
            telemetry.log(Level::Error, "api", &format!("{method} {path}: {e}"));
            Reply::error(&e)
        }
    }
}

fn answer(
    controller: &mut Controller,
    telemetry: &mut Telemetry,
    method: &str,
    url: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let start = Instant::now();
    let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
    let root = controller.root_id();
    let done = || Ok(Reply::no_content());
    // Only what `ROUTES` lists is dispatched (so the spec test, which checks `ROUTES`, sees
    // every route); the rest is refused or unknown.
    let Some(&(_, template)) = ROUTES.iter().find(|(m, t)| *m == method && matches(t, path)) else {
        return match REFUSED.iter().find(|t| matches(t, path)) {
            Some(template) => Err(ApiError::NotSupported { what: format!("{template} (no such device or service)") }),
            None => Err(no_route(method, path)),
        };
    };
    // The one path parameter (`{drive_id}`, `{iface_id}`), if the template has one.
    let id = path.rsplit('/').next().unwrap_or_default();
    match (method, template) {
        ("PUT", "/drives/{drive_id}") => {
            let drive: Drive = parse(body)?;
            controller.preboot("PUT /drives")?.set_drive(id, drive)?;
            done()
        }
        ("PATCH", "/drives/{drive_id}") => {
            let patch: PartialDrive = parse(body)?;
            patch_drive(controller, id, patch)?;
            done()
        }
        ("PUT", "/network-interfaces/{iface_id}") => {
            let iface: NetworkInterface = parse(body)?;
            controller.preboot("PUT /network-interfaces")?.set_network_interface(id, iface)?;
            done()
        }
        ("PUT", "/vsock") => {
            let vsock: Vsock = parse(body)?;
            controller.preboot("PUT /vsock")?.set_vsock(vsock)?;
            done()
        }
        ("PATCH", "/network-interfaces/{iface_id}") => {
            let patch: PartialNetworkInterface = parse(body)?;
            patch_interface(controller, root, id, patch)?;
            done()
        }
        ("PUT", "/entropy") => {
            let entropy: EntropyConfig = parse(body)?;
            controller.preboot("PUT /entropy")?.set_entropy(entropy)?;
            done()
        }
        ("GET", "/") => {
            let info = match query_vm_id(query)? {
                None if controller.is_empty() => None,
                id => Some(controller.info(id.unwrap_or(root))?),
            };
            let state = info.as_ref().map_or("Not started".to_string(), |i| i.state.clone());
            let id = controller.instance_name(info.as_ref().map_or(root, |i| i.id));
            let info = InstanceInfo { app_name: "Zygote", id, state, vmm_version: env!("CARGO_PKG_VERSION"), vm: info };
            Ok(Reply::json(serde_json::to_value(info).expect("InstanceInfo serializes")))
        }
        ("GET", "/version") => Ok(Reply::json(
            json!({ "firecracker_version": FIRECRACKER_API_VERSION, "zygote_version": env!("CARGO_PKG_VERSION") }),
        )),
        ("GET", "/vm/config") => {
            Ok(Reply::json(serde_json::to_value(controller.resources()).expect("VmResources serializes")))
        }
        ("GET", "/machine-config") => {
            Ok(Reply::json(serde_json::to_value(&controller.resources().machine).expect("MachineConfig serializes")))
        }
        ("PUT", "/machine-config") => {
            let machine: MachineConfig = parse(body)?;
            controller.preboot("PUT /machine-config")?.set_machine(machine)?;
            done()
        }
        ("PATCH", "/machine-config") => {
            let patch: MachineConfigPatch = parse(body)?;
            controller.preboot("PATCH /machine-config")?.patch_machine(patch)?;
            done()
        }
        ("PUT", "/boot-source") => {
            let source: BootSource = parse(body)?;
            controller.preboot("PUT /boot-source")?.set_boot_source(source);
            done()
        }
        ("PUT", "/logger") => {
            let config: LoggerConfig = parse(body)?;
            telemetry.set_logger(&config)?;
            controller.resources_mut().logger = Some(config);
            done()
        }
        ("PUT", "/metrics") => {
            let config: MetricsConfig = parse(body)?;
            telemetry.set_metrics(&config)?;
            controller.resources_mut().metrics = Some(config);
            done()
        }
        ("GET", "/vms") => Ok(Reply::json(serde_json::to_value(controller.list()).expect("VmInfo serializes"))),
        ("PATCH", "/vm") => {
            let req: PatchVm = parse(body)?;
            let pause = matches!(req.state, RunState::Paused);
            controller.set_paused(req.vm_id.unwrap_or(root), pause)?;
            let name = if pause { "pause_vm" } else { "resume_vm" };
            telemetry.latency(name, start.elapsed());
            telemetry.count("zygote", if pause { "pause_count" } else { "resume_count" }, 1);
            done()
        }
        ("PUT", "/clone") => {
            let req: CloneRequest = parse(body)?;
            let mut overrides = net::overrides(&req.network_overrides)?;
            overrides.vsock_uds_path = vsock::override_path(req.vsock_override.as_ref())?;
            let (vm_id, report) = controller.clone_vm_with(req.vm_id.unwrap_or(root), overrides)?;
            telemetry.latency("clone", start.elapsed());
            telemetry.log(Level::Info, "clone", &format!("VM {vm_id} cloned"));
            Ok(Reply::json(json!({ "vm_id": vm_id, "report": report })))
        }
        ("PUT", "/snapshot/create") => {
            let req: SnapshotCreate = parse(body)?;
            let default_dir = parent_dir(&req.snapshot_path);
            let mem = match (&req.mem_dir, &req.mem_file_path) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::BadRequest("give mem_file_path or mem_dir, not both".into()))
                }
                (Some(dir), None) => MemTarget::Dir(dir),
                (None, Some(file)) => MemTarget::File(file),
                (None, None) => MemTarget::Dir(&default_dir),
            };
            let kind = req.snapshot_type.unwrap_or(SnapshotKind::Full);
            controller.snapshot_create(req.vm_id.unwrap_or(root), &req.snapshot_path, mem, kind)?;
            let (name, count) = match kind {
                SnapshotKind::Full => ("full_create_snapshot", "full_snapshot_count"),
                SnapshotKind::Diff => ("diff_create_snapshot", "diff_snapshot_count"),
            };
            telemetry.latency(name, start.elapsed());
            telemetry.count("zygote", count, 1);
            done()
        }
        ("PUT", "/snapshot/load") => {
            let req: SnapshotLoad = parse(body)?;
            let options =
                LoadOptions { mem_file: req.mem_file()?.cloned(), written_here: controller.written_mem_files() };
            let first = controller.is_empty();
            let clock = match req.clock_realtime {
                true => crate::vstate::ClockOnRestore::AdvanceToHostRealtime,
                false => crate::vstate::ClockOnRestore::Resume,
            };
            let mut overrides = net::overrides(&req.network_overrides)?;
            overrides.vsock_uds_path = vsock::override_path(req.vsock_override.as_ref())?;
            let vm_id = controller.snapshot_load_with(&req.snapshot_path, &options, req.resume_vm, clock, overrides)?;
            telemetry.latency("load_snapshot", start.elapsed());
            telemetry.count("zygote", "snapshot_load_count", 1);
            // Into an empty server, as in Firecracker: VM 0, 204. Beside other VMs (an
            // extension Firecracker refuses): the new VM's id.
            match first {
                true => done(),
                false => Ok(Reply::json(json!({ "vm_id": vm_id }))),
            }
        }
        ("PUT", "/reset") => {
            let req: Reset = parse(body)?;
            let wait = req.wait_for_pins_ms.map(Duration::from_millis);
            let reset_us = controller.reset(req.vm_id.unwrap_or(root), wait)?;
            telemetry.latency("reset", start.elapsed());
            Ok(Reply::json(json!({ "reset_us": reset_us })))
        }
        ("PUT", "/actions") => match parse::<Action>(body)?.action_type {
            ActionType::Shutdown => Ok(Reply { shutdown: true, ..Reply::no_content() }),
            ActionType::InstanceStart => {
                controller.instance_start()?;
                done()
            }
            ActionType::SendCtrlAltDel => Err(ApiError::NotSupported {
                what: "SendCtrlAltDel (Zygote's i8042 has no keyboard to send it through)".into(),
            }),
            ActionType::FlushMetrics => {
                telemetry.flush(controller)?;
                done()
            }
        },
        // A template in `ROUTES` with no arm: a bug in this file, caught by the unit test below.
        _ => Err(ApiError::Vm(0, format!("route {method} {template} has no handler"))),
    }
}

fn no_route(method: &str, path: &str) -> ApiError {
    ApiError::NoRoute { method: method.to_string(), path: path.to_string() }
}

/// The directory of `file` (`.` for a bare name).
fn parent_dir(file: &Path) -> std::path::PathBuf {
    file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// `PATCH /drives/{id}`: post-boot, as in Firecracker. Zygote cannot swap a running VM's
/// backing file or rate-limit it: only a patch that changes nothing is accepted.
fn patch_drive(controller: &mut Controller, id: &str, patch: PartialDrive) -> Result<(), ApiError> {
    if controller.is_empty() {
        return Err(ApiError::PostBootOnly("PATCH /drives"));
    }
    if patch.drive_id != id {
        return Err(ApiError::BadRequest(format!("drive_id {:?} in the body, {id:?} in the path", patch.drive_id)));
    }
    let drive = controller.resources().drives.iter().find(|d| d.drive_id == id);
    let Some(drive) = drive else {
        return Err(ApiError::BadRequest(format!("no drive {id:?}")));
    };
    if patch.rate_limiter.is_some() {
        return Err(ApiError::NotSupported { what: "rate_limiter".into() });
    }
    match patch.path_on_host {
        Some(path) if Some(&path) != drive.path_on_host.as_ref() => Err(ApiError::NotSupported {
            what: format!("changing drive {id:?}'s backing file to {} while it runs", path.display()),
        }),
        _ => Ok(()),
    }
}

/// `PATCH /network-interfaces/{id}` of VM `vm`: post-boot, as in Firecracker, and only for an
/// interface the VM has. Zygote has no rate limiters: only a patch that sets none is accepted.
fn patch_interface(
    controller: &mut Controller,
    vm: u64,
    id: &str,
    patch: PartialNetworkInterface,
) -> Result<(), ApiError> {
    if controller.is_empty() {
        return Err(ApiError::PostBootOnly("PATCH /network-interfaces"));
    }
    if patch.iface_id != id {
        return Err(ApiError::BadRequest(format!("iface_id {:?} in the body, {id:?} in the path", patch.iface_id)));
    }
    let ids = controller.iface_ids(vm)?;
    if !ids.iter().any(|i| i == id) {
        return Err(ApiError::BadRequest(format!("no network interface {id:?} (VM {vm} has {ids:?})")));
    }
    if patch.rx_rate_limiter.is_some() || patch.tx_rate_limiter.is_some() {
        return Err(ApiError::NotSupported { what: "rx_rate_limiter / tx_rate_limiter".into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_route_has_a_handler() {
        let (mut controller, mut telemetry) = (Controller::empty(), Telemetry::default());
        for (method, template) in ROUTES {
            if (*method, *template) == ("PUT", "/actions") {
                continue; // no body: a bad action, but Shutdown must not be sent
            }
            let url = template.replace("{drive_id}", "d").replace("{iface_id}", "eth0");
            let reply = route(&mut controller, &mut telemetry, method, &url, b"");
            let text = reply.body.map(|b| b.to_string()).unwrap_or_default();
            assert!(!text.contains("has no handler") && !text.contains("Invalid request"), "{method} {url}: {text}");
        }
    }

    #[test]
    fn templates_match_one_segment() {
        assert!(matches("/drives/{drive_id}", "/drives/rootfs"));
        assert!(!matches("/drives/{drive_id}", "/drives/"));
        assert!(!matches("/drives/{drive_id}", "/drives/a/b"));
        assert!(matches("/", "/"));
        assert!(!matches("/vm", "/vm/config"));
    }

    #[test]
    fn an_empty_server_answers_firecracker_requests() {
        let (mut controller, mut telemetry) = (Controller::empty(), Telemetry::default());
        let mut call =
            |method: &str, url: &str, body: &str| route(&mut controller, &mut telemetry, method, url, body.as_bytes());
        let info = call("GET", "/", "");
        assert_eq!(info.status, 200);
        assert_eq!(info.body.as_ref().unwrap()["state"], "Not started");
        assert_eq!(call("GET", "/version", "").body.unwrap()["firecracker_version"], FIRECRACKER_API_VERSION);
        assert_eq!(call("PUT", "/machine-config", r#"{"vcpu_count":2,"mem_size_mib":64}"#).status, 204);
        assert_eq!(call("PATCH", "/machine-config", r#"{"mem_size_mib":48}"#).status, 204);
        let machine = call("GET", "/machine-config", "").body.unwrap();
        assert_eq!((machine["vcpu_count"].as_u64(), machine["mem_size_mib"].as_u64()), (Some(2), Some(48)));
        let drive = r#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true}"#;
        assert_eq!(call("PUT", "/drives/rootfs", drive).status, 204);
        let config = call("GET", "/vm/config", "").body.unwrap();
        assert_eq!(config["drives"][0]["drive_id"], "rootfs");
        assert_eq!(config["machine-config"]["mem_size_mib"], 48);
        assert!(config.get("entropy").is_none(), "no entropy device until PUT /entropy");
        let entropy = r#"{"rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#;
        assert_eq!(call("PUT", "/entropy", entropy).status, 204);
        let config = call("GET", "/vm/config", "").body.unwrap();
        assert_eq!(config["entropy"]["rate_limiter"]["bandwidth"]["size"], 1000);
        for (method, url, body, needle) in [
            ("PUT", "/entropy", r#"{"rate":1}"#, "unknown field"),
            ("PUT", "/entropy", r#"{"rate_limiter":{"bandwidth":{"size":-1,"refill_time":1}}}"#, "invalid value"),
            (
                "PUT",
                "/entropy",
                r#"{"rate_limiter":{"bandwidth":{"size":9223372036854775808,"refill_time":1}}}"#,
                "size",
            ),
            ("PATCH", "/drives/rootfs", r#"{"drive_id":"rootfs"}"#, "post-boot only"),
            ("PUT", "/balloon", r#"{"amount_mib":1,"deflate_on_oom":true}"#, "/balloon"),
            ("GET", "/mmds", "", "/mmds"),
            ("PUT", "/network-interfaces/eth0", "{}", "missing field"),
            ("PATCH", "/network-interfaces/eth0", r#"{"iface_id":"eth0"}"#, "post-boot only"),
            ("DELETE", "/vm", "", "Invalid request method and/or path: DELETE /vm"),
            ("PUT", "/drives/", "{}", "Invalid request method and/or path"),
            ("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#, "SendCtrlAltDel"),
        ] {
            let reply = call(method, url, body);
            assert_eq!(reply.status, 400, "{method} {url}: {reply:?}");
            assert!(reply.body.unwrap()["fault_message"].as_str().unwrap().contains(needle), "{method} {url}");
        }
    }
}
