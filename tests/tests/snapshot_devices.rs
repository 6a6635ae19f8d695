//! Snapshot files carry the MMIO devices and the disk. The `dma` guest, snapshotted to a file
//! mid-DMA-transfer with its virtio-blk read in flight and restored after its original disk
//! file was overwritten, ends with the full DMA data and the disk's bytes as of the snapshot.
//! A VM's disk writes before a snapshot are in it and later ones are not (full and diff).
//! Missing, truncated and corrupted disk files, and saved devices that do not match, are
//! refused with an error naming the file (HTTP 400 through the API), no VM created.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::api::Controller;
use vmm::clone::clone_vm;
use vmm::layout::{DMA_GUEST_BLK_LEN, DMA_GUEST_DMA_LEN, DMA_GUEST_PATTERN};
use vmm::snapshot::file::{load_snapshot, write_snapshot, SnapshotError, SnapshotKind};
use vmm::snapshot::validate::ValidateError;
use vmm::snapshot::VmSnapshot;
use vmm::{build_tiny_vm, guests, Console, VmConfig, VmOutcome, Vmm};
use zygote_tests::blk_driver::{blk_in_flight, dma_busy, hold_blk_submissions, hold_dma, step_dma, BlkDriver};
use zygote_tests::snapshot_file::{body_of, rewrite_body};
use zygote_tests::{scratch_dir, spin_vm_with_disk, text};

/// µs between the dma guest's 4 KiB chunks: its 1 MiB transfer takes about half a second.
const PACING_US: u64 = 2000;
const DISK_BYTES: usize = 256 << 10;

fn disk_byte(offset: usize) -> u8 {
    (offset / 512 * 7 + offset % 241) as u8
}

fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// What the dma guest prints when it got the whole pattern and read `disk`'s first bytes.
fn dma_guest_output(disk: &[u8]) -> String {
    let pattern = DMA_GUEST_PATTERN.to_le_bytes();
    let dma = fnv1a64((0..DMA_GUEST_DMA_LEN as usize).map(|i| pattern[i % 8]));
    let blk = fnv1a64(disk[..DMA_GUEST_BLK_LEN as usize].iter().copied());
    format!("DMA done {dma:016x}\nBLK done {blk:016x}\n")
}

fn dma_vm(disk: &Path) -> (Vmm, Arc<Mutex<Vec<u8>>>) {
    let (console, out) = Console::capture();
    let config = VmConfig { mem_mib: 32, console, disk: Some(disk.to_path_buf()), ..VmConfig::default() };
    (build_tiny_vm(&config, guests::find("dma").unwrap(), PACING_US).unwrap(), out)
}

/// Runs `vm` to its end (30 s at most); returns whether it exited 0.
fn finishes(mut vm: Vmm) -> bool {
    vm.start();
    vm.wait_timeout(Duration::from_secs(30)) && matches!(vm.stop(), VmOutcome::Exited(0))
}

fn disk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("-disk-"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_snapshot_file_taken_mid_dma_and_mid_read_restores_both_with_the_saved_disk() {
    let dir = scratch_dir("snapshot-devices-dma");
    let disk = dir.join("disk.img");
    let initial: Vec<u8> = (0..DISK_BYTES).map(disk_byte).collect();
    std::fs::write(&disk, &initial).unwrap();
    let (mut vm, out) = dma_vm(&disk);
    // The guest's read would finish within milliseconds: hold it in flight (the guest's
    // device reset at bring-up hands held requests over but leaves the hold on). Its transfer
    // moves only when the test steps it: one chunk.
    hold_blk_submissions(&vm, true);
    hold_dma(&vm, true);
    vm.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    while blk_in_flight(&vm) == 0 || !dma_busy(&vm) {
        assert!(Instant::now() < deadline, "the guest never had its read and its transfer in flight");
        std::thread::sleep(Duration::from_millis(1));
    }
    step_dma(&vm, 1);
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    let state = dir.join("mid-dma.json");
    write_snapshot(&snap, &state, &dir, SnapshotKind::Full, None).unwrap();
    let dma = snap.state.devices.dma.as_ref().expect("DMA state in the snapshot");
    assert!(dma.in_flight.is_some() && dma.progress > 0, "DMA not mid-transfer: {dma:?}");
    assert_eq!(
        snap.state.devices.block.as_ref().expect("virtio-blk state").device.in_flight.len(),
        1,
        "the read is in flight"
    );
    drop(snap);
    vm.resume(token);
    hold_blk_submissions(&vm, false);
    hold_dma(&vm, false);
    assert!(finishes(vm), "the snapshotted VM goes on to the end");
    assert_eq!(text(&out), dma_guest_output(&initial), "the snapshotted VM");

    // The original disk changes afterwards: the snapshot must carry its own bytes.
    std::fs::write(&disk, vec![0x5a; DISK_BYTES]).unwrap();
    let saved = disk_files(&dir);
    assert_eq!(saved.len(), 1, "one disk file beside the RAM file: {saved:?}");
    let saved_bytes = std::fs::read(&saved[0]).unwrap();
    assert!(saved_bytes == initial, "the disk file holds the disk as of the snapshot");
    let loaded = load_snapshot(&state).unwrap();
    for id in [7, 8] {
        let (console, out) = Console::capture();
        let restored = loaded.snapshot.restore(id, &console).unwrap();
        // The snapshot keeps the test's hold on the engine: this VM runs its transfer freely.
        hold_dma(&restored, false);
        assert!(finishes(restored), "restored VM {id} did not finish: {}", text(&out));
        assert_eq!(text(&out), dma_guest_output(&initial), "restored VM {id} re-ran its transfer and its read");
    }
    assert!(std::fs::read(&saved[0]).unwrap() == saved_bytes, "restored VMs never write the saved disk file");
    let _ = std::fs::remove_dir_all(&dir);
}

fn sector_bytes(sector: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((sector * 512 + i) / 512 * 13 + i % 251) as u8).collect()
}

#[test]
fn disk_writes_before_a_snapshot_are_in_its_file_and_later_ones_are_not() {
    let dir = scratch_dir("snapshot-devices-writes");
    let disk = dir.join("disk.img");
    let initial: Vec<u8> = (0..512u64).flat_map(|s| sector_bytes(s, 512)).collect();
    std::fs::write(&disk, &initial).unwrap();
    let mut vm = spin_vm_with_disk(1, &disk);
    vm.start();
    let mut driver = BlkDriver::setup(&vm);
    driver.write(&vm, 10, &[b'A'; 1024]);
    // A clone puts the VM on an overlay over the frozen file: the snapshot must save both.
    let (clone, _) = clone_vm(&mut vm, 2, &Console::capture().0, None).unwrap();
    drop(clone.stop());
    driver.write(&vm, 20, &[b'B'; 512]);
    let token = vm.pause().unwrap();
    let full =
        write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &dir.join("full.json"), &dir, SnapshotKind::Full, None)
            .unwrap();
    vm.resume(token);
    let at_full = driver;
    driver.write(&vm, 10, &[b'C'; 512]);
    driver.write(&vm, 21, &[b'C'; 512]);
    let token = vm.pause().unwrap();
    let diff = VmSnapshot::take(&vm, &token).unwrap();
    write_snapshot(&diff, &dir.join("diff.json"), &dir, SnapshotKind::Diff, Some(&full)).unwrap();
    vm.resume(token);
    // The diff's disk file holds only the sectors written since the full one (and those the
    // full one held privately), sparse elsewhere.
    let diff_disk = &body_of(&dir.join("diff.json"))["disk"];
    let runs: Vec<(u64, u64)> = diff_disk["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!((runs, &diff_disk["diff"]), (vec![(10, 1), (20, 2)], &serde_json::json!(true)), "{diff_disk}");
    let allocated =
        |file: &serde_json::Value| std::fs::metadata(dir.join(file.as_str().unwrap())).unwrap().blocks() * 512;
    assert!(
        allocated(&diff_disk["file"]) <= 16 << 10,
        "diff disk file allocates {} bytes",
        allocated(&diff_disk["file"])
    );
    assert!(allocated(&body_of(&dir.join("full.json"))["disk"]["file"]) >= 256 << 10, "the full one holds the disk");
    let at_diff = driver;
    driver.write(&vm, 10, &[b'D'; 2048]);
    assert_eq!(driver.read(&vm, 10, 512), vec![b'D'; 512]);

    let restored = |name: &str, id: u64| {
        let mut vm = load_snapshot(&dir.join(name)).unwrap().snapshot.restore(id, &Console::capture().0).unwrap();
        vm.start();
        vm
    };
    let (vm_full, mut d) = (restored("full.json", 3), at_full);
    assert_eq!(d.read(&vm_full, 10, 1024), vec![b'A'; 1024], "written before the full snapshot");
    assert_eq!(
        d.read(&vm_full, 20, 1024),
        [vec![b'B'; 512], sector_bytes(21, 512)].concat(),
        "overlay sectors and the base"
    );
    let (vm_diff, mut d) = (restored("diff.json", 4), at_diff);
    assert_eq!(d.read(&vm_diff, 10, 1024), [vec![b'C'; 512], vec![b'A'; 512]].concat(), "written before the diff");
    assert_eq!(d.read(&vm_diff, 20, 1536), [vec![b'B'; 512], vec![b'C'; 512], sector_bytes(22, 512)].concat());
    let frozen_file = [&initial[..10 * 512], &[b'A'; 1024], &initial[12 * 512..]].concat();
    assert!(std::fs::read(&disk).unwrap() == frozen_file, "the file holds the writes before the clone froze it");
    drop((vm_full.stop(), vm_diff.stop(), vm.stop()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_disk_files_and_mismatched_devices_are_refused() {
    let dir = scratch_dir("snapshot-devices-refused");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![7u8; 64 << 10]).unwrap();
    let mut vm = spin_vm_with_disk(1, &disk);
    vm.start();
    BlkDriver::setup(&vm);
    let token = vm.pause().unwrap();
    let path = dir.join("s.json");
    write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &path, &dir, SnapshotKind::Full, None).unwrap();
    vm.resume(token);
    let good_state = std::fs::read(&path).unwrap();
    let disk_file = disk_files(&dir).pop().expect("a disk file");
    let good_disk = std::fs::read(&disk_file).unwrap();
    assert!(load_snapshot(&path).is_ok());

    let refused = || {
        let err = load_snapshot(&path).unwrap_err();
        let mut controller = Controller::new(spin_vm_with_disk(50, &disk), None);
        let api = controller.snapshot_load(&path, false).unwrap_err();
        assert_eq!(api.status(), 400, "{api}");
        assert_eq!(controller.list().len(), 1, "no VM was added");
        err
    };
    let mut corrupted = good_disk.clone();
    corrupted[4096] ^= 1;
    std::fs::write(&disk_file, &corrupted).unwrap();
    let err = refused();
    assert!(matches!(&err, SnapshotError::Corrupted { path, .. } if path == &disk_file), "{err:?}");
    std::fs::write(&disk_file, &good_disk[..good_disk.len() - 512]).unwrap();
    let err = refused();
    assert!(
        matches!(&err, SnapshotError::DiskFileSize { expected, actual, .. } if *expected == *actual + 512),
        "{err:?}"
    );
    std::fs::remove_file(&disk_file).unwrap();
    let err = refused();
    assert!(matches!(&err, SnapshotError::Io { path, .. } if path == &disk_file), "{err:?}");
    std::fs::write(&disk_file, &good_disk).unwrap();
    assert!(load_snapshot(&path).is_ok());

    // Saved virtio-blk state without its disk file.
    rewrite_body(&path, |body| body["disk"] = serde_json::Value::Null);
    let err = refused();
    assert!(matches!(&err, SnapshotError::DeviceMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("s.json"), "{err}");
    // A full snapshot whose disk file claims to be a diff.
    std::fs::write(&path, &good_state).unwrap();
    rewrite_body(&path, |body| body["disk"]["diff"] = serde_json::json!(true));
    let err = refused();
    assert!(matches!(&err, SnapshotError::Invalid { source: ValidateError::DiskDiff, .. }), "{err:?}");
    // A request in flight past the disk's end.
    std::fs::write(&path, &good_state).unwrap();
    rewrite_body(&path, |body| {
        body["vm"]["devices"]["block"]["device"]["in_flight"] = serde_json::json!([{
            "head": 0, "kind": "In", "sector": 1u64 << 40, "data": [{"addr": 0x50_0000, "len": 512}], "status": 0x50_1000
        }]);
    });
    let err = refused();
    let past_end = |e: &SnapshotError| matches!(e, SnapshotError::Invalid { source: ValidateError::Block { reason }, .. } if reason.contains("past the disk end"));
    assert!(past_end(&err), "{err:?}");
    drop(vm.stop());
    let _ = std::fs::remove_dir_all(&dir);
}
