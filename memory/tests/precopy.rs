//! Pre-copy: pages written into the next freeze's image while the VM runs. Each test writes a
//! page again after its pre-copy, through one writer, and checks the clone holds the new bytes,
//! that nothing anyone else maps changed, and that the other consumers of the dirty sets
//! (`take_dirty`, `reset_to`) still see everything.

use std::sync::Arc;

use memory::model::ScriptedVcpuLog;
use memory::{Access, Bytes, GuestAddress, GuestRam, PAGE_SIZE};

const MIB: usize = 1 << 20;

fn ram() -> GuestRam {
    GuestRam::new(&[(GuestAddress(0), MIB)]).unwrap()
}

fn read(ram: &GuestRam, page: u64) -> Vec<u8> {
    let mut buf = vec![0; PAGE_SIZE];
    ram.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE as u64)).unwrap();
    buf
}

fn fill(ram: &GuestRam, page: u64, byte: u8) {
    ram.write_slice(&[byte; PAGE_SIZE], GuestAddress(page * PAGE_SIZE as u64)).unwrap();
}

#[test]
fn the_freeze_writes_only_what_changed_since_the_precopy() {
    let src = ram();
    for page in 0..8 {
        fill(&src, page, 1);
    }
    let round = src.precopy().unwrap();
    assert_eq!((round.written_pages, round.clean_pages), (8, 0));
    fill(&src, 3, 2);
    let round = src.precopy().unwrap();
    assert_eq!((round.written_pages, round.clean_pages), (1, 7), "a second round writes only page 3");
    fill(&src, 5, 3);
    let (frozen, report) = src.freeze().unwrap();
    assert_eq!((report.written_pages, report.precopied_pages), (1, 7));
    let clone = src.clone_from_frozen(&frozen).unwrap();
    for page in 0..8 {
        let want = match page {
            3 => 2,
            5 => 3,
            _ => 1,
        };
        assert_eq!(read(&clone, page), vec![want; PAGE_SIZE], "page {page}");
    }
    assert_eq!(src.stats().folds, 1, "the source held its image alone: pre-copy folded in place");
}

#[test]
fn a_vcpu_write_after_the_precopy_reaches_the_clone_through_the_dirty_log() {
    let src = ram();
    let log = Arc::new(ScriptedVcpuLog::default());
    src.set_vcpu_dirty_log(log.clone());
    fill(&src, 4, 1);
    src.precopy().unwrap();
    // A guest write: no host bitmap sees it, only the vCPU dirty log.
    let host = src.kvm_regions()[0].userspace_addr as *mut u8;
    // SAFETY: page 4 lies inside the 1 MiB region the RAM keeps mapped read-write there.
    unsafe { std::ptr::write_bytes(host.add(4 * PAGE_SIZE), 9, PAGE_SIZE) };
    log.mark(0, 4);
    let clone = src.clone_cow().unwrap();
    assert_eq!(read(&clone, 4), vec![9; PAGE_SIZE]);
    assert!(src.take_dirty().contains(&GuestAddress(4 * PAGE_SIZE as u64)));
}

#[test]
fn a_page_pinned_after_the_precopy_is_copied_at_the_clone_instant() {
    let src = ram();
    fill(&src, 6, 1);
    src.precopy().unwrap();
    let dma = src.pin(GuestAddress(6 * PAGE_SIZE as u64), PAGE_SIZE, Access::Write).unwrap();
    // The kernel DMAs into the pinned buffer behind every bitmap (io_uring, O_DIRECT).
    // SAFETY: the guard pins one page at host_ptr and keeps it mapped.
    unsafe { std::ptr::write_bytes(dma.host_ptr(), 7, PAGE_SIZE) };
    let (frozen, report) = src.freeze().unwrap();
    assert_eq!((report.written_pages, report.precopied_pages), (1, 0), "the pinned page is written again");
    let clone = src.clone_from_frozen(&frozen).unwrap();
    assert_eq!(read(&clone, 6), vec![7; PAGE_SIZE]);
    assert_eq!(src.stats().eager_copied_pages, 1);
}

#[test]
fn a_write_pin_that_ended_after_the_precopy_counts_its_pages_written() {
    let src = ram();
    fill(&src, 2, 1);
    src.precopy().unwrap();
    let dma = src.pin(GuestAddress(2 * PAGE_SIZE as u64), PAGE_SIZE, Access::Write).unwrap();
    // SAFETY: the guard pins one page at host_ptr and keeps it mapped.
    unsafe { std::ptr::write_bytes(dma.host_ptr(), 5, PAGE_SIZE) };
    drop(dma);
    let clone = src.clone_cow().unwrap();
    assert_eq!(read(&clone, 2), vec![5; PAGE_SIZE]);
    assert_eq!(src.stats().eager_copied_pages, 0, "nothing was pinned at the clone instant");
}

#[test]
fn pinned_pages_are_copied_ahead_but_never_trusted() {
    let src = ram();
    fill(&src, 1, 1);
    fill(&src, 2, 1);
    let dma = src.pin(GuestAddress(PAGE_SIZE as u64), PAGE_SIZE, Access::Write).unwrap();
    let round = src.precopy().unwrap();
    assert_eq!((round.written_pages, round.pinned_pages), (1, 1), "the pinned page is copied, not trusted");
    // DMA after the round: the freeze copies the pinned page again, at its instant.
    // SAFETY: the guard pins one page at host_ptr and keeps it mapped.
    unsafe { std::ptr::write_bytes(dma.host_ptr(), 3, PAGE_SIZE) };
    assert_eq!(read(&src, 1), vec![3; PAGE_SIZE], "the source sees its DMA, not the round's copy");
    let (frozen, report) = src.freeze().unwrap();
    assert_eq!((report.written_pages, report.precopied_pages), (1, 1));
    let clone = src.clone_from_frozen(&frozen).unwrap();
    assert_eq!(read(&clone, 1), vec![3; PAGE_SIZE], "the clone has the bytes of the freeze instant");
}

#[test]
fn precopy_never_writes_an_image_anyone_maps() {
    let src = ram();
    fill(&src, 0, 1);
    let snap = src.snapshot().unwrap();
    let clone = src.clone_cow().unwrap();
    fill(&src, 0, 2);
    fill(&src, 1, 2);
    src.precopy().unwrap();
    let mut buf = vec![0; PAGE_SIZE];
    snap.read_slice(&mut buf, GuestAddress(0)).unwrap();
    assert_eq!(buf, vec![1; PAGE_SIZE], "a snapshot changed under a pre-copy");
    assert_eq!(read(&clone, 0), vec![1; PAGE_SIZE], "a clone changed under a pre-copy");
    assert_eq!(read(&clone, 1), vec![0; PAGE_SIZE]);
    let layers = src.stats().layers;
    let (frozen, report) = src.freeze().unwrap();
    assert_eq!((report.written_pages, report.precopied_pages), (0, 2), "the pre-copied layer is used as is");
    assert_eq!(src.stats().layers, layers + 1);
    let second = src.clone_from_frozen(&frozen).unwrap();
    assert_eq!(read(&second, 0), vec![2; PAGE_SIZE]);
    assert_eq!(read(&second, 1), vec![2; PAGE_SIZE]);
}

#[test]
fn precopy_leaves_take_dirty_and_reset_complete() {
    let src = ram();
    let snap = src.snapshot().unwrap();
    fill(&src, 3, 1);
    fill(&src, 4, 1);
    src.precopy().unwrap();
    let dirty: Vec<u64> = src.take_dirty().iter().map(|a| a.0 / PAGE_SIZE as u64).collect();
    assert_eq!(dirty, vec![3, 4], "pre-copy consumed the dirty set");
    fill(&src, 5, 1);
    src.precopy().unwrap();
    src.reset_to(&snap).unwrap();
    for page in 3..6 {
        assert_eq!(read(&src, page), vec![0; PAGE_SIZE], "reset missed page {page}");
    }
    // The pre-copy went into a layer that reset dropped: the next clone starts afresh.
    fill(&src, 7, 3);
    let (frozen, report) = src.freeze().unwrap();
    assert_eq!((report.written_pages, report.precopied_pages), (1, 0));
    let clone = src.clone_from_frozen(&frozen).unwrap();
    assert_eq!(read(&clone, 3), vec![0; PAGE_SIZE]);
    assert_eq!(read(&clone, 7), vec![3; PAGE_SIZE]);
}

#[test]
fn a_freeze_between_precopy_rounds_starts_the_next_round_afresh() {
    let src = ram();
    fill(&src, 0, 1);
    src.precopy().unwrap();
    let first = src.clone_cow().unwrap(); // consumes the pre-copy, shares the base
    fill(&src, 1, 2);
    let round = src.precopy().unwrap();
    assert_eq!((round.written_pages, round.clean_pages), (1, 0), "a new layer, from nothing");
    drop(first); // the base is the source's alone again: the next freeze folds instead
    fill(&src, 2, 3);
    let (frozen, report) = src.freeze().unwrap();
    assert_eq!(report.precopied_pages, 0, "a pre-copy into a layer nobody will push is dropped");
    let clone = src.clone_from_frozen(&frozen).unwrap();
    assert_eq!(read(&clone, 0), vec![1; PAGE_SIZE]);
    assert_eq!(read(&clone, 1), vec![2; PAGE_SIZE]);
    assert_eq!(read(&clone, 2), vec![3; PAGE_SIZE]);
}
