//! Live clones of a running `spin` VM with a disk while a virtio-blk read and a paced DMA
//! transfer are in flight. The test plays the guest driver through the VM's MMIO bus and guest
//! RAM while the guest spins. The source's buffers end with exactly the full data (its DMA
//! landed in its own pinned pages); each clone's end with exactly the full data too, after it
//! re-executed its copy of each request; the pinned pages were copied into the clone eagerly;
//! afterwards the disks diverge.

use memory::{Bytes, GuestAddress};
use vmm::clone::{capture_clone, clone_vm};
use vmm::layout::VM_ID_ADDR;
use vmm::{Console, Paused, Vmm};
use zygote_tests::blk_driver::{
    hold_blk_submissions, hold_dma, read_bytes, start_dma_pattern, step_dma, wait_dma_idle, BlkDriver, DATA,
};
use zygote_tests::{scratch_dir, spin_counters, spin_vm_with_disk, wait_for_progress};

const DISK_SECTORS: u64 = 512;
const READ_BUF: u64 = DATA;
const READ_LEN: usize = 8192;
const DMA_DST: u64 = DATA + 0x4_0000;
const DMA_LEN: usize = 64 << 10;
const DMA_CHUNK: u32 = 4096;
/// Once the runner has the transfer: 16 chunks 1 ms apart.
const DMA_PACING_US: u32 = 1000;
const PATTERN: u64 = 0x0123_4567_89ab_cdef;

/// A byte of the disk's initial content.
fn disk_byte(offset: u64) -> u8 {
    (offset / 512 * 13 + offset % 251) as u8
}

fn disk_bytes(sector: u64, len: usize) -> Vec<u8> {
    (sector * 512..sector * 512 + len as u64).map(disk_byte).collect()
}

fn pattern_bytes(pattern: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern.to_le_bytes()[i % 8]).collect()
}

struct Vm {
    id: u64,
    vmm: Vmm,
    driver: BlkDriver,
    paused: Option<Paused>,
}

impl Vm {
    fn resume(&mut self) {
        if let Some(token) = self.paused.take() {
            self.vmm.resume(token);
        }
    }

    fn pause(&mut self) {
        if self.paused.is_none() {
            self.paused = Some(self.vmm.pause().unwrap());
        }
    }
}

/// On running `parent`, starts a (held) DMA transfer and a (held) virtio-blk read, clones it
/// mid-transfer into VM `id` (with `clone_vm`, or its steps one by one to check the captured
/// state), and checks both end with exactly the full data.
fn clone_mid_transfer(parent: &mut Vm, id: u64, round: u64, via_clone_vm: bool) -> Vm {
    let pattern = PATTERN.rotate_left(8 * round as u32) ^ round;
    let sector = 8 * round;
    let vmm = &parent.vmm;
    vmm.ram().write_slice(&vec![0xaa; READ_LEN], GuestAddress(READ_BUF)).unwrap();
    vmm.ram().write_slice(&vec![0x11; DMA_LEN], GuestAddress(DMA_DST)).unwrap();
    // Both stay in flight until the test lets them go: the read held back from the kernel,
    // the transfer moved one chunk by the test and then held (the clone inherits the hold).
    hold_blk_submissions(vmm, true);
    let read = parent.driver.submit_read(vmm, sector, READ_BUF, READ_LEN as u32);
    hold_dma(vmm, true);
    start_dma_pattern(vmm, pattern, DMA_DST, DMA_LEN as u32, DMA_CHUNK, DMA_PACING_US);
    assert_eq!(step_dma(vmm, 1), u64::from(DMA_CHUNK));

    let mut clone = match via_clone_vm {
        true => {
            let (clone, report) =
                clone_vm(&mut parent.vmm, id, &Console::capture().0, Some(GuestAddress(VM_ID_ADDR))).unwrap();
            assert!(report.eager_copied_pages > 0, "clone {id}: pinned pages were not copied eagerly: {report:?}");
            clone
        }
        false => {
            // clone_vm's steps, to look at the state captured at the clone instant.
            let token = parent.vmm.pause().unwrap();
            let image = capture_clone(&parent.vmm, &token).unwrap();
            parent.vmm.resume(token);
            let devices = &image.state.devices;
            let dma = devices.dma.as_ref().expect("DMA state");
            assert!(
                dma.in_flight.is_some() && dma.progress == u64::from(DMA_CHUNK),
                "clone {id}: DMA not mid-transfer: {dma:?}"
            );
            let block = devices.block.as_ref().expect("virtio-blk state");
            assert_eq!(block.device.in_flight.len(), 1, "clone {id}: the read is in flight");
            assert_eq!(block.device.in_flight[0].data[0].addr, READ_BUF);
            assert!(image.disk.is_some(), "clone {id}: the disk is cloned");
            let pinned_pages = ((READ_LEN + DMA_LEN) / 4096) as u64;
            assert!(image.eager_copied_pages >= pinned_pages, "clone {id}: {} eager copies", image.eager_copied_pages);
            image.tell_guest_id(GuestAddress(VM_ID_ADDR), id).unwrap();
            image.build(id, &Console::capture().0).unwrap()
        }
    };
    hold_blk_submissions(&parent.vmm, false);
    hold_dma(&parent.vmm, false);
    hold_dma(&clone, false);
    clone.start();

    // The source: its in-flight read and transfer land, complete, in its own pages.
    assert_eq!(BlkDriver::wait(&parent.vmm, read), 0, "source {}: read status", parent.id);
    assert_eq!(read_bytes(&parent.vmm, READ_BUF, READ_LEN), disk_bytes(sector, READ_LEN), "source {} read", parent.id);
    assert_eq!(wait_dma_idle(&parent.vmm), 2, "source {}: DMA done", parent.id);
    assert!(
        read_bytes(&parent.vmm, DMA_DST, DMA_LEN) == pattern_bytes(pattern, DMA_LEN),
        "source {}: DMA data",
        parent.id
    );

    // The clone had the clone-instant bytes (0xaa, a part-written pattern) and re-executed both.
    assert_eq!(BlkDriver::wait(&clone, read), 0, "clone {id}: read status");
    assert_eq!(read_bytes(&clone, READ_BUF, READ_LEN), disk_bytes(sector, READ_LEN), "clone {id}: re-executed read");
    assert_eq!(wait_dma_idle(&clone), 2, "clone {id}: DMA done");
    assert!(
        read_bytes(&clone, DMA_DST, DMA_LEN) == pattern_bytes(pattern, DMA_LEN),
        "clone {id}: re-executed DMA data"
    );
    // A request unpins right after its used-ring entry is written.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while clone.ram().stats().pinned_pages > 0 {
        assert!(std::time::Instant::now() < deadline, "clone {id}: pins never released");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let counters = spin_counters(&clone);
    wait_for_progress(&clone, &counters);
    Vm { id, vmm: clone, driver: parent.driver, paused: None }
}

#[test]
fn clones_mid_dma_and_mid_read_reexecute_and_their_disks_diverge() {
    let dir = scratch_dir("clone_devices");
    let disk = dir.join("disk.img");
    let initial: Vec<u8> = (0..DISK_SECTORS * 512).map(disk_byte).collect();
    std::fs::write(&disk, &initial).unwrap();

    let mut source = spin_vm_with_disk(1, &disk);
    source.start();
    wait_for_progress(&source, &[0]);
    let driver = BlkDriver::setup(&source);
    let mut source = Vm { id: 1, vmm: source, driver, paused: None };
    assert_eq!(source.driver.read(&source.vmm, 3, 512), disk_bytes(3, 512));

    // Nine clones of the source, then a clone of the first clone; each kept paused afterwards
    // (two cores: a dozen spinning VMs would starve the test).
    let mut clones: Vec<Vm> = Vec::new();
    for (round, id) in (100..109).enumerate() {
        let mut clone = clone_mid_transfer(&mut source, id, round as u64, round % 3 == 2);
        clone.pause();
        clones.push(clone);
    }
    source.pause();
    clones[0].resume();
    let mut grandchild = clone_mid_transfer(&mut clones[0], 200, 9, true);
    clones[0].pause();

    // The disks diverge: each side's write is invisible to the other.
    let (s, c) = (vec![b'S'; 1024], vec![b'C'; 1024]);
    source.driver.write(&source.vmm, 300, &s);
    grandchild.driver.write(&grandchild.vmm, 300, &c);
    assert_eq!(source.driver.read(&source.vmm, 300, 1024), s, "the source reads its own write");
    assert_eq!(grandchild.driver.read(&grandchild.vmm, 300, 1024), c, "the clone of a clone reads its own write");
    for vm in &mut clones {
        assert_eq!(vm.driver.read(&vm.vmm, 300, 1024), disk_bytes(300, 1024), "VM {} sees another VM's write", vm.id);
    }
    // A write on a clone of the source, after its own clone (200) was made, stays its own too.
    let first = &mut clones[0];
    first.driver.write(&first.vmm, 302, &[b'F'; 512]);
    assert_eq!(first.driver.read(&first.vmm, 302, 512), vec![b'F'; 512]);
    assert_eq!(grandchild.driver.read(&grandchild.vmm, 300, 1536), [&c[..], &disk_bytes(302, 512)].concat());
    assert_eq!(source.driver.read(&source.vmm, 300, 1536), [&s[..], &disk_bytes(302, 512)].concat());
    assert_eq!(std::fs::read(&disk).unwrap(), initial, "the frozen base file never changes");
    grandchild.pause();
    let _ = std::fs::remove_dir_all(&dir);
}
