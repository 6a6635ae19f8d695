//! virtio-vsock wired into VMs, on the real `zygote run` under its seccomp filters: a served
//! `spin` VM (whose guest never drives the device) listens on its `uds_path`; a host's
//! `CONNECT <port>\n` reaches the device's muxer, which queues a REQUEST for the guest and, as
//! the REQUEST never reaches a guest without a driver, closes the host's stream at the
//! handshake timeout (a line that is not a CONNECT is closed at once); clones listen on `<uds_path>.<vm_id>` or on their `vsock_override`, a VM
//! loaded from a snapshot file on the path its request gives (required), a reset VM on its own
//! again; every socket goes with its VM; the metrics have a `vsock` group. Bad `--vsock` values
//! exit 2 and bad `PUT /vsock` bodies answer 400, each with one clear message.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devices::vsock::HANDSHAKE_TIMEOUT;
use serde_json::Value;
use vmm::api::client::{call, ApiResponse};
use zygote_tests::{run_zygote, scratch_dir, wait_for_api_socket, zygote_bin};

/// A `zygote run` serving the API on `dir/api.sock`; killed on drop.
struct Served {
    child: Child,
    socket: PathBuf,
}

impl Served {
    fn start(dir: &Path, args: &[&str]) -> Served {
        let socket = dir.join("api.sock");
        let child = Command::new(zygote_bin())
            .arg("run")
            .args(args)
            .arg("--api-sock")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning zygote run");
        wait_for_api_socket(&socket);
        Served { child, socket }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> ApiResponse {
        call(&self.socket, method, path, Some(body)).expect("API call")
    }

    fn ok(&self, method: &str, path: &str, body: &str) -> Value {
        let response = self.call(method, path, body);
        assert!(response.is_success(), "{method} {path} {body}: {response:?}");
        serde_json::from_str(&response.body).unwrap_or(Value::Null)
    }

    /// Asks for a 400 whose fault message contains `needle`.
    fn refused(&self, method: &str, path: &str, body: &str, needle: &str) {
        let response = self.call(method, path, body);
        assert_eq!(response.status, 400, "{method} {path} {body}: {response:?}");
        assert!(response.body.contains(needle), "{method} {path} {body}: {}", response.body);
    }

    /// Shuts the server down and waits for it to exit 0.
    fn shutdown(mut self) {
        self.ok("PUT", "/actions", r#"{"action_type":"Shutdown"}"#);
        let status = self.child.wait().expect("waiting for zygote");
        assert!(status.success(), "zygote run ended with {status}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_socket(path: &Path) -> bool {
    path.symlink_metadata().is_ok_and(|m| m.file_type().is_socket())
}

/// Writes `line` to the device listening on `uds_path`; returns what the host then reads
/// until the device closes the stream, and how long that took.
fn talk(uds_path: &Path, line: &str) -> (Vec<u8>, Duration) {
    let mut host =
        UnixStream::connect(uds_path).unwrap_or_else(|e| panic!("connecting to {}: {e}", uds_path.display()));
    // Far beyond any deadline of the device's: only a device that never closes hits it.
    host.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let start = Instant::now();
    host.write_all(line.as_bytes()).unwrap();
    let mut answer = Vec::new();
    host.read_to_end(&mut answer).expect("the device closes the stream");
    (answer, start.elapsed())
}

/// `CONNECT 52` reaches the muxer: it queues a REQUEST for the guest and, as the guest has no
/// driver to take it, closes the stream with no `OK` line at the handshake timeout (never
/// before: the deadline starts after the line is read).
fn assert_connect_times_out(uds_path: &Path) {
    let (answer, took) = talk(uds_path, "CONNECT 52\n");
    assert_eq!(answer, b"", "{}", uds_path.display());
    assert!(took >= HANDSHAKE_TIMEOUT, "{}: closed after {took:?}, before the timeout", uds_path.display());
}

#[test]
fn a_served_vm_and_its_clones_restores_and_resets_listen_each_on_its_own_socket() {
    let dir = scratch_dir("vsock-served");
    let uds = dir.join("v.sock");
    let spec = format!("cid=3,uds={}", uds.display());
    let api = Served::start(&dir, &["--guest", "spin", "--vsock", &spec]);
    // The API socket is bound before VM 0 is built; its first answer comes after.
    assert_eq!(api.ok("GET", "/vms", "").as_array().map(Vec::len), Some(1));
    assert!(is_socket(&uds));
    // A line that is not a CONNECT is dropped at once (a CONNECT waits for the guest: below).
    assert_eq!(talk(&uds, "HELLO 52\n").0, b"");
    let late = format!(r#"{{"guest_cid": 4, "uds_path": "{}"}}"#, dir.join("late.sock").display());
    api.refused("PUT", "/vsock", &late, "PUT /vsock is not allowed after VM 0 has started");

    // A clone without an override: `<uds>.<id>`; with one: that path. The source keeps its own.
    let first = api.ok("PUT", "/clone", "{}")["vm_id"].as_u64().unwrap();
    let default_path = dir.join(format!("v.sock.{first}"));
    let chosen = dir.join("chosen.sock");
    let body = format!(r#"{{"vsock_override": {{"uds_path": "{}"}}}}"#, chosen.display());
    api.ok("PUT", "/clone", &body);
    for path in [&uds, &default_path, &chosen] {
        assert!(is_socket(path), "{}", path.display());
    }
    // A path in use (the source's) is refused and changes nothing.
    let taken = format!(r#"{{"vsock_override": {{"uds_path": "{}"}}}}"#, uds.display());
    api.refused("PUT", "/clone", &taken, "exists already");
    api.refused("PUT", "/clone", r#"{"vsock_override": {"path": "x"}}"#, "unknown field");

    // A snapshot file holds no host path: loading it needs vsock_override.
    let snap = dir.join("s.json");
    api.ok("PUT", "/snapshot/create", &format!(r#"{{"snapshot_path": "{}"}}"#, snap.display()));
    let load = |extra: &str| format!(r#"{{"snapshot_path": "{}", "resume_vm": true{extra}}}"#, snap.display());
    api.refused("PUT", "/snapshot/load", &load(""), "vsock_override");
    let restored = dir.join("restored.sock");
    let with_override = format!(r#", "vsock_override": {{"uds_path": "{}"}}"#, restored.display());
    let restored_id = api.ok("PUT", "/snapshot/load", &load(&with_override))["vm_id"].as_u64().unwrap();
    assert!(is_socket(&restored));
    // The same from the command line: `--restore` needs `--vsock uds=PATH`.
    let out = run_zygote(&["run", "--restore", snap.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--vsock uds=PATH") && err.lines().count() == 1, "{err}");
    let cli_dir = dir.join("cli");
    std::fs::create_dir(&cli_dir).unwrap();
    let cli_uds = cli_dir.join("cli.sock");
    let cli_spec = format!("uds={}", cli_uds.display());
    let from_cli = Served::start(&cli_dir, &["--restore", snap.to_str().unwrap(), "--vsock", &cli_spec]);
    assert_eq!(from_cli.ok("GET", "/vms", "").as_array().map(Vec::len), Some(1));
    assert!(is_socket(&cli_uds));
    from_cli.shutdown();
    assert!(!cli_uds.exists());

    // Resets keep each VM's socket and listener; every socket, the source's too, is served
    // (all at once: each takes the handshake timeout).
    for vm in [0, first, restored_id] {
        api.ok("PUT", "/reset", &format!(r#"{{"vm_id": {vm}}}"#));
    }
    let paths = [uds.clone(), default_path, chosen, restored];
    let checks: Vec<_> =
        paths.iter().cloned().map(|p| std::thread::spawn(move || assert_connect_times_out(&p))).collect();
    for check in checks {
        check.join().expect("a socket check failed");
    }
    // The counters, under Firecracker's group name (the guest never drove the device).
    let metrics = dir.join("metrics.json");
    api.ok("PUT", "/metrics", &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()));
    api.ok("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#);
    let line: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let zero = serde_json::json!({ "tx_packets_count": 0, "rx_packets_count": 0, "bad_buffers_count": 0,
                                   "transport_reset_count": 0 });
    assert_eq!(line["vsock"], zero, "{line}");
    assert_eq!(line["vms"][format!("vm{restored_id}")]["vsock"], zero, "{line}");
    api.shutdown();
    for path in &paths {
        assert!(!path.exists(), "{} outlived its VM", path.display());
    }
}

#[test]
fn put_vsock_configures_vm_0_and_bad_bodies_are_400() {
    let dir = scratch_dir("vsock-put");
    let api = Served::start(&dir, &[]);
    let uds = dir.join("v.sock");
    let existing = dir.join("api.sock");
    for (body, needle) in [
        (r#"{"guest_cid": 2, "uds_path": "/x"}"#.to_string(), "guest_cid 2: a guest CID is 3 to 4294967294"),
        (r#"{"guest_cid": 4294967295, "uds_path": "/x"}"#.to_string(), "guest_cid 4294967295"),
        (r#"{"guest_cid": -3, "uds_path": "/x"}"#.to_string(), "malformed JSON"),
        (r#"{"guest_cid": 3}"#.to_string(), "missing field `uds_path`"),
        (r#"{"guest_cid": 3, "uds_path": ""}"#.to_string(), "uds_path is empty"),
        (r#"{"guest_cid": 3, "uds_path": "/x", "port": 1}"#.to_string(), "unknown field `port`"),
        (format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, existing.display()), "exists already"),
    ] {
        api.refused("PUT", "/vsock", &body, needle);
    }
    let body = format!(r#"{{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "{}"}}"#, uds.display());
    let response = api.call("PUT", "/vsock", &body);
    assert_eq!((response.status, response.body.as_str()), (204, ""), "{response:?}");
    let config = api.ok("GET", "/vm/config", "");
    assert_eq!(config["vsock"], serde_json::from_str::<Value>(&body).unwrap());
    // The device exists from InstanceStart on: nothing listens yet.
    assert!(!uds.exists());
    api.shutdown();
}

#[test]
fn bad_vsock_flags_exit_2_with_one_line_and_a_good_one_leaves_no_socket() {
    let dir = scratch_dir("vsock-cli");
    let uds = dir.join("h.sock");
    let in_use = dir.to_str().unwrap().to_string();
    let restore = dir.join("none.json");
    for (args, needle) in [
        (vec!["--guest", "hello", "--vsock", "cid=2,uds=/tmp/x"], "cid=2: a guest CID is 3 to 4294967294"),
        (
            vec!["--guest", "hello", "--vsock", "cid=4294967296,uds=/tmp/x"],
            "cid=4294967296: a guest CID is 3 to 4294967294",
        ),
        (vec!["--guest", "hello", "--vsock", "cid=three,uds=/tmp/x"], "cid=three: not a number"),
        (vec!["--guest", "hello", "--vsock", "uds=/tmp/x"], "cid=N is required"),
        (vec!["--guest", "hello", "--vsock", "cid=3"], "uds=PATH is required"),
        (vec!["--guest", "hello", "--vsock", "cid=3,uds=/tmp/x,port=1"], "unknown key \"port\""),
        (vec!["--restore", restore.to_str().unwrap(), "--vsock", "cid=3,uds=/tmp/x"], "uds=PATH only"),
        (vec!["--guest", "hello", "--vsock", &format!("cid=3,uds={in_use}")], "cannot listen on"),
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(&args);
        let out = run_zygote(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle) && err.lines().count() == 1, "{args:?}: {err}");
    }
    let out = run_zygote(&["run", "--guest", "hello", "--vsock", &format!("cid=3,uds={}", uds.display())]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!uds.exists(), "the socket outlived the VM");
}
