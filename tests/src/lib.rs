//! Shared fixtures for the integration tests in `tests/`: building tiny-guest VMs with a
//! captured console, reading guest RAM, and finding and running the real `zygote` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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
        cargo.args(["build", "-j1", "--quiet", "-p", "zygote-vmm", "--bin", "zygote", "--target-dir"]).arg(target);
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
