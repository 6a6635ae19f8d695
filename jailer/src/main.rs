//! zygote-jailer: prepares a jail for one VM and runs `zygote run` in it, as Firecracker's
//! jailer does for Firecracker. In order: check every argument (exit 2, nothing made), build
//! the jail directory, make the VM's cgroups, then fork the VMM into new PID, mount and network
//! namespaces (or a given network namespace), pivot_root into the jail, set rlimits, drop to
//! uid:gid with an empty environment and no inherited fd, and exec. The jailer stays as the
//! VMM's parent: it exits with the VMM's code, after removing the cgroups and the jail's device
//! nodes. A failure before the exec removes everything made.

mod cgroup;
mod config;
mod elf;
mod enter;
mod jail;
mod supervise;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use clap::Parser;

use cgroup::{CgroupError, CgroupPlan};
use config::{Args, Config, ConfigError};
use elf::ElfError;
use jail::{JailDir, JailError};
use supervise::SpawnError;

/// Exit code for a command line no jail can be built from.
const EXIT_BAD_INPUT: i32 = 2;
/// Exit code when the host failed (the VMM's own code once it runs).
const EXIT_FAILURE: i32 = 1;

/// `ioctl(NS_GET_NSTYPE)` on a namespace fd: its CLONE_NEW* type (linux/nsfs.h, _IO(0xb7, 3)).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

#[derive(Debug, thiserror::Error)]
enum JailerError {
    #[error("must run as root: it makes namespaces, device nodes and cgroups")]
    NotRoot,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--exec-file")]
    Elf(#[from] ElfError),
    #[error("--netns {path:?}: {why}")]
    NetNs { path: PathBuf, why: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("starting the VMM in the jail")]
    Spawn(#[from] SpawnError),
    #[error("writing the pid file {path:?}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl JailerError {
    fn exit_code(&self) -> i32 {
        let bad_input = match self {
            JailerError::Config(_) | JailerError::Elf(_) | JailerError::NetNs { .. } => true,
            JailerError::Cgroup(e) => e.is_bad_input(),
            JailerError::Jail(e) => e.is_bad_input(),
            JailerError::NotRoot | JailerError::Spawn(_) | JailerError::PidFile { .. } => false,
        };
        if bad_input {
            EXIT_BAD_INPUT
        } else {
            EXIT_FAILURE
        }
    }
}

/// `err` and its causes on one line.
pub(crate) fn one_line(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    msg
}

/// Opens `path` and checks it is a network namespace.
fn open_netns(path: &PathBuf) -> Result<File, JailerError> {
    let bad = |why: String| JailerError::NetNs { path: path.clone(), why };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd, which outlives the call.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    match kind {
        libc::CLONE_NEWNET => Ok(file),
        -1 => Err(bad("not a namespace file (e.g. /var/run/netns/NAME)".into())),
        _ => Err(bad("a namespace, but not a network namespace".into())),
    }
}

/// Builds the jail, runs the VMM in it and returns its exit code.
fn jail_and_run(config: &Config) -> Result<i32, JailerError> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailerError::NotRoot);
    }
    // Everything that can be refused is, before anything is made.
    let runtime = elf::runtime_files(&config.exec_file)?;
    let plan = CgroupPlan::new(&config.cgroups)?;
    let netns = config.netns.as_ref().map(open_netns).transpose()?;
    let mut jail = JailDir::create(config, &runtime)?;
    let mut cgroups = plan.create(&config.parent_cgroup, &config.id)?;
    let entry = enter::Entry::new(config, &jail.root());
    let pid = supervise::spawn(&entry, &mut cgroups, netns.as_ref())?;
    jail.keep();
    drop(netns);
    let pid_file = jail.dir().join(format!("{}.pid", config.exec_name.to_string_lossy()));
    if let Err(source) = std::fs::write(&pid_file, format!("{pid}\n")) {
        supervise::kill(pid);
        supervise::wait(pid);
        jail.remove_devices();
        return Err(JailerError::PidFile { path: pid_file, source });
    }
    let code = supervise::wait(pid);
    jail.remove_devices();
    // The VM's processes are gone: its cgroups can go.
    drop(cgroups);
    Ok(code)
}

fn main() {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            print!("{}", e.render());
            std::process::exit(0);
        }
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!("zygote-jailer: {} (see zygote-jailer --help)", first.trim_start_matches("error: "));
            std::process::exit(EXIT_BAD_INPUT);
        }
    };
    let code = match Config::try_from(args).map_err(JailerError::from).and_then(|config| jail_and_run(&config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zygote-jailer: {}", one_line(&e));
            e.exit_code()
        }
    };
    std::process::exit(code);
}
