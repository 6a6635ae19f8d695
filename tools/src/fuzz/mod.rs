//! The clone-vs-DMA timing fuzzer: draw schedules from a seed, execute them, check the rules
//! after every step, shrink a violating schedule to a minimal reproducer and save it.
//!
//! One driver (campaign, shrinking, reproducers) serves every mode: a mode is a [`World`] that
//! executes its own kind of step and checks the rules after each.

pub mod command;
pub mod memory_mode;
pub mod schedule;
pub mod vm_mode;

use std::fmt::Debug;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use memory_mode::MemoryWorld;
pub use schedule::Step;
pub use vm_mode::{VmStep, VmWorld};

/// A broken rule, with what was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

/// Fails the step with a `Violation` saying what went wrong unless `$cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Violation(format!($($msg)+)));
        }
    };
}
pub(crate) use ensure;

/// The live item (VM or snapshot) a step's small index `i` names: the `i`-th of them, modulo
/// their number; None when none is live.
pub(crate) fn pick<T>(items: &[Option<T>], i: u8) -> Option<usize> {
    let live: Vec<usize> = (0..items.len()).filter(|&j| items[j].is_some()).collect();
    (!live.is_empty()).then(|| live[usize::from(i) % live.len()])
}

/// What a fuzz mode drives: a fresh world per run, one step at a time, every rule checked
/// after each step.
pub trait World: Sized {
    type Step: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync;
    /// The mode's name, as `--mode` and reproducer files spell it.
    const MODE: &'static str;
    fn new() -> Result<Self, Violation>;
    /// Executes one step, then checks every invariant.
    fn apply(&mut self, step: &Self::Step) -> Result<(), Violation>;
    /// The schedule of run `run` of a campaign seeded with `seed`.
    fn schedule(seed: u64, run: u64) -> Vec<Self::Step>;
}

impl World for MemoryWorld {
    type Step = Step;
    const MODE: &'static str = "memory";

    fn new() -> Result<Self, Violation> {
        MemoryWorld::new()
    }

    fn apply(&mut self, step: &Step) -> Result<(), Violation> {
        MemoryWorld::apply(self, step)
    }

    fn schedule(seed: u64, run: u64) -> Vec<Step> {
        schedule::generate(seed, run, memory_mode::PAGES)
    }
}

/// Errors of the fuzz command itself (not findings).
#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    #[error("cannot read replay file {path}")]
    ReadReplay {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replay file {path} is not a schedule: {reason}")]
    BadReplay { path: PathBuf, reason: String },
    #[error("cannot write reproducer {path}")]
    WriteReplay {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A violating schedule, as saved for `--replay`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reproducer<S = Step> {
    pub format: u32,
    pub mode: String,
    pub seed: u64,
    pub run: u64,
    pub planted_bug: Option<String>,
    pub violation: String,
    pub steps: Vec<S>,
}

/// A reproducer file of either mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyReproducer {
    Memory(Reproducer<Step>),
    Vm(Reproducer<VmStep>),
}

/// Runs `steps` in a fresh world; the first violation and the index of its step.
pub fn execute<W: World>(steps: &[W::Step]) -> Result<(), (usize, Violation)> {
    let mut world = W::new().map_err(|v| (0, v))?;
    for (i, step) in steps.iter().enumerate() {
        world.apply(step).map_err(|v| (i, v))?;
    }
    Ok(())
}

/// Shrinks a violating schedule: drops ever smaller blocks of steps (ddmin-style) while some
/// violation remains, then the tail after the violating step.
pub fn shrink<W: World>(steps: &[W::Step]) -> Vec<W::Step> {
    let mut best = steps.to_vec();
    if let Err((i, _)) = execute::<W>(&best) {
        best.truncate(i + 1);
    }
    let mut block = best.len() / 2;
    while block >= 1 {
        let mut start = 0;
        while start < best.len() {
            let mut candidate = best.clone();
            candidate.drain(start..(start + block).min(candidate.len()));
            match execute::<W>(&candidate) {
                Err((i, _)) => {
                    candidate.truncate(i + 1);
                    best = candidate;
                }
                Ok(()) => start += block,
            }
        }
        block /= 2;
    }
    best
}

/// What a campaign found.
#[derive(Debug)]
pub struct CampaignReport<S = Step> {
    pub runs: u64,
    pub steps: u64,
    pub elapsed: Duration,
    pub found: Option<Reproducer<S>>,
}

/// Runs `runs` schedules from `seed` on `jobs` threads; stops at the first violation.
pub fn campaign<W: World>(seed: u64, runs: u64, jobs: usize, planted: Option<&str>) -> CampaignReport<W::Step> {
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let steps = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let found = std::sync::Mutex::new(None::<(u64, Vec<W::Step>, Violation)>);
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let run = next.fetch_add(1, Ordering::Relaxed);
                    if run >= runs {
                        break;
                    }
                    let schedule = W::schedule(seed, run);
                    let result = execute::<W>(&schedule);
                    steps.fetch_add(schedule.len() as u64, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                    if let Err((_, violation)) = result {
                        stop.store(true, Ordering::Relaxed);
                        let mut slot = found.lock().unwrap_or_else(|e| e.into_inner());
                        if slot.as_ref().is_none_or(|(r, _, _)| run < *r) {
                            *slot = Some((run, schedule, violation));
                        }
                    }
                }
            });
        }
        if tty {
            while done.load(Ordering::Relaxed) < runs && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let n = done.load(Ordering::Relaxed);
                let rate = n as f64 / start.elapsed().as_secs_f64();
                eprint!("\r{n} runs, {rate:.1} runs/s, {} steps, 0 violations ", steps.load(Ordering::Relaxed));
                let _ = std::io::stderr().flush();
            }
            eprintln!();
        }
    });
    let elapsed = start.elapsed();
    let found = found.into_inner().unwrap_or_else(|e| e.into_inner()).map(|(run, schedule, _)| {
        let steps = shrink::<W>(&schedule);
        let violation =
            execute::<W>(&steps).err().map_or_else(|| "not reproduced after shrinking".into(), |(_, v)| v.0);
        Reproducer {
            format: 1,
            mode: W::MODE.into(),
            seed,
            run,
            planted_bug: planted.map(str::to_owned),
            violation,
            steps,
        }
    });
    CampaignReport { runs: done.into_inner(), steps: steps.into_inner(), elapsed, found }
}

pub fn save<S: Serialize>(repro: &Reproducer<S>, path: &Path) -> Result<(), FuzzError> {
    let json = serde_json::to_string_pretty(repro).expect("a reproducer always serialises");
    std::fs::write(path, json + "\n").map_err(|source| FuzzError::WriteReplay { path: path.into(), source })
}

/// Reads a reproducer file of either mode (its `mode` field says which).
pub fn load(path: &Path) -> Result<AnyReproducer, FuzzError> {
    let text = std::fs::read_to_string(path).map_err(|source| FuzzError::ReadReplay { path: path.into(), source })?;
    let bad = |reason: String| FuzzError::BadReplay { path: path.into(), reason };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    match value.get("mode").and_then(serde_json::Value::as_str) {
        Some(MemoryWorld::MODE) => {
            serde_json::from_value(value).map(AnyReproducer::Memory).map_err(|e| bad(e.to_string()))
        }
        Some(VmWorld::MODE) => serde_json::from_value(value).map(AnyReproducer::Vm).map_err(|e| bad(e.to_string())),
        Some(other) => Err(bad(format!("unknown mode {other:?}"))),
        None => Err(bad("no \"mode\" field".into())),
    }
}

/// Planted bugs are process-wide (`--features planted-bugs`): tests that plant one, and the
/// fuzzer's tests that expect a clean memory layer, take turns.
#[cfg(test)]
pub(crate) fn one_planting_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static PLANTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    PLANTING.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_memory_layer_survives_a_short_campaign() {
        let _clean = one_planting_at_a_time();
        let report = campaign::<MemoryWorld>(1, 300, 1, None);
        assert!(report.found.is_none(), "{:?}", report.found);
        assert_eq!(report.runs, 300);
    }

    #[test]
    fn reproducers_round_trip_through_their_file() {
        let repro = Reproducer {
            format: 1,
            mode: "memory".into(),
            seed: 9,
            run: 3,
            planted_bug: Some("lost-dirty".into()),
            violation: "x".into(),
            steps: schedule::generate(9, 3, memory_mode::PAGES),
        };
        let path = std::env::temp_dir().join(format!("zygote-repro-{}.json", std::process::id()));
        save(&repro, &path).unwrap();
        assert_eq!(load(&path).unwrap(), AnyReproducer::Memory(repro));
        std::fs::write(&path, r#"{"mode":"disk","steps":[]}"#).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("not a schedule"));
        std::fs::remove_file(path).unwrap();
    }
}

#[cfg(all(test, feature = "planted-bugs"))]
mod planted_tests {
    use super::*;
    use memory::planted::{plant, PlantedBug};

    /// Plants each bug in turn and runs a campaign of `runs` in mode `W`: the bug must be found,
    /// its shrunk schedule must fail with the bug and pass without it.
    fn finds_every_planted_bug<W: World>(runs: u64) {
        let _one_at_a_time = one_planting_at_a_time();
        for bug in PlantedBug::ALL {
            plant(Some(bug));
            let report = campaign::<W>(1, runs, 1, Some(bug.name()));
            let repro = report.found.unwrap_or_else(|| panic!("{} not found in {runs} {} runs", bug.name(), W::MODE));
            assert_eq!(repro.mode, W::MODE);
            assert!(execute::<W>(&repro.steps).is_err(), "{}: the shrunk schedule does not reproduce", bug.name());
            eprintln!(
                "{}: found after {} {} runs, {} steps: {}",
                bug.name(),
                report.runs,
                W::MODE,
                repro.steps.len(),
                repro.violation
            );
            plant(None);
            assert!(execute::<W>(&repro.steps).is_ok(), "{}: the schedule fails without the bug", bug.name());
        }
    }

    /// The fuzzer earns its keep only if it finds each bug class it exists for.
    #[test]
    fn every_planted_bug_is_found_and_its_reproducer_replays() {
        finds_every_planted_bug::<MemoryWorld>(10_000);
    }

    /// On real VMs, within the 200 runs of the acceptance campaign: every planted bug is
    /// reached through the DMA engine's writes (shared-pin, wrong-way-cow) and the dirty
    /// tracking they feed (lost-dirty).
    #[test]
    fn vm_mode_finds_every_planted_bug_and_its_reproducer_replays() {
        finds_every_planted_bug::<VmWorld>(200);
    }
}
