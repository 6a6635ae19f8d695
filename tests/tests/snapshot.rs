//! Snapshot to files and restore: a deterministic guest snapshotted mid-run (full, then diff)
//! and restored prints exactly what an uninterrupted run prints; bad snapshots are refused.

use std::time::Duration;

use vmm::snapshot::file::{load_snapshot, write_snapshot, SnapshotError, SnapshotKind, FORMAT_VERSION};
use vmm::snapshot::format::FormatError;
use vmm::snapshot::VmSnapshot;
use vmm::{build_tiny_vm, guests, VmOutcome};
use zygote_tests::{captured, scratch_dir, text, wait_for_lines};

const LINES: u64 = 12;

fn sequence_vm() -> (vmm::Vmm, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (config, out) = captured(1);
    (build_tiny_vm(&config, guests::find("sequence").unwrap(), LINES).unwrap(), out)
}

fn uninterrupted() -> String {
    let (vm, out) = sequence_vm();
    assert!(matches!(vm.run(), VmOutcome::Exited(0)));
    text(&out)
}

/// Restores the snapshot at `path` into a new VM and runs it to the end; returns its output.
fn finish_from(path: &std::path::Path) -> String {
    let loaded = load_snapshot(path).unwrap();
    let (console, out) = vmm::Console::capture();
    let mut vm = loaded.snapshot.restore(9, &console).unwrap();
    vm.start();
    assert!(vm.wait_timeout(Duration::from_secs(30)), "restored VM did not finish");
    assert!(matches!(vm.stop(), VmOutcome::Exited(0)));
    text(&out)
}

#[test]
fn full_and_diff_snapshots_restore_to_the_same_output() {
    let expected = uninterrupted();
    assert_eq!(expected.lines().count(), LINES as usize);
    let dir = scratch_dir("snapshot-roundtrip");
    let (mut vm, out) = sequence_vm();
    vm.start();
    assert!(wait_for_lines(&out, 3));
    let token = vm.pause().unwrap();
    let before_full = text(&out);
    let full =
        write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &dir.join("full.json"), &dir, SnapshotKind::Full, None)
            .unwrap();
    vm.resume(token);
    assert!(wait_for_lines(&out, 7));
    let token = vm.pause().unwrap();
    let before_diff = text(&out);
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    write_snapshot(&snap, &dir.join("diff.json"), &dir, SnapshotKind::Diff, Some(&full)).unwrap();
    vm.resume(token);
    assert!(vm.wait_timeout(Duration::from_secs(30)));
    assert_eq!(text(&out), expected, "the snapshotted VM itself goes on unchanged");

    assert_eq!(before_full.clone() + &finish_from(&dir.join("full.json")), expected);
    assert_eq!(before_diff + &finish_from(&dir.join("diff.json")), expected);
    // A diff file holds only pages changed since the full one: far smaller on disk.
    let disk = |name: &str| -> u64 {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name().to_string_lossy().starts_with(name) && e.file_name().to_string_lossy().ends_with(".raw")
            })
            .map(|e| std::os::unix::fs::MetadataExt::blocks(&e.metadata().unwrap()) * 512)
            .sum()
    };
    assert!(disk("diff.json") * 4 < disk("full.json"), "diff {} vs full {}", disk("diff.json"), disk("full.json"));
}

#[test]
fn truncated_corrupted_and_wrong_version_snapshots_are_refused() {
    let dir = scratch_dir("snapshot-refused");
    let (mut vm, _) = sequence_vm();
    let token = vm.pause().unwrap();
    let path = dir.join("s.json");
    write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &path, &dir, SnapshotKind::Full, None).unwrap();
    let good = std::fs::read(&path).unwrap();
    assert!(load_snapshot(&path).is_ok());

    let refused = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        let err = load_snapshot(&path).unwrap_err();
        assert!(err.to_string().contains("s.json"), "error names the file: {err}");
        err
    };
    assert!(matches!(
        refused(&good[..good.len() - 10]),
        SnapshotError::Format { source: FormatError::Truncated { .. }, .. }
    ));
    let mut flipped = good.clone();
    let last = flipped.len() - 20;
    flipped[last] ^= 0x01;
    assert!(matches!(refused(&flipped), SnapshotError::Format { source: FormatError::Corrupted { .. }, .. }));
    let text = String::from_utf8(good.clone()).unwrap();
    let v2 = text.replacen(&format!("\"format_version\":{FORMAT_VERSION}"), "\"format_version\":2", 1);
    assert!(matches!(
        refused(v2.as_bytes()),
        SnapshotError::Format { source: FormatError::Version { found: 2, .. }, .. }
    ));
    assert!(matches!(refused(b"hello\n"), SnapshotError::Format { source: FormatError::NotASnapshot, .. }));

    // A truncated or corrupted RAM file.
    std::fs::write(&path, &good).unwrap();
    let ram = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "raw"))
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&ram).unwrap();
    let len = f.metadata().unwrap().len();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", 0x10_0000).unwrap();
    assert!(matches!(load_snapshot(&path).unwrap_err(), SnapshotError::RamFile { .. }));
    f.set_len(len / 2).unwrap();
    assert!(matches!(load_snapshot(&path).unwrap_err(), SnapshotError::RamFileSize { .. }));
    // A diff needs a parent.
    assert!(matches!(
        write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &path, &dir, SnapshotKind::Diff, None),
        Err(SnapshotError::NoParent)
    ));
    let _paused = token;
}

#[test]
fn a_snapshot_of_another_shape_is_refused_for_reset() {
    let dir = scratch_dir("snapshot-shape");
    let (mut vm, _) = sequence_vm();
    let token = vm.pause().unwrap();
    let path = dir.join("s.json");
    write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &path, &dir, SnapshotKind::Full, None).unwrap();
    let (config, _) = captured(1);
    let config = vmm::VmConfig { mem_mib: 64, ..config };
    let mut other = build_tiny_vm(&config, guests::find("sequence").unwrap(), LINES).unwrap();
    let other_token = other.pause().unwrap();
    let err = load_snapshot(&path).unwrap().snapshot.reset(&mut other, &other_token, None).unwrap_err();
    assert!(err.to_string().contains("VM 0"), "{err}");
    assert!(format!("{:?}", err).contains("RamShape"), "{err:?}");
    let _paused = (token, other_token);
}

#[test]
fn diffs_go_on_after_the_memory_layer_flattens_its_stack() {
    use memory::{Bytes, GuestAddress, PAGE_SIZE};
    let dir = scratch_dir("snapshot-flatten");
    let mut vm = zygote_tests::spin_vm(1, 0);
    let token = vm.pause().unwrap();
    let mut parent =
        write_snapshot(&VmSnapshot::take(&vm, &token).unwrap(), &dir.join("full.json"), &dir, SnapshotKind::Full, None)
            .unwrap();
    // 50 scattered pages a round: more runs than the memory layer stacks (512) by round 11.
    let offsets: Vec<u64> = (0..50u64).map(|i| vmm::layout::TOUCH_ADDR + i * 8 * PAGE_SIZE as u64).collect();
    for round in 0..14u8 {
        for &offset in &offsets {
            vm.ram().write_slice(&[round + 1; PAGE_SIZE], GuestAddress(offset)).unwrap();
        }
        let snap = VmSnapshot::take(&vm, &token).unwrap();
        parent = write_snapshot(&snap, &dir.join(format!("d{round}.json")), &dir, SnapshotKind::Diff, Some(&parent))
            .unwrap();
    }
    let loaded = load_snapshot(&parent.state_path).unwrap();
    for &offset in &offsets {
        let mut page = vec![0u8; PAGE_SIZE];
        loaded.snapshot.ram.read_slice(&mut page, GuestAddress(offset)).unwrap();
        assert!(page.iter().all(|&b| b == 14), "page at {offset:#x}");
    }
    drop((token, vm.stop()));
}
