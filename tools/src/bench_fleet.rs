//! `zygote bench fleet`: many clones in one `zygote run` process, driven through its control
//! API as a user would. VM 0 is a `spin` guest of MEM MiB rewriting 1 % of its pages, paused;
//! every clone of it is resumed until it has written its own 1 %, then paused again. Measured
//! on the way, all in the same run:
//! - each `PUT /clone` call, with no clone running and with BUSY clones running;
//! - the process's Pss against its Pss before the first clone + the pages every clone owns;
//! - the CPU the process uses while every VM is paused (from /proc, over a window);
//! - `GET /vms` with every VM listed;
//! - how far the process is from the limits it could hit (mappings, descriptors, threads).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use vmm::api::client::{call, ClientError};

/// What failed while driving the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetBenchError {
    #[error("cannot start {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API socket {0} never came up")]
    NoSocket(PathBuf),
    #[error("{request} failed")]
    Client {
        request: String,
        #[source]
        source: ClientError,
    },
    #[error("{request} answered {status}: {body}")]
    Refused { request: String, status: u16, body: String },
    #[error("{0} did not happen within 120 s")]
    Timeout(String),
    #[error("cannot read /proc/{pid}/{file}")]
    Proc {
        pid: u32,
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// What to run.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub clones: usize,
    pub mem_mib: u64,
    /// Clones that run while the busy clone calls are timed.
    pub busy: usize,
    /// VM counts at which idle CPU, Pss and `GET /vms` are also measured (the last count always).
    pub checkpoints: Vec<usize>,
    /// How long the idle CPU is sampled.
    pub idle_window: Duration,
    /// Clone calls timed with none running, and with `busy` running.
    pub timed_clones: usize,
}

/// One look at the whole process with `vms` VMs, all paused.
#[derive(Clone, Debug, Serialize)]
pub struct FleetPoint {
    pub vms: usize,
    pub pss_kib: u64,
    /// Pss before the first clone + 4 KiB per page the clones own (`GET /vms` private pages).
    pub ideal_kib: u64,
    pub idle_cpu_percent: f64,
    pub vms_list_ms: f64,
}

/// A limit of the process and how much of it is in use.
#[derive(Clone, Debug, Serialize)]
pub struct Limit {
    pub name: &'static str,
    pub used: u64,
    pub limit: u64,
}

/// `zygote bench fleet`.
#[derive(Clone, Debug, Serialize)]
pub struct FleetBench {
    pub clones: usize,
    pub mem_mib: u64,
    pub pages_per_vm_written: u64,
    pub base_pss_kib: u64,
    pub points: Vec<FleetPoint>,
    pub idle_window_s: f64,
    /// `PUT /clone` of VM 0, medians: no clone running, and `busy` clones running.
    pub clone_idle_ms_p50: f64,
    pub clone_busy_ms_p50: f64,
    pub busy: usize,
    pub clone_busy_vs_idle: f64,
    /// Every `PUT /clone` call, in order (ms).
    pub clone_ms: Vec<f64>,
    pub limits: Vec<Limit>,
}

/// The `zygote run` process serving the fleet; stopped when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = call(&self.socket, "PUT", "/actions", Some(r#"{"action_type":"Shutdown"}"#));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<Value, FleetBenchError> {
        let request = format!("{method} {path} {}", body.unwrap_or(""));
        let r = call(&self.socket, method, path, body)
            .map_err(|source| FleetBenchError::Client { request: request.clone(), source })?;
        if !r.is_success() {
            return Err(FleetBenchError::Refused { request, status: r.status, body: r.body });
        }
        Ok(serde_json::from_str(&r.body).unwrap_or(Value::Null))
    }

    fn set_paused(&self, id: u64, paused: bool) -> Result<(), FleetBenchError> {
        let state = if paused { "Paused" } else { "Resumed" };
        self.api("PATCH", "/vm", Some(&format!(r#"{{"vm_id":{id},"state":"{state}"}}"#))).map(drop)
    }

    /// `PUT /clone` of VM 0: the new VM's id and the call's time.
    fn clone_root(&self) -> Result<(u64, Duration), FleetBenchError> {
        let start = Instant::now();
        let reply = self.api("PUT", "/clone", Some(r#"{"vm_id":0}"#))?;
        let took = start.elapsed();
        let id = reply["vm_id"].as_u64().ok_or_else(|| FleetBenchError::Refused {
            request: "PUT /clone".into(),
            status: 200,
            body: reply.to_string(),
        })?;
        Ok((id, took))
    }

    /// `GET /vms`: (id, private pages) of every VM, and the call's time.
    fn list(&self) -> Result<(Vec<(u64, u64)>, Duration), FleetBenchError> {
        let start = Instant::now();
        let reply = self.api("GET", "/vms", None)?;
        let took = start.elapsed();
        let rows = reply.as_array().map(Vec::as_slice).unwrap_or_default();
        let vms = rows.iter().map(|v| (v["id"].as_u64().unwrap_or(0), v["private_pages"].as_u64().unwrap_or(0)));
        Ok((vms.collect(), took))
    }

    /// Waits until every VM of `ids` owns at least `pages` pages.
    fn wait_written(&self, ids: &[u64], pages: u64) -> Result<(), FleetBenchError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (vms, _) = self.list()?;
            if ids.iter().all(|id| vms.iter().any(|&(v, own)| v == *id && own >= pages)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(FleetBenchError::Timeout(format!("{} VMs writing {pages} pages each", ids.len())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn proc(&self, file: &str) -> Result<String, FleetBenchError> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| FleetBenchError::Proc {
            pid,
            file: file.into(),
            source,
        })
    }
}

/// Starts `exe run --guest spin` with an API socket in a fresh directory under `work`.
fn start_server(exe: &Path, work: &Path, mem_mib: u64, pages: u64) -> Result<Server, FleetBenchError> {
    let dir = work.join(format!("zygote-fleet-{}", std::process::id()));
    let spawn = |source| FleetBenchError::Spawn { exe: exe.to_path_buf(), source };
    std::fs::create_dir_all(&dir).map_err(spawn)?;
    let socket = dir.join("api.sock");
    let child = Command::new(exe)
        .args(["run", "--guest", "spin", "--arg", &pages.to_string(), "--mem", &mem_mib.to_string(), "--api-sock"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(spawn)?;
    let server = Server { child, socket, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while call(&server.socket, "GET", "/", None).is_err() {
        if Instant::now() > deadline {
            return Err(FleetBenchError::NoSocket(server.socket.clone()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

/// VMs resumed together to write their pages, after the busy batch.
const BATCH: usize = 10;

/// Runs the fleet: `exe` is the `zygote` binary, its socket goes under `work`.
pub fn bench_fleet(exe: &Path, work: &Path, options: &FleetOptions) -> Result<FleetBench, FleetBenchError> {
    let pages = (options.mem_mib << 20) / memory::PAGE_SIZE as u64 / 100;
    let server = start_server(exe, work, options.mem_mib, pages)?;
    server.wait_written(&[0], pages)?;
    server.set_paused(0, true)?;
    let base_pss_kib = pss_kib(&server)?;

    let mut clone_ms = Vec::new();
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    let mut points = Vec::new();
    let mut made = 0;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // Batches: clone, resume the batch, wait until each wrote its pages, pause it again. The
    // first has `busy` VMs (the busy clone calls run beside it), the others few, so that the
    // process (and the host) is not running many spinning vCPUs for long.
    while made < options.clones {
        let size = if made == 0 { options.busy.max(1) } else { BATCH }.min(options.clones - made);
        let mut batch = Vec::with_capacity(size);
        for _ in 0..size {
            let (id, took) = server.clone_root()?;
            clone_ms.push(ms(took));
            if made == 0 && idle.len() < options.timed_clones {
                idle.push(ms(took));
            }
            batch.push(id);
        }
        for &id in &batch {
            server.set_paused(id, false)?;
        }
        if made == 0 {
            // The first batch running: the busy clones (kept, paused with the fleet).
            server.wait_written(&batch, pages)?;
            for _ in 0..options.timed_clones.min(options.clones.saturating_sub(size)) {
                let (id, took) = server.clone_root()?;
                busy.push(ms(took));
                clone_ms.push(ms(took));
                batch.push(id);
                server.set_paused(id, false)?;
            }
        }
        server.wait_written(&batch, pages)?;
        for &id in &batch {
            server.set_paused(id, true)?;
        }
        let before = made;
        made += batch.len();
        if options.checkpoints.iter().any(|&c| c > before && c <= made) || made >= options.clones {
            points.push(look(&server, made + 1, base_pss_kib, options.idle_window)?);
        }
    }
    let limits = limits(&server)?;
    let (clone_idle_ms_p50, clone_busy_ms_p50) = (median(&mut idle), median(&mut busy));
    Ok(FleetBench {
        clones: made,
        mem_mib: options.mem_mib,
        pages_per_vm_written: pages,
        base_pss_kib,
        points,
        idle_window_s: options.idle_window.as_secs_f64(),
        clone_idle_ms_p50,
        clone_busy_ms_p50,
        busy: options.busy,
        clone_busy_vs_idle: clone_busy_ms_p50 / clone_idle_ms_p50,
        clone_ms,
        limits,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Pss, idle CPU and `GET /vms` with `vms` VMs, all paused.
fn look(server: &Server, vms: usize, base_pss_kib: u64, window: Duration) -> Result<FleetPoint, FleetBenchError> {
    let mut lists = Vec::new();
    let mut owned = 0;
    for _ in 0..5 {
        let (rows, took) = server.list()?;
        owned = rows.iter().filter(|&&(id, _)| id != 0).map(|&(_, own)| own).sum::<u64>();
        lists.push(took.as_secs_f64() * 1e3);
    }
    let before = (cpu_ns(server)?, Instant::now());
    std::thread::sleep(window);
    let cpu = cpu_ns(server)?.saturating_sub(before.0) as f64;
    let idle_cpu_percent = cpu / (before.1.elapsed().as_secs_f64() * 1e9) * 100.0;
    Ok(FleetPoint {
        vms,
        pss_kib: pss_kib(server)?,
        ideal_kib: base_pss_kib + owned * (memory::PAGE_SIZE as u64 / 1024),
        idle_cpu_percent,
        vms_list_ms: median(&mut lists),
    })
}

/// The process's Pss, from smaps_rollup.
fn pss_kib(server: &Server) -> Result<u64, FleetBenchError> {
    Ok(field(&server.proc("smaps_rollup")?, "Pss:"))
}

/// The first number after `name` at the start of a line.
fn field(text: &str, name: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_default();
    line[name.len().min(line.len())..].split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// CPU time of every thread of the process so far, ns (schedstat: exact, not tick-sampled).
fn cpu_ns(server: &Server) -> Result<u64, FleetBenchError> {
    let pid = server.child.id();
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|source| FleetBenchError::Proc { pid, file: "task".into(), source })?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        // A thread may exit between the listing and the read: it adds nothing then.
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

/// Mappings, descriptors and threads in use against their limits.
fn limits(server: &Server) -> Result<Vec<Limit>, FleetBenchError> {
    let sys = |path: &str| std::fs::read_to_string(path).ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    let pid = server.child.id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    let limits = server.proc("limits")?;
    let soft = |name: &str| {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        line[name.len().min(line.len())..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    };
    let threads = field(&server.proc("status")?, "Threads:");
    Ok(vec![
        Limit {
            name: "vm.max_map_count",
            used: server.proc("maps")?.lines().count() as u64,
            limit: sys("/proc/sys/vm/max_map_count"),
        },
        Limit { name: "RLIMIT_NOFILE", used: fds, limit: soft("Max open files") },
        Limit { name: "RLIMIT_NPROC (threads)", used: threads, limit: soft("Max processes") },
        Limit { name: "kernel.threads-max", used: threads, limit: sys("/proc/sys/kernel/threads-max") },
    ])
}
