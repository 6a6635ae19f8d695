//! The `dma` guest under real KVM: a guest-side driver runs a paced DMA-engine transfer and a
//! virtio-blk read at once; the checksums it prints, the bytes in guest RAM and the dirty log
//! match what the host expects; and a RAM clone taken while both are in flight holds the
//! clone-instant bytes while the source finishes with the full data.

#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::dma::MAX_PACING_US;
use memory::{Bytes, GuestAddress, GuestRam, PAGE_SIZE};
use vmm::layout::{
    DMA_GUEST_AVAIL_ADDR, DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_CHUNK,
    DMA_GUEST_DMA_LEN, DMA_GUEST_PATTERN, DMA_GUEST_RESULTS_ADDR, DMA_GUEST_USED_ADDR,
};
use vmm::VmOutcome;
use zygote_tests::dma_guest::{bytes, disk_bytes, dma_vm, expected_output, fnv1a64, pattern_bytes, TempDisk};
use zygote_tests::{read_u64, run_zygote, text};

/// How long any one guest run may take before the test gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A virtio ring's `idx` field (the u16 after `flags`).
fn ring_idx(ram: &GuestRam, ring: u64) -> u16 {
    ram.read_obj(GuestAddress(ring + 2)).unwrap()
}

fn pages(addr: u64, len: u64) -> impl Iterator<Item = GuestAddress> {
    (addr..addr + len).step_by(PAGE_SIZE).map(GuestAddress)
}

/// Runs a built VM to its end; returns the outcome and how long the guest ran.
fn run(vmm: &mut vmm::Vmm) -> Duration {
    let start = Instant::now();
    vmm.start();
    assert!(vmm.wait_timeout(RUN_TIMEOUT), "the dma guest did not finish within {RUN_TIMEOUT:?}");
    start.elapsed()
}

#[test]
fn dma_guest_checksums_buffers_and_dirty_pages_match_the_host() {
    let disk = TempDisk::new(512); // 256 KiB: the guest reads its first DMA_GUEST_BLK_LEN bytes
    let (mut vmm, out) = dma_vm(Some(&disk), 0, 0);
    let ram = Arc::clone(vmm.ram());
    ram.take_dirty(); // what the VMM wrote while building
    let took = run(&mut vmm);
    eprintln!("dma guest (1 MiB DMA in 4 KiB chunks, 1 ms pacing, 64 KiB disk read) ran {took:?}");
    let dirty = ram.take_dirty();
    let dirty_again = ram.take_dirty();
    let outcome = vmm.stop();
    assert!(matches!(outcome, VmOutcome::Exited(0)), "{outcome:?}: {}", text(&out));
    assert_eq!(text(&out), expected_output(DMA_GUEST_BLK_LEN as usize));
    // 256 chunks, at least 1 ms apart.
    assert!(took >= Duration::from_millis(250), "the paced transfer took only {took:?}");

    // The buffers hold exactly the device-written bytes; the results, the guest's checksums.
    assert_eq!(bytes(&ram, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_LEN), pattern_bytes(DMA_GUEST_DMA_LEN as usize));
    assert_eq!(bytes(&ram, DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN), disk_bytes(0, DMA_GUEST_BLK_LEN as usize));
    let results = |i: u64| read_u64(&ram, DMA_GUEST_RESULTS_ADDR + 8 * i);
    assert_eq!(results(0), fnv1a64(&pattern_bytes(DMA_GUEST_DMA_LEN as usize)));
    assert_eq!(results(1), fnv1a64(&disk_bytes(0, DMA_GUEST_BLK_LEN as usize)));
    assert_eq!((results(2), results(3)), (DMA_GUEST_BLK_LEN, 0), "bytes read, exit code");
    assert_eq!(ring_idx(&ram, DMA_GUEST_USED_ADDR), 1, "one used-ring entry");

    // The devices wrote through pins, not the vCPU: the dirty log still has every page.
    for page in pages(DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_LEN).chain(pages(DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN)) {
        assert!(dirty.binary_search(&page).is_ok(), "page {:#x} missing from take_dirty", page.0);
    }
    assert!(!dirty_again.iter().any(|p| p.0 >= DMA_GUEST_DMA_BUF), "no pins left after the run: {dirty_again:x?}");
}

#[test]
fn dma_guest_reads_a_small_disk_whole_and_runs_without_one() {
    let disk = TempDisk::new(3);
    let (mut vmm, out) = dma_vm(Some(&disk), 0, 100);
    run(&mut vmm);
    let ram = Arc::clone(vmm.ram());
    let outcome = vmm.stop();
    assert!(matches!(outcome, VmOutcome::Exited(0)), "{outcome:?}: {}", text(&out));
    assert_eq!(text(&out), expected_output(3 * 512));
    assert_eq!(read_u64(&ram, DMA_GUEST_RESULTS_ADDR + 16), 3 * 512);
    assert!(bytes(&ram, DMA_GUEST_BLK_BUF + 3 * 512, 512).iter().all(|&b| b == 0), "nothing past the disk end");

    let (mut vmm, out) = dma_vm(None, 0, 100);
    run(&mut vmm);
    let outcome = vmm.stop();
    assert!(matches!(outcome, VmOutcome::Exited(0)), "{outcome:?}: {}", text(&out));
    let dma = fnv1a64(&pattern_bytes(DMA_GUEST_DMA_LEN as usize));
    assert_eq!(text(&out), format!("DMA done {dma:016x}\nBLK none\n"));
}

#[test]
fn zygote_binary_runs_the_dma_guest_with_a_disk() {
    let disk = TempDisk::new(256);
    zygote_tests::zygote_bin();
    let start = Instant::now();
    let out = run_zygote(&["run", "--guest", "dma", "--disk", disk.path()]);
    let took = start.elapsed();
    eprintln!("zygote run --guest dma --disk (128 KiB) took {took:?}");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected_output(DMA_GUEST_BLK_LEN as usize));
    // A hang guard (shutdown waiting on a device thread), not a benchmark.
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn ram_clone_while_dma_and_blk_read_are_in_flight_holds_the_clone_instant() {
    let disk = TempDisk::new(256);
    let (mut vmm, out) = dma_vm(Some(&disk), 0, 2000);
    let blk = Arc::clone(vmm.devices().block().expect("virtio-blk with --disk"));
    let dma = Arc::clone(vmm.devices().dma().expect("a DMA engine"));
    let ram = Arc::clone(vmm.ram());

    // Both requests stay in flight until the test lets them go, however loaded the host: the
    // transfer moves only when stepped, and the disk read is held back from the kernel (pinned
    // and queued, not started; the hold outlasts the guest's virtio reset).
    dma.lock().unwrap().set_host_stepped(true);
    blk.lock().unwrap().device().hold_submissions(true);
    vmm.start();

    // Wait until the guest has started the transfer and submitted the read; move 16 chunks.
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !(blk.lock().unwrap().device().in_flight() == 1 && dma.lock().unwrap().busy()) {
        assert!(Instant::now() < deadline, "the guest never got both devices going: {}", text(&out));
        std::thread::sleep(Duration::from_millis(1));
    }
    (0..16).for_each(|_| assert!(dma.lock().unwrap().step()));

    // The clone instant: vCPUs out of KVM_RUN, the DMA engine held between chunks, and the
    // block device locked against completions while the RAM is cloned.
    let token = vmm.pause().unwrap();
    let eager_before = ram.eager_copied_pages();
    let (progress, clone) = {
        let engine = dma.lock().unwrap();
        assert!(engine.busy(), "the transfer finished before the clone instant");
        let transport = blk.lock().unwrap();
        let (state, _disk, clone) = transport.device().capture_and_clone(|| ram.clone_cow()).unwrap();
        assert_eq!(state.in_flight.len(), 1, "the disk read is in flight at the clone instant");
        assert_eq!(state.in_flight[0].data[0].addr, DMA_GUEST_BLK_BUF);
        (engine.progress(), Arc::new(clone.unwrap()))
    };
    let eager = ram.eager_copied_pages() - eager_before;
    let pinned = (DMA_GUEST_DMA_LEN + DMA_GUEST_BLK_LEN) / PAGE_SIZE as u64;
    assert!(eager >= pinned, "{eager} pages copied eagerly, {pinned} were pinned");
    assert!(ram.stats().eager_copied_pages > 0);
    assert_eq!(progress, 16 * DMA_GUEST_DMA_CHUNK);

    // The source goes on: both devices finish and the guest checks and reports them.
    vmm.resume(token);
    dma.lock().unwrap().set_host_stepped(false);
    blk.lock().unwrap().device().hold_submissions(false);
    assert!(vmm.wait_timeout(RUN_TIMEOUT), "the source did not finish");
    let outcome = vmm.stop();
    assert!(matches!(outcome, VmOutcome::Exited(0)), "{outcome:?}: {}", text(&out));
    assert_eq!(text(&out), expected_output(DMA_GUEST_BLK_LEN as usize));
    assert_eq!(bytes(&ram, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_LEN), pattern_bytes(DMA_GUEST_DMA_LEN as usize));
    assert_eq!(bytes(&ram, DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN), disk_bytes(0, DMA_GUEST_BLK_LEN as usize));

    // The clone holds the clone-instant bytes: the transfer's prefix, then the untouched buffer
    // (zero, and the guest's sentinel ~pattern in its last u64); no disk data; the request
    // offered but not used; no checksums yet.
    let dma_at_clone = bytes(&clone, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_LEN);
    let done = progress as usize;
    assert_eq!(&dma_at_clone[..done], &pattern_bytes(done)[..]);
    let (rest, sentinel) = dma_at_clone[done..].split_at(dma_at_clone.len() - done - 8);
    assert!(rest.iter().all(|&b| b == 0), "bytes past the clone-instant progress were written");
    assert_eq!(sentinel, (!DMA_GUEST_PATTERN).to_le_bytes());
    let blk_at_clone = bytes(&clone, DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN);
    assert!(blk_at_clone.iter().all(|&b| b == 0), "disk data in the clone: the read was not held");
    assert_eq!(ring_idx(&clone, DMA_GUEST_AVAIL_ADDR), 1, "the read was offered");
    assert_eq!(ring_idx(&clone, DMA_GUEST_USED_ADDR), 0, "and not yet used");
    let results: Vec<u64> = (0..4).map(|i| read_u64(&clone, DMA_GUEST_RESULTS_ADDR + 8 * i)).collect();
    assert_eq!(results, [0, 0, DMA_GUEST_BLK_LEN, 0], "no checksums yet; the read's length set at submission");
    eprintln!("cloned at {progress:#x} of {DMA_GUEST_DMA_LEN:#x} DMA bytes; {eager} pages copied eagerly");
}

#[test]
fn a_guest_asking_the_longest_pacing_cannot_delay_shutdown() {
    // u32::MAX µs (~71 minutes) per chunk, written by the guest: the register saturates at the
    // cap, and stopping the VM wakes the runner in the middle of its pause.
    let (mut vmm, out) = dma_vm(None, 0, u64::from(u32::MAX));
    let dma = Arc::clone(vmm.devices().dma().expect("a DMA engine"));
    vmm.start();
    let deadline = Instant::now() + RUN_TIMEOUT;
    while dma.lock().unwrap().progress() == 0 {
        assert!(Instant::now() < deadline, "the guest never started its transfer: {}", text(&out));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(dma.lock().unwrap().pacing_us(), MAX_PACING_US);
    // The runner wrote a chunk and sleeps; before the fix this stop did not return for 71 min.
    assert!(matches!(vmm.stop(), VmOutcome::Stopped));
    assert!(dma.lock().unwrap().busy(), "stopped mid-transfer");
}
