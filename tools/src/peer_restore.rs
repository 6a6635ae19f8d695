//! `restore_vs_qemu` (`zygote bench report --peers`): the same Linux kernel, initramfs and
//! command line (the test init printing a tick every 20 ms) booted under Zygote and under QEMU
//! (Debian's `qemu-system-x86`, `microvm` machine, KVM), each snapshotted once while paused,
//! then restored ROUNDS times in a new process: the time from spawning the process to the
//! guest's first line after the restore. Zygote restores with `zygote run --restore`; QEMU with
//! `-incoming "exec:cat FILE"` and a QMP `cont` once the state is loaded (its guest was stopped
//! when saved, as Zygote's was paused).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use vmm::api::client::call;
use vmm::linux::DEFAULT_CMDLINE;

const TICK: &str = "ZYGOTE-TICK";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
const MEM_MIB: &str = "256";

/// What failed measuring a restore against QEMU's.
#[derive(Debug, thiserror::Error)]
pub enum PeerBenchError {
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: no `{TICK}` line within {timeout:?}")]
    NoTick { what: &'static str, timeout: Duration },
    #[error("Zygote's API refused {request}: {reply}")]
    Api { request: String, reply: String },
    #[error("QMP {command}: {reply}")]
    Qmp { command: String, reply: String },
    #[error("QMP socket {path}")]
    QmpIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the work directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The figures (JSON): spawn to the first guest line after a restore, per round and median.
#[derive(Clone, Debug, Serialize)]
pub struct RestorePeerBench {
    pub qemu_version: String,
    pub zygote_ms: Vec<f64>,
    pub qemu_ms: Vec<f64>,
    pub zygote_ms_p50: f64,
    pub qemu_ms_p50: f64,
}

/// The Linux guest both VMMs run.
#[derive(Clone, Debug)]
pub struct PeerGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// A child process whose stdout lines arrive on a channel, with the instant each was read;
/// killed when dropped.
struct Watched {
    child: Child,
    lines: Receiver<(Instant, String)>,
}

impl Watched {
    fn spawn(mut command: Command, what: &str) -> Result<Watched, PeerBenchError> {
        let spawn = |source| PeerBenchError::Spawn { what: what.to_string(), source };
        let mut child =
            command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().map_err(spawn)?;
        let stdout = child.stdout.take().ok_or_else(|| spawn(std::io::ErrorKind::BrokenPipe.into()))?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Watched { child, lines })
    }

    /// When the first tick line arrived (`None` if none came within `timeout`).
    fn first_tick(&self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while let Ok((at, line)) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line.contains(TICK) {
                return Some(at);
            }
        }
        None
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cmdline() -> String {
    format!("{DEFAULT_CMDLINE} zygote_tick=20")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Boots `guest` under the `zygote` binary `exe`, snapshots it paused into `dir`, then restores
/// it `rounds` times; the time of each restore (ms).
fn zygote_restores(exe: &Path, guest: &PeerGuest, dir: &Path, rounds: usize) -> Result<Vec<f64>, PeerBenchError> {
    let socket = dir.join("zygote.sock");
    let state = dir.join("zygote.snap");
    let mut boot = Command::new(exe);
    boot.arg("run").arg("--kernel").arg(&guest.kernel).arg("--initrd").arg(&guest.initrd);
    boot.args(["--mem", MEM_MIB, "--cmdline", &cmdline(), "--api-sock"]).arg(&socket);
    let source = Watched::spawn(boot, "zygote run")?;
    source.first_tick(BOOT_TIMEOUT).ok_or(PeerBenchError::NoTick { what: "Zygote's boot", timeout: BOOT_TIMEOUT })?;
    let create = json!({ "snapshot_type": "Full", "snapshot_path": state }).to_string();
    for (method, path, body) in
        [("PATCH", "/vm", r#"{"state":"Paused"}"#), ("PUT", "/snapshot/create", create.as_str())]
    {
        let refused = |reply: String| PeerBenchError::Api { request: format!("{method} {path}"), reply };
        let reply = call(&socket, method, path, Some(body)).map_err(|e| refused(e.to_string()))?;
        if !reply.is_success() {
            return Err(refused(format!("{} {}", reply.status, reply.body)));
        }
    }
    drop(source);
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut restore = Command::new(exe);
        restore.arg("run").arg("--restore").arg(&state);
        let spawned = Instant::now();
        let restored = Watched::spawn(restore, "zygote run --restore")?;
        let at = restored
            .first_tick(RESTORE_TIMEOUT)
            .ok_or(PeerBenchError::NoTick { what: "Zygote's restore", timeout: RESTORE_TIMEOUT })?;
        times.push(ms(at - spawned));
    }
    Ok(times)
}

/// A QMP connection (QEMU's JSON control protocol), capabilities negotiated.
struct Qmp {
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Qmp {
    /// Connects to `path`, waiting up to `timeout` for QEMU to create it.
    fn connect(path: &Path, timeout: Duration) -> Result<Qmp, PeerBenchError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(source) => return Err(PeerBenchError::QmpIo { path: path.to_path_buf(), source }),
            }
        };
        let mut qmp = Qmp { reader: BufReader::new(stream), path: path.to_path_buf() };
        qmp.reply("greeting")?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The next message that is not an event.
    fn reply(&mut self, command: &str) -> Result<Value, PeerBenchError> {
        loop {
            let mut line = String::new();
            let read = self.reader.read_line(&mut line);
            let io = |source| PeerBenchError::QmpIo { path: self.path.clone(), source };
            if read.map_err(io)? == 0 {
                return Err(PeerBenchError::Qmp { command: command.into(), reply: "connection closed".into() });
            }
            let message: Value = serde_json::from_str(&line)
                .map_err(|_| PeerBenchError::Qmp { command: command.into(), reply: line.clone() })?;
            if message.get("event").is_none() {
                return Ok(message);
            }
        }
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, PeerBenchError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let io = |source| PeerBenchError::QmpIo { path: self.path.clone(), source };
        writeln!(self.reader.get_mut(), "{request}").map_err(io)?;
        let reply = self.reply(command)?;
        match reply.get("return") {
            Some(value) => Ok(value.clone()),
            None => Err(PeerBenchError::Qmp { command: command.into(), reply: reply.to_string() }),
        }
    }

    /// Polls `query-status` until it is no longer `status`.
    fn wait_while(&mut self, status: &str, timeout: Duration) -> Result<String, PeerBenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.execute("query-status", None)?["status"].as_str().unwrap_or_default().to_string();
            if now != status || Instant::now() > deadline {
                return Ok(now);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn qemu(guest: &PeerGuest, qmp: &Path) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    // The nested PVM host refuses IA32_ARCH_CAPABILITIES: QEMU's `host` CPU without it.
    command.args(["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", MEM_MIB]);
    command.args(["-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"]);
    command.arg("-kernel").arg(&guest.kernel).arg("-initrd").arg(&guest.initrd).args(["-append", &cmdline()]);
    command.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    command
}

/// The same under QEMU: boot, stop, save with `migrate` to a file, then restore `rounds` times.
fn qemu_restores(guest: &PeerGuest, dir: &Path, rounds: usize) -> Result<Vec<f64>, PeerBenchError> {
    let state = dir.join("qemu.state");
    let qmp_path = dir.join("qemu-source.qmp");
    let source = Watched::spawn(qemu(guest, &qmp_path), "qemu-system-x86_64")?;
    source.first_tick(BOOT_TIMEOUT).ok_or(PeerBenchError::NoTick { what: "QEMU's boot", timeout: BOOT_TIMEOUT })?;
    let mut qmp = Qmp::connect(&qmp_path, RESTORE_TIMEOUT)?;
    qmp.execute("stop", None)?;
    let uri = format!("exec:cat > {}", state.display());
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    loop {
        let status = qmp.execute("query-migrate", None)?["status"].as_str().unwrap_or_default().to_string();
        match status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => return Err(PeerBenchError::Qmp { command: "migrate".into(), reply: status }),
            _ if Instant::now() > deadline => {
                return Err(PeerBenchError::Qmp { command: "migrate".into(), reply: status })
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    drop(source);
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let qmp_path = dir.join(format!("qemu-restore-{round}.qmp"));
        let mut restore = qemu(guest, &qmp_path);
        restore.args(["-incoming", &format!("exec:cat {}", state.display())]);
        let spawned = Instant::now();
        let restored = Watched::spawn(restore, "qemu-system-x86_64 -incoming")?;
        let mut qmp = Qmp::connect(&qmp_path, RESTORE_TIMEOUT)?;
        let status = qmp.wait_while("inmigrate", RESTORE_TIMEOUT)?;
        if status != "running" {
            qmp.execute("cont", None)?;
        }
        let at = restored
            .first_tick(RESTORE_TIMEOUT)
            .ok_or(PeerBenchError::NoTick { what: "QEMU's restore", timeout: RESTORE_TIMEOUT })?;
        times.push(ms(at - spawned));
    }
    Ok(times)
}

fn qemu_version() -> Result<String, PeerBenchError> {
    let out = Command::new("qemu-system-x86_64").arg("--version").output().map_err(|source| PeerBenchError::Spawn {
        what: "qemu-system-x86_64 (apt install qemu-system-x86)".into(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
}

/// Measures both, `rounds` restores each, with scratch files in `work_dir`.
pub fn bench_restore_vs_qemu(
    exe: &Path,
    guest: &PeerGuest,
    work_dir: &Path,
    rounds: usize,
) -> Result<RestorePeerBench, PeerBenchError> {
    let qemu_version = qemu_version()?;
    let dir = work_dir.join(format!("zygote-peer-restore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| PeerBenchError::Dir { path: dir.clone(), source })?;
    let measured =
        zygote_restores(exe, guest, &dir, rounds).and_then(|zygote| Ok((zygote, qemu_restores(guest, &dir, rounds)?)));
    let _ = std::fs::remove_dir_all(&dir);
    let (zygote_ms, qemu_ms) = measured?;
    Ok(RestorePeerBench {
        qemu_version,
        zygote_ms_p50: median(&zygote_ms),
        qemu_ms_p50: median(&qemu_ms),
        zygote_ms,
        qemu_ms,
    })
}
