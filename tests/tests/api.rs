//! The control API over a real Unix socket: `zygote run --guest spin --api-sock` in a child
//! process, driven with the API client and with `zygote ctl`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::api::client::{call, ApiResponse};
use zygote_tests::{run_zygote, scratch_dir, wait_for_api_socket, zygote_bin};

/// The lines a child prints, collected by a thread as they come.
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Lines {
    fn collect(stdout: ChildStdout) -> Lines {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Lines { lines, reader }
    }

    /// Waits (however long the host takes, 60 s at most) until a line starts with `prefix`.
    fn wait_for(&self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.lines.lock().unwrap().iter().any(|l| l.starts_with(prefix)) {
            assert!(Instant::now() < deadline, "no line {prefix:?} in {:?}", self.lines.lock().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every line, once the child has closed its stdout.
    fn finish(self) -> Vec<String> {
        self.reader.join().unwrap();
        Arc::try_unwrap(self.lines).unwrap().into_inner().unwrap()
    }
}

/// A `zygote run` serving the API; killed if the test did not shut it down.
struct Served {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Served {
    fn start(name: &str) -> Served {
        Served::start_guest(name, &["--guest", "spin"], Stdio::null())
    }

    /// A served `guest` whose output the test reads: `Lines` collects it.
    fn start_printing(name: &str, guest: &[&str]) -> (Served, Lines) {
        let mut api = Served::start_guest(name, guest, Stdio::piped());
        let lines = Lines::collect(api.child.stdout.take().expect("piped stdout"));
        (api, lines)
    }

    fn start_guest(name: &str, guest: &[&str], stdout: Stdio) -> Served {
        let dir = scratch_dir(name);
        let socket = dir.join("api.sock");
        let child = Command::new(zygote_bin())
            .arg("run")
            .args(guest)
            .arg("--api-sock")
            .arg(&socket)
            .stdout(stdout)
            .spawn()
            .expect("spawning zygote run");
        wait_for_api_socket(&socket);
        Served { child, socket, dir }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> ApiResponse {
        call(&self.socket, method, path, body).expect("API call")
    }

    fn json(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let response = self.call(method, path, body);
        assert_eq!(response.status, 200, "{method} {path}: {response:?}");
        serde_json::from_str(&response.body).expect("JSON answer")
    }

    /// A request Firecracker answers 204 No Content.
    fn done(&self, method: &str, path: &str, body: Option<&str>) {
        let response = self.call(method, path, body);
        assert_eq!((response.status, response.body.as_str()), (204, ""), "{method} {path} {body:?}");
    }

    fn shutdown(mut self) {
        self.done("PUT", "/actions", Some(r#"{"action_type":"Shutdown"}"#));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for zygote") {
                assert!(status.success(), "zygote run ended with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "zygote run did not stop on Shutdown");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn states(vms: &Value) -> Vec<(u64, Option<u64>, String)> {
    vms.as_array()
        .expect("a list")
        .iter()
        .map(|vm| (vm["id"].as_u64().unwrap(), vm["parent"].as_u64(), vm["state"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn clone_tree_pause_snapshot_and_reset_over_the_socket() {
    let api = Served::start("api-tree");
    assert_eq!(api.json("GET", "/", None)["state"], "Running");
    let clone = api.json("PUT", "/clone", None);
    assert_eq!(clone["vm_id"], 1);
    assert!(clone["report"]["pause_us"].as_u64().is_some(), "{clone}");
    assert_eq!(api.json("PUT", "/clone", Some(r#"{"vm_id":1}"#))["vm_id"], 2);
    api.done("PATCH", "/vm", Some(r#"{"state":"Paused","vm_id":2}"#));
    let tree = states(&api.json("GET", "/vms", None));
    assert_eq!(tree, vec![(0, None, "Running".into()), (1, Some(0), "Running".into()), (2, Some(1), "Paused".into())]);
    let vm2 = &api.json("GET", "/vms", None)[2];
    assert!(vm2["shared_pages"].as_u64().unwrap() > vm2["private_pages"].as_u64().unwrap(), "{vm2}");

    let path = api.dir.join("snap.json");
    let body = serde_json::json!({ "snapshot_path": path, "snapshot_type": "Full" }).to_string();
    api.done("PUT", "/snapshot/create", Some(&body));
    let body = serde_json::json!({ "snapshot_path": api.dir.join("diff.json"), "snapshot_type": "Diff" }).to_string();
    api.done("PUT", "/snapshot/create", Some(&body));
    let body = serde_json::json!({ "snapshot_path": api.dir.join("diff.json"), "resume_vm": true }).to_string();
    assert_eq!(api.json("PUT", "/snapshot/load", Some(&body))["vm_id"], 3);
    assert!(api.json("PUT", "/reset", Some(r#"{"vm_id":1}"#))["reset_us"].as_u64().is_some());
    assert!(api.json("PUT", "/reset", Some(r#"{"vm_id":3}"#))["reset_us"].as_u64().is_some());
    api.done("PATCH", "/vm", Some(r#"{"state":"Resumed","vm_id":2}"#));
    assert_eq!(states(&api.json("GET", "/vms", None)).iter().filter(|v| v.2 == "Running").count(), 4);
    api.shutdown();
}

#[test]
fn bad_requests_get_4xx_and_leave_the_vms_alone() {
    let api = Served::start("api-bad");
    api.json("PUT", "/clone", None);
    let before = states(&api.json("GET", "/vms", None));
    let not_a_snapshot = api.dir.join("nothing.json");
    std::fs::write(&not_a_snapshot, "{}\n{}").unwrap();
    let load = serde_json::json!({ "snapshot_path": not_a_snapshot }).to_string();
    for (method, path, body, status, needle) in [
        ("PUT", "/clone", Some("{not json"), 400, "malformed JSON"),
        ("PATCH", "/vm", Some(r#"{"state":"Sleeping"}"#), 400, "Sleeping"),
        ("PUT", "/clone", Some(r#"{"vm_id":42}"#), 404, "no VM with id 42"),
        ("GET", "/?vm_id=42", None, 404, "42"),
        ("PUT", "/snapshot/load", Some(load.as_str()), 400, "nothing.json"),
        ("PUT", "/snapshot/load", Some(r#"{"snapshot_path":"/nonexistent/s.json"}"#), 400, "/nonexistent/s.json"),
        ("PUT", "/snapshot/create", Some(r#"{"snapshot_path":"x","snapshot_type":"Diff"}"#), 400, "diff"),
        ("PUT", "/reset", Some(r#"{"vm_id":0}"#), 400, "no snapshot to reset to"),
        ("PUT", "/clone", Some(r#"{"vm":1}"#), 400, "unknown field"),
        ("DELETE", "/vms", None, 400, "Invalid request method and/or path: DELETE /vms"),
    ] {
        let response = api.call(method, path, body);
        assert_eq!(response.status, status, "{method} {path} {body:?}: {response:?}");
        assert!(response.body.contains(needle), "{method} {path}: {}", response.body);
    }
    assert_eq!(states(&api.json("GET", "/vms", None)), before, "bad requests changed the VMs");
    api.shutdown();
}

#[test]
fn ctl_speaks_for_the_cli() {
    let api = Served::start("api-ctl");
    let sock = api.socket.to_str().unwrap().to_string();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--api-sock", sock.as_str()];
        all.extend_from_slice(args);
        run_zygote(&all)
    };
    let out = ctl(&["clone"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"vm_id\":1"));
    let out = ctl(&["vms"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"parent\":0"));
    let out = ctl(&["pause", "--vm", "7"]);
    assert_eq!(out.status.code(), Some(2), "an unknown VM id is bad input");
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 404"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(ctl(&["shutdown"]).status.success());
    let gone = run_zygote(&["ctl", "--api-sock", Path::new(&sock).to_str().unwrap(), "vms"]);
    assert_eq!(gone.status.code(), Some(1));
}

#[test]
fn a_clone_prints_with_its_own_prefix_and_goes_on_from_the_instant() {
    // Every step waits for the guests, never for a time: the root is cloned paused after its
    // first line, and runs on (to its end, which ends the process) once the clone has printed.
    let (mut api, lines) = Served::start_printing("api-prefix", &["--guest", "sequence", "--arg", "24"]);
    lines.wait_for("[vm0] ");
    api.done("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(api.json("PUT", "/clone", None)["vm_id"], 1);
    api.done("PATCH", "/vm", Some(r#"{"state":"Resumed","vm_id":1}"#));
    lines.wait_for("[vm1] ");
    api.done("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    let out = lines.finish().join("\n");
    let status = api.child.wait().unwrap();
    assert!(status.success(), "the root guest ends the process with its code 0: {status}");
    let lines = |prefix: &str| -> Vec<String> {
        out.lines().filter_map(|l| l.strip_prefix(prefix)).map(str::to_string).collect()
    };
    let (root, clone) = (lines("[vm0] "), lines("[vm1] "));
    assert_eq!(root.len(), 24, "{out}");
    // The clone may be cut off when the root ends the process: compare its whole lines.
    let whole: Vec<&String> = clone.iter().filter(|l| l.len() == 16).collect();
    assert!(!whole.is_empty(), "the clone printed nothing: {out}");
    let start = root.iter().position(|l| l == whole[0]).expect("the clone's first line is one of the root's");
    for (i, line) in whole.iter().enumerate() {
        assert_eq!(&&root[start + i], line, "the clone's line {i} differs from the root's");
    }
}

#[test]
fn a_vm_with_a_disk_clones_over_the_socket() {
    let dir = scratch_dir("api-disk-file");
    let disk = dir.join("disk.img");
    let bytes: Vec<u8> = (0..256 * 512u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let api = Served::start_guest("api-disk", &["--guest", "spin", "--disk", disk.to_str().unwrap()], Stdio::null());
    assert_eq!(api.json("PUT", "/clone", None)["vm_id"], 1);
    assert_eq!(api.json("PUT", "/clone", Some(r#"{"vm_id":1}"#))["vm_id"], 2);
    let vms = api.json("GET", "/vms", None);
    let running = |id| (id, if id == 0 { None } else { Some(id - 1) }, "Running".to_string());
    assert_eq!(states(&vms), vec![running(0), running(1), running(2)]);
    api.shutdown();
    assert_eq!(std::fs::read(&disk).unwrap(), bytes, "the disk, frozen as the clones' base, is unchanged");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pauses VM 0 of `api`, snapshots it to `name` in its directory and shuts the server down;
/// returns the state file and what VM 0 printed before (its whole lines, prefix stripped).
fn snapshot_and_shut_down(api: Served, lines: Option<Lines>, name: &str) -> (PathBuf, String) {
    let path = api.dir.join(name);
    api.done("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    let body = serde_json::json!({ "snapshot_path": path }).to_string();
    api.done("PUT", "/snapshot/create", Some(&body));
    api.shutdown();
    let out = lines.map(Lines::finish).unwrap_or_default();
    let printed = out.iter().filter_map(|l| l.strip_prefix("[vm0] ")).map(|l| format!("{l}\n")).collect();
    (path, printed)
}

#[test]
fn run_restore_goes_on_from_a_snapshot_file_and_serves_it_with_reset() {
    // A deterministic guest snapshotted mid-run: `zygote run --restore` prints the rest.
    let whole = run_zygote(&["run", "--guest", "sequence", "--arg", "24"]);
    let whole = String::from_utf8(whole.stdout).unwrap();
    // Snapshotted once it has printed (not after a fixed time, which a loaded host may spend
    // before the guest's first line); 23 lines of guest work remain for the pause to land.
    let (api, lines) = Served::start_printing("api-restore", &["--guest", "sequence", "--arg", "24"]);
    lines.wait_for("[vm0] ");
    let (sequence, before) = snapshot_and_shut_down(api, Some(lines), "sequence.json");
    let restored = run_zygote(&["run", "--restore", sequence.to_str().unwrap()]);
    assert_eq!(restored.status.code(), Some(0), "{}", String::from_utf8_lossy(&restored.stderr));
    let after = String::from_utf8(restored.stdout).unwrap();
    assert!(!after.is_empty() && after.len() < whole.len(), "the restore starts mid-run:\n{after}");
    assert!(whole.ends_with(&after), "the restored VM goes on exactly from the snapshot:\n{after}\nwhole:\n{whole}");
    assert!(whole[..whole.len() - after.len()].starts_with(&before), "printed before:\n{before}\nwhole:\n{whole}");

    // Served: VM 0 is the restored one, and a reset brings it back to the file's snapshot.
    let (spin, _) = snapshot_and_shut_down(Served::start("api-restore-spin"), None, "spin.json");
    let api = Served::start_guest("api-restored", &["--restore", spin.to_str().unwrap()], Stdio::null());
    let vms = api.json("GET", "/vms", None);
    assert_eq!(states(&vms), vec![(0, None, "Running".to_string())]);
    assert!(api.json("PUT", "/reset", None)["reset_us"].as_u64().is_some());
    assert_eq!(api.json("PUT", "/clone", None)["vm_id"], 1);
    api.shutdown();

    for (args, expect) in [
        (&["run", "--restore", "README.md"][..], "not a Zygote snapshot"),
        (&["run", "--restore", spin.to_str().unwrap(), "--mem", "64"], "cannot be used with"),
    ] {
        let out = run_zygote(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect) && err.lines().count() == 1, "{args:?}: {err}");
    }
}

#[test]
fn an_empty_server_is_configured_like_firecracker_and_refuses_bad_configurations() {
    let (spin, _) = snapshot_and_shut_down(Served::start("api-empty-spin"), None, "spin.json");
    let api = Served::start_guest("api-empty", &[], Stdio::null());
    let junk = api.dir.join("junk.bin");
    std::fs::write(&junk, [0x5a; 4096]).unwrap();
    let junk_source = serde_json::json!({ "kernel_image_path": junk }).to_string();
    assert_eq!(api.json("GET", "/", None)["state"], "Not started");
    assert_eq!(api.json("GET", "/vms", None), serde_json::json!([]));
    for (method, path, body, status, needle) in [
        ("PUT", "/machine-config", r#"{"vcpu_count":0,"mem_size_mib":64}"#, 400, "vcpu_count: vCPU count 0"),
        ("PUT", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":1}"#, 400, "mem_size_mib: memory size 1 MiB"),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":64,"smt":true}"#,
            400,
            "smt: true (simultaneous multithreading) is not supported",
        ),
        ("PUT", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":64,"sm":true}"#, 400, "unknown field"),
        (
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"data","path_on_host":"/tmp/x","is_root_device":false}"#,
            400,
            "in the path",
        ),
        (
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/tmp/x"}"#,
            400,
            "missing field `is_root_device`",
        ),
        (
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/tmp/x","is_root_device":true,"rate_limiter":{}}"#,
            400,
            "rate_limiter is not supported",
        ),
        ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#, 400, "PUT /boot-source first"),
        ("PUT", "/boot-source", junk_source.as_str(), 204, ""),
        ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#, 400, "not a kernel"),
        ("PUT", "/boot-source", r#"{"kernel_image_path":"/nonexistent/vmlinux"}"#, 204, ""),
        ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#, 400, "/nonexistent/vmlinux"),
        ("PUT", "/clone", "", 404, "no VM with id 0"),
    ] {
        let response = api.call(method, path, Some(body));
        assert_eq!(response.status, status, "{method} {path} {body}: {response:?}");
        assert!(response.body.contains(needle), "{method} {path} {body}: {}", response.body);
    }
    assert_eq!(api.json("GET", "/vms", None), serde_json::json!([]), "no failed start left a VM");

    // A snapshot loaded into the empty server is VM 0, and its reset goes back to the file.
    let load = serde_json::json!({ "snapshot_path": spin, "resume_vm": true }).to_string();
    api.done("PUT", "/snapshot/load", Some(&load));
    assert_eq!(api.json("GET", "/", None)["state"], "Running");
    assert!(api.json("PUT", "/reset", None)["reset_us"].as_u64().is_some());
    let closed = api.call("PUT", "/machine-config", Some(r#"{"vcpu_count":1,"mem_size_mib":64}"#));
    assert_eq!(closed.status, 400, "{closed:?}");
    assert!(closed.body.contains("pre-boot only"), "{}", closed.body);
    api.shutdown();
}

#[test]
fn firecracker_requests_get_firecracker_answers() {
    let api = Served::start("api-firecracker");
    let info = api.json("GET", "/", None);
    for field in ["app_name", "id", "vmm_version"] {
        assert!(info[field].is_string(), "{field}: {info}");
    }
    assert_eq!(info["state"], "Running");
    assert!(api.json("GET", "/version", None)["firecracker_version"].is_string());
    let machine = api.json("GET", "/machine-config", None);
    assert_eq!((machine["vcpu_count"].as_u64(), machine["smt"].as_bool()), (Some(1), Some(false)), "{machine}");
    let config = api.json("GET", "/vm/config", None);
    assert_eq!(config["machine-config"], machine);
    assert_eq!(config["drives"], serde_json::json!([]));

    // Firecracker's snapshot bodies: mem_file_path to create, mem_backend or mem_file_path to load.
    api.done("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    let (state, mem) = (api.dir.join("fc.state"), api.dir.join("fc.mem"));
    let create =
        serde_json::json!({ "snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem }).to_string();
    api.done("PUT", "/snapshot/create", Some(&create));
    api.done("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    // One memory file holding all of the guest's RAM, as Firecracker writes it: no RAM file of
    // Zygote's own layout beside the state file.
    let mem_mib = machine["mem_size_mib"].as_u64().unwrap();
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), mem_mib << 20);
    let names: Vec<String> =
        std::fs::read_dir(&api.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with("fc.state-mem")), "{names:?}");
    for (method, path, body, needle) in [
        ("PUT", "/machine-config", r#"{"vcpu_count":1,"mem_size_mib":64}"#, "pre-boot only"),
        ("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#, "pre-boot only"),
        ("PATCH", "/drives/rootfs", r#"{"drive_id":"rootfs"}"#, "no drive \"rootfs\""),
        ("PATCH", "/network-interfaces/eth0", r#"{"iface_id":"eth0"}"#, "no network interface \"eth0\""),
        ("PUT", "/mmds", "{}", "not supported"),
        ("PUT", "/balloon", r#"{"amount_mib":1,"deflate_on_oom":false}"#, "not supported"),
        ("PUT", "/actions", r#"{"action_type":"Reboot"}"#, "unknown variant"),
        ("GET", "/boot-source", "", "Invalid request method and/or path"),
    ] {
        let response = api.call(method, path, Some(body));
        assert_eq!(response.status, 400, "{method} {path}: {response:?}");
        let fault: Value = serde_json::from_str(&response.body).expect("a JSON error");
        assert!(fault["fault_message"].as_str().unwrap().contains(needle), "{method} {path}: {fault}");
    }
    api.shutdown();

    // Loaded as Firecracker loads it (a fresh server, mem_backend File), and by `--restore`.
    let fresh = Served::start_guest("api-firecracker-load", &[], Stdio::null());
    assert_eq!(fresh.json("GET", "/", None)["id"], "0");
    let load = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": { "backend_type": "File", "backend_path": mem },
        "enable_diff_snapshots": false,
        "resume_vm": true,
    });
    let uffd =
        serde_json::json!({ "snapshot_path": state, "mem_backend": { "backend_type": "Uffd", "backend_path": mem } });
    let refused = fresh.call("PUT", "/snapshot/load", Some(&uffd.to_string()));
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(refused.body.contains("Uffd is not supported"), "{}", refused.body);
    fresh.done("PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(fresh.json("GET", "/", None)["state"], "Running");
    fresh.shutdown();
    let restored =
        Served::start_guest("api-firecracker-restore", &["--restore", state.to_str().unwrap()], Stdio::null());
    assert_eq!(restored.json("GET", "/", None)["state"], "Running");
    restored.shutdown();
    // Moved away from where the state file names it, the memory file is given by path: the
    // older `mem_file_path` of `PUT /snapshot/load`, and `--restore --mem-file`.
    let moved = state.with_file_name("moved").join("guest.mem");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&mem, &moved).unwrap();
    let lost = run_zygote(&["run", "--restore", state.to_str().unwrap()]);
    assert_eq!(lost.status.code(), Some(2), "{lost:?}");
    let fresh = Served::start_guest("api-firecracker-load-moved", &[], Stdio::null());
    let load = serde_json::json!({ "snapshot_path": state, "mem_file_path": moved, "resume_vm": true });
    fresh.done("PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(fresh.json("GET", "/", None)["state"], "Running");
    fresh.shutdown();
    let restore = ["--restore", state.to_str().unwrap(), "--mem-file", moved.to_str().unwrap()];
    let restored = Served::start_guest("api-firecracker-restore-moved", &restore, Stdio::null());
    assert_eq!(restored.json("GET", "/", None)["state"], "Running");
    restored.shutdown();
}

#[test]
fn firecracker_s_command_line_starts_a_server() {
    // `firecracker --api-sock PATH --id ID`, as tools launch Firecracker: no subcommand.
    let dir = scratch_dir("api-fc-argv");
    let socket = dir.join("fc.sock");
    let child = Command::new(zygote_bin())
        .args(["--api-sock", socket.to_str().unwrap(), "--id", "sandbox-42"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning zygote");
    wait_for_api_socket(&socket);
    let api = Served { child, socket, dir };
    let info = api.json("GET", "/", None);
    assert_eq!((info["id"].as_str(), info["state"].as_str()), (Some("sandbox-42"), Some("Not started")), "{info}");
    api.shutdown();
    for args in [&["--api-sock", "/tmp/x.sock", "--id", "bad id!"][..], &["--id", "a"]] {
        let out = run_zygote(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1, "{args:?}");
    }
}
