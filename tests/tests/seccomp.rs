//! Seccomp filters per thread class (`vmm::seccomp`), on the real `zygote run`: every thread of
//! a served VM with a disk (and of its clone and a VM restored from its snapshot) runs
//! filtered, each worker thread under its own class's filter on top of the VMM thread's; a
//! syscall outside its class's filter kills the process with SIGSYS in every class.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmm::api::client::call;
use zygote_tests::{scratch_dir, wait_for_api_socket, zygote_bin};

/// The test hook's variable (debug builds of `zygote`, as the tests build it).
const FORBIDDEN: &str = "ZYGOTE_SECCOMP_TEST_FORBIDDEN";

/// One thread of a process, from /proc.
#[derive(Debug)]
struct Task {
    tid: u32,
    name: String,
    /// `Seccomp:` (0 none, 2 filter).
    mode: u32,
    /// `Seccomp_filters:`: how many filters the thread is under.
    filters: u32,
}

fn field(status: &str, name: &str) -> u32 {
    let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {status}"));
    line[name.len()..].trim().parse().unwrap_or_else(|_| panic!("bad {line}"))
}

fn tasks(pid: u32) -> Vec<Task> {
    let mut tasks = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process is alive") {
        let dir = entry.expect("task entry").path();
        let tid = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()).expect("a tid");
        // A thread may end between the listing and the read: it has no status to check then.
        let (Ok(status), Ok(name)) =
            (std::fs::read_to_string(dir.join("status")), std::fs::read_to_string(dir.join("comm")))
        else {
            continue;
        };
        tasks.push(Task {
            tid,
            name: name.trim().to_string(),
            mode: field(&status, "Seccomp:"),
            filters: field(&status, "Seccomp_filters:"),
        });
    }
    tasks
}

fn spawn_served(dir: &Path, extra: &[&str], forbidden: Option<&str>) -> Child {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0x5a; 1 << 20]).expect("writing the disk");
    let mut command = Command::new(zygote_bin());
    command.args(["run", "--guest", "spin", "--disk"]).arg(&disk).arg("--api-sock").arg(dir.join("api.sock"));
    command.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    match forbidden {
        Some(class) => command.env(FORBIDDEN, class),
        None => command.env_remove(FORBIDDEN),
    };
    command.spawn().expect("spawning zygote run")
}

fn ok(socket: &Path, method: &str, path: &str, body: &str) -> serde_json::Value {
    let response = call(socket, method, path, Some(body)).expect("API call");
    assert!(response.is_success(), "{method} {path}: {response:?}");
    serde_json::from_str(&response.body).unwrap_or(serde_json::Value::Null)
}

/// Waits for `child` to end (it ends on its own: the process kills itself or is shut down).
fn wait(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("waiting for zygote") {
            return status;
        }
        assert!(Instant::now() < deadline, "zygote run did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
    }
    text
}

#[test]
fn every_thread_of_a_served_vm_with_a_disk_its_clone_and_a_restored_snapshot_is_filtered() {
    let dir = scratch_dir("seccomp-threads");
    let socket = dir.join("api.sock");
    let mut child = spawn_served(&dir, &[], None);
    wait_for_api_socket(&socket);
    // A clone and a restored snapshot: their vCPU and device threads come from the VMM thread
    // long after it was filtered.
    assert_eq!(ok(&socket, "PUT", "/clone", "{}")["vm_id"], 1);
    let snapshot = dir.join("s.json");
    ok(&socket, "PUT", "/snapshot/create", &format!(r#"{{"snapshot_path": "{}"}}"#, snapshot.display()));
    let loaded = ok(
        &socket,
        "PUT",
        "/snapshot/load",
        &format!(r#"{{"snapshot_path": "{}", "resume_vm": true}}"#, snapshot.display()),
    );
    assert_eq!(loaded["vm_id"], 2);
    ok(&socket, "PUT", "/reset", r#"{"vm_id": 1}"#);

    let pid = child.id();
    // A worker names itself and installs its filter as its first steps, which the test cannot
    // see begin (a thread just spawned still carries the VMM thread's name and filter, and a
    // resumed VM's vCPU thread may not exist yet when the API answers): wait (20 s at most)
    // until every VM has its three workers, each past its filter, then check every thread.
    let deadline = Instant::now() + Duration::from_secs(20);
    let worker = |t: &Task| ["vcpu", "virtio-blk", "dma-engine"].iter().any(|p| t.name.starts_with(p));
    let settled = |tasks: &[Task]| {
        let workers = tasks.iter().filter(|t| worker(t)).count();
        let unnamed = tasks.iter().any(|t| t.tid != pid && t.name == "zygote");
        workers == 9 && !unnamed && tasks.iter().all(|t| !worker(t) || t.filters >= 2)
    };
    while !settled(&tasks(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let tasks = tasks(pid);
    for task in &tasks {
        assert_eq!(task.mode, 2, "not filtered: {task:?} (all: {tasks:?})");
    }
    let main = tasks.iter().find(|t| t.tid == pid).expect("the main thread");
    assert_eq!(main.filters, 1, "the VMM thread has its own filter only: {main:?}");
    // Each worker narrowed the VMM filter it inherited with its class's own.
    for (prefix, count) in [("vcpu", 3), ("virtio-blk", 3), ("dma-engine", 3)] {
        let class: Vec<&Task> = tasks.iter().filter(|t| t.name.starts_with(prefix)).collect();
        assert_eq!(class.len(), count, "one {prefix} thread per VM: {tasks:?}");
        assert!(class.iter().all(|t| t.filters == 2), "{prefix}: {class:?}");
    }
    ok(&socket, "PUT", "/actions", r#"{"action_type": "Shutdown"}"#);
    let status = wait(&mut child);
    assert!(status.success(), "{status}: {}", stderr_of(&mut child));
}

#[test]
fn a_forbidden_syscall_kills_the_process_with_sigsys_in_every_thread_class() {
    for class in ["vmm", "api", "vcpu", "event-loop", "dma"] {
        let dir = scratch_dir(&format!("seccomp-kill-{class}"));
        let mut child = spawn_served(&dir, &[], Some(class));
        let status = wait(&mut child);
        let stderr = stderr_of(&mut child);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{class}: {status}, stderr: {stderr}");
        assert!(!stderr.contains("was allowed"), "{class}: {stderr}");
    }
}

#[test]
fn seccomp_log_lets_the_forbidden_syscall_through_and_no_seccomp_installs_nothing() {
    for (flag, filtered) in [("--seccomp-log", true), ("--no-seccomp", false)] {
        let dir = scratch_dir(&format!("seccomp-flag{flag}"));
        let socket = dir.join("api.sock");
        let mut child = spawn_served(&dir, &[flag], Some("vcpu"));
        wait_for_api_socket(&socket);
        // The VM is built and its vCPU thread started once the API answers about it.
        ok(&socket, "GET", "/", "");
        let modes: Vec<u32> = tasks(child.id()).iter().map(|t| t.mode).collect();
        assert!(modes.iter().all(|&m| m == if filtered { 2 } else { 0 }), "{flag}: {modes:?}");
        ok(&socket, "PUT", "/actions", r#"{"action_type": "Shutdown"}"#);
        let status = wait(&mut child);
        let stderr = stderr_of(&mut child);
        assert!(status.success(), "{flag}: {status}: {stderr}");
        // With --seccomp-log the hook's syscall was logged and allowed; without filters the hook
        // never runs.
        assert_eq!(stderr.contains("the vcpu thread's forbidden syscall was allowed"), filtered, "{flag}: {stderr}");
    }
}

#[test]
fn the_two_seccomp_flags_conflict() {
    let out = zygote_tests::run_zygote(&["run", "--guest", "hello", "--no-seccomp", "--seccomp-log"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// The lines a child prints, collected by a thread.
fn collect_lines(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stdout = child.stdout.take().expect("piped stdout");
    let sink = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).for_each(|l| sink.lock().unwrap().push(l));
    });
    lines
}

/// Waits for a line of VM `vm` (its `[vmN] ` prefix) that holds `text`.
fn wait_for_line(lines: &std::sync::Mutex<Vec<String>>, vm: u64, text: &str) {
    let prefix = format!("[vm{vm}] ");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !lines.lock().unwrap().iter().any(|l| l.starts_with(&prefix) && l.contains(text)) {
        assert!(Instant::now() < deadline, "no {prefix}{text:?} within 300 s:\n{}", lines.lock().unwrap().join("\n"));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Slow: a Linux guest with a disk under `zygote run --api-sock`, cloned mid-boot; the clone
/// probes and reads its disk (virtio-blk through the event loop's ioeventfd and io_uring) and
/// every thread of the process is filtered while VM 0 is held paused; VM 0 then does the same.
#[test]
#[ignore = "boots a real Linux kernel and a clone of it (~40 s here): scripts/test.sh --slow"]
fn a_linux_guest_with_a_disk_runs_and_clones_with_every_thread_filtered() {
    use zygote_tests::linux::{kernel_and_initrd, write_checksum_disk};
    let (kernel, initrd) = kernel_and_initrd();
    let dir = scratch_dir("seccomp-linux");
    let disk = dir.join("disk.img");
    let expected = write_checksum_disk(&disk, 0x5365_6363_6f6d_7021);
    let socket = dir.join("api.sock");
    // Without `quiet`: the test clones on a kernel line printed before virtio-mmio's probe.
    let cmdline = format!("{} zygote_blk=1", vmm::linux::DEFAULT_CMDLINE.replace(" quiet", ""));
    let mut child = Command::new(zygote_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline, "--mem", "256", "--disk"])
        .arg(&disk)
        .arg("--api-sock")
        .arg(&socket)
        .env_remove(FORBIDDEN)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning zygote run");
    let lines = collect_lines(&mut child);
    wait_for_api_socket(&socket);
    wait_for_line(&lines, 0, "devtmpfs: initialized");
    ok(&socket, "PATCH", "/vm", r#"{"state": "Paused", "vm_id": 0}"#);
    assert_eq!(ok(&socket, "PUT", "/clone", r#"{"vm_id": 0}"#)["vm_id"], 1);
    // A clone of a paused VM starts paused.
    ok(&socket, "PATCH", "/vm", r#"{"state": "Resumed", "vm_id": 1}"#);
    wait_for_line(&lines, 1, &expected);

    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tasks(pid).iter().any(|t| t.name.starts_with("virtio-blk") && t.filters < 2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let tasks = tasks(pid);
    assert!(tasks.iter().all(|t| t.mode == 2), "not every thread filtered: {tasks:?}");
    let vm0 = tasks.iter().filter(|t| t.name.starts_with("vcpu") || t.name.starts_with("virtio-blk")).count();
    assert!(vm0 >= 2, "VM 0's vCPU and event loop threads: {tasks:?}");
    assert!(
        tasks.iter().filter(|t| t.name.starts_with("vcpu") || t.name.starts_with("virtio-blk")).all(|t| t.filters == 2),
        "{tasks:?}"
    );

    ok(&socket, "PATCH", "/vm", r#"{"state": "Resumed", "vm_id": 0}"#);
    wait_for_line(&lines, 0, &expected);
    // VM 0's init resets it when done, which ends the process.
    let status = wait(&mut child);
    assert_eq!(status.code(), Some(0), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
