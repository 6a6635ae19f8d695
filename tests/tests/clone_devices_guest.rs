//! Issue #5's acceptance driven by the guest itself, under real KVM: the `dma` guest starts a
//! long DMA-engine transfer and a virtio-blk read; the VM is cloned 10 times mid-transfer with
//! the read still in flight, and one clone is cloned again. The source and every clone end with
//! exactly the full data (each clone after re-executing both requests), and after each guest
//! writes its own id to its disk, every VM's disk holds its own write and nobody else's.
//!
//! Both requests are held in flight by the host, never raced: the DMA engines are host-stepped
//! (the test moves every chunk until it lets the runners go) and the source's read is held
//! from the kernel, so the outcome is the same on an idle or a loaded machine.

#![allow(clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memory::{GuestAddress, PAGE_SIZE};
use vmm::clone::{clone_vm, CloneReport};
use vmm::layout::{
    DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_CHUNK, DMA_GUEST_DMA_LEN,
    DMA_GUEST_RESULTS_ADDR, DMA_GUEST_WRITE_ID, VM_ID_ADDR,
};
use vmm::{Console, VmOutcome, Vmm};
use zygote_tests::blk_driver::{dma_busy, hold_dma, step_dma, BlkDriver};
use zygote_tests::dma_guest::{bytes, disk_bytes, dma_vm, expected_output, pattern_bytes, TempDisk};
use zygote_tests::{read_u64, text};

/// Once the runners take over, 256 chunks 1 ms apart.
const PACING_US: u64 = 1000;
/// Chunks the source's transfer moves before the first clone, and between two clones.
const CHUNKS_BEFORE: u64 = 4;
const CHUNKS_BETWEEN: u64 = 8;
const DISK_SECTORS: u64 = 256;
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

struct GuestVm {
    id: u64,
    vmm: Vmm,
    out: Arc<Mutex<Vec<u8>>>,
}

fn clone_of(source: &mut GuestVm, id: u64) -> (GuestVm, CloneReport) {
    let (console, out) = Console::capture();
    let (vmm, report) = clone_vm(&mut source.vmm, id, &console, Some(GuestAddress(VM_ID_ADDR))).unwrap();
    (GuestVm { id, vmm, out }, report)
}

/// The sector every VM's guest ends with: its id, 64 times.
fn id_sector(id: u64) -> Vec<u8> {
    id.to_le_bytes().repeat(64)
}

/// Waits for `vm`'s guest to finish, then checks its output, its buffers and its disk.
fn check_finished(vm: &GuestVm) {
    let ram = vm.vmm.ram();
    let last = DISK_SECTORS - 1;
    assert_eq!(read_u64(ram, DMA_GUEST_RESULTS_ADDR + 24), 0, "VM {}: exit code in its results", vm.id);
    assert_eq!(text(&vm.out), expected_output(DMA_GUEST_BLK_LEN as usize), "VM {}: guest output", vm.id);
    assert!(
        bytes(ram, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_LEN) == pattern_bytes(DMA_GUEST_DMA_LEN as usize),
        "VM {}: DMA data",
        vm.id
    );
    assert!(
        bytes(ram, DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN) == disk_bytes(0, DMA_GUEST_BLK_LEN as usize),
        "VM {}: read data",
        vm.id
    );
    assert_eq!(read_u64(ram, DMA_GUEST_RESULTS_ADDR + 32), last, "VM {}: the sector it wrote", vm.id);
    // Its disk, read back through its own device (the guest is done with it).
    let mut driver = BlkDriver::setup(&vm.vmm);
    assert_eq!(driver.read(&vm.vmm, last, 512), id_sector(vm.id), "VM {}: its disk lacks its own write", vm.id);
    assert_eq!(
        driver.read(&vm.vmm, last - 1, 512),
        disk_bytes((last - 1) * 512, 512),
        "VM {}: sector {}",
        vm.id,
        last - 1
    );
}

#[test]
fn ten_guest_driven_clones_mid_transfer_end_complete_and_their_disks_diverge() {
    let disk = TempDisk::new(DISK_SECTORS);
    let base = std::fs::read(&disk.0).unwrap();
    let (vmm, out) = dma_vm(Some(&disk), 1, DMA_GUEST_WRITE_ID | PACING_US);
    let mut source = GuestVm { id: 1, vmm, out };
    let blk = Arc::clone(source.vmm.devices().block().expect("virtio-blk with a disk"));

    // The transfer moves only when the test steps it (clones inherit that), and the disk read
    // is held back from the kernel (pinned and queued, not started; the hold outlasts the
    // guest's virtio reset): both are in flight at every clone instant.
    hold_dma(&source.vmm, true);
    blk.lock().unwrap().device().hold_submissions(true);
    source.vmm.start();
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !(blk.lock().unwrap().device().in_flight() == 1 && dma_busy(&source.vmm)) {
        assert!(Instant::now() < deadline, "the guest never got both devices going: {}", text(&source.out));
        std::thread::sleep(Duration::from_millis(1));
    }
    step_dma(&source.vmm, CHUNKS_BEFORE);

    let pinned_pages = (DMA_GUEST_DMA_LEN + DMA_GUEST_BLK_LEN) / PAGE_SIZE as u64;
    let mut vms = Vec::new();
    let mut progress_at_clone = Vec::new();
    for id in 100..110 {
        let (mut clone, report) = clone_of(&mut source, id);
        assert_eq!(
            report.reexecuted_requests, 2,
            "clone {id}: the DMA transfer and the read were in flight: {report:?}"
        );
        assert!(report.eager_copied_pages >= pinned_pages, "clone {id}: pinned pages copied eagerly: {report:?}");
        progress_at_clone.push(step_dma(&source.vmm, 0));
        clone.vmm.start();
        vms.push(clone);
        step_dma(&source.vmm, CHUNKS_BETWEEN);
    }
    let expected: Vec<u64> = (0..10).map(|i| (CHUNKS_BEFORE + i * CHUNKS_BETWEEN) * DMA_GUEST_DMA_CHUNK).collect();
    assert_eq!(progress_at_clone, expected, "clones at spread-out instants");
    // A clone of a clone, mid-way through the first clone's re-executed transfer.
    assert_eq!(
        step_dma(&vms[0].vmm, CHUNKS_BETWEEN),
        CHUNKS_BETWEEN * DMA_GUEST_DMA_CHUNK,
        "clone 100 restarted its transfer"
    );
    let (mut grandchild, report) = clone_of(&mut vms[0], 200);
    assert!(report.reexecuted_requests >= 1, "clone 200: its parent's transfer was in flight: {report:?}");
    assert_eq!(step_dma(&grandchild.vmm, 0), 0, "clone 200 restarted it from byte 0");
    grandchild.vmm.start();
    vms.push(grandchild);

    // Let every VM finish on its own: the runners take the transfers over, the read goes.
    blk.lock().unwrap().device().hold_submissions(false);
    vms.push(source);
    for vm in &vms {
        hold_dma(&vm.vmm, false);
    }
    for vm in &mut vms {
        assert!(vm.vmm.wait_timeout(RUN_TIMEOUT), "VM {} did not finish: {}", vm.id, text(&vm.out));
        let outcome = vm.vmm.outcome();
        assert!(matches!(outcome, Some(VmOutcome::Exited(0))), "VM {}: {outcome:?}: {}", vm.id, text(&vm.out));
    }
    for vm in &vms {
        check_finished(vm);
    }
    assert!(std::fs::read(&disk.0).unwrap() == base, "the disk file under every VM's copy-on-write layer changed");
}
