//! zygote-jailer end to end, as root: the VMM runs jailed (its own root, namespaces, user,
//! cgroups and rlimits), clones and snapshots inside the jail, and a refused or failed jail
//! leaves nothing behind.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;

use support::{cgroup_dir, ctl, identity, status_field, wait_for_path, JailSpec, Jailed, Scratch, GID, UID};

#[test]
fn a_jailed_hello_guest_prints_its_line_and_its_cgroups_and_device_nodes_go_with_it() {
    let mut jailed = Jailed::start(JailSpec {
        name: "jail-hello",
        parent_cgroup: None,
        jailer_args: vec!["--cgroup".into(), "memory.max=268435456".into()],
        run_args: &["--guest", "hello"],
        stdout: Stdio::piped(),
    });
    let (status, stderr) = jailed.wait();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut jailed.child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stdout.trim(), "Hello from a Zygote guest", "stderr: {stderr}");
    assert_eq!(jailed.cgroups_left(), Vec::<std::path::PathBuf>::new());
    let root = jailed.root();
    assert!(root.join("zygote").is_file() && jailed.jail_dir().join("zygote.pid").is_file());
    assert!(!root.join("dev/kvm").exists() && !root.join("dev/net/tun").exists(), "device nodes outlived the VM");
}

#[test]
fn a_jailed_vm_sees_only_its_jail_runs_as_its_user_in_its_cgroups_and_clones_and_snapshots_inside() {
    let scratch = Scratch::new("jail-api-files");
    let disk = scratch.0.join("disk.img");
    std::fs::write(&disk, vec![0x5a; 64 * 1024]).unwrap();
    // An fd the jailer inherits (not CLOEXEC): the VMM must not.
    let leaked = std::fs::File::create(scratch.0.join("inherited-fd")).unwrap();
    // SAFETY: F_SETFD on an fd this test owns, clearing its flags (CLOEXEC).
    assert_eq!(unsafe { libc::fcntl(leaked.as_raw_fd(), libc::F_SETFD, 0) }, 0);
    let mut jailed = Jailed::start(JailSpec {
        name: "jail-api",
        parent_cgroup: Some("zygote-test-jail-api"),
        jailer_args: ["--cgroup", "memory.max=268435456", "--cgroup", "cpu.max=50000 100000"]
            .into_iter()
            .chain(["--resource-limit", "no-file=256", "--copy-file", disk.to_str().unwrap()])
            .map(String::from)
            .collect(),
        run_args: &["--guest", "spin", "--disk", "/disk.img", "--api-sock", "/api.sock"],
        stdout: Stdio::null(),
    });
    drop(leaked);
    let root = jailed.root();
    let socket = root.join("api.sock");
    wait_for_path(&socket, &mut jailed.child);
    let pid = jailed.vmm_pid();

    // Its "/" is the jail root, with nothing of the host's mounts: the host's root is gone.
    assert_eq!(identity(Path::new(&format!("/proc/{pid}/root"))), identity(&root));
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let points: Vec<&str> = mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert_eq!(points, ["/", "/proc"], "{mountinfo}");
    let mut seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, ["api.sock", "dev", "disk.img", "lib", "lib64", "proc", "tmp", "zygote"]);
    // Its own PID, mount and network namespaces; PID 1 in its.
    for ns in ["pid", "mnt", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(theirs, std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(), "{ns} namespace");
    }
    assert_eq!(status_field(pid, "NSpid"), format!("{pid} 1"));
    // The given user and group only, no environment, no inherited fd, its rlimit.
    assert_eq!(status_field(pid, "Uid"), format!("{UID} {UID} {UID} {UID}"));
    assert_eq!(status_field(pid, "Gid"), format!("{GID} {GID} {GID} {GID}"));
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(std::fs::read(format!("/proc/{pid}/environ")).unwrap(), b"");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert!(!target.ends_with("inherited-fd"), "the VMM holds the jailer's inherited fd");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(open_files.split_whitespace().collect::<Vec<_>>()[3..5], ["256", "256"]);
    // Its cgroups (v2 always; memory and cpu wherever this host keeps them) with the limits.
    let v2_line = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(v2_line.lines().any(|l| l == format!("0::/{}/{}", jailed.parent_cgroup, jailed.id)), "{v2_line}");
    let memory = cgroup_dir(pid, "memory");
    let cpu = cgroup_dir(pid, "cpu");
    for dir in [&memory, &cpu] {
        assert!(dir.ends_with(Path::new(&jailed.parent_cgroup).join(&jailed.id)), "{}", dir.display());
    }
    let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap().trim().to_string();
    if memory.join("memory.max").exists() {
        assert_eq!(read(&memory, "memory.max"), "268435456");
        assert_eq!(read(&cpu, "cpu.max"), "50000 100000");
    } else {
        assert_eq!(read(&memory, "memory.limit_in_bytes"), "268435456");
        assert_eq!(
            (read(&cpu, "cpu.cfs_quota_us"), read(&cpu, "cpu.cfs_period_us")),
            ("50000".into(), "100000".into())
        );
    }

    // A clone and a snapshot through the API, the files inside the jail and the user's.
    assert_eq!(ctl(&socket, &["clone"])["vm_id"], 1);
    assert_eq!(ctl(&socket, &["snapshot-create", "--path", "/snap/s.json"]), serde_json::json!({}));
    let snap = root.join("snap");
    let mut files: Vec<String> =
        std::fs::read_dir(&snap).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files.len(), 3, "state, RAM and disk files: {files:?}");
    assert!(files[0] == "s.json" && files[1].contains("-disk-") && files[2].contains("-mem0-"), "{files:?}");
    for file in &files {
        let meta = std::fs::metadata(snap.join(file)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{file}");
    }
    assert_eq!(ctl(&socket, &["vms"]).as_array().map(Vec::len), Some(2));

    ctl(&socket, &["shutdown"]);
    let (status, stderr) = jailed.wait();
    assert!(status.success(), "{status}: {stderr}");
    assert!(jailed.cgroups_left().is_empty(), "{:?}", jailed.cgroups_left());
}

#[test]
fn a_given_network_namespace_is_joined_and_a_linked_file_is_the_host_file() {
    support::require_root();
    let netns = format!("zygote-jail-test-{}", std::process::id());
    let added = std::process::Command::new("ip").args(["netns", "add", &netns]).status().unwrap();
    assert!(added.success(), "ip netns add {netns}");
    // Deleted on every path out of this test.
    struct NetNs(String);
    impl Drop for NetNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "delete", &self.0]).status();
        }
    }
    let netns = NetNs(netns);
    let scratch = Scratch::new("jail-netns-files");
    let kernel = scratch.0.join("kernel.bin");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let netns_path = format!("/var/run/netns/{}", netns.0);
    let mut jailed = Jailed::start(JailSpec {
        name: "jail-netns",
        parent_cgroup: Some("zygote-test-jail-netns"),
        jailer_args: ["--netns", &netns_path, "--link-file", kernel.to_str().unwrap()].map(String::from).to_vec(),
        run_args: &["--guest", "spin", "--api-sock", "/api.sock"],
        stdout: Stdio::null(),
    });
    let socket = jailed.root().join("api.sock");
    wait_for_path(&socket, &mut jailed.child);
    let pid = jailed.vmm_pid();
    assert_eq!(identity(Path::new(&format!("/proc/{pid}/ns/net"))), identity(Path::new(&netns_path)));
    assert_eq!(identity(&jailed.root().join("kernel.bin")), identity(&kernel));
    ctl(&socket, &["shutdown"]);
    let (status, stderr) = jailed.wait();
    assert!(status.success(), "{status}: {stderr}");
}

/// Runs the jailer expecting it to refuse or fail: its exit code and its one stderr line.
fn refused(name: &str, jailer_args: &[&str]) -> (Jailed, i32, String) {
    let mut jailed = Jailed::start(JailSpec {
        name,
        parent_cgroup: Some(&format!("zygote-test-{name}")),
        jailer_args: jailer_args.iter().map(|a| a.to_string()).collect(),
        run_args: &["--guest", "hello"],
        stdout: Stdio::piped(),
    });
    let (status, stderr) = jailed.wait();
    assert_eq!(stderr.lines().count(), 1, "{name}: {stderr:?}");
    assert!(stderr.starts_with("zygote-jailer: "), "{name}: {stderr:?}");
    (jailed, status.code().expect("exited"), stderr)
}

#[test]
fn refused_and_failed_jails_exit_with_one_line_and_leave_no_jail_or_cgroup() {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap().trim().parse().unwrap();
    let too_many = format!("no-file={}", nr_open + 1);
    let cases: [(&str, &[&str], i32, &str); 6] = [
        ("jail-no-controller", &["--cgroup", "nosuchctl.max=1"], 2, "controller \"nosuchctl\" is not available"),
        ("jail-no-file", &["--cgroup", "memory.max=1073741824", "--cgroup", "memory.nosuch=1"], 2, "has no file"),
        ("jail-bad-value", &["--cgroup", "memory.max=12x"], 2, "refused the value"),
        ("jail-cross-fs-link", &["--link-file", "/proc/cpuinfo"], 2, "--copy-file"),
        ("jail-bad-netns", &["--netns", "/proc/cpuinfo"], 2, "not a namespace file"),
        // Fails in the child, after the jail and cgroups were made: they go all the same.
        ("jail-rlimit", &["--cgroup", "memory.max=1073741824", "--resource-limit", &too_many], 1, "no-file"),
    ];
    for (name, args, code, message) in cases {
        let (jailed, got, stderr) = refused(name, args);
        assert_eq!(got, code, "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        assert!(!jailed.jail_dir().exists() && !jailed.base.join("zygote").exists(), "{name}: the jail is left");
        assert!(jailed.cgroups_left().is_empty(), "{name}: {:?}", jailed.cgroups_left());
        for (mount, _) in support::cgroup_mounts() {
            assert!(!mount.join(&jailed.parent_cgroup).exists(), "{name}: parent cgroup left in {}", mount.display());
        }
    }
}

#[test]
fn an_existing_jail_is_refused_and_left_as_it_was() {
    let scratch = Scratch::new("jail-exists");
    let base = &scratch.0;
    let id = format!("jail-exists-{}", std::process::id());
    let existing = base.join("zygote").join(&id).join("root");
    std::fs::create_dir_all(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), b"mine").unwrap();
    support::require_root();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zygote-jailer"))
        .args(["--id", &id, "--uid", "1", "--gid", "1", "--exec-file"])
        .arg(zygote_tests::zygote_bin())
        .arg("--chroot-base-dir")
        .arg(base)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already exists") && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(std::fs::read(existing.join("keep.txt")).unwrap(), b"mine");
}

#[test]
fn bad_arguments_exit_2_before_anything_is_made() {
    support::require_root();
    let scratch = Scratch::new("jail-bad-args");
    let base = &scratch.0;
    let bin = zygote_tests::zygote_bin().to_str().unwrap().to_string();
    let common = |id: &str, uid: &str, extra: &[&str]| -> Vec<String> {
        let base = base.to_str().unwrap();
        let args = ["--id", id, "--uid", uid, "--gid", "7", "--exec-file", &bin, "--chroot-base-dir", base];
        args.iter().chain(extra).map(|a| a.to_string()).collect()
    };
    let twice = ["--copy-file", "/etc/hostname", "--link-file", "/etc/hostname"];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (common("../x", "7", &[]), "--id"),
        (common("ok", "0", &[]), "must not run as root"),
        (common("ok", "7", &["--exec-file-typo"]), "--exec-file-typo"),
        (common("ok", "7", &["--resource-limit", "nproc=4"]), "--resource-limit"),
        (common("ok", "7", &["--copy-file", "/nonexistent"]), "/nonexistent"),
        (common("ok", "7", &twice), "already in the jail"),
    ];
    for (args, message) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zygote-jailer")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.lines().count() == 1 && stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(std::fs::read_dir(base).unwrap().count(), 0, "{args:?} made something");
    }
    let exec = std::process::Command::new(env!("CARGO_BIN_EXE_zygote-jailer"))
        .args(["--id", "ok", "--uid", "7", "--gid", "7", "--exec-file", "/etc/hostname", "--chroot-base-dir"])
        .arg(base)
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(2), "{}", String::from_utf8_lossy(&exec.stderr));
    assert!(String::from_utf8_lossy(&exec.stderr).contains("not a 64-bit little-endian ELF"));
}
