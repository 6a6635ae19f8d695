//! Logs and metrics the way Firecracker users read them. `PUT /logger` names a file or FIFO for
//! human-readable lines (level filter, optional level and origin); `PUT /metrics` names one for
//! JSON lines of counters, flushed every `FLUSH_INTERVAL` and on the `FlushMetrics` action.
//! Counters are deltas since the previous flush, as Firecracker's are; the per-VM page gauges
//! are values. Counter names follow Firecracker's where it has one (`put_api_requests.
//! drive_count`, `latencies_us.full_create_snapshot`, `block.read_bytes`, `uart.write_count`,
//! ...), Zygote's own in `zygote` (clones, snapshots, resets, pauses) and `dma_engine`.
//! Device counters (`devices::metrics`) are summed over every VM under their group, and
//! given per VM under `vms.vm<id>.<group>`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::requests::{LoggerConfig, MetricsConfig};
use super::{ApiError, Controller};
use crate::device_manager::DeviceMetrics;

/// How often metrics are written without a `FlushMetrics` (Firecracker's period).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Log levels, most severe first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warning => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        }
    }
}

/// Opens a log or metrics destination: an existing FIFO or a file (created if missing),
/// appended to, never blocking (a FIFO with no reader is refused rather than waited on).
fn open_sink(path: &Path, field: &str) -> Result<File, ApiError> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| ApiError::BadRequest(format!("{field} {}: {e}", path.display())))?;
    let kind =
        file.metadata().map_err(|e| ApiError::BadRequest(format!("{field} {}: {e}", path.display())))?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if !(kind.is_file() || kind.is_fifo()) {
        return Err(ApiError::BadRequest(format!("{field} {}: not a file or FIFO", path.display())));
    }
    Ok(file)
}

struct Logger {
    file: File,
    level: Option<Level>,
    show_level: bool,
    show_origin: bool,
}

/// The server's logger and metrics.
#[derive(Default)]
pub struct Telemetry {
    logger: Option<Logger>,
    metrics: Option<File>,
    counters: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Last values (latencies), reported as they stand.
    latest: BTreeMap<String, u64>,
    last_flush: Option<Instant>,
    /// Each device counter's value at the last flush, by (VM, group, name): flushes report
    /// the difference.
    seen: BTreeMap<(u64, &'static str, &'static str), u64>,
}

impl Telemetry {
    /// `PUT /logger`.
    pub fn set_logger(&mut self, config: &LoggerConfig) -> Result<(), ApiError> {
        let level = match config.level.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("info") => Some(Level::Info),
            Some("error") => Some(Level::Error),
            Some("warning" | "warn") => Some(Level::Warning),
            Some("debug") => Some(Level::Debug),
            Some("trace") => Some(Level::Trace),
            Some("off") => None,
            Some(_) => {
                let level = config.level.as_deref().unwrap_or_default();
                return Err(ApiError::BadRequest(format!(
                    "level {level:?}: expected Error, Warning, Info, Debug, Trace or Off"
                )));
            }
        };
        if let Some(module) = &config.module {
            return Err(ApiError::NotSupported { what: format!("module {module:?} (Zygote's log has no modules)") });
        }
        let Some(path) = &config.log_path else {
            return Err(ApiError::BadRequest("log_path is required (Zygote has no default log destination)".into()));
        };
        let file = open_sink(path, "log_path")?;
        self.logger = Some(Logger { file, level, show_level: config.show_level, show_origin: config.show_log_origin });
        self.log(Level::Info, "api", "logger configured");
        Ok(())
    }

    /// `PUT /metrics`: once only, as in Firecracker.
    pub fn set_metrics(&mut self, config: &MetricsConfig) -> Result<(), ApiError> {
        if self.metrics.is_some() {
            return Err(ApiError::BadRequest("the metrics system is already initialized".into()));
        }
        self.metrics = Some(open_sink(&config.metrics_path, "metrics_path")?);
        self.last_flush = Some(Instant::now());
        Ok(())
    }

    /// Writes a log line if the level passes the filter. `origin` says which part spoke.
    pub fn log(&mut self, level: Level, origin: &str, message: &str) {
        let Some(logger) = self.logger.as_mut() else { return };
        if logger.level.is_none_or(|max| level > max) {
            return;
        }
        let mut tag = String::from("zygote");
        if logger.show_level {
            tag.push(':');
            tag.push_str(level.name());
        }
        if logger.show_origin {
            tag.push(':');
            tag.push_str(origin);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let line = format!("{}.{:09} [{tag}] {message}\n", now.as_secs(), now.subsec_nanos());
        // A full FIFO drops the line rather than stall the server.
        let _ = logger.file.write_all(line.as_bytes());
    }

    /// Adds `n` to counter `group.name`.
    pub fn count(&mut self, group: &'static str, name: &str, n: u64) {
        let value = self.counters.entry(group).or_default().entry(name.to_string()).or_default();
        *value = value.saturating_add(n);
    }

    /// Records the latest value of `latencies_us.name`.
    pub fn latency(&mut self, name: &str, took: Duration) {
        self.latest.insert(name.to_string(), u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// Whether the periodic flush is due.
    pub fn flush_due(&self) -> bool {
        self.last_flush.is_some_and(|t| t.elapsed() >= FLUSH_INTERVAL)
    }

    /// Writes one JSON line: the counters since the last flush (then zeroed), the latest
    /// latencies, each VM's pages and device counters. Refused when no metrics destination is
    /// set.
    pub fn flush(&mut self, controller: &mut Controller) -> Result<(), ApiError> {
        if self.metrics.is_none() {
            return Err(ApiError::BadRequest("the metrics system is not initialized: PUT /metrics first".into()));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut line = json!({ "utc_timestamp_ms": u64::try_from(now.as_millis()).unwrap_or(u64::MAX) });
        for (group, counters) in std::mem::take(&mut self.counters) {
            line[group] = json!(counters);
        }
        line["latencies_us"] = json!(self.latest);
        let mut vms: BTreeMap<String, Value> = controller
            .list()
            .iter()
            .map(|vm| {
                let gauges = json!({ "private_pages": vm.private_pages, "shared_pages": vm.shared_pages,
                                     "pinned_pages": vm.pinned_pages, "vcpus": vm.vcpus });
                (format!("vm{}", vm.id), gauges)
            })
            .collect();
        for (group, counters) in self.device_deltas(&controller.device_metrics(), &mut vms) {
            line[group] = json!(counters);
        }
        line["vms"] = json!(vms);
        self.last_flush = Some(Instant::now());
        let text = format!("{line}\n");
        let file = self.metrics.as_mut().expect("checked above");
        file.write_all(text.as_bytes()).map_err(|e| ApiError::BadRequest(format!("cannot write the metrics: {e}")))
    }

    /// The device counters' changes since the last flush: summed over the VMs by group, and
    /// each VM's into its entry of `vms`. A counter lower than last seen belongs to a device
    /// built since (its count starts from zero).
    fn device_deltas(
        &mut self,
        devices: &[(u64, Vec<DeviceMetrics>)],
        vms: &mut BTreeMap<String, Value>,
    ) -> BTreeMap<&'static str, BTreeMap<&'static str, u64>> {
        let mut seen = BTreeMap::new();
        let mut sums: BTreeMap<&'static str, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for (vm, metrics) in devices {
            let entry = vms.entry(format!("vm{vm}")).or_insert_with(|| json!({}));
            for DeviceMetrics { group, counters } in metrics {
                let mut own = BTreeMap::new();
                for &(name, value) in counters {
                    let before = self.seen.get(&(*vm, *group, name)).copied().unwrap_or(0);
                    let delta = if value >= before { value - before } else { value };
                    seen.insert((*vm, *group, name), value);
                    own.insert(name, delta);
                    let sum = sums.entry(group).or_default().entry(name).or_default();
                    *sum = sum.saturating_add(delta);
                }
                entry[*group] = json!(own);
            }
        }
        self.seen = seen;
        sums
    }
}

/// Firecracker's metric group and name for a request, if it has one, and Zygote's otherwise.
pub fn request_metric(method: &str, path: &str) -> Option<(&'static str, &'static str)> {
    let group = match method {
        "GET" => "get_api_requests",
        "PUT" => "put_api_requests",
        "PATCH" => "patch_api_requests",
        _ => return None,
    };
    let name = match path {
        "/" => "instance_info",
        "/version" => "vmm_version",
        "/machine-config" => "machine_cfg",
        "/vm/config" => "vm_config",
        "/actions" => "actions",
        "/boot-source" => "boot_source",
        "/logger" => "logger",
        "/metrics" => "metrics",
        "/vm" => "vm",
        "/snapshot/create" => "create_snapshot",
        "/snapshot/load" => "load_snapshot",
        "/clone" => return Some(("zygote", "clone")),
        "/reset" => return Some(("zygote", "reset")),
        "/vms" => return Some(("zygote", "vms")),
        "/vsock" => "vsock",
        p if p.starts_with("/drives/") => "drive",
        _ => return None,
    };
    Some((group, name))
}
