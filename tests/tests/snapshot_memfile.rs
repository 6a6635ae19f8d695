//! Firecracker's single memory file (issue 14): a snapshot created with `mem_file_path` holds
//! all guest RAM in one sparse file (regions one after the other), a diff only the changed
//! pages at their offsets; it loads with the file named explicitly (`mem_backend`) and, when
//! the file is in the snapshot's directory, through the state file alone (`--restore`).

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use memory::{Bytes, GuestAddress, PAGE_SIZE};
use vmm::snapshot::file::{
    load_snapshot, load_snapshot_with, write_snapshot_to, LoadOptions, MemTarget, SnapshotError, SnapshotKind,
};
use vmm::snapshot::VmSnapshot;
use vmm::{build_tiny_vm, guests, VmConfig, VmOutcome};
use zygote_tests::snapshot_file::body_of;
use zygote_tests::{captured, run_zygote, scratch_dir, text, wait_for_lines};

fn page_at(snap: &VmSnapshot, addr: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    snap.ram.read_slice(&mut page, GuestAddress(addr)).unwrap();
    page
}

#[test]
fn a_full_and_a_diff_in_single_memory_files_restore_the_run() {
    let dir = scratch_dir("snapshot-memfile");
    let (config, out) = captured(1);
    let mut vm = build_tiny_vm(&config, guests::find("sequence").unwrap(), 12).unwrap();
    let expected = {
        let (config, out) = captured(1);
        let vm = build_tiny_vm(&config, guests::find("sequence").unwrap(), 12).unwrap();
        assert!(matches!(vm.run(), VmOutcome::Exited(0)));
        text(&out)
    };
    vm.start();
    assert!(wait_for_lines(&out, 3));
    let token = vm.pause().unwrap();
    let before_full = text(&out);
    let mem = dir.join("mem");
    let full = write_snapshot_to(
        &VmSnapshot::take(&vm, &token).unwrap(),
        &dir.join("snap"),
        MemTarget::File(&mem),
        SnapshotKind::Full,
        None,
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), config.mem_mib << 20, "one file holds all of RAM");
    assert!(std::fs::metadata(&mem).unwrap().blocks() * 512 < 8 << 20, "sparse: only pages with data");
    vm.resume(token);
    assert!(wait_for_lines(&out, 7));
    let token = vm.pause().unwrap();
    let before_diff = text(&out);
    let diff_mem = dir.join("diff-mem");
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    write_snapshot_to(&snap, &dir.join("diff"), MemTarget::File(&diff_mem), SnapshotKind::Diff, Some(&full)).unwrap();
    // A diff over its parent's memory file would destroy the parent.
    let err = write_snapshot_to(&snap, &dir.join("diff2"), MemTarget::File(&mem), SnapshotKind::Diff, Some(&full))
        .unwrap_err();
    assert!(matches!(err, SnapshotError::OverItsParent { .. }), "{err:?}");
    vm.resume(token);
    assert!(vm.wait_timeout(Duration::from_secs(30)));
    let diff_bytes = std::fs::metadata(&diff_mem).unwrap().blocks() * 512;
    assert!(diff_bytes <= 64 << 10, "the diff file holds only changed pages: {diff_bytes} bytes");

    let finish = |loaded: vmm::snapshot::SnapshotOnDisk| {
        let (console, out) = vmm::Console::capture();
        let mut vm = loaded.snapshot.restore(9, &console).unwrap();
        vm.start();
        assert!(vm.wait_timeout(Duration::from_secs(30)));
        assert!(matches!(vm.stop(), VmOutcome::Exited(0)));
        text(&out)
    };
    // By the state file alone (the memory file is in its directory) and with it named.
    assert_eq!(before_full.clone() + &finish(load_snapshot(&dir.join("snap")).unwrap()), expected);
    let named = LoadOptions { mem_file: Some(mem.clone()), ..LoadOptions::default() };
    assert_eq!(before_full + &finish(load_snapshot_with(&dir.join("snap"), &named).unwrap()), expected);
    let named = LoadOptions { mem_file: Some(diff_mem.clone()), ..LoadOptions::default() };
    assert_eq!(before_diff.clone() + &finish(load_snapshot_with(&dir.join("diff"), &named).unwrap()), expected);
    assert_eq!(before_diff + &finish(load_snapshot(&dir.join("diff")).unwrap()), expected);
    // The wrong file named explicitly is refused by its checksums.
    let wrong = LoadOptions { mem_file: Some(diff_mem), ..LoadOptions::default() };
    assert!(load_snapshot_with(&dir.join("snap"), &wrong).is_err());
    // `zygote run --restore` of the state file.
    let run = run_zygote(&["run", "--restore", dir.join("snap").to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_memory_file_outside_the_directory_loads_only_when_named() {
    let dir = scratch_dir("snapshot-memfile-outside");
    let elsewhere = scratch_dir("snapshot-memfile-elsewhere");
    let mut vm = zygote_tests::spin_vm(1, 0);
    let token = vm.pause().unwrap();
    let mem = elsewhere.join("mem.bin");
    write_snapshot_to(
        &VmSnapshot::take(&vm, &token).unwrap(),
        &dir.join("s.json"),
        MemTarget::File(&mem),
        SnapshotKind::Full,
        None,
    )
    .unwrap();
    drop((token, vm.stop()));
    let err = load_snapshot(&dir.join("s.json")).unwrap_err();
    assert!(matches!(err, SnapshotError::Escapes { .. }), "a path read from the file is not followed out: {err:?}");
    assert!(load_snapshot_with(
        &dir.join("s.json"),
        &LoadOptions { mem_file: Some(mem.clone()), ..LoadOptions::default() }
    )
    .is_ok());
    // Written again: the file is replaced whole, through a temporary file beside it.
    let mut vm = zygote_tests::spin_vm(1, 0);
    let token = vm.pause().unwrap();
    write_snapshot_to(
        &VmSnapshot::take(&vm, &token).unwrap(),
        &dir.join("s.json"),
        MemTarget::File(&mem),
        SnapshotKind::Full,
        None,
    )
    .unwrap();
    drop((token, vm.stop()));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1, "no temporary file left");
    assert!(
        load_snapshot_with(&dir.join("s.json"), &LoadOptions { mem_file: Some(mem), ..LoadOptions::default() }).is_ok()
    );
}

#[test]
fn a_diff_chain_with_memory_files_outside_its_directory_loads_where_it_was_written() {
    let dir = scratch_dir("snapshot-memfile-chain");
    let elsewhere = scratch_dir("snapshot-memfile-chain-mem");
    let mut vm = zygote_tests::spin_vm(1, 0);
    let token = vm.pause().unwrap();
    let (full_mem, diff_mem) = (elsewhere.join("full.mem"), elsewhere.join("diff.mem"));
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    let full =
        write_snapshot_to(&snap, &dir.join("full"), MemTarget::File(&full_mem), SnapshotKind::Full, None).unwrap();
    vm.ram().write_slice(&[0x5au8; PAGE_SIZE], GuestAddress(0x40_0000)).unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    let diff = write_snapshot_to(&snap, &dir.join("diff"), MemTarget::File(&diff_mem), SnapshotKind::Diff, Some(&full))
        .unwrap();
    drop((token, vm.stop()));
    // The diff's own file is named by the user; its parent's file, outside the directory, is
    // a path read from the state file: followed only when this process wrote that file.
    let named = LoadOptions { mem_file: Some(diff_mem.clone()), ..LoadOptions::default() };
    let err = load_snapshot_with(&dir.join("diff"), &named).unwrap_err();
    assert!(matches!(err, SnapshotError::Escapes { .. }), "{err:?}");
    let written_here = LoadOptions { mem_file: Some(diff_mem), written_here: diff.chain.clone() };
    let loaded = load_snapshot_with(&dir.join("diff"), &written_here).unwrap();
    assert!(page_at(&loaded.snapshot, 0x40_0000).iter().all(|&b| b == 0x5a));
    // A list of other files does not open the parent's.
    let others = LoadOptions { written_here: vec![dir.join("full")], ..named };
    assert!(matches!(load_snapshot_with(&dir.join("diff"), &others), Err(SnapshotError::Escapes { .. })));
}

#[test]
fn regions_sit_one_after_the_other_in_the_file() {
    let dir = scratch_dir("snapshot-memfile-regions");
    // 3.5 GiB: the RAM below the MMIO gap and a region above it (sparse: nothing allocated).
    let (config, _) = captured(1);
    let config = VmConfig { mem_mib: 3584, ..config };
    let mut vm = build_tiny_vm(&config, guests::find("spin").unwrap(), 0).unwrap();
    let token = vm.pause().unwrap();
    let layout: Vec<(u64, usize)> = vm.ram().layout().iter().map(|&(s, l)| (s.0, l)).collect();
    assert_eq!(layout.len(), 2, "{layout:?}");
    let high = layout[1].0 + 5 * PAGE_SIZE as u64;
    vm.ram().write_slice(&[0xabu8; PAGE_SIZE], GuestAddress(high)).unwrap();
    let mem = dir.join("mem");
    let full = write_snapshot_to(
        &VmSnapshot::take(&vm, &token).unwrap(),
        &dir.join("s"),
        MemTarget::File(&mem),
        SnapshotKind::Full,
        None,
    )
    .unwrap();
    // Firecracker's layout: the high region's page at (size of the low region + its offset).
    let mut page = vec![0u8; PAGE_SIZE];
    let at = layout[0].1 as u64 + 5 * PAGE_SIZE as u64;
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&mem).unwrap(), &mut page, at).unwrap();
    assert!(page.iter().all(|&b| b == 0xab));
    let body = body_of(&dir.join("s"));
    assert_eq!(body["regions"][1]["file_offset"], layout[0].1 as u64);
    vm.ram().write_slice(&[0xcdu8; PAGE_SIZE], GuestAddress(high)).unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    write_snapshot_to(&snap, &dir.join("d"), MemTarget::File(&dir.join("dmem")), SnapshotKind::Diff, Some(&full))
        .unwrap();
    drop((token, vm.stop()));
    assert!(page_at(&load_snapshot(&dir.join("s")).unwrap().snapshot, high).iter().all(|&b| b == 0xab));
    assert!(page_at(&load_snapshot(&dir.join("d")).unwrap().snapshot, high).iter().all(|&b| b == 0xcd));
    // A region moved onto another in the file is refused before anything is read.
    zygote_tests::snapshot_file::rewrite_body(&dir.join("s"), |b| {
        b["regions"][1]["file_offset"] = serde_json::json!(4096)
    });
    let err = load_snapshot(&dir.join("s")).unwrap_err();
    assert!(err.to_string().contains("invalid"), "{err}");
}
