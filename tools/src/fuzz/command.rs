//! `zygote fuzz`: run a campaign or replay a reproducer, print what was found, pick the exit code.

use std::path::PathBuf;

use serde::Serialize;

use super::{campaign, execute, load, save, AnyReproducer, FuzzError, MemoryWorld, Reproducer, VmWorld, World};

/// Which world schedules drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzMode {
    /// `GuestRam` and pin guards directly: fast.
    Memory,
    /// Real KVM VMs with tiny guests, the DMA engine and virtio-blk.
    Vm,
}

#[derive(Clone, Debug)]
pub struct FuzzOptions {
    pub runs: u64,
    pub seed: u64,
    pub mode: FuzzMode,
    pub jobs: usize,
    pub replay: Option<PathBuf>,
    pub plant_bug: Option<String>,
    /// Where a reproducer is written.
    pub out: Option<PathBuf>,
}

/// Exit codes: 0 nothing found, 1 a violation, 2 bad input.
pub fn run(opts: &FuzzOptions) -> i32 {
    if let Err(msg) = plant(opts.plant_bug.as_deref()) {
        eprintln!("zygote: {msg}");
        return 2;
    }
    match (&opts.replay, opts.mode) {
        (Some(path), _) => match load(path) {
            // The file's mode wins over --mode.
            Ok(AnyReproducer::Memory(repro)) => replay::<MemoryWorld>(&repro, opts),
            Ok(AnyReproducer::Vm(repro)) => replay::<VmWorld>(&repro, opts),
            Err(e) => bad(&e),
        },
        (None, FuzzMode::Memory) => fuzz::<MemoryWorld>(opts),
        (None, FuzzMode::Vm) => fuzz::<VmWorld>(opts),
    }
}

fn replay<W: World>(repro: &Reproducer<W::Step>, opts: &FuzzOptions) -> i32 {
    if opts.plant_bug.is_none() {
        if let Err(msg) = plant(repro.planted_bug.as_deref()) {
            eprintln!("zygote: {msg}");
            return 2;
        }
    }
    match execute::<W>(&repro.steps) {
        Err((step, violation)) => {
            println!("reproduced at step {step} ({:?}): {}", repro.steps[step], violation.0);
            1
        }
        Ok(()) => {
            println!("{} steps replayed, no violation", repro.steps.len());
            0
        }
    }
}

fn fuzz<W: World>(opts: &FuzzOptions) -> i32 {
    let report = campaign::<W>(opts.seed, opts.runs, opts.jobs, opts.plant_bug.as_deref());
    let secs = report.elapsed.as_secs_f64();
    println!(
        "{} mode: {} runs, {} steps in {:.1} s ({:.1} runs/s), seed {}, {} violation(s)",
        W::MODE,
        report.runs,
        report.steps,
        secs,
        report.runs as f64 / secs.max(1e-9),
        opts.seed,
        u8::from(report.found.is_some())
    );
    let Some(repro) = report.found else { return 0 };
    print_reproducer(&repro);
    let path = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("zygote-fuzz-seed{}-run{}.json", repro.seed, repro.run)));
    match save(&repro, &path) {
        Ok(()) => {
            println!("reproducer written to {} (replay: zygote fuzz --replay {})", path.display(), path.display())
        }
        Err(e) => eprintln!("zygote: {e}"),
    }
    1
}

fn print_reproducer<S: Serialize>(repro: &Reproducer<S>) {
    println!("VIOLATION (seed {}, run {}): {}", repro.seed, repro.run, repro.violation);
    println!("minimal schedule ({} steps):", repro.steps.len());
    for (i, step) in repro.steps.iter().enumerate() {
        println!("  {i:3}: {}", serde_json::to_string(step).unwrap_or_default());
    }
}

fn bad(e: &FuzzError) -> i32 {
    let mut msg = format!("zygote: {e}");
    if let Some(source) = std::error::Error::source(e) {
        msg.push_str(&format!(": {source}"));
    }
    eprintln!("{msg}");
    2
}

#[cfg(feature = "planted-bugs")]
fn plant(name: Option<&str>) -> Result<(), String> {
    use memory::planted::PlantedBug;
    let bug = match name {
        None => None,
        Some(n) => Some(PlantedBug::from_name(n).ok_or_else(|| {
            let known: Vec<_> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
            format!("unknown planted bug {n:?}: known are {}", known.join(", "))
        })?),
    };
    memory::planted::plant(bug);
    Ok(())
}

#[cfg(not(feature = "planted-bugs"))]
fn plant(name: Option<&str>) -> Result<(), String> {
    match name {
        None => Ok(()),
        Some(n) => Err(format!(
            "cannot plant {n:?}: this build lacks the planted-bugs feature (cargo build --features planted-bugs)"
        )),
    }
}
