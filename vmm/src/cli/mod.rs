//! Command-line parsing and the mapping from outcomes to exit codes.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod bench;
mod ctl;

use bench::{bench, BenchCommand};
use ctl::{ctl, CtlArgs};
use vmm::builder::{DEFAULT_MEM_MIB, MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
use vmm::api::Controller;
use vmm::snapshot::file::{load_snapshot, SnapshotOnDisk};
use vmm::vstate::ClockOnRestore;
use vmm::{boot_linux, build_linux_vm, run_tiny_guest, ConfigError, Console, LinuxConfig, VmConfig, VmOutcome, Vmm};

/// Exit code for bad input (bad flags, values, files).
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code when the guest faulted or the host failed.
pub const EXIT_FAILURE: i32 = 1;

#[derive(Debug, Parser)]
#[command(name = "zygote", version, about = "A minimal KVM VMM whose VMs clone like fork()")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a bundled tiny guest or a Linux kernel; exit with the guest's code.
    Run(RunArgs),
    /// Clone a VM mid-DMA several times and check every VM ends with the full data.
    Demo(DemoArgs),
    /// Fuzz clone-vs-DMA timing; exit 1 if a rule was broken.
    Fuzz(FuzzArgs),
    /// Send one request to a running `zygote run --api-sock` and print the JSON answer.
    Ctl(CtlArgs),
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



#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").args(["guest", "kernel", "restore"])))]
struct RunArgs {
    /// Bundled guest (see the README: hello, spin, sequence, dma, ...).
    #[arg(long, value_name = "NAME")]
    guest: Option<String>,
    /// Argument for the tiny guest (RDX; `exitcode` exits with its low byte).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "guest")]
    arg: u64,
    /// Linux kernel (ELF vmlinux or bzImage).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "S", requires = "kernel")]
    cmdline: Option<String>,
    /// Start from a snapshot's state file (written by `PUT /snapshot/create`) instead: RAM,
    /// vCPUs, devices and disk come from it, and `PUT /reset` of VM 0 goes back to it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["mem", "vcpus", "disk"])]
    restore: Option<PathBuf>,
    /// With --restore: move the guest's clock forward by the host real time passed since the
    /// snapshot (KVM_CLOCK_REALTIME), so its CLOCK_REALTIME is the host's again; its monotonic
    /// clock moves forward as much. Without it the guest resumes its clock where it stopped.
    #[arg(long, requires = "restore")]
    clock_realtime: bool,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = DEFAULT_MEM_MIB,
          value_parser = clap::value_parser!(u64).range(MIN_MEM_MIB..=MAX_MEM_MIB))]
    mem: u64,
    /// Disk image for virtio-blk (read-write until the VM's first clone freezes it).
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS)))]
    vcpus: u32,
    /// Serve the control API (HTTP/JSON) on this Unix socket; VM output lines get a [vmN] prefix.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
}

/// Clap's message on one line: the error and its hints, without the usage block.
fn one_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let lines: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.starts_with("For more information"))
        .collect();
    let mut msg = lines.into_iter().filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    if let Some(rest) = msg.strip_prefix("error: ") {
        msg = rest.to_string();
    }
    format!("zygote: {msg} (see zygote --help)")
}

/// Prints `err` and its causes on one line.
fn report(err: &dyn std::error::Error) -> String {
    let mut msg = format!("zygote: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    msg
}

fn finish(outcome: VmOutcome) -> i32 {
    match &outcome {
        VmOutcome::Failed(err) => eprintln!("{}", report(err)),
        VmOutcome::AllParked => eprintln!("zygote: every vCPU parked itself without an exit code"),
        _ => {}
    }
    i32::from(outcome.exit_code())
}

fn run(args: RunArgs) -> i32 {
    let vm = VmConfig { mem_mib: args.mem, vcpus: args.vcpus, vm_id: 0, console: Console::Stdout, disk: args.disk, irqchip: false };
    let clock = match args.clock_realtime {
        true => ClockOnRestore::AdvanceToHostRealtime,
        false => ClockOnRestore::Resume,
    };
    let root = match (args.guest, args.kernel, args.restore) {
        (_, Some(kernel), _) => Some(Root::Linux(LinuxConfig { vm, kernel, initrd: args.initrd, cmdline: args.cmdline })),
        (_, None, Some(path)) => Some(Root::Restore(path, clock)),
        (Some(name), None, None) => Some(Root::Tiny { vm, name, arg: args.arg }),
        (None, None, None) => None,
    };
    match (root, args.api_sock) {
        (root, Some(socket)) => serve(root, &socket),
        (Some(root), None) => root.run(),
        (None, None) => {
            eprintln!(
                "zygote: one of --guest, --kernel or --restore is required (or --api-sock alone, to configure VM 0 over the API) (see zygote --help)"
            );
            EXIT_BAD_INPUT
        }
    }
}

/// What `zygote run` starts as VM 0.
enum Root {
    Tiny { vm: VmConfig, name: String, arg: u64 },
    Linux(LinuxConfig),
    /// A snapshot's state file, and what the restored guest's clock does.
    Restore(PathBuf, ClockOnRestore),
}

/// VM 0 built from the snapshot at `path`, and the loaded snapshot; on failure, the exit code
/// after saying why (whatever is wrong comes from the file: bad input).
fn restore(path: &std::path::Path, console: &Console, clock: ClockOnRestore) -> Result<(Vmm, SnapshotOnDisk), i32> {
    let loaded = load_snapshot(path).map_err(|e| fail(&e, true))?;
    let vmm = loaded.snapshot.restore(0, console).map_err(|e| fail(&e, true))?;
    if clock == ClockOnRestore::AdvanceToHostRealtime {
        vmm::vstate::clock::advance_to_host_realtime(&vmm, &loaded.snapshot.state.clock).map_err(|e| fail(&e, true))?;
    }
    Ok((vmm, loaded))
}

impl Root {
    /// Runs VM 0 until its guest ends it; returns the process exit code.
    fn run(self) -> i32 {
        let outcome = match self {
            Root::Linux(config) => boot_linux(&config).map_err(|e| fail(&e, e.is_bad_input())),
            Root::Tiny { vm, name, arg } => run_tiny_guest(&vm, &name, arg).map_err(|e| fail(&e, e.is_bad_input())),
            Root::Restore(path, clock) => restore(&path, &Console::Stdout, clock).map(|(vmm, _)| vmm.run()),
        };
        outcome.map_or_else(|code| code, finish)
    }

    /// The API's VMs with VM 0 built and started, its console lines prefixed `[vm0] `; on
    /// failure, the exit code after saying why.
    fn build(self) -> Result<Controller, i32> {
        let prefixed = |vm: VmConfig| VmConfig { console: Console::Prefixed(format!("[vm{}] ", vm.vm_id)), ..vm };
        match self {
            Root::Tiny { vm, name, arg } => {
                let guest = vmm::guests::find(&name)
                    .ok_or_else(|| fail(&ConfigError::UnknownGuest { name, known: vmm::guests::names() }, true))?;
                let mut root = vmm::build_tiny_vm(&prefixed(vm), guest, arg).map_err(|e| fail(&e, e.is_bad_input()))?;
                root.start();
                Ok(Controller::new(root, Some(memory::GuestAddress(vmm::layout::VM_ID_ADDR))))
            }
            Root::Linux(config) => {
                let config = LinuxConfig { vm: prefixed(config.vm), ..config };
                let mut root = build_linux_vm(&config).map_err(|e| fail(&e, e.is_bad_input()))?;
                root.start();
                Ok(Controller::new(root, None))
            }
            Root::Restore(path, clock) => {
                let (mut root, loaded) = restore(&path, &Console::Prefixed("[vm0] ".into()), clock)?;
                root.start();
                Ok(Controller::restored(root, loaded))
            }
        }
    }
}

/// Prints a failure to start and picks its exit code.
fn fail(err: &dyn std::error::Error, bad_input: bool) -> i32 {
    eprintln!("{}", report(err));
    if bad_input {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILURE
    }
}

/// Runs `root` as VM 0 (none: VM 0 comes over the API) and serves the control API on `socket`
/// until a Shutdown request or until the guest ends VM 0.
fn serve(root: Option<Root>, socket: &std::path::Path) -> i32 {
    let server = match vmm::api::server::ApiServer::bind(socket) {
        Ok(server) => server,
        Err(e) => return fail(&e, true),
    };
    let mut controller = match root.map_or_else(|| Ok(Controller::empty()), Root::build) {
        Ok(controller) => controller,
        Err(code) => {
            let _ = std::fs::remove_file(socket);
            return code;
        }
    };
    let code = server.serve(&mut controller);
    drop(controller);
    let _ = std::fs::remove_file(socket);
    i32::from(code)
}

/// Parses `args` and runs; returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version: not errors.
            print!("{}", e.render());
            return 0;
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            return EXIT_BAD_INPUT;
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Bench(command) => bench(command),
        Command::Ctl(args) => ctl(args),
        Command::Demo(args) => match vmm::demo::run_demo(usize::try_from(args.clones).unwrap_or(4)) {
            Ok(report) => match vmm::demo::print(&report, args.json, &mut std::io::stdout()) {
                Ok(true) => 0,
                Ok(false) => EXIT_FAILURE,
                Err(e) => fail(&e, false),
            },
            Err(e) => fail(&e, false),
        },
        Command::Fuzz(args) => vmm::fuzz::command::run(&vmm::fuzz::command::FuzzOptions {
            runs: args.runs,
            seed: args.seed,
            mode: if args.mode == "vm" { vmm::fuzz::command::FuzzMode::Vm } else { vmm::fuzz::command::FuzzMode::Memory },
            jobs: usize::try_from(args.jobs).unwrap_or(1),
            replay: args.replay,
            plant_bug: args.plant_bug,
            out: args.out,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn parse_err(args: &[&str]) -> String {
        let args = std::iter::once("zygote").chain(args.iter().copied()).map(OsString::from);
        one_line(&Cli::try_parse_from(args).unwrap_err())
    }

    #[test]
    fn bad_flags_give_one_line_errors() {
        for args in [
            &["run", "--guest", "hello", "--mem", "0"][..],
            &["run", "--guest", "hello", "--vcpus", "33"],
            &["run", "--guest", "hello", "--bogus"],
            &["run", "--restore", "s.json", "--vcpus", "2"],
            &["run", "--guest", "hello", "--kernel", "x"],
        ] {
            let msg = parse_err(args);
            assert!(!msg.contains('\n') && msg.starts_with("zygote: "), "{args:?}: {msg}");
        }
        assert!(parse_err(&["run", "--guest", "hello", "--mem", "0"]).contains("0 is not in"));
    }
}
