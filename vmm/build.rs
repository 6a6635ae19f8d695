//! Assembles the tiny test guests in `resources/guests/*.s` into flat binaries in OUT_DIR with
//! the system `as`, `ld` and `objcopy` (binutils). The layout constants come from
//! `src/layout.rs`, so guests and VMM share one source of truth.

use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "src/layout.rs"]
mod layout;

/// (guest, address it is linked at).
const GUESTS: &[(&str, u64)] = &[
    ("traps", layout::TRAPS_ADDR),
    ("hello", layout::GUEST_CODE_ADDR),
    ("fault", layout::GUEST_CODE_ADDR),
    ("exitcode", layout::GUEST_CODE_ADDR),
    ("spin", layout::GUEST_CODE_ADDR),
    ("dma", layout::GUEST_CODE_ADDR),
    ("sequence", layout::GUEST_CODE_ADDR),
    ("dirty16", layout::GUEST_CODE_ADDR),
    ("mailbox", layout::GUEST_CODE_ADDR),
    ("net", layout::GUEST_CODE_ADDR),
    ("rng", layout::GUEST_CODE_ADDR),
];

fn symbols() -> Vec<(&'static str, u64)> {
    vec![
        ("TRAP_STUB_SIZE", layout::TRAP_STUB_SIZE),
        ("COUNTERS_ADDR", layout::COUNTERS_ADDR),
        ("PATTERN_ADDR", layout::PATTERN_ADDR),
        ("PATTERN_SIZE", layout::PATTERN_SIZE),
        ("VM_ID_ADDR", layout::VM_ID_ADDR),
        ("DIRTY_ADDR", layout::DIRTY_ADDR),
        ("DIRTY_PAGES", layout::DIRTY_PAGES),
        ("TOUCH_ADDR", layout::TOUCH_ADDR),
        ("UNMAPPED_ADDR", layout::UNMAPPED_ADDR),
        ("SERIAL_PORT", u64::from(layout::SERIAL_PORT)),
        ("EXIT_PORT", u64::from(layout::EXIT_PORT)),
        ("PARK_PORT", u64::from(layout::PARK_PORT)),
        ("TRAP_PORT", u64::from(layout::TRAP_PORT)),
        ("VIRTIO_BLK_MMIO_ADDR", layout::VIRTIO_BLK_MMIO_ADDR),
        ("DMA_ENGINE_MMIO_ADDR", layout::DMA_ENGINE_MMIO_ADDR),
        ("DMA_GUEST_QUEUE_SIZE", layout::DMA_GUEST_QUEUE_SIZE),
        ("DMA_GUEST_DESC_ADDR", layout::DMA_GUEST_DESC_ADDR),
        ("DMA_GUEST_AVAIL_ADDR", layout::DMA_GUEST_AVAIL_ADDR),
        ("DMA_GUEST_USED_ADDR", layout::DMA_GUEST_USED_ADDR),
        ("DMA_GUEST_REQ_ADDR", layout::DMA_GUEST_REQ_ADDR),
        ("DMA_GUEST_RESULTS_ADDR", layout::DMA_GUEST_RESULTS_ADDR),
        ("DMA_GUEST_DMA_BUF", layout::DMA_GUEST_DMA_BUF),
        ("DMA_GUEST_DMA_LEN", layout::DMA_GUEST_DMA_LEN),
        ("DMA_GUEST_DMA_CHUNK", layout::DMA_GUEST_DMA_CHUNK),
        ("DMA_GUEST_DMA_PACING_US", layout::DMA_GUEST_DMA_PACING_US),
        ("DMA_GUEST_PATTERN", layout::DMA_GUEST_PATTERN),
        ("DMA_GUEST_BLK_BUF", layout::DMA_GUEST_BLK_BUF),
        ("DMA_GUEST_BLK_LEN", layout::DMA_GUEST_BLK_LEN),
        ("DMA_GUEST_WRITE_ID", layout::DMA_GUEST_WRITE_ID),
        ("DMA_GUEST_WRITE_REQ_ADDR", layout::DMA_GUEST_WRITE_REQ_ADDR),
        ("MAILBOX_ADDR", layout::MAILBOX_ADDR),
        ("NET_GUEST_QUEUE_SIZE", layout::NET_GUEST_QUEUE_SIZE),
        ("NET_GUEST_RX_QUEUE", layout::NET_GUEST_RX_QUEUE),
        ("NET_GUEST_TX_QUEUE", layout::NET_GUEST_TX_QUEUE),
        ("NET_GUEST_TX_BUF", layout::NET_GUEST_TX_BUF),
        ("NET_GUEST_RX_BUFS", layout::NET_GUEST_RX_BUFS),
        ("NET_GUEST_RX_BUF_LEN", layout::NET_GUEST_RX_BUF_LEN),
        ("RNG_GUEST_QUEUE_SIZE", layout::RNG_GUEST_QUEUE_SIZE),
        ("RNG_GUEST_QUEUE", layout::RNG_GUEST_QUEUE),
        ("RNG_GUEST_BUFS", layout::RNG_GUEST_BUFS),
        ("RNG_GUEST_BUF_LEN", layout::RNG_GUEST_BUF_LEN),
        ("MMIO_DEVICES_END", layout::MMIO_DEVICES_END),
    ]
}

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (the guests need binutils: apt-get install binutils)"));
    assert!(status.success(), "{shown} failed with {status}");
}

fn assemble(src_dir: &Path, out_dir: &Path, name: &str, addr: u64) {
    let src = src_dir.join(format!("{name}.s"));
    println!("cargo:rerun-if-changed={}", src.display());
    let obj = out_dir.join(format!("{name}.o"));
    let elf = out_dir.join(format!("{name}.elf"));
    let bin = out_dir.join(format!("{name}.bin"));
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--64").arg("-I").arg(src.parent().expect("guest sources live in a folder"));
    for (sym, value) in symbols() {
        as_cmd.arg(format!("--defsym={sym}={value:#x}"));
    }
    run(as_cmd.arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-static", "-nostdlib", "-e", "_start"])
        .arg(format!("-Ttext={addr:#x}"))
        .arg("-o")
        .arg(&elf)
        .arg(&obj));
    run(Command::new("objcopy").args(["-O", "binary", "-j", ".text"]).arg(&elf).arg(&bin));
    let len = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    assert!(len > 0 && len <= layout::GUEST_CODE_MAX, "{name}.bin has {len} bytes");
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src_dir = manifest.join("../resources/guests");
    println!("cargo:rerun-if-changed=src/layout.rs");
    // The include files every guest may pull in (`.include "common.inc"`, ...).
    let includes = std::fs::read_dir(&src_dir).expect("resources/guests is readable");
    for entry in includes.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "inc")) {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    for &(name, addr) in GUESTS {
        assemble(&src_dir, &out_dir, name, addr);
    }
}
