//! Snapshot RAM files: full and diff round trips, files never written after the fact.

mod common;

use std::fs::File;

use memory::{Bytes, GuestAddress, GuestRam, MemoryError, Snapshot, PAGE_SIZE};

const MIB: usize = 1 << 20;

fn layout() -> Vec<(GuestAddress, usize)> {
    vec![(GuestAddress(0), MIB), (GuestAddress(0x40_0000), 2 * PAGE_SIZE)]
}

fn files(dir: &std::path::Path, stem: &str) -> Vec<File> {
    (0..2)
        .map(|i| {
            File::options().read(true).write(true).create(true).truncate(true).open(dir.join(format!("{stem}.{i}"))).unwrap()
        })
        .collect()
}

fn reopen(dir: &std::path::Path, stem: &str) -> Vec<File> {
    (0..2).map(|i| File::open(dir.join(format!("{stem}.{i}"))).unwrap()).collect()
}

fn read(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    ram.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("zygote-files-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn full_and_diff_files_restore_the_same_bytes() {
    let dir = tempdir();
    let ram = GuestRam::new(&layout()).unwrap();
    ram.write_slice(&[1; 3 * PAGE_SIZE], GuestAddress(0x2000)).unwrap();
    ram.write_slice(&[2; 16], GuestAddress(0x40_1000)).unwrap();
    let full = ram.snapshot().unwrap();
    for (i, f) in files(&dir, "full").iter().enumerate() {
        full.write_region(i, f).unwrap();
    }
    ram.write_slice(&[3; 8], GuestAddress(0x9000)).unwrap();
    let later = ram.snapshot().unwrap();
    let mut diffs = Vec::new();
    for (i, f) in files(&dir, "diff").iter().enumerate() {
        diffs.push(later.write_region_diff(&full, i, f).unwrap());
    }
    assert_eq!(diffs[0].iter().collect::<Vec<_>>(), vec![9], "a diff holds only what changed");
    assert!(diffs[1].is_empty());

    let parent = Snapshot::from_files(&layout(), reopen(&dir, "full")).unwrap();
    let restored = GuestRam::from_snapshot(&parent).unwrap();
    assert_eq!(read(&restored, 0x2000, 3 * PAGE_SIZE), vec![1; 3 * PAGE_SIZE]);
    assert_eq!(read(&restored, 0x40_1000, 16), vec![2; 16]);
    assert_eq!(read(&restored, 0x9000, 8), vec![0; 8]);

    let child = Snapshot::from_diff_files(&parent, reopen(&dir, "diff").into_iter().zip(diffs).collect()).unwrap();
    let restored_child = GuestRam::from_snapshot(&child).unwrap();
    assert_eq!(read(&restored_child, 0x9000, 8), vec![3; 8]);
    assert_eq!(read(&restored_child, 0x2000, 8), vec![1; 8]);

    // A RAM restored from a file owns nothing it may write: its changes go to new images.
    drop((parent, child, restored_child));
    restored.write_slice(&[9; 8], GuestAddress(0x2000)).unwrap();
    drop(restored.snapshot().unwrap());
    let mut buf = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&File::open(dir.join("full.0")).unwrap(), &mut buf, 0x2000).unwrap();
    assert_eq!(buf, [1; 8], "the snapshot file was written after the fact");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn restores_of_one_snapshot_file_share_its_page_cache() {
    const RESTORES: u64 = 4;
    let dir = tempdir();
    let size = 8 * MIB;
    let layout = vec![(GuestAddress(0), size)];
    let ram = GuestRam::new(&layout).unwrap();
    let bytes: Vec<u8> = (0..size).map(|i| (i / PAGE_SIZE) as u8 ^ (i % 251) as u8).collect();
    ram.write_slice(&bytes, GuestAddress(0)).unwrap();
    let path = dir.join("shared.0");
    ram.snapshot().unwrap().write_region(0, &File::create(&path).unwrap()).unwrap();
    drop(ram);
    let snap = Snapshot::from_files(&layout, vec![File::open(&path).unwrap()]).unwrap();
    let restored: Vec<GuestRam> = (0..RESTORES).map(|_| GuestRam::from_snapshot(&snap).unwrap()).collect();
    for ram in &restored {
        assert!(read(ram, 0, size) == bytes, "every restore reads the file's bytes");
    }
    for (i, ram) in restored.iter().enumerate() {
        let stats = ram.stats();
        // Every page was read, none written: all of it is the file's page cache, mapped
        // MAP_PRIVATE by each restore, so each is charged a quarter of it.
        assert_eq!(stats.private_bytes, 0, "restore {i}: {stats:?}");
        let pss = common::pss_bytes(ram);
        assert!(pss <= stats.ram_bytes / RESTORES + 64 * PAGE_SIZE as u64, "restore {i}: Pss {pss}, {stats:?}");
        assert!(stats.shared_bytes >= stats.ram_bytes - 64 * PAGE_SIZE as u64, "restore {i}: {stats:?}");
    }
    // A write makes one page of one restore its own; the others still read the file.
    restored[1].write_slice(&[0xee; 8], GuestAddress(0x3000)).unwrap();
    assert_eq!(restored[1].stats().private_bytes, PAGE_SIZE as u64);
    assert_eq!(read(&restored[2], 0x3000, 8), bytes[0x3000..0x3008].to_vec());
    drop((restored, snap));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn files_of_the_wrong_shape_are_refused() {
    let dir = tempdir();
    let short = files(&dir, "short");
    short[0].set_len(4096).unwrap();
    short[1].set_len(2 * PAGE_SIZE as u64).unwrap();
    assert!(matches!(Snapshot::from_files(&layout(), short), Err(MemoryError::FileSize { .. })));
    assert!(matches!(Snapshot::from_files(&layout(), Vec::new()), Err(MemoryError::FileCount { expected: 2, actual: 0 })));
    let a = GuestRam::new(&layout()).unwrap().snapshot().unwrap();
    let b = GuestRam::new(&layout()).unwrap().snapshot().unwrap();
    assert!(matches!(b.write_region_diff(&a, 0, &files(&dir, "x")[0]), Err(MemoryError::NotADescendant { region: 0 })));
    std::fs::remove_dir_all(dir).unwrap();
}
