//! Shared fixtures for the integration tests in `tests/`: building tiny-guest VMs with a
//! captured console, reading guest RAM, and finding and running the real `zygote` binary.

pub mod blk_driver;
pub mod dma_guest;
pub mod linux;
pub mod snapshot_file;
pub mod ticks;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use memory::{Bytes, GuestAddress, GuestRam};
use vmm::{Console, VmConfig};

/// A config with a captured console, and the buffer it fills.
pub fn captured(vcpus: u32) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (console, out) = Console::capture();
    (VmConfig { vcpus, console, ..VmConfig::default() }, out)
}

/// The console output so far, as text.
pub fn text(out: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Reads a u64 of guest RAM.
pub fn read_u64(ram: &GuestRam, addr: u64) -> u64 {
    ram.read_obj(GuestAddress(addr)).expect("guest address inside RAM")
}

/// `target/<profile>` of the running test executable (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("test executable lives in target/<profile>/deps").to_path_buf()
}

/// The `zygote` binary of this build profile, built (or brought up to date) on first use:
/// a test executable cannot depend on another package's binary, so ask cargo for it.
pub fn zygote_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile = profile_dir();
        let target = profile.parent().expect("target dir");
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-j1", "--quiet", "-p", "zygote-tools", "--bin", "zygote", "--target-dir"]).arg(target);
        if profile.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo.current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("running cargo");
        assert!(status.success(), "cargo build of the zygote binary failed: {status}");
        profile.join("zygote")
    })
}

/// Runs `zygote` with `args`.
pub fn run_zygote(args: &[&str]) -> Output {
    Command::new(zygote_bin())
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("spawning zygote")
}

/// A paused `spin` VM with `vcpus` vCPUs and id `vm_id`, its console captured.
pub fn spin_vm(vcpus: u32, vm_id: u64) -> vmm::Vmm {
    let (config, _) = captured(vcpus);
    let config = VmConfig { vm_id, ..config };
    vmm::build_tiny_vm(&config, vmm::guests::find("spin").expect("spin is bundled"), 0).expect("building spin")
}

/// A paused one-vCPU `spin` VM with id `vm_id` serving `disk` through virtio-blk.
pub fn spin_vm_with_disk(vm_id: u64, disk: &Path) -> vmm::Vmm {
    let (config, _) = captured(1);
    let config = VmConfig { vm_id, disk: Some(disk.to_path_buf()), ..config };
    vmm::build_tiny_vm(&config, vmm::guests::find("spin").expect("spin is bundled"), 0)
        .expect("building spin with a disk")
}

/// Each vCPU's `spin` counter.
pub fn spin_counters(vmm: &vmm::Vmm) -> Vec<u64> {
    (0..vmm.vcpu_count() as u64).map(|i| read_u64(vmm.ram(), vmm::layout::COUNTERS_ADDR + 8 * i)).collect()
}

/// Polls until every counter is past `before` (the host may be busy: no fixed sleeps); returns
/// the counters then, or the last ones seen after 20 s.
pub fn wait_for_progress(vmm: &vmm::Vmm, before: &[u64]) -> Vec<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = spin_counters(vmm);
        if now.iter().zip(before).all(|(a, b)| a > b) || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The ids found in the `spin` pattern pages of every vCPU other than `id` (empty: the VM's
/// pages hold only its own id).
pub fn foreign_pattern_ids(vmm: &vmm::Vmm, id: u64) -> Vec<u64> {
    use vmm::layout::{PATTERN_ADDR, PATTERN_SIZE};
    let mut foreign = Vec::new();
    for vcpu in 0..vmm.vcpu_count() as u64 {
        let mut page = vec![0u8; PATTERN_SIZE as usize];
        vmm.ram().read_slice(&mut page, GuestAddress(PATTERN_ADDR + vcpu * PATTERN_SIZE)).expect("pattern page in RAM");
        for slot in page.chunks_exact(8) {
            let value = u64::from_le_bytes(slot.try_into().expect("8 bytes"));
            if value != id && !foreign.contains(&value) {
                foreign.push(value);
            }
        }
    }
    foreign
}

/// The first guest address where two RAMs of the same layout differ, if any.
pub fn first_difference(a: &GuestRam, b: &GuestRam) -> Option<u64> {
    const CHUNK: usize = 1 << 20;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for (start, size) in a.layout() {
        for offset in (0..size).step_by(CHUNK) {
            let addr = GuestAddress(start.0 + offset as u64);
            let n = CHUNK.min(size - offset);
            a.read_slice(&mut x[..n], addr).expect("inside RAM");
            b.read_slice(&mut y[..n], addr).expect("same layout");
            // Slice equality is one memcmp even in an unoptimised test build.
            if x[..n] != y[..n] {
                let i = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q).unwrap_or(0);
                return Some(addr.0 + i as u64);
            }
        }
    }
    None
}

/// Waits until the console holds at least `lines` lines; false after 20 s.
pub fn wait_for_lines(out: &Mutex<Vec<u8>>, lines: usize) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while text(out).lines().count() < lines {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// A fresh empty directory under the target dir's tmp, named for the test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = profile_dir().join("tmp").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch dir");
    dir
}

/// `zygote ctl --api-sock SOCKET ARGS...`, which must succeed; its JSON answer.
pub fn ctl(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["ctl", "--api-sock", socket.to_str().expect("a UTF-8 socket path")];
    all.extend_from_slice(args);
    let out = run_zygote(&all);
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ctl prints JSON")
}

/// A `zygote run --guest spin --api-sock DIR/api.sock` (stdout discarded), serving once
/// `start` returns; killed when dropped if the test did not stop it.
pub struct SpinServer {
    pub child: std::process::Child,
    pub socket: PathBuf,
    /// Where the socket is, and where the test keeps its files.
    pub dir: PathBuf,
}

impl SpinServer {
    pub fn start(dir: PathBuf) -> SpinServer {
        let socket = dir.join("api.sock");
        let child = Command::new(zygote_bin())
            .args(["run", "--guest", "spin", "--api-sock"])
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning zygote run");
        wait_for_api_socket(&socket);
        SpinServer { child, socket, dir }
    }
}

impl Drop for SpinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a `zygote run --api-sock` serves `socket` (panics after 20 s).
pub fn wait_for_api_socket(socket: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(std::time::Instant::now() < deadline, "the API socket {} never came up", socket.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
