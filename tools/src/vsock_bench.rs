//! `zygote bench vsock`: bulk transfer through virtio-vsock (Firecracker's hybrid model) against
//! the same transfer over a host Unix socket, measured in the same run. A Linux guest (the test
//! init's `zygote_vsock_echo=PORT`) echoes every byte back; each round the host connects to the
//! VM's `uds_path`, says `CONNECT PORT`, and sends KIB KiB while reading them back. The
//! reference is a host thread echoing over a Unix socket pair with the same client code. Also
//! reported: the median round trip of a 16-byte message.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::device_manager::VsockConfig;
use vmm::linux::DEFAULT_CMDLINE;
use vmm::{build_linux_vm, Console, LinuxConfig, VmConfig};

const PORT: u32 = 5000;
const READY: &str = "ZYGOTE-VSOCK-ECHO-LISTENING 5000";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const IO_TIMEOUT: Duration = Duration::from_secs(300);
const PINGS: usize = 20;

/// What failed setting up or running the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum VsockBenchError {
    #[error("--kib {0} and --rounds {1} must be 1 to 65536 and 1 to 100")]
    Size(usize, usize),
    #[error("cannot build the Linux VM")]
    Build(#[from] vmm::BootError),
    #[error("the guest's vsock echo server did not listen within {0:?}")]
    NotReady(Duration),
    #[error("CONNECT {PORT} through {path} was answered {answer:?}")]
    Handshake { path: PathBuf, answer: String },
    #[error("{what} transfer failed")]
    Transfer {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} echoed different bytes")]
    Corrupt { what: &'static str },
}

/// The measured figures (JSON).
#[derive(Debug, Serialize)]
pub struct VsockBenchReport {
    pub kib_per_round: usize,
    pub rounds: usize,
    /// Median MiB/s each way (KIB out and KIB back in one round's time).
    pub guest_vsock_mib_s: f64,
    pub host_unix_mib_s: f64,
    /// guest / host.
    pub ratio: f64,
    /// Median round trip of a 16-byte message through the guest, and through the host pair.
    pub guest_rtt_us: f64,
    pub host_rtt_us: f64,
    pub boot_to_listening_ms: u64,
}

/// Connects to the VM's `uds_path` and completes the hybrid handshake for `PORT`.
fn connect(uds_path: &Path) -> Result<UnixStream, VsockBenchError> {
    let io = |source| VsockBenchError::Transfer { what: "vsock connect", source };
    let mut stream = UnixStream::connect(uds_path).map_err(io)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.write_all(format!("CONNECT {PORT}\n").as_bytes()).map_err(io)?;
    // The answer line, byte by byte: nothing of the echoed stream may be read with it.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.last() != Some(&b'\n') && answer.len() < 64 {
        match stream.read(&mut byte).map_err(io)? {
            0 => break,
            _ => answer.push(byte[0]),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    match answer.starts_with("OK ") {
        true => Ok(stream),
        false => Err(VsockBenchError::Handshake { path: uds_path.to_path_buf(), answer }),
    }
}

/// Sends `data` through `stream` while reading it back; the round's time.
fn echo_round(what: &'static str, stream: &mut UnixStream, data: &[u8]) -> Result<Duration, VsockBenchError> {
    let io = |source| VsockBenchError::Transfer { what, source };
    let mut writer = stream.try_clone().map_err(io)?;
    let payload = data.to_vec();
    let start = Instant::now();
    let sender = std::thread::spawn(move || writer.write_all(&payload));
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).map_err(io)?;
    let took = start.elapsed();
    sender.join().map_err(|_| io(std::io::Error::other("sender panicked")))?.map_err(io)?;
    match back == data {
        true => Ok(took),
        false => Err(VsockBenchError::Corrupt { what }),
    }
}

/// Median round trip of `PINGS` 16-byte messages, in µs.
fn rtt_us(what: &'static str, stream: &mut UnixStream) -> Result<f64, VsockBenchError> {
    let mut times: Vec<Duration> = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        times.push(echo_round(what, stream, &[0x5a; 16])?);
    }
    times.sort();
    Ok(times[times.len() / 2].as_secs_f64() * 1e6)
}

/// A host echo over a Unix socket pair: the client's end.
fn host_pair() -> std::io::Result<UnixStream> {
    let (client, mut server) = UnixStream::pair()?;
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    std::thread::spawn(move || crate::net_bench::echo_until_closed(&mut server));
    Ok(client)
}

fn median_mib_s(kib: usize, mut times: Vec<Duration>) -> f64 {
    times.sort();
    kib as f64 / 1024.0 / times[times.len() / 2].as_secs_f64()
}

/// Waits until the guest printed `READY`; the time it took from `start`.
fn wait_ready(out: &std::sync::Mutex<Vec<u8>>, start: Instant) -> Result<u64, VsockBenchError> {
    let ready = || String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).contains(READY);
    while !ready() {
        if start.elapsed() > BOOT_TIMEOUT {
            return Err(VsockBenchError::NotReady(BOOT_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// Runs the benchmark with the Linux guest `kernel` and `initrd`.
pub fn bench_vsock(
    kernel: &Path,
    initrd: &Path,
    kib: usize,
    rounds: usize,
) -> Result<VsockBenchReport, VsockBenchError> {
    if !(1..=65536).contains(&kib) || !(1..=100).contains(&rounds) {
        return Err(VsockBenchError::Size(kib, rounds));
    }
    let uds_path = std::env::temp_dir().join(format!("zygote-bench-vsock-{}.sock", std::process::id()));
    let (console, out) = Console::capture();
    let vsock = VsockConfig { guest_cid: 3, uds_path: uds_path.clone() };
    let config = LinuxConfig {
        vm: VmConfig { mem_mib: 256, console, vsock: Some(vsock), ..VmConfig::default() },
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd.to_path_buf()),
        cmdline: Some(format!("{DEFAULT_CMDLINE} zygote_vsock_echo={PORT}")),
    };
    let start = Instant::now();
    let mut vm = build_linux_vm(&config)?;
    vm.start();
    let measured = wait_ready(&out, start).and_then(|boot_to_listening_ms| {
        let data: Vec<u8> = (0..kib << 10).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut guest = connect(&uds_path)?;
        let mut host = host_pair().map_err(|source| VsockBenchError::Transfer { what: "host pair", source })?;
        let (guest_rtt_us, host_rtt_us) = (rtt_us("guest", &mut guest)?, rtt_us("host", &mut host)?);
        let mut guest_times = Vec::with_capacity(rounds);
        let mut host_times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            guest_times.push(echo_round("guest", &mut guest, &data)?);
            host_times.push(echo_round("host", &mut host, &data)?);
        }
        let (guest_vsock_mib_s, host_unix_mib_s) = (median_mib_s(kib, guest_times), median_mib_s(kib, host_times));
        Ok(VsockBenchReport {
            kib_per_round: kib,
            rounds,
            guest_vsock_mib_s,
            host_unix_mib_s,
            ratio: guest_vsock_mib_s / host_unix_mib_s,
            guest_rtt_us,
            host_rtt_us,
            boot_to_listening_ms,
        })
    });
    drop(vm.stop());
    measured
}
