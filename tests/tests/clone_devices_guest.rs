//! Issue #5's acceptance driven by the guest itself, under real KVM: the `dma` guest starts a
//! long DMA-engine transfer and a virtio-blk read; the VM is cloned 10 times mid-transfer with
//! the read still in flight, and one clone is cloned again. The source and every clone end with
//! exactly the full data (each clone after re-executing both requests), and after each guest
//! writes its own id to its disk, every VM's disk holds its own write and nobody else's.

#![allow(clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memory::{GuestAddress, PAGE_SIZE};
use vmm::layout::{
    DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_CHUNK, DMA_GUEST_DMA_LEN,
    DMA_GUEST_RESULTS_ADDR, DMA_GUEST_WRITE_ID, VM_ID_ADDR,
};
use vmm::clone::{clone_vm, CloneReport};
use vmm::{Console, VmOutcome, Vmm};
use zygote_tests::blk_driver::BlkDriver;
use zygote_tests::dma_guest::{bytes, disk_bytes, dma_vm, expected_output, pattern_bytes, TempDisk};
use zygote_tests::{read_u64, text};

/// 256 chunks 4 ms apart: the transfer runs for over a second, long enough for ten clones.
const PACING_US: u64 = 4000;
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
    assert!(bytes(ram, DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_LEN) == pattern_bytes(DMA_GUEST_DMA_LEN as usize), "VM {}: DMA data", vm.id);
    assert!(bytes(ram, DMA_GUEST_BLK_BUF, DMA_GUEST_BLK_LEN) == disk_bytes(0, DMA_GUEST_BLK_LEN as usize), "VM {}: read data", vm.id);
    assert_eq!(read_u64(ram, DMA_GUEST_RESULTS_ADDR + 32), last, "VM {}: the sector it wrote", vm.id);
    // Its disk, read back through its own device (the guest is done with it).
    let mut driver = BlkDriver::setup(&vm.vmm);
    assert_eq!(driver.read(&vm.vmm, last, 512), id_sector(vm.id), "VM {}: its disk lacks its own write", vm.id);
    assert_eq!(driver.read(&vm.vmm, last - 1, 512), disk_bytes((last - 1) * 512, 512), "VM {}: sector {}", vm.id, last - 1);
}

#[test]
fn ten_guest_driven_clones_mid_transfer_end_complete_and_their_disks_diverge() {
    let disk = TempDisk::new(DISK_SECTORS);
    let base = std::fs::read(&disk.0).unwrap();
    let (vmm, out) = dma_vm(Some(&disk), 1, DMA_GUEST_WRITE_ID | PACING_US);
    let mut source = GuestVm { id: 1, vmm, out };
    let mmio = source.vmm.devices().mmio.as_ref().expect("MMIO devices");
    let blk = Arc::clone(&mmio.block.as_ref().expect("virtio-blk with a disk").transport);
    let dma = Arc::clone(&mmio.dma);

    // Hold the source's disk read back from the kernel (pinned and queued, not started): it is
    // in flight at every clone instant. The hold outlasts the guest's virtio reset.
    blk.lock().unwrap().device().hold_submissions(true);
    source.vmm.start();
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !(blk.lock().unwrap().device().in_flight() == 1 && dma.lock().unwrap().progress() >= 4 * DMA_GUEST_DMA_CHUNK) {
        assert!(Instant::now() < deadline, "the guest never got both devices going: {}", text(&source.out));
        std::thread::sleep(Duration::from_millis(1));
    }

    let pinned_pages = (DMA_GUEST_DMA_LEN + DMA_GUEST_BLK_LEN) / PAGE_SIZE as u64;
    let mut vms = Vec::new();
    let mut progress_at_clone = Vec::new();
    for id in 100..110 {
        let (clone, report) = clone_of(&mut source, id);
        assert_eq!(report.reexecuted_requests, 2, "clone {id}: the DMA transfer and the read were in flight: {report:?}");
        assert!(report.eager_copied_pages >= pinned_pages, "clone {id}: pinned pages copied eagerly: {report:?}");
        progress_at_clone.push(dma.lock().unwrap().progress());
        let mut clone = clone;
        clone.vmm.start();
        vms.push(clone);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(progress_at_clone.windows(2).all(|w| w[0] < w[1]), "clones at spread-out instants: {progress_at_clone:x?}");
    // A clone of a clone, mid-way through the first clone's re-executed transfer.
    let (grandchild, report) = clone_of(&mut vms[0], 200);
    assert!(report.reexecuted_requests >= 1, "clone 200: its parent's transfer was in flight: {report:?}");
    let mut grandchild = grandchild;
    grandchild.vmm.start();
    vms.push(grandchild);

    blk.lock().unwrap().device().hold_submissions(false);
    vms.push(source);
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
