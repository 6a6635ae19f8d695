//! Command-line parsing and the mapping from outcomes to exit codes.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod ctl;
mod entropy;
mod net;
mod vsock;

use crate::api::Controller;
use crate::builder::{DEFAULT_MEM_MIB, MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
use crate::device_manager::DeviceOverrides;
use crate::snapshot::file::{load_snapshot_with, LoadOptions, SnapshotOnDisk};
use crate::vstate::ClockOnRestore;
use crate::{boot_linux, build_linux_vm, run_tiny_guest, ConfigError, Console, LinuxConfig, VmConfig, VmOutcome, Vmm};
use ctl::ctl;
pub use ctl::CtlArgs;

/// Exit code for bad input (bad flags, values, files).
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code when the guest faulted or the host failed.
pub const EXIT_FAILURE: i32 = 1;

/// The VMM's own commands; the `zygote` binary (crate zygote-tools) adds its tools beside them.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a bundled tiny guest or a Linux kernel; exit with the guest's code.
    Run(Box<RunArgs>),
    /// Send one request to a running `zygote run --api-sock` and print the JSON answer.
    Ctl(CtlArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").args(["guest", "kernel", "restore", "config_file"])))]
pub struct RunArgs {
    /// Bundled guest (see the README: hello, spin, sequence, dma, ...).
    #[arg(long, value_name = "NAME")]
    guest: Option<String>,
    /// Argument for the tiny guest (RDX; `exitcode` exits with its low byte).
    #[arg(long, value_name = "N", conflicts_with_all = ["kernel", "restore"])]
    arg: Option<u64>,
    /// Linux kernel (ELF vmlinux or bzImage).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["guest", "restore"])]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "S", conflicts_with_all = ["guest", "restore"])]
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
    /// With --restore: the snapshot's single memory file (Firecracker's `mem_file_path`), when
    /// it is not where the state file names it (a memory file beside the state file is found
    /// without this).
    #[arg(long, value_name = "FILE", requires = "restore")]
    mem_file: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value_t = DEFAULT_MEM_MIB,
          value_parser = clap::value_parser!(u64).range(MIN_MEM_MIB..=MAX_MEM_MIB))]
    mem: u64,
    /// Disk image for virtio-blk. Write policy: the guest writes FILE in place until the VM's
    /// first clone or snapshot, which freezes FILE as the shared base; from then on every VM
    /// writes its own overlay and FILE is never written again (so FILE is opened read-write).
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// A virtio-net interface on an existing TAP: `[id=ID,]tap=NAME[,mac=MAC][,netns=PATH]`
    /// (repeatable; ids eth0, eth1, ... by default). With --restore: the TAP the restored
    /// interface of that id is attached to (without one it is attached to nothing).
    #[arg(long, value_name = "SPEC", value_parser = net::parse_net)]
    net: Vec<net::NetFlag>,
    /// A virtio-rng device (host getrandom), unlimited, or `--entropy bytes=N,refill_ms=M[,burst=B]`:
    /// at most N bytes per M milliseconds (Firecracker's bandwidth bucket), plus B bytes once.
    #[arg(long, value_name = "LIMIT", num_args = 0..=1, default_missing_value = "",
          value_parser = entropy::parse_entropy, conflicts_with = "restore")]
    entropy: Option<crate::device_manager::EntropyConfig>,
    /// A virtio-vsock device: `cid=N,uds=PATH` (guest CID 3 or more; the host reaches guest
    /// port P by connecting to PATH and writing `CONNECT P\n`). With --restore: `uds=PATH`
    /// alone, the restored device's own socket (required when the snapshot has a vsock).
    #[arg(long, value_name = "SPEC", value_parser = vsock::parse_vsock)]
    vsock: Option<vsock::VsockFlag>,
    /// Without the VM generation ID device: clones, restored and reset VMs then keep their
    /// source's CRNG state (same "random" bytes); for tests that show what the device fixes.
    #[arg(long, conflicts_with_all = ["guest", "restore"])]
    no_vmgenid: bool,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS)))]
    vcpus: u32,
    /// VM 0 from a Firecracker config file (JSON: boot-source, drives, machine-config, logger,
    /// metrics), started at once; with --api-sock, served as if configured over the API.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["initrd", "cmdline", "disk", "mem", "vcpus", "arg", "net", "entropy", "vsock"])]
    config_file: Option<PathBuf>,
    /// Firecracker's instance id (letters, digits and hyphens, at most 64): `GET /` shows it
    /// as VM 0's `id`.
    #[arg(long, value_name = "ID", requires = "api_sock", value_parser = instance_id)]
    id: Option<String>,
    /// Serve the control API (HTTP/JSON) on this Unix socket; VM output lines get a [vmN] prefix.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Run without the per-thread seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Let a syscall the filters forbid through and have the kernel log it (audit log, dmesg
    /// `type=1326`) instead of killing the process: finds what a filter misses.
    #[arg(long, conflicts_with = "no_seccomp")]
    seccomp_log: bool,
}

/// A Firecracker instance id: 1 to 64 ASCII letters, digits and hyphens.
fn instance_id(id: &str) -> Result<String, String> {
    let valid = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid.then(|| id.to_string()).ok_or_else(|| format!("{id:?} is not 1 to 64 letters, digits and hyphens"))
}

/// Clap's message on one line: the error and its hints, without the usage block.
pub fn one_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.starts_with("For more information"))
        .collect();
    let mut msg = lines.into_iter().filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    if let Some(rest) = msg.strip_prefix("error: ") {
        msg = rest.to_string();
    }
    format!("zygote: {msg} (see zygote --help)")
}

/// Prints `err` and its causes on one line.
pub fn report(err: &dyn std::error::Error) -> String {
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
    if let Err(e) = enable_seccomp(&args) {
        return fail(&e, false);
    }
    // Files are checked before anything is built: a directory, FIFO or device is refused
    // with its flag named (a FIFO would block the open; a directory fails late and vaguely).
    let files = [("--kernel", &args.kernel), ("--initrd", &args.initrd), ("--disk", &args.disk)];
    for (flag, path) in files {
        if let Some(path) = path {
            if let Err(e) = crate::regular_file::require_regular(path, flag) {
                eprintln!("zygote: {e}");
                return EXIT_BAD_INPUT;
            }
        }
    }
    // A fresh VM's device (cid and uds), or a restored one's own socket (uds only).
    let vsock_flag = args.vsock.as_ref();
    let vsock = match args.restore.is_some() {
        true => vsock::override_path(vsock_flag).map(|path| (None, path)),
        false => vsock::config(vsock_flag).map(|config| (config, None)),
    };
    let (vsock, vsock_override) = match vsock {
        Ok(vsock) => vsock,
        Err(message) => {
            eprintln!("zygote: {message}");
            return EXIT_BAD_INPUT;
        }
    };
    let vm = VmConfig {
        mem_mib: args.mem,
        vcpus: args.vcpus,
        vm_id: 0,
        console: Console::Stdout,
        disk: args.disk,
        net: net::configs(&args.net),
        entropy: args.entropy,
        vsock,
        irqchip: false,
        vmgenid: !args.no_vmgenid,
    };
    let clock = match args.clock_realtime {
        true => ClockOnRestore::AdvanceToHostRealtime,
        false => ClockOnRestore::Resume,
    };
    if let Some(path) = args.config_file {
        let root = match crate::api::config_file::load_config_file(&path) {
            Ok(resources) => Root::Configured(Box::new(resources)),
            Err(e) => return fail(&e, true),
        };
        return match args.api_sock {
            Some(socket) => serve(Some(root), &socket, args.id),
            None => root.run(),
        };
    }
    let root = match (args.guest, args.kernel, args.restore) {
        (_, Some(kernel), _) => {
            Some(Root::Linux(LinuxConfig { vm, kernel, initrd: args.initrd, cmdline: args.cmdline }))
        }
        (_, None, Some(path)) => {
            let overrides = DeviceOverrides { net: net::overrides(&args.net), vsock_uds_path: vsock_override };
            Some(Root::Restore(
                path,
                LoadOptions { mem_file: args.mem_file, written_here: Vec::new() },
                clock,
                overrides,
            ))
        }
        (Some(name), None, None) => Some(Root::Tiny { vm, name, arg: args.arg.unwrap_or(0) }),
        (None, None, None) => None,
    };
    match (root, args.api_sock) {
        (root, Some(socket)) => serve(root, &socket, args.id),
        (Some(root), None) => root.run(),
        (None, None) => {
            eprintln!(
                "zygote: one of --guest, --kernel or --restore is required (or --api-sock alone, to configure VM 0 over the API) (see zygote --help)"
            );
            EXIT_BAD_INPUT
        }
    }
}

/// Installs the VMM thread's filter (the other threads install theirs as they start).
fn enable_seccomp(args: &RunArgs) -> Result<(), crate::seccomp::SeccompError> {
    use crate::seccomp::SeccompMode;
    match (args.no_seccomp, args.seccomp_log) {
        (true, _) => Ok(()),
        (false, log) => crate::seccomp::enable(if log { SeccompMode::Log } else { SeccompMode::Kill }),
    }
}

/// What `zygote run` starts as VM 0.
enum Root {
    Tiny {
        vm: VmConfig,
        name: String,
        arg: u64,
    },
    Linux(LinuxConfig),
    /// A snapshot's state file, how to load it, what the restored guest's clock does, and its
    /// own TAPs.
    Restore(PathBuf, LoadOptions, ClockOnRestore, DeviceOverrides),
    /// A Firecracker config file's configuration.
    Configured(Box<crate::api::preboot::VmResources>),
}

/// VM 0 built from the snapshot at `path`, and the loaded snapshot; on failure, the exit code
/// after saying why (whatever is wrong comes from the file: bad input).
fn restore(
    path: &std::path::Path,
    options: &LoadOptions,
    console: &Console,
    clock: ClockOnRestore,
    overrides: DeviceOverrides,
) -> Result<(Vmm, SnapshotOnDisk), i32> {
    let loaded = load_snapshot_with(path, options).map_err(|e| fail(&e, true))?;
    let vmm = loaded.snapshot.restore_with(0, console, overrides).map_err(|e| fail(&e, true))?;
    if clock == ClockOnRestore::AdvanceToHostRealtime {
        crate::vstate::clock::advance_to_host_realtime(&vmm, &loaded.snapshot.state.clock)
            .map_err(|e| fail(&e, true))?;
    }
    Ok((vmm, loaded))
}

impl Root {
    /// Runs VM 0 until its guest ends it; returns the process exit code.
    fn run(self) -> i32 {
        let outcome = match self {
            Root::Linux(config) => boot_linux(&config).map_err(|e| fail(&e, e.is_bad_input())),
            Root::Tiny { vm, name, arg } => run_tiny_guest(&vm, &name, arg).map_err(|e| fail(&e, e.is_bad_input())),
            Root::Restore(path, options, clock, overrides) => {
                restore(&path, &options, &Console::Stdout, clock, overrides).map(|(vmm, _)| vmm.run())
            }
            Root::Configured(resources) => {
                resources.build(Console::Stdout).map(Vmm::run).map_err(|e| fail(&e, e.status() < 500))
            }
        };
        outcome.map_or_else(|code| code, finish)
    }

    /// The API's VMs with VM 0 built and started, its console lines prefixed `[vm0] `; on
    /// failure, the exit code after saying why.
    fn build(self) -> Result<Controller, i32> {
        let prefixed = |vm: VmConfig| VmConfig { console: Console::Prefixed(format!("[vm{}] ", vm.vm_id)), ..vm };
        match self {
            Root::Tiny { vm, name, arg } => {
                let guest = crate::guests::find(&name)
                    .ok_or_else(|| fail(&ConfigError::UnknownGuest { name, known: crate::guests::names() }, true))?;
                let mut root =
                    crate::build_tiny_vm(&prefixed(vm), guest, arg).map_err(|e| fail(&e, e.is_bad_input()))?;
                root.start();
                Ok(Controller::new(root, Some(memory::GuestAddress(crate::layout::VM_ID_ADDR))))
            }
            Root::Linux(config) => {
                let config = LinuxConfig { vm: prefixed(config.vm), ..config };
                let mut root = build_linux_vm(&config).map_err(|e| fail(&e, e.is_bad_input()))?;
                root.start();
                Ok(Controller::new(root, None))
            }
            Root::Restore(path, options, clock, overrides) => {
                let prefixed = Console::Prefixed("[vm0] ".into());
                let (mut root, loaded) = restore(&path, &options, &prefixed, clock, overrides)?;
                root.start();
                Ok(Controller::restored(root, loaded))
            }
            Root::Configured(resources) => {
                let mut controller = Controller::configured(*resources);
                controller.instance_start().map_err(|e| fail(&e, e.status() < 500))?;
                Ok(controller)
            }
        }
    }
}

/// Prints a failure to start and picks its exit code.
pub fn fail(err: &dyn std::error::Error, bad_input: bool) -> i32 {
    eprintln!("{}", report(err));
    if bad_input {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILURE
    }
}

/// Runs `root` as VM 0 (none: VM 0 comes over the API) and serves the control API on `socket`
/// until a Shutdown request or until the guest ends VM 0.
fn serve(root: Option<Root>, socket: &std::path::Path, instance_id: Option<String>) -> i32 {
    let server = match crate::api::server::ApiServer::bind(socket) {
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
    controller.set_instance_id(instance_id);
    let (code, failure) = server.serve(&mut controller);
    // Reported as without --api-sock: a guest fault's register dump, a parked VM.
    if let Some(failure) = failure {
        eprintln!("zygote: {failure}");
    }
    drop(controller);
    let _ = std::fs::remove_file(socket);
    i32::from(code)
}

/// Parses `args` as the command line `C`; on --help or --version, or on bad input, the exit
/// code after printing what clap said (bad input: one line, exit 2).
pub fn parse<C: Parser>(args: impl IntoIterator<Item = OsString>) -> Result<C, i32> {
    match C::try_parse_from(args) {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            // --help, --version: not errors.
            print!("{}", e.render());
            Err(0)
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            Err(EXIT_BAD_INPUT)
        }
    }
}

/// Runs one of the VMM's commands; returns the process exit code.
pub fn execute(command: Command) -> i32 {
    match command {
        Command::Run(args) => run(*args),
        Command::Ctl(args) => ctl(args),
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// The VMM's commands alone, as the `zygote` binary parses them.
    #[derive(Debug, Parser)]
    #[command(name = "zygote")]
    struct Cli {
        #[command(subcommand)]
        _command: Command,
    }

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
