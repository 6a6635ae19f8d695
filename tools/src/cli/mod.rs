//! The `zygote` command line: the VMM's `run` and `ctl` (`vmm::cli`) and the tools beside them.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vmm::cli::{fail, EXIT_FAILURE};

mod bench;

use bench::{bench, BenchCommand};

#[derive(Debug, Parser)]
#[command(name = "zygote", version, about = "A minimal KVM VMM whose VMs clone like fork()")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Vmm(vmm::cli::Command),
    /// Clone a VM mid-DMA several times and check every VM ends with the full data.
    Demo(DemoArgs),
    /// Fuzz clone-vs-DMA timing; exit 1 if a rule was broken.
    Fuzz(FuzzArgs),
    /// Measure reset and clone costs on this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// How many clones to take during the transfer.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=16))]
    clones: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FuzzArgs {
    /// Schedules to run.
    #[arg(long, default_value_t = 10_000)]
    runs: u64,
    /// Campaign seed: the same seed draws the same schedules.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// What schedules drive: `memory` (GuestRam and guards) or `vm` (real KVM VMs).
    #[arg(long, value_parser = ["memory", "vm"], default_value = "memory")]
    mode: String,
    /// Threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
    /// Replay a reproducer file instead of fuzzing.
    #[arg(long, value_name = "FILE")]
    replay: Option<PathBuf>,
    /// Make the memory layer misbehave on purpose (builds with --features planted-bugs):
    /// wrong-way-cow, lost-dirty, shared-pin.
    #[arg(long, value_name = "NAME")]
    plant_bug: Option<String>,
    /// Where to write a reproducer (default zygote-fuzz-seedS-runN.json).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Parses `args` and runs; returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let mut args: Vec<OsString> = args.into_iter().collect();
    // Firecracker's command line (`firecracker --api-sock PATH [--id ID] [--config-file F]`),
    // as tools that launch Firecracker give it: flags with no subcommand mean `run`.
    let flag = args.get(1).and_then(|a| a.to_str()).filter(|a| a.starts_with("--"));
    if flag.is_some_and(|a| !matches!(a, "--help" | "--version")) {
        args.insert(1, OsString::from("run"));
    }
    let cli: Cli = match vmm::cli::parse(args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Vmm(command) => vmm::cli::execute(command),
        Command::Bench(command) => bench(command),
        Command::Demo(args) => match tools::demo::run_demo(usize::try_from(args.clones).unwrap_or(4)) {
            Ok(report) => match tools::demo::print(&report, args.json, &mut std::io::stdout()) {
                Ok(true) => 0,
                Ok(false) => EXIT_FAILURE,
                Err(e) => fail(&e, false),
            },
            Err(e) => fail(&e, false),
        },
        Command::Fuzz(args) => tools::fuzz::command::run(&tools::fuzz::command::FuzzOptions {
            runs: args.runs,
            seed: args.seed,
            mode: if args.mode == "vm" {
                tools::fuzz::command::FuzzMode::Vm
            } else {
                tools::fuzz::command::FuzzMode::Memory
            },
            jobs: usize::try_from(args.jobs).unwrap_or(1),
            replay: args.replay,
            plant_bug: args.plant_bug,
            out: args.out,
        }),
    }
}
