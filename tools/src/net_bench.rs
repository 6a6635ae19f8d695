//! `zygote bench net`: bulk TCP through virtio-net and a TAP against the same transfer over the
//! host's loopback, measured in the same run. A Linux guest (the test init's
//! `zygote_net=... zygote_tcp_echo=PORT`) echoes every byte back, so each round moves MIB MiB
//! host -> guest and the same MiB guest -> host at once; the reference is a host thread echoing
//! on 127.0.0.1 with the same client. Also reported: the guest's boot time to its echo server
//! listening (its share due to the network was not measured: that needs a second kernel built
//! without networking).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::device_manager::NetConfig;
use vmm::linux::DEFAULT_CMDLINE;
use vmm::{build_linux_vm, Console, LinuxConfig, VmConfig};

const TAP: &str = "zbench0";
const GUEST: &str = "172.31.0.2:7777";
const READY: &str = "ZYGOTE-TCP-ECHO-LISTENING 7777";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// What failed setting up or running the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum NetBenchError {
    #[error("ip {args}: {reason}")]
    Ip { args: String, reason: String },
    #[error("cannot build the Linux VM")]
    Build(#[from] vmm::BootError),
    #[error("the guest's echo server did not listen within {0:?}")]
    NotReady(Duration),
    #[error("{what} transfer failed")]
    Transfer {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} echoed {got} bytes of {sent}, or different bytes")]
    Corrupt { what: &'static str, got: usize, sent: usize },
    #[error("--mib {0} and --rounds {1} must be 1 to 1024 and 1 to 100")]
    Size(usize, usize),
}

/// The measured figures (JSON).
#[derive(Debug, Serialize)]
pub struct NetBenchReport {
    pub mib_per_round: usize,
    pub rounds: usize,
    /// Median MiB/s each way (MIB out and MIB back in one round's time).
    pub guest_tap_mib_s: f64,
    pub host_loopback_mib_s: f64,
    /// guest / loopback.
    pub ratio: f64,
    /// From the VM's build to its echo server listening.
    pub boot_to_listening_ms: u64,
}

fn ip(args: &[&str]) -> Result<(), NetBenchError> {
    let failed = |reason: String| NetBenchError::Ip { args: args.join(" "), reason };
    let out = Command::new("ip").args(args).output().map_err(|e| failed(e.to_string()))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_string())),
    }
}

/// A named network namespace with the TAP, deleted on drop.
struct BenchNetns(String);

impl BenchNetns {
    fn new() -> Result<BenchNetns, NetBenchError> {
        let name = format!("zyg-bench-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = BenchNetns(name);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["-n", &ns.0, "addr", "add", "172.31.0.1/24", "dev", TAP])?;
        ip(&["-n", &ns.0, "link", "set", TAP, "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
}

impl Drop for BenchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Sends `data` to the echo server at `addr` (from namespace `netns` if given) and reads it
/// back; returns the round's time.
fn echo_round(
    what: &'static str,
    addr: SocketAddr,
    netns: Option<&Path>,
    data: &[u8],
) -> Result<Duration, NetBenchError> {
    let io = |source| NetBenchError::Transfer { what, source };
    let ns = netns.map(std::fs::File::open).transpose().map_err(io)?;
    let payload = data.to_vec();
    let (back, took) = std::thread::spawn(move || -> std::io::Result<(Vec<u8>, Duration)> {
        if let Some(ns) = ns {
            // SAFETY: setns on an fd we own; it moves only this short-lived thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(60))?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let start = Instant::now();
        let mut writer = stream.try_clone()?;
        let sender = std::thread::spawn(move || -> std::io::Result<()> {
            writer.write_all(&payload)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut back = Vec::new();
        stream.read_to_end(&mut back)?;
        let took = start.elapsed();
        sender.join().map_err(|_| std::io::Error::other("sender panicked"))??;
        Ok((back, took))
    })
    .join()
    .map_err(|_| io(std::io::Error::other("client panicked")))?
    .map_err(io)?;
    let sent = data.len();
    if back.len() != sent || back != data {
        return Err(NetBenchError::Corrupt { what, got: back.len(), sent });
    }
    Ok(took)
}

/// Writes back what `stream` reads until it ends or fails: the host side of a reference echo.
pub(crate) fn echo_until_closed(stream: &mut (impl Read + Write)) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// A host echo server on 127.0.0.1 serving `rounds` connections.
fn loopback_echo(rounds: usize) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().take(rounds) {
            let Ok(mut stream) = stream else { continue };
            echo_until_closed(&mut stream);
        }
    });
    Ok(addr)
}

fn median_mib_s(mib: usize, mut times: Vec<Duration>) -> f64 {
    times.sort();
    mib as f64 / times[times.len() / 2].as_secs_f64()
}

/// Runs the benchmark with the Linux guest `kernel` and `initrd`.
pub fn bench_net(kernel: &Path, initrd: &Path, mib: usize, rounds: usize) -> Result<NetBenchReport, NetBenchError> {
    if !(1..=1024).contains(&mib) || !(1..=100).contains(&rounds) {
        return Err(NetBenchError::Size(mib, rounds));
    }
    let ns = BenchNetns::new()?;
    let (console, out) = Console::capture();
    let eth0 =
        NetConfig { iface_id: "eth0".into(), host_dev_name: TAP.into(), guest_mac: None, netns: Some(ns.path()) };
    let config = LinuxConfig {
        vm: VmConfig { mem_mib: 256, console, net: vec![eth0], ..VmConfig::default() },
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd.to_path_buf()),
        cmdline: Some(format!("{DEFAULT_CMDLINE} zygote_net=172.31.0.2/24 zygote_tcp_echo=7777")),
    };
    let start = Instant::now();
    let mut vm = build_linux_vm(&config)?;
    vm.start();
    let ready = || String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).contains(READY);
    while !ready() {
        if start.elapsed() > BOOT_TIMEOUT {
            return Err(NetBenchError::NotReady(BOOT_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let boot_to_listening_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let data: Vec<u8> = (0..mib << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let guest: SocketAddr = GUEST.parse().expect("a socket address");
    let loopback = loopback_echo(rounds).map_err(|source| NetBenchError::Transfer { what: "loopback", source })?;
    let mut guest_times = Vec::with_capacity(rounds);
    let mut loopback_times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        guest_times.push(echo_round("guest", guest, Some(&ns.path()), &data)?);
        loopback_times.push(echo_round("loopback", loopback, None, &data)?);
    }
    drop(vm.stop());
    let guest_tap_mib_s = median_mib_s(mib, guest_times);
    let host_loopback_mib_s = median_mib_s(mib, loopback_times);
    Ok(NetBenchReport {
        mib_per_round: mib,
        rounds,
        guest_tap_mib_s,
        host_loopback_mib_s,
        ratio: guest_tap_mib_s / host_loopback_mib_s,
        boot_to_listening_ms,
    })
}
