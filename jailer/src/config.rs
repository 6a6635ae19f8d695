//! The command line, and the checked configuration built from it before anything is created.

use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};

use clap::Parser;

/// Longest VM id (it names a directory and a cgroup).
pub const MAX_ID_LEN: usize = 64;

/// Names the jail root holds for itself (besides the exec file's name); a file placed with
/// --copy-file/--link-file may not take them.
pub const RESERVED_NAMES: [&str; 6] = ["dev", "proc", "tmp", "lib", "lib64", "usr"];

/// zygote-jailer: runs `zygote run` in a jail of its own. Arguments after `--` go to `zygote run`.
#[derive(Parser, Debug)]
#[command(name = "zygote-jailer", version)]
pub struct Args {
    /// The VM's id: letters, digits and '-', at most 64 characters; names the jail and cgroup.
    #[arg(long)]
    pub id: String,
    /// The zygote binary to run; copied into the jail with the loader and libraries it needs.
    /// Its file name names the jail's parent directory and the default parent cgroup.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// User the VMM runs as (not 0).
    #[arg(long)]
    pub uid: u32,
    /// Group the VMM runs as (not 0).
    #[arg(long)]
    pub gid: u32,
    /// Where jails are built (made if missing): the jail root is <DIR>/<exec file name>/<id>/root.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// Join this network namespace (e.g. /var/run/netns/NAME) instead of a new, empty one.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// A file of the VM's cgroup and its value, e.g. memory.max=536870912 or
    /// cpu.max="50000 100000" (cgroup v2 names; on a host that keeps the controller on a
    /// cgroup v1 hierarchy, memory.max and cpu.max are written as their v1 equivalents).
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// The VM's cgroup is <hierarchy root>/<PARENT>/<id> in every hierarchy used (default
    /// PARENT: the exec file's name).
    #[arg(long, value_name = "PARENT")]
    pub parent_cgroup: Option<PathBuf>,
    /// A resource limit: no-file=N (open files) or fsize=N (bytes a file may grow to).
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    pub resource_limits: Vec<String>,
    /// A file copied into the jail root under its own name, owned by uid:gid (a disk the VMM
    /// writes, a kernel, an initrd).
    #[arg(long = "copy-file", value_name = "PATH")]
    pub copy_files: Vec<PathBuf>,
    /// A file hard-linked into the jail root under its own name (same filesystem; its owner
    /// and mode stay: uid:gid must be able to open it).
    #[arg(long = "link-file", value_name = "PATH")]
    pub link_files: Vec<PathBuf>,
    /// Arguments of `zygote run`.
    #[arg(last = true, value_name = "RUN ARGS")]
    pub run_args: Vec<String>,
}

/// One value to write into the VM's cgroup: `<controller>.<rest>` = `value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    pub controller: String,
    pub file: String,
    pub value: String,
}

/// A resource limit to set before the exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceLimit {
    NoFile(u64),
    FileSize(u64),
}

/// How a file gets into the jail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Copy,
    HardLink,
}

/// A file to place in the jail root: `source` (canonical) under `name` (the name given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailFile {
    pub source: PathBuf,
    pub name: OsString,
    pub placement: Placement,
}

/// Everything the jailer does, checked.
#[derive(Debug)]
pub struct Config {
    pub id: String,
    pub exec_file: PathBuf,
    /// The exec file's name: the binary's name in the jail root.
    pub exec_name: OsString,
    pub uid: u32,
    pub gid: u32,
    /// <base>/<exec name>/<id>: holds the jail root and the pid file.
    pub jail_dir: PathBuf,
    /// A network namespace file to join (checked when opened), or None for a new one.
    pub netns: Option<PathBuf>,
    pub cgroups: Vec<CgroupSetting>,
    pub parent_cgroup: PathBuf,
    pub resource_limits: Vec<ResourceLimit>,
    pub files: Vec<JailFile>,
    pub run_args: Vec<String>,
}

/// A command line no jail can be built from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--id {0:?}: use 1..={MAX_ID_LEN} letters, digits and '-'")]
    Id(String),
    #[error("--{flag} {value}: the VMM must not run as root")]
    Root { flag: &'static str, value: u32 },
    #[error("{flag} {path:?}")]
    Path {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {path:?} is not a {what}")]
    Kind { flag: &'static str, path: PathBuf, what: &'static str },
    #[error("--cgroup {0:?}: expected <controller>.<file>=<value>, one file name, a value without newlines")]
    Cgroup(String),
    #[error("--parent-cgroup {0:?}: expected a relative path of plain names")]
    ParentCgroup(PathBuf),
    #[error("--resource-limit {0:?}: expected no-file=N or fsize=N")]
    ResourceLimit(String),
    #[error("{flag} {path:?}: its name {name:?} is already in the jail, or one the jail keeps for itself")]
    FileName { flag: &'static str, name: String, path: PathBuf },
}

/// Checks `id` as a directory and cgroup name.
fn check_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty() && id.len() <= MAX_ID_LEN && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    ok.then_some(()).ok_or_else(|| ConfigError::Id(id.to_string()))
}

/// `path` made absolute and free of links, and of the right kind.
fn canonical(flag: &'static str, path: &Path, dir: bool) -> Result<PathBuf, ConfigError> {
    let real = path.canonicalize().map_err(|source| ConfigError::Path { flag, path: path.to_path_buf(), source })?;
    let meta = real.metadata().map_err(|source| ConfigError::Path { flag, path: real.clone(), source })?;
    match (dir, meta.is_dir(), meta.is_file()) {
        (true, true, _) | (false, _, true) => Ok(real),
        _ => Err(ConfigError::Kind { flag, path: real, what: if dir { "directory" } else { "regular file" } }),
    }
}

pub fn parse_cgroup(arg: &str) -> Result<CgroupSetting, ConfigError> {
    let bad = || ConfigError::Cgroup(arg.to_string());
    let (file, value) = arg.split_once('=').ok_or_else(bad)?;
    let (controller, rest) = file.split_once('.').ok_or_else(bad)?;
    let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !plain(controller) || !plain(rest) || value.is_empty() || value.contains('\n') {
        return Err(bad());
    }
    Ok(CgroupSetting { controller: controller.to_string(), file: file.to_string(), value: value.to_string() })
}

pub fn parse_resource_limit(arg: &str) -> Result<ResourceLimit, ConfigError> {
    let bad = || ConfigError::ResourceLimit(arg.to_string());
    let (name, value) = arg.split_once('=').ok_or_else(bad)?;
    let value: u64 = value.parse().map_err(|_| bad())?;
    match name {
        "no-file" => Ok(ResourceLimit::NoFile(value)),
        "fsize" => Ok(ResourceLimit::FileSize(value)),
        _ => Err(bad()),
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        check_id(&args.id)?;
        for (flag, value) in [("uid", args.uid), ("gid", args.gid)] {
            if value == 0 {
                return Err(ConfigError::Root { flag, value });
            }
        }
        let exec_file = canonical("--exec-file", &args.exec_file, false)?;
        // The name the user gave (not a link's target's), as Firecracker's jailer does.
        let exec_name = args.exec_file.file_name().unwrap_or_default().to_os_string();
        // A missing base (the default /srv/jailer on a new host) is made with the jail.
        let base = match canonical("--chroot-base-dir", &args.chroot_base_dir, true) {
            Err(ConfigError::Path { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && args.chroot_base_dir.is_absolute() =>
            {
                args.chroot_base_dir.clone()
            }
            other => other?,
        };
        let cgroups = args.cgroups.iter().map(|c| parse_cgroup(c)).collect::<Result<Vec<_>, _>>()?;
        let parent_cgroup = args.parent_cgroup.unwrap_or_else(|| PathBuf::from(&exec_name));
        if parent_cgroup.as_os_str().is_empty()
            || !parent_cgroup.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(ConfigError::ParentCgroup(parent_cgroup));
        }
        let resource_limits =
            args.resource_limits.iter().map(|r| parse_resource_limit(r)).collect::<Result<Vec<_>, _>>()?;
        let mut files: Vec<JailFile> = Vec::new();
        let copies = args.copy_files.iter().map(|p| (p, Placement::Copy, "--copy-file"));
        let links = args.link_files.iter().map(|p| (p, Placement::HardLink, "--link-file"));
        for (path, placement, flag) in copies.chain(links) {
            let source = canonical(flag, path, false)?;
            // The name the user gave, not that of a link's target.
            let name = path.file_name().unwrap_or_default().to_os_string();
            let taken = RESERVED_NAMES.iter().any(|r| OsStr::new(r) == name)
                || name == exec_name
                || files.iter().any(|f| f.name == name);
            if taken || name.is_empty() {
                return Err(ConfigError::FileName {
                    flag,
                    name: name.to_string_lossy().into_owned(),
                    path: path.clone(),
                });
            }
            files.push(JailFile { source, name, placement });
        }
        Ok(Config {
            jail_dir: base.join(&exec_name).join(&args.id),
            id: args.id,
            exec_file,
            exec_name,
            uid: args.uid,
            gid: args.gid,
            netns: args.netns,
            cgroups,
            parent_cgroup,
            resource_limits,
            files,
            run_args: args.run_args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        for good in ["a", "vm-1", &"x".repeat(MAX_ID_LEN)] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", "a b", ".", &"x".repeat(MAX_ID_LEN + 1), "é"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cgroup_settings_name_a_controller_and_one_file() {
        let s = parse_cgroup("cpu.max=50000 100000").unwrap();
        assert_eq!((s.controller.as_str(), s.file.as_str(), s.value.as_str()), ("cpu", "cpu.max", "50000 100000"));
        for bad in [
            "memory.max",
            "max=1",
            "memory.=1",
            ".max=1",
            "memory.max=",
            "../memory.max=1",
            "memory/x.max=1",
            "memory.max=1\n2",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resource_limits_are_no_file_and_fsize() {
        assert_eq!(parse_resource_limit("no-file=1024").unwrap(), ResourceLimit::NoFile(1024));
        assert_eq!(parse_resource_limit("fsize=7").unwrap(), ResourceLimit::FileSize(7));
        for bad in ["no-file", "no-file=-1", "nproc=4", "fsize=1e6"] {
            assert!(parse_resource_limit(bad).is_err(), "{bad:?}");
        }
    }
}
