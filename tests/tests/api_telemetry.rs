//! `PUT /logger` and `PUT /metrics` as Firecracker's users read them: log lines in a file,
//! metrics as JSON lines (deltas per flush) in a file or FIFO, flushed on `FlushMetrics`, with
//! each device's counters.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde_json::{json, Value};
use vmm::api::client::{call, ApiResponse};
use vmm::api::requests::MetricsConfig;
use vmm::api::telemetry::Telemetry;
use vmm::api::Controller;
use vmm::layout::{DMA_GUEST_BLK_LEN, DMA_GUEST_DMA_LEN};
use zygote_tests::dma_guest::{dma_vm, TempDisk};
use zygote_tests::{scratch_dir, text, SpinServer};

/// Requests with JSON bodies, and the 204 most of them answer.
trait Requests {
    fn call(&self, method: &str, path: &str, body: Value) -> ApiResponse;
    fn done(&self, method: &str, path: &str, body: Value);
}

impl Requests for SpinServer {
    fn call(&self, method: &str, path: &str, body: Value) -> ApiResponse {
        call(&self.socket, method, path, Some(&body.to_string())).expect("API call")
    }

    fn done(&self, method: &str, path: &str, body: Value) {
        let response = self.call(method, path, body);
        assert_eq!(response.status, 204, "{method} {path}: {response:?}");
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

#[test]
fn logger_and_metrics_write_what_happened() {
    let api = SpinServer::start(scratch_dir("api-telemetry"));
    let (log, metrics) = (api.dir.join("zygote.log"), api.dir.join("metrics.json"));
    let flush = json!({ "action_type": "FlushMetrics" });
    let refused = api.call("PUT", "/actions", flush.clone());
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(refused.body.contains("not initialized"), "{}", refused.body);
    for (body, needle) in [
        (json!({ "log_path": log, "level": "Loud" }), "level \"Loud\""),
        (json!({ "log_path": api.dir, "level": "Info" }), "Is a directory"),
        (json!({ "log_path": "/nonexistent/dir/log" }), "/nonexistent/dir/log"),
    ] {
        let response = api.call("PUT", "/logger", body);
        assert_eq!(response.status, 400, "{response:?}");
        let fault: Value = serde_json::from_str(&response.body).unwrap();
        assert!(fault["fault_message"].as_str().unwrap().contains(needle), "{fault}");
    }
    api.done(
        "PUT",
        "/logger",
        json!({ "log_path": log, "level": "Info", "show_level": true, "show_log_origin": false }),
    );
    api.done("PUT", "/metrics", json!({ "metrics_path": metrics }));
    let again = api.call("PUT", "/metrics", json!({ "metrics_path": metrics }));
    assert_eq!(again.status, 400);
    assert!(again.body.contains("already initialized"), "{}", again.body);

    api.done("PATCH", "/vm", json!({ "state": "Paused" }));
    api.done(
        "PUT",
        "/snapshot/create",
        json!({ "snapshot_path": api.dir.join("s.state"), "mem_file_path": api.dir.join("s.mem") }),
    );
    api.done("PATCH", "/vm", json!({ "state": "Resumed" }));
    assert_eq!(api.call("PUT", "/clone", json!({})).status, 200);
    assert_eq!(api.call("PUT", "/drives/x", json!({})).status, 400);
    api.done("PUT", "/actions", flush.clone());
    api.done("PUT", "/actions", flush);

    let written = lines(&metrics);
    assert_eq!(written.len(), 2, "{written:?}");
    let first = &written[0];
    assert_eq!(first["patch_api_requests"]["vm_count"], 2, "{first}");
    assert_eq!(first["put_api_requests"]["create_snapshot_count"], 1, "{first}");
    assert_eq!(first["put_api_requests"]["drive_fails"], 1, "{first}");
    assert_eq!(first["zygote"]["clone_count"], 1, "{first}");
    assert_eq!(first["zygote"]["full_snapshot_count"], 1, "{first}");
    assert_eq!((first["zygote"]["pause_count"].as_u64(), first["zygote"]["resume_count"].as_u64()), (Some(1), Some(1)));
    assert!(first["latencies_us"]["full_create_snapshot"].as_u64().unwrap() > 0, "{first}");
    assert!(first["vms"]["vm1"]["shared_pages"].as_u64().unwrap() > 0, "{first}");
    assert!(first["utc_timestamp_ms"].as_u64().is_some());
    // Deltas: the second line counts only what came after the first flush (that flush itself).
    let second = &written[1];
    assert_eq!(second["put_api_requests"], json!({ "actions_count": 1 }), "{second}");
    assert!(second.get("zygote").is_none(), "{second}");

    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("[zygote:INFO] The API server received a PUT request on \"/clone\"."), "{log}");
    assert!(log.contains("[zygote:ERROR] PUT /drives/x:"), "{log}");
}

#[test]
fn metrics_go_to_a_fifo_that_has_a_reader() {
    let api = SpinServer::start(scratch_dir("api-metrics-fifo"));
    let fifo = api.dir.join("metrics.fifo");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // No reader: refused at once instead of blocking the server.
    let refused = api.call("PUT", "/metrics", json!({ "metrics_path": fifo }));
    assert_eq!(refused.status, 400, "{refused:?}");
    let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    api.done("PUT", "/metrics", json!({ "metrics_path": fifo }));
    api.done("PUT", "/actions", json!({ "action_type": "FlushMetrics" }));
    let mut line = String::new();
    let mut reader = BufReader::new(reader);
    reader.read_line(&mut line).expect("a metrics line waits in the FIFO");
    let value: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["put_api_requests"], json!({ "metrics_count": 2, "metrics_fails": 1 }), "{value}");
}

#[test]
fn device_counters_are_flushed_summed_and_per_vm() {
    // The `dma` guest runs one DMA transfer and one virtio-blk read, prints two lines, exits.
    let dir = scratch_dir("api-device-metrics");
    let disk = TempDisk::new(2 * DMA_GUEST_BLK_LEN / 512);
    let (mut root, out) = dma_vm(Some(&disk), 0, 1);
    root.start();
    assert!(root.wait_timeout(std::time::Duration::from_secs(60)), "the dma guest did not finish");
    let mut controller = Controller::new(root, None);
    let mut telemetry = Telemetry::default();
    let metrics = dir.join("metrics.json");
    telemetry.set_metrics(&MetricsConfig { metrics_path: metrics.clone() }).unwrap();
    telemetry.flush(&mut controller).unwrap();
    telemetry.flush(&mut controller).unwrap();
    let written = lines(&metrics);
    let first = &written[0];
    let block = &first["block"];
    assert_eq!((block["read_count"].as_u64(), block["read_bytes"].as_u64()), (Some(1), Some(DMA_GUEST_BLK_LEN)));
    assert_eq!((block["write_count"].as_u64(), block["invalid_reqs_count"].as_u64()), (Some(0), Some(0)));
    let dma = &first["dma_engine"];
    assert_eq!((dma["transfers_started"].as_u64(), dma["transfers_done"].as_u64()), (Some(1), Some(1)), "{dma}");
    assert_eq!(dma["bytes_written"].as_u64(), Some(DMA_GUEST_DMA_LEN));
    let printed = text(&out);
    assert!(printed.contains("DMA done") && printed.contains("BLK done"), "{printed}");
    assert_eq!(first["uart"]["write_count"].as_u64(), Some(printed.len() as u64), "{first}");
    // One VM: its own counters are the sums.
    for group in ["block", "dma_engine", "uart"] {
        assert_eq!(first["vms"]["vm0"][group], first[group], "{group}");
    }
    // Deltas: nothing happened since.
    let second = &written[1];
    assert_eq!(second["block"]["read_count"], 0, "{second}");
    assert_eq!(second["uart"]["write_count"], 0, "{second}");
}
