//! Snapshot files are untrusted input (issue 11.1): every crafted file (truncated, bit-flipped,
//! or edited with its checksum recomputed) is one clear error, from the library, from
//! `zygote run --restore` (exit 2) and from `PUT /snapshot/load` (400) on a server that goes
//! on serving its VM; nothing blocks on a FIFO or reads a huge file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::api::client::call;
use vmm::snapshot::file::{load_snapshot, write_snapshot, SnapshotError, SnapshotKind, SnapshotOnDisk};
use vmm::snapshot::format::FormatError;
use vmm::snapshot::validate::ValidateError;
use vmm::snapshot::VmSnapshot;
use vmm::vstate::RamLayoutError;
use zygote_tests::blk_driver::BlkDriver;
use zygote_tests::snapshot_file::{read_state, rewrite_body, rewrite_header, state_bytes};
use zygote_tests::{scratch_dir, spin_vm, spin_vm_with_disk, zygote_bin, SpinServer};

/// A full snapshot `base.json` and a diff over it `diff.json` of a one-vCPU `spin` VM, and of
/// a `spin` VM with a disk (queue set up) `disk.json`, in `dir`.
fn snapshots(dir: &Path) -> (SnapshotOnDisk, SnapshotOnDisk) {
    let mut vm = spin_vm(1, 0);
    let token = vm.pause().unwrap();
    let base =
        write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &dir.join("base.json"), dir, SnapshotKind::Full, None)
            .unwrap();
    vm.resume(token);
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    let diff = write_snapshot(&snap, &dir.join("diff.json"), dir, SnapshotKind::Diff, Some(&base)).unwrap();
    drop((token, vm.stop()));
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![7u8; 64 << 10]).unwrap();
    let mut vm = spin_vm_with_disk(1, &disk);
    BlkDriver::setup(&vm);
    let token = vm.pause().unwrap();
    write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &dir.join("disk.json"), dir, SnapshotKind::Full, None)
        .unwrap();
    drop((token, vm.stop()));
    (base, diff)
}

/// `from` (a state file in `dir`) copied to `name` with its body edited, checksum recomputed.
fn edited(dir: &Path, from: &str, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(dir.join(from), &path).unwrap();
    rewrite_body(&path, edit);
    path
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// What a crafted file's error must be.
type Expected = fn(&SnapshotError) -> bool;

/// Every crafted state file of the list, with what its error must be.
fn crafted(dir: &Path) -> Vec<(PathBuf, Expected)> {
    use SnapshotError as E;
    use ValidateError as V;
    let mut cases: Vec<(PathBuf, Expected)> = Vec::new();
    // A diff that names itself as its parent, and two diffs naming each other.
    cases.push((edited(dir, "diff.json", "self.json", |b| b["parent"]["file"] = json!("self.json")), |e| {
        matches!(e, E::ChainCycle { .. })
    }));
    edited(dir, "diff.json", "ping.json", |b| b["parent"]["file"] = json!("pong.json"));
    cases.push((edited(dir, "diff.json", "pong.json", |b| b["parent"]["file"] = json!("ping.json")), |e| {
        matches!(e, E::ChainCycle { .. })
    }));
    // A chain of 70 diffs: longer than any loader follows.
    for i in 0..70 {
        let parent = if i == 69 { "base.json".to_string() } else { format!("chain{}.json", i + 1) };
        edited(dir, "diff.json", &format!("chain{i}.json"), |b| b["parent"]["file"] = json!(parent));
    }
    cases.push((dir.join("chain0.json"), |e| matches!(e, E::ChainTooLong { max: 64, .. })));
    // A parent that changed, a parent outside the directory, a full snapshot with a parent.
    cases.push((edited(dir, "diff.json", "changed.json", |b| b["parent"]["crc32"] = json!(1)), |e| {
        matches!(e, E::ParentChanged { .. })
    }));
    cases.push((edited(dir, "diff.json", "up.json", |b| b["parent"]["file"] = json!("../base.json")), |e| {
        matches!(e, E::Escapes { .. })
    }));
    cases.push((
        edited(dir, "base.json", "full-parent.json", |b| b["parent"] = json!({"file": "base.json", "crc32": 0})),
        |e| matches!(e, E::Invalid { source: V::Parent { .. }, .. }),
    ));
    // Sizes that wrap: a disk of 2^55 + 2048 sectors, a run past the end of its region.
    cases
        .push((edited(dir, "disk.json", "sectors.json", |b| b["disk"]["sectors"] = json!((1u64 << 55) + 2048)), |e| {
            matches!(e, E::Invalid { source: V::DiskSectors { .. }, .. })
        }));
    cases.push((edited(dir, "base.json", "run.json", |b| b["regions"][0]["runs"] = json!([[1, u64::MAX, 0]])), |e| {
        matches!(e, E::Invalid { source: V::BadRun { .. }, .. })
    }));
    cases.push((
        edited(dir, "disk.json", "disk-run.json", |b| b["disk"]["runs"] = json!([[u64::MAX - 1, 4, 0]])),
        |e| matches!(e, E::Invalid { source: V::BadRun { .. }, .. }),
    ));
    // Shapes no VM can have: 0 and 300 vCPUs, a region with no layout entry, too much RAM.
    cases.push((edited(dir, "base.json", "vcpus0.json", |b| b["vm"]["vcpus"] = json!([])), |e| {
        matches!(e, E::Invalid { source: V::VcpuCount { count: 0 }, .. })
    }));
    cases.push((
        edited(dir, "base.json", "vcpus300.json", |b| b["vm"]["vcpus"] = json!(vec![b["vm"]["vcpus"][0].clone(); 300])),
        |e| {
            matches!(
                e,
                E::Invalid { source: V::VcpuCount { count: 300 }, .. }
                    | E::Format { source: FormatError::TooLarge { .. }, .. }
            )
        },
    ));
    cases.push((
        edited(dir, "base.json", "region.json", |b| {
            let mut extra = b["regions"][0].clone();
            extra["start"] = json!(1u64 << 40);
            b["regions"].as_array_mut().unwrap().push(extra);
        }),
        |e| matches!(e, E::Invalid { source: V::RegionCount { files: 2, regions: 1 }, .. }),
    ));
    cases.push((
        edited(dir, "base.json", "layout.json", |b| {
            let high = vmm::layout::HIGH_RAM_START;
            b["vm"]["ram_layout"][0] = json!([high, 1u64 << 40]);
            b["regions"][0]["start"] = json!(high);
            b["regions"][0]["size"] = json!(1u64 << 40);
        }),
        |e| matches!(e, E::Invalid { source: V::RamLayout(RamLayoutError::TooMuchRam { .. }), .. }),
    ));
    // RAM the builder never places: over the MMIO gap (device windows, the APIC and IOAPIC).
    cases.push((
        edited(dir, "base.json", "gap.json", |b| {
            let into_gap = vmm::layout::MMIO_GAP_START + 4096;
            b["vm"]["ram_layout"][0][1] = json!(into_gap);
            b["regions"][0]["size"] = json!(into_gap);
        }),
        |e| matches!(e, E::Invalid { source: V::RamLayout(RamLayoutError::Region { .. }), .. }),
    ));
    cases.push((edited(dir, "base.json", "unaligned.json", |b| b["vm"]["ram_layout"][0][0] = json!(7)), |e| {
        matches!(e, E::Invalid { source: V::RamLayout(RamLayoutError::Region { .. }) | V::RegionMismatch { .. }, .. })
    }));
    // Guest addresses the devices hold outside RAM.
    cases.push((
        edited(dir, "base.json", "dma.json", |b| {
            b["vm"]["devices"]["dma"]["in_flight"] =
                json!({"source": {"Guest": 0x1000}, "dst": 1u64 << 40, "len": 4096, "chunk": 4096, "pacing_us": 0});
        }),
        |e| matches!(e, E::Invalid { source: V::OutsideRam { .. }, .. }),
    ));
    cases.push((
        edited(dir, "disk.json", "ring.json", |b| {
            b["vm"]["devices"]["block"]["transport"]["queues"][0]["desc_table"] = json!(u64::MAX - 8)
        }),
        |e| matches!(e, E::Invalid { source: V::OutsideRam { .. }, .. }),
    ));
    // File names outside the snapshot's directory, special files, wrong sizes.
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link.raw")).unwrap();
    mkfifo(&dir.join("fifo.raw"));
    std::fs::write(dir.join("small.raw"), b"tiny").unwrap();
    for (name, file) in [("abs.json", "/etc/passwd"), ("dotdot.json", "../base.json"), ("symlink.json", "link.raw")] {
        cases.push((edited(dir, "base.json", name, |b| b["regions"][0]["file"] = json!(file)), |e| {
            matches!(e, E::Escapes { .. })
        }));
    }
    cases.push((edited(dir, "disk.json", "disk-abs.json", |b| b["disk"]["file"] = json!("/etc/passwd")), |e| {
        matches!(e, E::Escapes { .. })
    }));
    cases.push((edited(dir, "base.json", "fifo.json", |b| b["regions"][0]["file"] = json!("fifo.raw")), |e| {
        matches!(e, E::NotRegular { kind: "FIFO", .. })
    }));
    cases.push((edited(dir, "base.json", "dir.json", |b| b["regions"][0]["file"] = json!(".")), |e| {
        matches!(e, E::Escapes { .. } | E::NotRegular { kind: "directory", .. })
    }));
    cases.push((edited(dir, "base.json", "size.json", |b| b["regions"][0]["file"] = json!("small.raw")), |e| {
        matches!(e, E::RamFileSize { .. })
    }));
    // A state file that is a FIFO, a device, huge (sparse), or from another CPU.
    mkfifo(&dir.join("state-fifo.json"));
    cases.push((dir.join("state-fifo.json"), |e| matches!(e, E::NotRegular { kind: "FIFO", .. })));
    cases.push((PathBuf::from("/dev/zero"), |e| matches!(e, E::NotRegular { kind: "character device", .. })));
    std::fs::File::create(dir.join("sparse.json")).unwrap().set_len(2 << 30).unwrap();
    cases.push((dir.join("sparse.json"), |e| matches!(e, E::Format { source: FormatError::TooLarge { .. }, .. })));
    let foreign = dir.join("foreign.json");
    std::fs::copy(dir.join("base.json"), &foreign).unwrap();
    rewrite_header(&foreign, |h| h["host_cpu"]["vendor"] = json!("NotThisCPU!!"));
    cases.push((foreign, |e| matches!(e, E::Host { .. })));
    cases
}

/// Whether `message` names the state file `path` or the RAM file at fault.
fn names_the_file(message: &str, path: &Path) -> bool {
    message.contains(path.file_name().unwrap().to_string_lossy().as_ref()) || message.contains(".raw")
}

#[test]
fn every_crafted_snapshot_is_one_clear_error() {
    let dir = scratch_dir("snapshot-untrusted");
    snapshots(&dir);
    for (path, expected) in crafted(&dir) {
        let err = load_snapshot(&path).unwrap_err();
        assert!(expected(&err), "{}: {err:?}", path.display());
        assert!(names_the_file(&err.to_string(), &path), "names the file: {err}");
    }
    for name in ["base.json", "diff.json", "disk.json"] {
        assert!(load_snapshot(&dir.join(name)).is_ok(), "{name} itself loads");
    }
}

#[test]
fn truncations_and_bit_flips_are_errors() {
    let dir = scratch_dir("snapshot-matrix");
    snapshots(&dir);
    for name in ["base.json", "diff.json", "disk.json"] {
        let path = dir.join(name);
        let good = std::fs::read(&path).unwrap();
        let probe = dir.join(format!("probe-{name}"));
        let step = (good.len() / 97).max(1);
        for len in (0..good.len()).step_by(step).chain([good.len() - 1]) {
            std::fs::write(&probe, &good[..len]).unwrap();
            assert!(load_snapshot(&probe).is_err(), "{name} truncated to {len}");
        }
        for (i, byte) in (0..good.len()).step_by(step / 2 + 1).map(|i| (i, i % 8)) {
            let mut flipped = good.clone();
            flipped[i] ^= 1 << byte;
            std::fs::write(&probe, &flipped).unwrap();
            assert!(load_snapshot(&probe).is_err(), "{name} byte {i} bit {byte} flipped");
        }
        // A diff's parent name resolves against the probe's directory: the same one.
        std::fs::write(&probe, &good).unwrap();
        assert!(load_snapshot(&probe).is_ok(), "{name} copied loads");
    }
    // Semantic edits of every listed field, checksum recomputed, are the other test's.
    let (header, body) = read_state(&dir.join("base.json"));
    std::fs::write(dir.join("resealed.json"), state_bytes(header, &body)).unwrap();
    assert!(load_snapshot(&dir.join("resealed.json")).is_ok(), "resealing alone changes nothing");
}

/// Runs `zygote run --restore path`; its exit code (killed after 60 s: a hang fails).
fn restore_exit_code(path: &Path) -> (i32, String) {
    let mut child = Command::new(zygote_bin())
        .arg("run")
        .arg("--restore")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("zygote run --restore {} hangs", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_cli_exits_2_and_the_api_answers_400_and_keeps_serving() {
    let dir = scratch_dir("snapshot-untrusted-served");
    snapshots(&dir);
    let api = SpinServer::start(dir.clone());
    for (path, _) in crafted(&dir) {
        let body = json!({ "snapshot_path": path }).to_string();
        let answer = call(&api.socket, "PUT", "/snapshot/load", Some(&body)).unwrap();
        assert_eq!(answer.status, 400, "{}: {answer:?}", path.display());
        let vms: Value = serde_json::from_str(&call(&api.socket, "GET", "/vms", None).unwrap().body).unwrap();
        assert_eq!(vms.as_array().unwrap().len(), 1, "after {}: {vms}", path.display());
        assert_eq!(vms[0]["state"], "Running", "after {}: {vms}", path.display());
    }
    assert!(api.child.id() > 0);
    drop(api);
    for name in [
        "self.json",
        "chain0.json",
        "sectors.json",
        "vcpus0.json",
        "vcpus300.json",
        "state-fifo.json",
        "sparse.json",
        "fifo.json",
        "foreign.json",
    ] {
        let (code, stderr) = restore_exit_code(&dir.join(name));
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(names_the_file(&stderr, &dir.join(name)), "{name}: {stderr}");
    }
    let (code, stderr) = restore_exit_code(Path::new("/dev/zero"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

#[test]
fn a_diff_is_never_written_over_a_snapshot_it_depends_on() {
    let dir = scratch_dir("snapshot-over-parent");
    let (base, diff) = snapshots(&dir);
    let mut vm = spin_vm(1, 0);
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    drop((token, vm.stop()));
    let before = std::fs::read_dir(&dir).unwrap().count();
    for over in ["base.json", "diff.json"] {
        let err = write_snapshot(&snap, &dir.join(over), &dir, SnapshotKind::Diff, Some(&diff)).unwrap_err();
        assert!(matches!(err, SnapshotError::OverItsParent { .. }), "{err:?}");
    }
    let err = write_snapshot(&snap, &dir.join("base.json"), &dir, SnapshotKind::Diff, Some(&base)).unwrap_err();
    assert!(matches!(err, SnapshotError::OverItsParent { .. }), "{err:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), before, "a refused create leaves nothing");
    assert!(load_snapshot(&dir.join("diff.json")).is_ok());
}

#[test]
fn the_api_refuses_a_diff_over_its_own_path_and_the_full_one_survives() {
    let dir = scratch_dir("snapshot-over-parent-api");
    let api = SpinServer::start(dir.clone());
    let path = dir.join("s.json");
    let full = json!({ "snapshot_path": path }).to_string();
    assert!(call(&api.socket, "PUT", "/snapshot/create", Some(&full)).unwrap().is_success());
    let diff = json!({ "snapshot_path": path, "snapshot_type": "Diff" }).to_string();
    let answer = call(&api.socket, "PUT", "/snapshot/create", Some(&diff)).unwrap();
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("depends on"), "{answer:?}");
    let load = json!({ "snapshot_path": path }).to_string();
    let answer = call(&api.socket, "PUT", "/snapshot/load", Some(&load)).unwrap();
    assert!(answer.is_success(), "the full snapshot is still whole: {answer:?}");
}

/// `.raw` files in `dir`.
fn raw_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".raw") || n.contains(".tmp-"))
        .collect();
    names.sort();
    names
}

#[test]
fn writes_follow_no_planted_link_clean_up_after_failing_and_replace_old_files() {
    let dir = scratch_dir("snapshot-writes");
    let mut vm = spin_vm(1, 0);
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    drop((token, vm.stop()));
    // A link planted where the old writer put its temporary file.
    let victim = dir.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let planted = dir.join(format!(".s.json.tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    write_snapshot(&snap, &dir.join("s.json"), &dir, SnapshotKind::Full, None).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    std::fs::remove_file(&planted).unwrap();
    let first = raw_files(&dir);
    assert_eq!(first.len(), 1, "{first:?}");
    // Written again: the old RAM file goes.
    write_snapshot(&snap, &dir.join("s.json"), &dir, SnapshotKind::Full, None).unwrap();
    let second = raw_files(&dir);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second);
    assert!(load_snapshot(&dir.join("s.json")).is_ok());
    // A directory that does not exist yet is made (as the API always did).
    write_snapshot(&snap, &dir.join("new/s.json"), &dir.join("new"), SnapshotKind::Full, None).unwrap();
    assert!(load_snapshot(&dir.join("new/s.json")).is_ok());
    // A create that fails at its last step (the state path is a directory) leaves nothing.
    std::fs::create_dir(dir.join("d.json")).unwrap();
    assert!(write_snapshot(&snap, &dir.join("d.json"), &dir, SnapshotKind::Full, None).is_err());
    assert_eq!(raw_files(&dir), second, "no RAM file or temporary file left behind");
    // RAM files outside the state file's directory could not be loaded from it: refused.
    let outside = scratch_dir("snapshot-writes-outside");
    let err = write_snapshot(&snap, &dir.join("o.json"), &outside, SnapshotKind::Full, None).unwrap_err();
    assert!(matches!(err, SnapshotError::OutsideDir { what: "mem_dir", .. }), "{err:?}");
    assert!(raw_files(&outside).is_empty());
}
