//! One test per rule of the memory contract (../shared/DESIGN.md §1), in the style of the
//! kernel's mm/cow.c selftests: set up sharing and pins, clone, write on one side, check both.

use memory::{Access, Bytes, GuestAddress, GuestRam, MemoryError, PAGE_SIZE};

const MIB: usize = 1 << 20;

fn ram(size: usize) -> GuestRam {
    GuestRam::new(&[(GuestAddress(0), size)]).unwrap()
}

fn read(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    ram.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn pages_of(addrs: Vec<GuestAddress>) -> Vec<u64> {
    addrs.into_iter().map(|a| a.0 / PAGE_SIZE as u64).collect()
}

/// Minor faults taken by this thread so far.
fn minor_faults() -> i64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
    usage.ru_minflt
}

#[test]
fn clone_isolates_host_writes_both_ways() {
    let src = ram(MIB);
    src.write_slice(&[1; 3 * PAGE_SIZE], GuestAddress(0x3000)).unwrap();
    let clone = src.clone_cow().unwrap();
    assert_eq!(read(&clone, 0x3000, 3 * PAGE_SIZE), vec![1; 3 * PAGE_SIZE]);
    src.write_slice(&[2; 10], GuestAddress(0x3000)).unwrap();
    clone.write_slice(&[3; 10], GuestAddress(0x4000)).unwrap();
    assert_eq!(read(&src, 0x4000, 10), vec![1; 10]);
    assert_eq!(read(&clone, 0x3000, 10), vec![1; 10]);
    let grandchild = clone.clone_cow().unwrap();
    clone.write_slice(&[4; 10], GuestAddress(0x5000)).unwrap();
    assert_eq!(read(&grandchild, 0x4000, 10), vec![3; 10]);
    assert_eq!(read(&grandchild, 0x5000, 10), vec![1; 10]);
    assert_eq!(read(&src, 0x5000, 10), vec![1; 10]);
}

#[test]
fn unpinned_pages_are_shared_not_copied_per_clone() {
    let src = ram(4 * MIB);
    src.write_slice(&vec![7; 64 * PAGE_SIZE], GuestAddress(0)).unwrap();
    let first = src.clone_cow().unwrap();
    // The clone owns no page of its own: it maps the frozen image.
    assert_eq!(first.stats().private_bytes, 0);
    assert_eq!(read(&first, 0, 64 * PAGE_SIZE), vec![7; 64 * PAGE_SIZE]);
    assert_eq!(src.stats().folds, 1, "the source's own image is folded in place");
    // Now the image is shared: a page written since goes once into a new layer.
    src.write_slice(&[8; 16], GuestAddress(0x10_0000)).unwrap();
    let second = src.clone_cow().unwrap();
    let third = src.clone_cow().unwrap();
    assert_eq!(src.stats().layers, 1, "unchanged pages are never written again");
    for clone in [&second, &third] {
        assert_eq!(clone.stats().private_bytes, 0);
        assert_eq!(read(clone, 0x10_0000, 16), vec![8; 16]);
    }
    assert_eq!(src.stats().eager_copied_pages, 0);
}

#[test]
fn pinned_page_stays_with_source_and_clone_gets_the_clone_instant_bytes() {
    let src = ram(MIB);
    src.write_slice(&[0xAA; PAGE_SIZE], GuestAddress(0x8000)).unwrap();
    let dma = src.pin(GuestAddress(0x8000), PAGE_SIZE, Access::Write).unwrap();
    dma.write_at(0, &[0x11; PAGE_SIZE / 2]).unwrap(); // half the transfer done
    let clone = src.clone_cow().unwrap();
    dma.write_at(PAGE_SIZE / 2, &[0x22; PAGE_SIZE / 2]).unwrap(); // the rest lands after the clone
    let mut want_src = vec![0x11; PAGE_SIZE / 2];
    want_src.extend([0x22; PAGE_SIZE / 2]);
    assert_eq!(read(&src, 0x8000, PAGE_SIZE), want_src, "DMA in flight lands, complete, in the source");
    let mut want_clone = vec![0x11; PAGE_SIZE / 2];
    want_clone.extend([0xAA; PAGE_SIZE / 2]);
    assert_eq!(read(&clone, 0x8000, PAGE_SIZE), want_clone, "the clone holds the clone-instant bytes");
    assert_eq!(src.stats().eager_copied_pages, 1);
    // The clone's page is its own: its writes never reach the device's buffer.
    clone.write_slice(&[0x33; 8], GuestAddress(0x8000)).unwrap();
    let mut buf = [0; 8];
    dma.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 8]);
}

#[test]
fn a_sole_owner_writes_in_place() {
    let src = ram(MIB);
    let addr = GuestAddress(0x2000);
    src.write_slice(&[1; 64], addr).unwrap();
    let clone = src.clone_cow().unwrap();
    let before = minor_faults();
    for i in 0..100u8 {
        src.write_slice(&[i; 64], addr).unwrap();
    }
    assert_eq!(minor_faults() - before, 0, "the source's own page was copied on write");
    let before = minor_faults();
    clone.write_slice(&[9; 64], addr).unwrap();
    assert!(minor_faults() - before >= 1, "the clone's first write must break sharing");
    let before = minor_faults();
    clone.write_slice(&[10; 64], addr).unwrap();
    assert_eq!(minor_faults() - before, 0, "once broken, the clone owns the page");
}

#[test]
fn guard_and_vm_see_each_others_writes_and_read_pins_count_for_eager_copy() {
    let src = ram(MIB);
    let reader = src.pin(GuestAddress(0x1000), 64, Access::Read).unwrap();
    let writer = src.pin(GuestAddress(0x4000), 64, Access::Write).unwrap();
    src.write_slice(&[5; 64], GuestAddress(0x1000)).unwrap();
    let mut buf = [0; 64];
    reader.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [5; 64], "a read pin sees its VM's later writes");
    writer.write_at(0, &[6; 64]).unwrap();
    assert_eq!(read(&src, 0x4000, 64), vec![6; 64], "the VM sees the device's writes");
    assert!(matches!(reader.write_at(0, &[1]), Err(MemoryError::ReadOnlyPin { .. })));
    let clone = src.clone_cow().unwrap();
    assert_eq!(src.stats().eager_copied_pages, 2, "read pins count as pins for the eager copy");
    clone.write_slice(&[7; 64], GuestAddress(0x1000)).unwrap();
    src.write_slice(&[8; 64], GuestAddress(0x1000)).unwrap();
    reader.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [8; 64], "after the clone the read pin still follows its own VM only");
}

#[test]
fn a_guard_outliving_its_ram_reaches_no_vm_and_no_snapshot() {
    let src = ram(MIB);
    src.write_slice(&[1; 16], GuestAddress(0x6000)).unwrap();
    let guard = src.pin(GuestAddress(0x6000), PAGE_SIZE, Access::Write).unwrap();
    let snap = src.snapshot().unwrap();
    let clone = src.clone_cow().unwrap();
    drop(src);
    guard.write_at(0, &[2; 16]).unwrap();
    let mut buf = [0; 16];
    guard.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [2; 16]);
    assert_eq!(read(&clone, 0x6000, 16), vec![1; 16]);
    snap.read_slice(&mut buf, GuestAddress(0x6000)).unwrap();
    assert_eq!(buf, [1; 16]);
    assert_eq!(read(&GuestRam::from_snapshot(&snap).unwrap(), 0x6000, 16), vec![1; 16]);
}

#[test]
fn a_snapshot_never_changes() {
    let src = ram(MIB);
    src.write_slice(&[1; 32], GuestAddress(0)).unwrap();
    let snap = src.snapshot().unwrap();
    src.write_slice(&[2; 32], GuestAddress(0)).unwrap();
    let restored = GuestRam::from_snapshot(&snap).unwrap();
    restored.write_slice(&[3; 32], GuestAddress(0)).unwrap();
    let again = restored.snapshot().unwrap(); // folds nothing into the shared base
    restored.reset_to(&snap).unwrap();
    src.reset_to(&again).unwrap();
    src.write_slice(&[4; 32], GuestAddress(0)).unwrap();
    let _clone = src.clone_cow().unwrap();
    let mut buf = [0; 32];
    snap.read_slice(&mut buf, GuestAddress(0)).unwrap();
    assert_eq!(buf, [1; 32]);
    again.read_slice(&mut buf, GuestAddress(0)).unwrap();
    assert_eq!(buf, [3; 32]);
    assert_eq!(read(&restored, 0, 32), vec![1; 32]);
}

#[test]
fn has_pinned_is_sticky_and_a_never_pinned_ram_copies_nothing() {
    let src = ram(MIB);
    src.write_slice(&[1; PAGE_SIZE * 4], GuestAddress(0)).unwrap();
    assert!(!src.has_pinned());
    let _clones: Vec<_> = (0..3).map(|_| src.clone_cow().unwrap()).collect();
    assert_eq!(src.stats().eager_copied_pages, 0);
    drop(src.pin(GuestAddress(0), 1, Access::Read).unwrap());
    assert!(src.has_pinned(), "has_pinned stays true after the unpin");
    let clone = src.clone_cow().unwrap();
    assert!(!clone.has_pinned(), "pins belong to one RAM");
    assert_eq!(src.stats().eager_copied_pages, 0, "nothing pinned at the clone instant");
}

#[test]
fn take_dirty_reports_every_writer_and_survives_clones() {
    let src = ram(MIB);
    assert!(src.take_dirty().is_empty());
    src.write_slice(&[1; 2], GuestAddress(0x1fff)).unwrap(); // straddles pages 1 and 2
    let guard = src.pin(GuestAddress(0x5000), 16, Access::Write).unwrap();
    guard.write_at(0, &[1; 16]).unwrap();
    let clone = src.clone_cow().unwrap();
    assert!(clone.take_dirty().is_empty(), "a clone starts clean");
    assert_eq!(pages_of(src.take_dirty()), vec![1, 2, 5], "the clone did not consume the source's set");
    assert_eq!(pages_of(src.take_dirty()), vec![5], "a pinned page is reported again while pinned");
    drop(guard);
    assert_eq!(pages_of(src.take_dirty()), vec![5], "and once more after its unpin");
    assert!(src.take_dirty().is_empty(), "then only when written again");
    clone.write_slice(&[1], GuestAddress(0x9000)).unwrap();
    assert_eq!(pages_of(clone.take_dirty()), vec![9]);
    assert!(src.take_dirty().is_empty());
}

#[test]
fn a_refused_reset_changes_nothing_and_a_clone_pin_never_blocks_its_source() {
    let src = ram(MIB);
    let snap = src.snapshot().unwrap();
    src.write_slice(&[1; 8], GuestAddress(0x3000)).unwrap();
    let guard = src.pin(GuestAddress(0x7000), 8, Access::Read).unwrap();
    let err = src.reset_to(&snap).unwrap_err();
    assert!(matches!(err, MemoryError::Pinned { pages: 1, first: 0x7000 }), "{err}");
    assert_eq!(read(&src, 0x3000, 8), vec![1; 8]);
    assert_eq!(pages_of(src.take_dirty()), vec![3, 7]);
    drop(guard);
    let clone = src.clone_cow().unwrap();
    let _clone_pin = clone.pin(GuestAddress(0x3000), 8, Access::Write).unwrap();
    src.reset_to(&snap).unwrap();
    assert_eq!(read(&src, 0x3000, 8), vec![0; 8]);
    assert!(matches!(clone.reset_to(&snap), Err(MemoryError::Pinned { .. })));
}

#[test]
fn bad_input_is_an_error() {
    let g = GuestAddress;
    assert!(matches!(GuestRam::new(&[]), Err(MemoryError::NoRegions)));
    assert!(matches!(GuestRam::new(&[(g(0), 0)]), Err(MemoryError::BadRegionSize { .. })));
    assert!(matches!(GuestRam::new(&[(g(0), 100)]), Err(MemoryError::BadRegionSize { .. })));
    assert!(matches!(GuestRam::new(&[(g(1), PAGE_SIZE)]), Err(MemoryError::UnalignedRegion(1))));
    assert!(matches!(GuestRam::new(&[(g(u64::MAX - 4095), PAGE_SIZE)]), Err(MemoryError::RegionOverflow { .. })));
    assert!(matches!(
        GuestRam::new(&[(g(0), 2 * PAGE_SIZE), (g(0x1000), PAGE_SIZE)]),
        Err(MemoryError::OverlappingRegions { first: 0, second: 0x1000 })
    ));
    let ram = GuestRam::new(&[(g(0), MIB), (g(0x20_0000), MIB)]).unwrap();
    assert!(matches!(ram.pin(g(MIB as u64 - 8), 16, Access::Read), Err(MemoryError::OutOfRange { .. })));
    assert!(matches!(ram.pin(g(0x18_0000), 16, Access::Read), Err(MemoryError::OutOfRange { .. })));
    assert!(matches!(ram.pin(g(u64::MAX - 2), 16, Access::Read), Err(MemoryError::OutOfRange { .. })));
    assert!(matches!(ram.pin(g(0), 0, Access::Read), Err(MemoryError::EmptyPin(0))));
    let guard = ram.pin(g(0x100), 32, Access::Write).unwrap();
    assert!(matches!(guard.write_at(30, &[0; 4]), Err(MemoryError::GuardOutOfRange { .. })));
    assert!(matches!(guard.read_at(usize::MAX, &mut [0; 4]), Err(MemoryError::GuardOutOfRange { .. })));
    assert!(ram.write_slice(&[0; 8], g(MIB as u64 - 4)).is_err());
    let other = GuestRam::new(&[(g(0), MIB)]).unwrap();
    let snap = other.snapshot().unwrap();
    assert!(matches!(ram.reset_to(&snap), Err(MemoryError::LayoutMismatch { .. })));
}
