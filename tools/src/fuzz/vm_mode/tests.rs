//! VM mode against expectations computed here, not by its model: a clone mid-DMA and
//! mid-read, a refused and an allowed reset, a short clean campaign, determinism.

use memory::{Bytes, GuestAddress, PAGE_SIZE};

use super::model::disk_byte;
use super::*;
use crate::fuzz::{campaign, execute, one_planting_at_a_time};

const PATTERN: u64 = 0x1122_3344_5566_7788;

fn data(world: &VmWorld, vm: usize, page: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let v = world.vms[vm].as_ref().expect("a live VM");
    v.vmm.ram().read_slice(&mut buf, GuestAddress(DATA_ADDR + (page * PAGE_SIZE) as u64)).unwrap();
    buf
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| PATTERN.to_le_bytes()[i % 8]).collect()
}

fn run(world: &mut VmWorld, steps: &[VmStep]) {
    for (i, step) in steps.iter().enumerate() {
        world.apply(step).unwrap_or_else(|v| panic!("step {i} {step:?}: {}", v.0));
    }
}

#[test]
fn a_clone_mid_dma_and_mid_read_holds_the_instant_then_both_end_with_the_full_data() {
    let _clean = one_planting_at_a_time();
    let mut world = VmWorld::new().unwrap();
    let dma = |by_guest| VmStep::DmaStart { vm: 0, page: 4, pages: 2, pattern: PATTERN, chunk: 1024, by_guest };
    run(
        &mut world,
        &[
            VmStep::GuestWrite { vm: 0, page: 0, offset: 10, len: 100, byte: 7 },
            VmStep::BlkRead { vm: 0, sector: 4, sectors: 8, page: 2 },
            dma(true),
            VmStep::DmaStep { vm: 0 },
            VmStep::DmaStep { vm: 0 },
            VmStep::DmaStep { vm: 0 },
            VmStep::Clone { vm: 0 },
        ],
    );
    let disk: Vec<u8> = (4 * 512..12 * 512).map(disk_byte).collect();
    // The clone: the source's three chunks, then nothing (its engine restarted from byte 0);
    // its copy of the read was re-executed at the clone step.
    let mut instant = pattern(3 * 1024);
    instant.resize(2 * PAGE_SIZE, 0);
    assert_eq!(data(&world, 1, 4, 2 * PAGE_SIZE), instant);
    assert_eq!(data(&world, 1, 2, PAGE_SIZE), disk);
    assert_eq!(data(&world, 0, 2, PAGE_SIZE), vec![0; PAGE_SIZE], "the source's read is still held");
    run(&mut world, &[VmStep::DmaComplete { vm: 0 }, VmStep::BlkComplete { vm: 0 }, VmStep::DmaStep { vm: 1 }]);
    assert_eq!(data(&world, 0, 4, 2 * PAGE_SIZE), pattern(2 * PAGE_SIZE), "the source got the whole transfer");
    assert_eq!(data(&world, 0, 2, PAGE_SIZE), disk);
    assert_eq!(data(&world, 1, 4, 2 * PAGE_SIZE), instant, "the source's DMA reached the clone");
    run(&mut world, &[VmStep::DmaComplete { vm: 1 }, dma(false), VmStep::DmaComplete { vm: 1 }]);
    assert_eq!(data(&world, 1, 4, 2 * PAGE_SIZE), pattern(2 * PAGE_SIZE), "the clone's re-executed transfer");
    assert_eq!(data(&world, 1, 0, PAGE_SIZE)[10..110], [7; 100]);
}

#[test]
fn reset_is_refused_while_the_dma_buffer_is_pinned_and_restores_the_snapshot_after() {
    let _clean = one_planting_at_a_time();
    let mut world = VmWorld::new().unwrap();
    run(
        &mut world,
        &[
            VmStep::HostWrite { vm: 0, page: 1, offset: 0, len: 4096, byte: 1 },
            VmStep::Snapshot { vm: 0 },
            VmStep::DmaStart { vm: 0, page: 1, pages: 1, pattern: PATTERN, chunk: 2048, by_guest: false },
            VmStep::DmaStep { vm: 0 },
            VmStep::Reset { vm: 0, snap: 0 },
        ],
    );
    assert_eq!(data(&world, 0, 1, 2048), pattern(2048), "a refused reset changed RAM");
    run(&mut world, &[VmStep::DmaStep { vm: 0 }, VmStep::GuestWrite { vm: 0, page: 3, offset: 0, len: 9, byte: 9 }]);
    run(&mut world, &[VmStep::Reset { vm: 0, snap: 0 }]);
    assert_eq!(data(&world, 0, 1, PAGE_SIZE), vec![1; PAGE_SIZE]);
    assert_eq!(data(&world, 0, 3, 9), vec![0; 9]);
    // The guest runs on from the snapshot's instant; the driver set virtio-blk up again.
    run(
        &mut world,
        &[
            VmStep::GuestWrite { vm: 0, page: 3, offset: 0, len: 9, byte: 5 },
            VmStep::BlkRead { vm: 0, sector: 0, sectors: 8, page: 6 },
            VmStep::BlkComplete { vm: 0 },
        ],
    );
    assert_eq!(data(&world, 0, 3, 9), vec![5; 9]);
    assert_eq!(data(&world, 0, 6, PAGE_SIZE), (0..PAGE_SIZE).map(disk_byte).collect::<Vec<_>>());
}

#[test]
fn a_short_campaign_on_real_vms_finds_nothing() {
    let _clean = one_planting_at_a_time();
    let report = campaign::<VmWorld>(1, 10, 1, None);
    assert!(report.found.is_none(), "{:?}", report.found);
    assert_eq!(report.runs, 10);
}

#[test]
fn the_same_schedule_leaves_the_same_bytes() {
    let _clean = one_planting_at_a_time();
    let steps = generate_vm(7, 3);
    let final_bytes = || {
        let mut world = VmWorld::new().unwrap();
        run(&mut world, &steps);
        (0..world.vms.len())
            .filter(|&i| world.vms[i].is_some())
            .map(|i| data(&world, i, 0, DATA_BYTES))
            .collect::<Vec<_>>()
    };
    assert_eq!(final_bytes(), final_bytes());
    assert!(execute::<VmWorld>(&steps).is_ok());
}

#[test]
fn a_copy_reads_its_source_at_each_chunk_and_a_clone_copies_from_its_own_pages() {
    let _clean = one_planting_at_a_time();
    let mut world = VmWorld::new().unwrap();
    run(
        &mut world,
        &[
            VmStep::HostWrite { vm: 0, page: 8, offset: 0, len: 4096, byte: 3 },
            VmStep::DmaCopy { vm: 0, page: 10, pages: 1, src_page: 8, chunk: 2048, by_guest: true },
            VmStep::DmaStep { vm: 0 },
            VmStep::Clone { vm: 0 },
            // The read-pinned source takes a guest write in the source VM, a host write in the clone.
            VmStep::GuestWrite { vm: 0, page: 8, offset: 2048, len: 2048, byte: 4 },
            VmStep::HostWrite { vm: 1, page: 8, offset: 0, len: 4096, byte: 5 },
            VmStep::DmaStep { vm: 0 },
            VmStep::DmaComplete { vm: 1 },
        ],
    );
    assert_eq!(data(&world, 0, 10, PAGE_SIZE), [vec![3; 2048], vec![4; 2048]].concat());
    assert_eq!(data(&world, 1, 10, PAGE_SIZE), vec![5; PAGE_SIZE], "the clone's re-executed copy");
    // A copy onto its own source is refused (the step checks the engine's error register).
    run(&mut world, &[VmStep::DmaCopy { vm: 0, page: 8, pages: 2, src_page: 9, chunk: 256, by_guest: false }]);
    assert!(world.vms[0].as_ref().unwrap().model.dma.is_none());
}
