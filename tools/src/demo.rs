//! `zygote demo`: the bundled `dma` guest starts a long DMA transfer and a virtio-blk read, the
//! VM is cloned at spread-out instants mid-transfer, and every VM must end with exactly the
//! full data: the source because the pinned buffer stayed its own, each clone because it got
//! the clone-instant bytes eagerly and re-ran what was in flight.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use devices::dma::DmaEngine;

use vmm::builder::{build_tiny_vm, BuildError, VmConfig};
use vmm::clone::{clone_vm, CloneError};
use vmm::device_manager::Console;
use vmm::guests;
use vmm::layout::{DMA_GUEST_BLK_LEN, DMA_GUEST_DMA_LEN, DMA_GUEST_PATTERN};
use vmm::machine::VmOutcome;

/// Microseconds between DMA chunks: 256 chunks of 4 KiB take about 0.8 s.
const PACING_US: u64 = 3000;
const DISK_BYTES: usize = 256 << 10;

/// One clone's line of the demo table.
#[derive(Clone, Debug, Serialize)]
pub struct DemoClone {
    pub vm_id: u64,
    /// When the clone was taken, after the source started.
    pub at_ms: u64,
    pub pause_us: u64,
    pub eager_copied_pages: u64,
    pub shared_pages: u64,
    pub reexecuted_requests: u64,
    /// The clone ended with exit 0 and exactly the full DMA and disk data.
    pub verified: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub clones: Vec<DemoClone>,
    /// The source received the complete DMA transfer (and the disk read).
    pub source_dma_complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write the demo disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the demo VM")]
    Build(#[from] BuildError),
    #[error("cloning the demo VM failed")]
    Clone(#[from] CloneError),
}

/// FNV-1a 64, as the `dma` guest computes its checksums.
fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn disk_byte(offset: usize) -> u8 {
    (offset / 512 * 7 + offset % 241) as u8
}

/// The two lines every VM must print: checksums of the full pattern and of the disk's bytes.
fn expected_output() -> String {
    let pattern = DMA_GUEST_PATTERN.to_le_bytes();
    let dma = fnv1a64((0..DMA_GUEST_DMA_LEN as usize).map(|i| pattern[i % 8]));
    let blk = fnv1a64((0..DMA_GUEST_BLK_LEN as usize).map(disk_byte));
    format!("DMA done {dma:016x}\nBLK done {blk:016x}\n")
}

fn text(out: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

fn verified(outcome: &VmOutcome, out: &Mutex<Vec<u8>>, want: &str) -> bool {
    outcome.exit_code() == 0 && text(out) == want
}

fn lock(engine: &Arc<Mutex<DmaEngine>>) -> MutexGuard<'_, DmaEngine> {
    engine.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the demo with `clones` clones.
pub fn run_demo(clones: usize) -> Result<DemoReport, DemoError> {
    let path = std::env::temp_dir().join(format!("zygote-demo-{}.img", std::process::id()));
    let disk: Vec<u8> = (0..DISK_BYTES).map(disk_byte).collect();
    std::fs::write(&path, &disk).map_err(|source| DemoError::Disk { path: path.clone(), source })?;
    let result = demo_with_disk(clones, &path);
    let _ = std::fs::remove_file(&path);
    result
}

fn demo_with_disk(clones: usize, disk: &std::path::Path) -> Result<DemoReport, DemoError> {
    let (console, source_out) = Console::capture();
    let config = VmConfig { mem_mib: 32, console, disk: Some(disk.to_path_buf()), ..VmConfig::default() };
    let guest = guests::find("dma").expect("the dma guest is bundled");
    let mut source = build_tiny_vm(&config, guest, PACING_US)?;
    let dma = Arc::clone(source.devices().dma().expect("tiny VMs have a DMA engine"));
    // The demo holds the transfer and moves it chunk by chunk itself, so every clone lands
    // mid-transfer however loaded the host is (a paced transfer could end before a slow clone).
    lock(&dma).set_host_stepped(true);
    let start = Instant::now();
    source.start();
    // The guest programs the transfer first thing; waiting for it is a hang guard only.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lock(&dma).busy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut running = Vec::new();
    for k in 0..clones {
        // Spread the clones over the transfer: at 1/(K+1), 2/(K+1), ... of its bytes.
        let at = DMA_GUEST_DMA_LEN * (k as u64 + 1) / (clones as u64 + 1);
        {
            let mut engine = lock(&dma);
            while engine.progress() < at && engine.step() {}
        }
        let (console, out) = Console::capture();
        let id = k as u64 + 1;
        let (clone, report) = clone_vm(&mut source, id, &console, None)?;
        // A clone inherits the engine's state, held stepping included: its re-executed
        // transfer runs paced in the background like any guest's.
        if let Some(engine) = clone.devices().dma() {
            lock(engine).set_host_stepped(false);
        }
        let at_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        running.push((clone, report, out, at_ms));
    }
    lock(&dma).set_host_stepped(false);
    for (clone, ..) in &mut running {
        clone.start();
    }
    let want = expected_output();
    let source_outcome = source.run();
    let source_dma_complete = verified(&source_outcome, &source_out, &want);
    let clones = running
        .into_iter()
        .map(|(clone, report, out, at_ms)| {
            let outcome = clone.run();
            DemoClone {
                vm_id: report.clone_id,
                at_ms,
                pause_us: report.pause_us,
                eager_copied_pages: report.eager_copied_pages,
                shared_pages: report.clone_shared_pages,
                reexecuted_requests: report.reexecuted_requests,
                verified: verified(&outcome, &out, &want),
            }
        })
        .collect();
    Ok(DemoReport { clones, source_dma_complete })
}

/// Prints the report as a table (or one JSON object); true if every VM verified.
pub fn print(report: &DemoReport, json: bool, out: &mut impl Write) -> std::io::Result<bool> {
    let ok = report.source_dma_complete && report.clones.iter().all(|c| c.verified);
    if json {
        writeln!(out, "{}", serde_json::to_string(report).map_err(std::io::Error::other)?)?;
        return Ok(ok);
    }
    writeln!(out, "clone  at ms  pause µs  eager-copied pages  shared pages  re-executed  verified")?;
    for c in &report.clones {
        writeln!(
            out,
            "{:>5}  {:>5}  {:>8}  {:>18}  {:>12}  {:>11}  {}",
            c.vm_id,
            c.at_ms,
            c.pause_us,
            c.eager_copied_pages,
            c.shared_pages,
            c.reexecuted_requests,
            if c.verified { "yes" } else { "NO" }
        )?;
    }
    writeln!(
        out,
        "source received the full DMA ({} KiB) and disk read: {}",
        DMA_GUEST_DMA_LEN >> 10,
        if report.source_dma_complete { "yes" } else { "NO" }
    )?;
    Ok(ok)
}
