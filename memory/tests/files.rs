//! Snapshot RAM files: full and diff round trips, files never written after the fact.

use std::fs::File;

use memory::{BlockSet, Bytes, FileKind, FileRun, GuestAddress, GuestRam, MemoryError, Snapshot, PAGE_SIZE};

const MIB: usize = 1 << 20;

fn layout() -> Vec<(GuestAddress, usize)> {
    vec![(GuestAddress(0), MIB), (GuestAddress(0x40_0000), 2 * PAGE_SIZE)]
}

fn files(dir: &std::path::Path, stem: &str) -> Vec<File> {
    (0..2)
        .map(|i| {
            File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(format!("{stem}.{i}")))
                .unwrap()
        })
        .collect()
}

fn reopen(dir: &std::path::Path, stem: &str) -> Vec<File> {
    (0..2).map(|i| File::open(dir.join(format!("{stem}.{i}"))).unwrap()).collect()
}

fn page_set(runs: &[FileRun], pages: usize) -> BlockSet {
    BlockSet::from_runs(pages, &runs.iter().map(FileRun::page_run).collect::<Vec<_>>())
}

fn read(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    ram.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn tempdir() -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("zygote-files-{}-{:?}", std::process::id(), std::thread::current().id()));
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
    let mut full_runs = Vec::new();
    for (i, f) in files(&dir, "full").iter().enumerate() {
        full_runs.push(full.write_region(i, f).unwrap());
    }
    assert_eq!(full_runs[0].iter().map(FileRun::page_run).collect::<Vec<_>>(), vec![(2, 3)], "only the data, no holes");
    assert_eq!(full_runs[1].iter().map(FileRun::page_run).collect::<Vec<_>>(), vec![(1, 1)]);
    assert_eq!(full_runs[0][0].crc32, crc32fast::hash(&[1; 3 * PAGE_SIZE]), "the checksum of what was written");
    ram.write_slice(&[3; 8], GuestAddress(0x9000)).unwrap();
    let later = ram.snapshot().unwrap();
    let mut diffs = Vec::new();
    for (i, f) in files(&dir, "diff").iter().enumerate() {
        diffs.push(later.write_region_diff(&full, i, f).unwrap());
    }
    assert_eq!(
        diffs[0].iter().map(FileRun::page_run).collect::<Vec<_>>(),
        vec![(9, 1)],
        "a diff holds only what changed"
    );
    assert!(diffs[1].is_empty());

    for ((file, runs), &(_, size)) in reopen(&dir, "full").iter().zip(&full_runs).zip(&layout()) {
        Snapshot::verify_file(file, size, runs, FileKind::Full).unwrap();
    }
    let parent = Snapshot::from_files(&layout(), reopen(&dir, "full")).unwrap();
    let restored = GuestRam::from_snapshot(&parent).unwrap();
    assert_eq!(read(&restored, 0x2000, 3 * PAGE_SIZE), vec![1; 3 * PAGE_SIZE]);
    assert_eq!(read(&restored, 0x40_1000, 16), vec![2; 16]);
    assert_eq!(read(&restored, 0x9000, 8), vec![0; 8]);

    let diff_files = reopen(&dir, "diff");
    for ((file, runs), &(_, size)) in diff_files.iter().zip(&diffs).zip(&layout()) {
        Snapshot::verify_file(file, size, runs, FileKind::Diff).unwrap();
    }
    let sets = diffs.iter().zip(layout()).map(|(runs, (_, size))| page_set(runs, size / PAGE_SIZE));
    let child = Snapshot::from_diff_files(&parent, diff_files.into_iter().zip(sets).collect()).unwrap();
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
        let pss = pss_bytes(ram);
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
    assert!(matches!(
        Snapshot::from_files(&layout(), Vec::new()),
        Err(MemoryError::FileCount { expected: 2, actual: 0 })
    ));
    let a = GuestRam::new(&layout()).unwrap().snapshot().unwrap();
    let b = GuestRam::new(&layout()).unwrap().snapshot().unwrap();
    assert!(matches!(b.write_region_diff(&a, 0, &files(&dir, "x")[0]), Err(MemoryError::NotADescendant { region: 0 })));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_full_file_costs_its_data_not_the_region_size() {
    let dir = tempdir();
    let size = 64 * MIB;
    let ram = GuestRam::new(&[(GuestAddress(0), size)]).unwrap();
    for page in [0, 5, 6, 7, 4000, 16383] {
        ram.write_slice(&[(page % 251) as u8 + 1; PAGE_SIZE], GuestAddress((page * PAGE_SIZE) as u64)).unwrap();
    }
    let snap = ram.snapshot().unwrap();
    ram.write_slice(&[0xee; 8], GuestAddress(0x10_0000)).unwrap(); // a layer above the base
    let later = ram.snapshot().unwrap();
    let path = dir.join("sparse.0");
    let runs = later.write_region(0, &File::create(&path).unwrap()).unwrap();
    let listed: Vec<_> = runs.iter().map(FileRun::page_run).collect();
    assert_eq!(listed, vec![(0, 1), (5, 3), (256, 1), (4000, 1), (16383, 1)]);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
    assert!(allocated <= 64 * PAGE_SIZE as u64, "{allocated} bytes allocated for 7 pages of data");
    let restored = GuestRam::from_snapshot(
        &Snapshot::from_files(&[(GuestAddress(0), size)], vec![File::open(&path).unwrap()]).unwrap(),
    )
    .unwrap();
    assert_eq!(read(&restored, 4000 * PAGE_SIZE as u64, 4), vec![(4000 % 251) as u8 + 1; 4]);
    assert_eq!(read(&restored, 0x10_0000, 8), vec![0xee; 8]);
    drop(snap);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn verify_refuses_a_changed_byte_stray_data_and_bad_runs() {
    let dir = tempdir();
    let size = 16 * PAGE_SIZE;
    let ram = GuestRam::new(&[(GuestAddress(0), size)]).unwrap();
    ram.write_slice(&[7; 2 * PAGE_SIZE], GuestAddress(0x3000)).unwrap();
    let path = dir.join("verify.0");
    let runs = ram.snapshot().unwrap().write_region(0, &File::create(&path).unwrap()).unwrap();
    let open = || File::options().read(true).write(true).open(&path).unwrap();
    Snapshot::verify_file(&open(), size, &runs, FileKind::Full).unwrap();

    let bad = |runs: &[FileRun], kind| Snapshot::verify_file(&open(), size, runs, kind).unwrap_err();
    let run = runs[0];
    for wrong in [
        FileRun { pages: 0, ..run },
        FileRun { first_page: 15, pages: 2, ..run },
        FileRun { first_page: usize::MAX, ..run },
    ] {
        assert!(matches!(bad(&[wrong], FileKind::Diff), MemoryError::BadFileRun { .. }), "{wrong:?}");
    }
    assert!(matches!(bad(&[run, run], FileKind::Diff), MemoryError::BadFileRun { .. }), "overlapping runs");
    assert!(matches!(bad(&[], FileKind::Full), MemoryError::DataOutsideRuns { page: 3 }));
    Snapshot::verify_file(&open(), size, &[], FileKind::Diff).unwrap(); // a diff maps only its runs

    std::os::unix::fs::FileExt::write_all_at(&open(), &[8], 0x4010).unwrap();
    assert!(matches!(bad(&runs, FileKind::Full), MemoryError::FileChecksum { first_page: 3, pages: 2, .. }));
    std::os::unix::fs::FileExt::write_all_at(&open(), &[7], 0x4010).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&open(), &[1], 0xa000).unwrap();
    assert!(matches!(bad(&runs, FileKind::Full), MemoryError::DataOutsideRuns { page: 10 }));
    Snapshot::verify_file(&open(), size, &runs, FileKind::Diff).unwrap();
    open().set_len(size as u64 - 1).unwrap();
    assert!(matches!(bad(&runs, FileKind::Diff), MemoryError::FileSize { .. }));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Pss of `ram`'s mappings from /proc/self/smaps (what `GuestRam::stats` no longer reads: it
/// costs O(every mapping of the process)).
pub fn pss_bytes(ram: &memory::GuestRam) -> u64 {
    let ranges: Vec<(u64, u64)> =
        ram.kvm_regions().iter().map(|r| (r.userspace_addr, r.userspace_addr + r.memory_size)).collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut pss = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                inside = ranges.iter().any(|&(lo, hi)| start >= lo && end <= hi);
                continue;
            }
        }
        if inside && first == "Pss:" {
            pss += fields.next().and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) * 1024;
        }
    }
    pss
}
