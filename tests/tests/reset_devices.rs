//! Reset brings back the MMIO devices and the disk. A `spin` VM with a disk (the test plays
//! its virtio-blk driver and DMA programmer through the MMIO bus and guest RAM) is
//! snapshotted with a read and a DMA transfer in flight; after every round of disk writes it
//! is reset: virtio-blk's registers, queue and requests in flight and the DMA engine's
//! registers and transfer match the snapshot's, the read and the transfer run again to their
//! full data, and the disk reads back exactly the snapshot's bytes. A reset while the DMA
//! engine holds pins is refused and changes nothing.

use std::time::Duration;

use memory::{Bytes, GuestAddress, MemoryError};
use vmm::snapshot::{VmSnapshot, VmSnapshotError};
use vmm::vstate::VmState;
use zygote_tests::blk_driver::{
    hold_blk_submissions, hold_dma, read_bytes, start_dma_pattern, step_dma, wait_dma_idle, BlkDriver, DATA,
};
use zygote_tests::{scratch_dir, spin_vm_with_disk};

const READ_BUF: u64 = DATA;
const READ_LEN: usize = 4 * 512;
const DMA_DST: u64 = DATA + 0x4_0000;
const DMA_LEN: usize = 64 << 10;
/// Once the runner has a transfer: 16 chunks 1 ms apart.
const DMA_PACING_US: u32 = 1000;
const PATTERN: u64 = 0x0123_4567_89ab_cdef;

fn sector_bytes(sector: u64, count: u64) -> Vec<u8> {
    (sector * 512..(sector + count) * 512).map(|o| (o / 512 * 13 + o % 251) as u8).collect()
}

fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| PATTERN.to_le_bytes()[i % 8]).collect()
}

/// Starts a DMA transfer the test holds in flight (one chunk done) until `hold_dma(false)`.
fn start_held_dma(vmm: &vmm::Vmm) {
    hold_dma(vmm, true);
    start_dma_pattern(vmm, PATTERN, DMA_DST, DMA_LEN as u32, 4096, DMA_PACING_US);
    assert_eq!(step_dma(vmm, 1), 4096);
}

#[test]
fn reset_restores_devices_and_disk_and_reruns_what_was_in_flight() {
    let dir = scratch_dir("reset-devices");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, sector_bytes(0, 512)).unwrap();
    let mut vm = spin_vm_with_disk(1, &disk);
    vm.start();
    let mut driver = BlkDriver::setup(&vm);
    driver.write(&vm, 10, &[b'A'; 1024]);

    // The snapshot instant: a read of sectors 10..14 and a DMA transfer in flight.
    vm.ram().write_slice(&[0xaa; READ_LEN], GuestAddress(READ_BUF)).unwrap();
    vm.ram().write_slice(&vec![0x11; DMA_LEN], GuestAddress(DMA_DST)).unwrap();
    hold_blk_submissions(&vm, true);
    let read = driver.submit_read(&vm, 10, READ_BUF, READ_LEN as u32);
    start_held_dma(&vm);
    let token = vm.pause().unwrap();
    let snap = VmSnapshot::take(&vm, &token).unwrap();
    vm.resume(token);
    let at_snapshot = driver;
    let saved = snap.state.devices.clone();
    assert_eq!(saved.block.as_ref().unwrap().device.in_flight.len(), 1, "the read is in flight at the snapshot");
    let saved_dma = saved.dma.clone().expect("DMA state");
    assert!(saved_dma.in_flight.is_some(), "the transfer is in flight at the snapshot");
    let expected_read = [vec![b'A'; 1024], sector_bytes(12, 2)].concat();
    hold_blk_submissions(&vm, false);
    hold_dma(&vm, false);
    assert_eq!(BlkDriver::wait(&vm, read), 0);
    assert_eq!(wait_dma_idle(&vm), 2);

    for round in 0..3u8 {
        // The VM goes on writing its disk: over the snapshot's sectors and elsewhere.
        driver.write(&vm, 10, &[b'B' + round; 1024]);
        driver.write(&vm, 13, &[b'b' + round; 512]);
        driver.write(&vm, 300, &[b'X'; 2048]);
        if round == 0 {
            // A transfer in flight pins its buffer: the reset is refused and changes nothing.
            start_held_dma(&vm);
            let token = vm.pause().unwrap();
            let err = snap.reset(&mut vm, &token, None).unwrap_err();
            assert!(matches!(err, VmSnapshotError::Memory { source: MemoryError::Pinned { .. }, .. }), "{err:?}");
            assert_eq!(driver.read(&vm, 300, 512), vec![b'X'; 512], "a refused reset left the disk alone");
            vm.resume(token);
            hold_dma(&vm, false);
        }
        let token = vm.pause().unwrap();
        // Keep the re-executed read in flight to compare the device state with the snapshot's.
        hold_blk_submissions(&vm, true);
        snap.reset(&mut vm, &token, Some(Duration::from_secs(10))).unwrap();
        let now = VmState::capture(&vm, &token).unwrap().devices;
        assert_eq!(now.block, saved.block, "round {round}: virtio-blk registers, queue and requests in flight");
        let now = now.dma.expect("DMA state");
        assert_eq!(now.programmed, saved_dma.programmed, "round {round}: DMA registers");
        assert_eq!(now.in_flight, saved_dma.in_flight, "round {round}: the DMA transfer runs again");
        assert_eq!(
            (now.completed, now.error, now.interrupt_status),
            (saved_dma.completed, saved_dma.error, saved_dma.interrupt_status),
            "round {round}: DMA status"
        );
        vm.resume(token);
        hold_blk_submissions(&vm, false);
        // The snapshot's engine was held (the test stepped it): let the runner redo it.
        hold_dma(&vm, false);
        driver = at_snapshot;
        assert_eq!(BlkDriver::wait(&vm, read), 0, "round {round}: the re-executed read");
        assert_eq!(read_bytes(&vm, READ_BUF, READ_LEN), expected_read, "round {round}: it read the snapshot's disk");
        assert_eq!(wait_dma_idle(&vm), 2, "round {round}: DMA done");
        assert!(read_bytes(&vm, DMA_DST, DMA_LEN) == pattern_bytes(DMA_LEN), "round {round}: the full DMA data");
        assert_eq!(driver.read(&vm, 10, 2048), expected_read, "round {round}: sectors 10..14 as of the snapshot");
        assert_eq!(driver.read(&vm, 300, 2048), sector_bytes(300, 4), "round {round}: a later write is gone");
    }
    assert!(std::fs::read(&disk).unwrap() == [sector_bytes(0, 10), vec![b'A'; 1024], sector_bytes(12, 500)].concat());
    drop(vm.stop());
    let _ = std::fs::remove_dir_all(&dir);
}
