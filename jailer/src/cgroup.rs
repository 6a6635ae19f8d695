//! The VM's own cgroup, in every hierarchy it needs: cgroup v2 (always, where mounted) and
//! the v1 hierarchy of any controller a setting names that the host keeps on v1. A systemd
//! host mounts v2 at /sys/fs/cgroup with every controller; a hybrid host (like this one)
//! mounts v2 at /sys/fs/cgroup/unified with few or none, and memory, cpu, ... as v1
//! hierarchies under /sys/fs/cgroup/<controller>. Each setting goes where its controller is.
//!
//! The cgroup is <hierarchy root>/<parent>/<id> (as Firecracker's jailer places it); the VMM
//! enters it before it execs. Settings use cgroup v2 names: `memory.max` and `cpu.max` become
//! `memory.limit_in_bytes` and `cpu.cfs_period_us` + `cpu.cfs_quota_us` where their
//! controller is on v1; any other file is written as named, in its controller's hierarchy.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use crate::config::CgroupSetting;

/// What failed setting up or removing the VM's cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cgroup {file}: controller {controller:?} is not available here ({where_})")]
    NoController { file: String, controller: String, where_: String },
    #[error("the VM's cgroup {0:?} already exists (a VM with this id runs, or was not cleaned up)")]
    Exists(PathBuf),
    #[error("--cgroup {file}: cgroup {dir:?} has no file {file_here:?} (cgroup v{version})")]
    NoFile { file: String, dir: PathBuf, file_here: String, version: u8 },
    #[error("--cgroup {setting}: the kernel refused the value for {path:?}")]
    Value { setting: String, path: PathBuf },
    #[error("cannot create cgroup {path:?}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path:?}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

impl CgroupError {
    /// True when the command line asked for what this host cannot give (exit 2), not a failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CgroupError::NoController { .. }
                | CgroupError::Exists(_)
                | CgroupError::NoFile { .. }
                | CgroupError::Value { .. }
        )
    }
}

/// The cgroup hierarchies mounted here.
#[derive(Debug, Default, PartialEq, Eq)]
struct Mounts {
    v2: Option<PathBuf>,
    /// (mount point, controllers)
    v1: Vec<(PathBuf, Vec<String>)>,
}

/// Reads the cgroup mounts out of /proc/self/mountinfo.
fn parse_mountinfo(text: &str) -> Mounts {
    let mut mounts = Mounts::default();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(point) = left.split(' ').nth(4) else { continue };
        let mut right = right.split(' ');
        let (fstype, options) = (right.next(), right.nth(1).unwrap_or(""));
        match fstype {
            Some("cgroup2") if mounts.v2.is_none() => mounts.v2 = Some(PathBuf::from(point)),
            Some("cgroup") => {
                let flags = ["rw", "ro", "clone_children", "noprefix", "xattr", "cpuset_v2_mode", "favordynmods"];
                let controllers: Vec<String> =
                    options.split(',').filter(|o| !o.contains('=') && !flags.contains(o)).map(str::to_string).collect();
                if !controllers.is_empty() && !mounts.v1.iter().any(|(p, _)| p.as_os_str() == point) {
                    mounts.v1.push((PathBuf::from(point), controllers));
                }
            }
            _ => {}
        }
    }
    mounts
}

/// The files and values `setting` becomes in a v1 hierarchy.
fn v1_files(setting: &CgroupSetting) -> Vec<(String, String)> {
    let unlimited = |v: &str| if v == "max" { "-1".to_string() } else { v.to_string() };
    match setting.file.as_str() {
        "memory.max" => vec![("memory.limit_in_bytes".into(), unlimited(&setting.value))],
        "cpu.max" => {
            let mut parts = setting.value.split_whitespace();
            let quota = unlimited(parts.next().unwrap_or("max"));
            let mut files: Vec<(String, String)> =
                parts.next().map(|p| ("cpu.cfs_period_us".into(), p.to_string())).into_iter().collect();
            files.push(("cpu.cfs_quota_us".into(), quota));
            files
        }
        _ => vec![(setting.file.clone(), setting.value.clone())],
    }
}

/// One hierarchy the VM's cgroup is made in, and what is written there.
#[derive(Debug, PartialEq, Eq)]
struct Hierarchy {
    root: PathBuf,
    v2: bool,
    settings: Vec<CgroupSetting>,
}

/// Where the VM's cgroups go and what they get: worked out (and refused) before anything is made.
#[derive(Debug, PartialEq, Eq)]
pub struct CgroupPlan {
    hierarchies: Vec<Hierarchy>,
}

impl CgroupPlan {
    /// Places each setting in the hierarchy of its controller on this host.
    pub fn new(settings: &[CgroupSetting]) -> Result<CgroupPlan, CgroupError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })
        };
        let mounts = parse_mountinfo(&read(Path::new("/proc/self/mountinfo"))?);
        let v2_controllers = match &mounts.v2 {
            Some(root) => read(&root.join("cgroup.controllers"))?,
            None => String::new(),
        };
        CgroupPlan::place(&mounts, &v2_controllers, settings)
    }

    fn place(mounts: &Mounts, v2_controllers: &str, settings: &[CgroupSetting]) -> Result<CgroupPlan, CgroupError> {
        let mut hierarchies: Vec<Hierarchy> =
            mounts.v2.iter().map(|root| Hierarchy { root: root.clone(), v2: true, settings: Vec::new() }).collect();
        for setting in settings {
            let v2 = v2_controllers.split_whitespace().any(|c| c == setting.controller);
            let root = match (&mounts.v2, mounts.v1.iter().find(|(_, c)| c.contains(&setting.controller))) {
                (Some(root), _) if v2 => root,
                (_, Some((root, _))) => root,
                _ => {
                    let where_ = match &mounts.v2 {
                        Some(root) => format!(
                            "cgroup v2 at {} offers [{}], and no cgroup v1 hierarchy has it",
                            root.display(),
                            v2_controllers.trim()
                        ),
                        None => "no cgroup v2 is mounted, and no cgroup v1 hierarchy has it".to_string(),
                    };
                    return Err(CgroupError::NoController {
                        file: setting.file.clone(),
                        controller: setting.controller.clone(),
                        where_,
                    });
                }
            };
            match hierarchies.iter_mut().find(|h| &h.root == root) {
                Some(h) => h.settings.push(setting.clone()),
                None => hierarchies.push(Hierarchy { root: root.clone(), v2: false, settings: vec![setting.clone()] }),
            }
        }
        Ok(CgroupPlan { hierarchies })
    }

    /// Creates <root>/<parent>/<id> in every hierarchy, writes the settings and opens each
    /// cgroup.procs. What it made is removed again on failure (and when the result drops).
    pub fn create(&self, parent: &Path, id: &str) -> Result<VmCgroups, CgroupError> {
        let mut made = VmCgroups::default();
        for h in &self.hierarchies {
            made.add(h, parent, id)?;
        }
        Ok(made)
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// The VM's cgroup in one hierarchy.
#[derive(Debug)]
struct VmCgroup {
    /// <root>/<parent>/<id>, once created here.
    dir: Option<PathBuf>,
    /// Parent directories this jailer created (removed after the VM if empty), outermost first.
    created: Vec<PathBuf>,
    /// Its cgroup.procs, open for the VMM to enter with before it execs.
    procs: Option<File>,
}

/// The VM's cgroups, in every hierarchy used; removed when dropped.
#[derive(Debug, Default)]
pub struct VmCgroups {
    groups: Vec<VmCgroup>,
}

impl VmCgroups {
    fn add(&mut self, h: &Hierarchy, parent: &Path, id: &str) -> Result<(), CgroupError> {
        // Recorded first, so `remove` undoes whatever of it gets made.
        self.groups.push(VmCgroup { dir: None, created: Vec::new(), procs: None });
        let group = self.groups.last_mut().expect("just pushed");
        let parent_dir = h.root.join(parent);
        // Another jailer may remove a parent it made, between our making (or finding) it and
        // our making the VM's cgroup in it: make the chain again then.
        let mut attempts = 0;
        let vm_dir = loop {
            attempts += 1;
            let mut dir = h.root.clone();
            for part in parent.components() {
                dir.push(part);
                match std::fs::create_dir(&dir) {
                    Ok(()) => group.created.push(dir.clone()),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError::Create { path: dir, source }),
                }
            }
            let vm_dir = parent_dir.join(id);
            match std::fs::create_dir(&vm_dir) {
                Ok(()) => break vm_dir,
                Err(e) if e.kind() == ErrorKind::NotFound && attempts < 5 => continue,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(CgroupError::Exists(vm_dir)),
                Err(source) => return Err(CgroupError::Create { path: vm_dir, source }),
            }
        };
        group.dir = Some(vm_dir.clone());
        if h.v2 {
            // A v2 controller works in a cgroup only if every ancestor enables it for its children.
            let ancestors: Vec<&Path> = vm_dir.ancestors().skip(1).take_while(|a| a.starts_with(&h.root)).collect();
            for setting in &h.settings {
                for ancestor in ancestors.iter().rev() {
                    write(&ancestor.join("cgroup.subtree_control"), &format!("+{}", setting.controller))?;
                }
            }
        }
        for setting in &h.settings {
            let files = if h.v2 { vec![(setting.file.clone(), setting.value.clone())] } else { v1_files(setting) };
            for (file, value) in files {
                let path = vm_dir.join(&file);
                // cgroupfs answers a write to a file it lacks with EACCES: look first.
                if !path.is_file() {
                    let version = if h.v2 { 2 } else { 1 };
                    return Err(CgroupError::NoFile {
                        file: setting.file.clone(),
                        dir: vm_dir,
                        file_here: file,
                        version,
                    });
                }
                match write(&path, &value) {
                    Err(CgroupError::Write { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                        return Err(CgroupError::Value {
                            setting: format!("{}={}", setting.file, setting.value),
                            path,
                        });
                    }
                    other => other?,
                }
            }
        }
        let procs = vm_dir.join("cgroup.procs");
        let file = OpenOptions::new().write(true).open(&procs);
        group.procs = Some(file.map_err(|source| CgroupError::Write { path: procs, value: String::new(), source })?);
        Ok(())
    }

    /// Moves the calling process into every one of the VM's cgroups (the VMM, before its exec).
    pub fn enter(&mut self) -> Result<(), CgroupError> {
        for group in &mut self.groups {
            if let (Some(procs), Some(dir)) = (group.procs.as_mut(), &group.dir) {
                // "0": the writing process, whatever its pid namespace calls it.
                let entered = procs.write_all(b"0");
                entered.map_err(|source| CgroupError::Write {
                    path: dir.join("cgroup.procs"),
                    value: "0".into(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Removes the VM's cgroups (once its processes are gone) and the parents this jailer made
    /// if nothing else uses them. Best effort: a cgroup whose last task just exited may be
    /// busy for a moment, so each removal is retried for up to a second.
    fn remove(&mut self) {
        for group in self.groups.drain(..) {
            drop(group.procs);
            if let Some(dir) = &group.dir {
                for attempt in 0..100 {
                    match std::fs::remove_dir(dir) {
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 99 => {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                        _ => break,
                    }
                }
            }
            for dir in group.created.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

impl Drop for VmCgroups {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cgroup;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
35 24 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct,clone_children";

    #[test]
    fn mountinfo_gives_v2_and_each_v1_hierarchy_with_its_controllers() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let v1: Vec<(&str, Vec<&str>)> =
            m.v1.iter().map(|(p, c)| (p.to_str().unwrap(), c.iter().map(String::as_str).collect())).collect();
        assert_eq!(
            v1,
            vec![
                ("/sys/fs/cgroup/cpu", vec!["cpu"]),
                ("/sys/fs/cgroup/memory", vec!["memory"]),
                ("/sys/fs/cgroup/cpu,cpuacct", vec!["cpu", "cpuacct"]),
            ]
        );
    }

    fn settings(args: &[&str]) -> Vec<CgroupSetting> {
        args.iter().map(|a| parse_cgroup(a).unwrap()).collect()
    }

    #[test]
    fn settings_go_to_the_hierarchy_of_their_controller_and_v2_is_always_joined() {
        let hybrid = parse_mountinfo(HYBRID);
        let plan =
            CgroupPlan::place(&hybrid, "hugetlb\n", &settings(&["memory.max=1", "hugetlb.2MB.max=0", "cpu.max=max"]))
                .unwrap();
        let placed: Vec<(&str, bool, Vec<&str>)> = plan
            .hierarchies
            .iter()
            .map(|h| (h.root.to_str().unwrap(), h.v2, h.settings.iter().map(|s| s.file.as_str()).collect()))
            .collect();
        assert_eq!(
            placed,
            vec![
                ("/sys/fs/cgroup/unified", true, vec!["hugetlb.2MB.max"]),
                ("/sys/fs/cgroup/memory", false, vec!["memory.max"]),
                ("/sys/fs/cgroup/cpu", false, vec!["cpu.max"]),
            ]
        );

        let unified = Mounts { v2: Some(PathBuf::from("/sys/fs/cgroup")), v1: Vec::new() };
        let plan =
            CgroupPlan::place(&unified, "cpuset cpu io memory pids\n", &settings(&["memory.max=1", "cpu.max=max"]))
                .unwrap();
        assert_eq!(plan.hierarchies.len(), 1);
        assert_eq!(plan.hierarchies[0].settings.len(), 2);
        assert!(CgroupPlan::place(&unified, "", &[]).unwrap().hierarchies[0].v2);
    }

    #[test]
    fn a_controller_nowhere_is_refused_naming_what_the_host_has() {
        let err = CgroupPlan::place(&parse_mountinfo(HYBRID), "hugetlb\n", &settings(&["pids.max=4"])).unwrap_err();
        assert!(err.is_bad_input());
        let msg = err.to_string();
        assert!(msg.contains("\"pids\"") && msg.contains("/sys/fs/cgroup/unified offers [hugetlb]"), "{msg}");
        let none = CgroupPlan::place(&Mounts::default(), "", &settings(&["memory.max=1"])).unwrap_err();
        assert!(none.to_string().contains("no cgroup v2 is mounted"), "{none}");
    }

    #[test]
    fn v2_names_map_to_v1_files() {
        let files = |arg: &str| v1_files(&parse_cgroup(arg).unwrap());
        assert_eq!(files("memory.max=1048576"), vec![("memory.limit_in_bytes".into(), "1048576".into())]);
        assert_eq!(files("memory.max=max"), vec![("memory.limit_in_bytes".into(), "-1".into())]);
        assert_eq!(
            files("cpu.max=50000 100000"),
            vec![("cpu.cfs_period_us".into(), "100000".into()), ("cpu.cfs_quota_us".into(), "50000".into())]
        );
        assert_eq!(files("cpu.max=max"), vec![("cpu.cfs_quota_us".into(), "-1".into())]);
        assert_eq!(files("pids.max=64"), vec![("pids.max".into(), "64".into())]);
    }
}
