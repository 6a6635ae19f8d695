//! virtio-blk against a real `GuestRam` and a real file through io_uring, with the test as the
//! driver: every request type, and every class of bad guest input.

#![allow(clippy::cast_possible_truncation, clippy::type_complexity)]

mod common;

use common::*;
use memory::{Bytes, GuestAddress};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const DISK_SECTORS: u64 = 64;

fn driver() -> (TempDisk, Driver) {
    let disk = TempDisk::new(DISK_SECTORS);
    let driver = Driver::new(new_ram(), disk.open());
    (disk, driver)
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(disk_byte).collect()
}

/// A read of `sectors` at `sector` into page-aligned memory succeeds with the disk's bytes.
fn assert_read_works(d: &mut Driver, at: u64, sector: u64) {
    let buf = at + 0x1000;
    let (head, status) = d.request(at, VIRTIO_BLK_T_IN, sector, &[(buf, 1024, true)]);
    d.notify();
    d.complete();
    assert_eq!(d.take_used(), vec![(u32::from(head), 1025)]);
    assert_eq!(d.status(status), OK);
    assert_eq!(d.bytes(buf, 1024), expected(sector * 512, 1024));
}

#[test]
fn reads_scatter_into_several_buffers() {
    let (_disk, mut d) = driver();
    // O_DIRECT-eligible page, then two unaligned pieces (buffered fallback).
    let bufs = [(SCRATCH + 0x1000, 4096, true), (SCRATCH + 0x3003, 512, true), (SCRATCH + 0x4100, 1024, true)];
    let (head, status) = d.request(SCRATCH, VIRTIO_BLK_T_IN, 3, &bufs);
    d.notify();
    assert_eq!(d.transport.device().in_flight() + d.take_used().len(), 1);
    d.complete();
    d.used_seen = 0;
    assert_eq!(d.take_used(), vec![(u32::from(head), 4096 + 512 + 1024 + 1)]);
    assert_eq!(d.status(status), OK);
    let mut offset = 3 * 512;
    for (addr, len, _) in bufs {
        assert_eq!(d.bytes(addr, len as usize), expected(offset, len as usize), "buffer {addr:#x}");
        offset += u64::from(len);
    }
    assert!(d.ram.has_pinned() && d.transport.device().in_flight() == 0);
}

#[test]
fn writes_reach_the_file_and_read_back() {
    let (disk, mut d) = driver();
    let data = SCRATCH + 0x1000;
    d.ram.write_slice(&[0x5a; 1024], GuestAddress(data)).unwrap();
    let (_, status) = d.request(SCRATCH, VIRTIO_BLK_T_OUT, 10, &[(data, 1024, false)]);
    d.notify();
    d.complete();
    assert_eq!((d.status(status), d.take_used()[0].1), (OK, 1));
    let (_, status) = d.request(SCRATCH + 0x100, VIRTIO_BLK_T_FLUSH, 0, &[]);
    d.notify();
    d.complete();
    assert_eq!(d.status(status), OK);
    let file = std::fs::read(&disk.0).unwrap();
    assert_eq!(&file[10 * 512..12 * 512], &[0x5a; 1024][..]);
    assert_eq!(file[12 * 512], disk_byte(12 * 512), "neighbouring sector untouched");
    let back = SCRATCH + 0x8000;
    d.request(SCRATCH + 0x200, VIRTIO_BLK_T_IN, 10, &[(back, 1024, true)]);
    d.notify();
    d.complete();
    assert_eq!(d.bytes(back, 1024), vec![0x5a; 1024]);
}

#[test]
fn get_id_and_unsupported_types() {
    let (_disk, mut d) = driver();
    let (_, status) = d.request(SCRATCH, VIRTIO_BLK_T_GET_ID, 0, &[(SCRATCH + 0x100, 20, true)]);
    d.notify();
    assert_eq!(d.status(status), OK);
    assert_eq!(&d.bytes(SCRATCH + 0x100, 13), b"zygote-blk-64");
    let (_, status) = d.request(SCRATCH + 0x200, 11 /* DISCARD */, 0, &[(SCRATCH + 0x300, 16, false)]);
    d.notify();
    assert_eq!(d.status(status), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(d.take_used().len(), 2);
}

#[test]
fn bad_requests_get_ioerr_and_the_device_keeps_serving() {
    let past_end = DISK_SECTORS - 1;
    let cases: Vec<(&str, u32, u64, Vec<(u64, u32, bool)>)> = vec![
        ("past the disk end", VIRTIO_BLK_T_IN, past_end, vec![(SCRATCH + 0x1000, 1024, true)]),
        ("sector overflow", VIRTIO_BLK_T_IN, u64::MAX, vec![(SCRATCH + 0x1000, 512, true)]),
        ("outside RAM", VIRTIO_BLK_T_IN, 0, vec![(RAM_SIZE as u64 - 256, 512, true)]),
        ("wrapping address", VIRTIO_BLK_T_IN, 0, vec![(u64::MAX - 255, 512, true)]),
        ("overlapping buffers", VIRTIO_BLK_T_IN, 0, vec![(SCRATCH + 0x1000, 512, true), (SCRATCH + 0x1100, 512, true)]),
        ("buffer over the header", VIRTIO_BLK_T_IN, 0, vec![(SCRATCH, 512, true)]),
        ("buffer over the used ring", VIRTIO_BLK_T_IN, 0, vec![(USED_RING, 512, true)]),
        ("read into a read-only buffer", VIRTIO_BLK_T_IN, 0, vec![(SCRATCH + 0x1000, 512, false)]),
        ("write from a write-only buffer", VIRTIO_BLK_T_OUT, 0, vec![(SCRATCH + 0x1000, 512, true)]),
        ("not whole sectors", VIRTIO_BLK_T_IN, 0, vec![(SCRATCH + 0x1000, 100, true)]),
        ("no data", VIRTIO_BLK_T_IN, 0, vec![]),
        ("empty segment", VIRTIO_BLK_T_IN, 0, vec![(SCRATCH + 0x1000, 0, true)]),
    ];
    for (what, kind, sector, data) in cases {
        let (_disk, mut d) = driver();
        let (head, status) = d.request(SCRATCH, kind, sector, &data);
        d.notify();
        d.complete();
        assert_eq!(d.take_used(), vec![(u32::from(head), 1)], "{what}");
        assert_eq!(d.status(status), IOERR, "{what}");
        assert_eq!(d.transport.status(), 15, "{what}: no reset needed");
        assert_read_works(&mut d, SCRATCH + 0x10_000, 2);
        assert_eq!(d.bytes(RAM_SIZE as u64 - 256, 256), vec![0; 256], "{what}: nothing outside the request written");
    }
}

#[test]
fn malformed_chains_are_returned_without_status() {
    let status = SCRATCH + 0x10;
    let header = (SCRATCH, 16, F_NEXT, 1);
    let cases: Vec<(&str, Vec<(u64, u32, u16, u16)>)> = vec![
        ("a loop", vec![header, (SCRATCH + 0x1000, 512, F_WRITE | F_NEXT, 0)]),
        ("next past the table", vec![header, (SCRATCH + 0x1000, 512, F_WRITE | F_NEXT, 99)]),
        ("status not writable", vec![header, (status, 1, 0, 0)]),
        ("header only", vec![(SCRATCH, 16, 0, 0)]),
        ("header written by the device", vec![(SCRATCH, 16, F_WRITE | F_NEXT, 1), (status, 1, F_WRITE, 0)]),
        ("short header", vec![(SCRATCH, 8, F_NEXT, 1), (status, 1, F_WRITE, 0)]),
    ];
    for (what, descs) in cases {
        let (_disk, mut d) = driver();
        d.ram.write_obj(VIRTIO_BLK_T_IN, GuestAddress(SCRATCH)).unwrap();
        d.ram.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        d.offer_raw(0, &descs, 0);
        d.notify();
        d.complete();
        let used = d.take_used();
        assert_eq!(used.len(), 1, "{what}: the head comes back");
        let answered = d.status(status);
        assert!(answered == 0xee || answered == IOERR, "{what}: status {answered:#x}");
        // A fresh driver's descriptors start at 0; use the upper half for the check.
        let (head, st) = {
            let at = SCRATCH + 0x2_0000;
            d.ram.write_obj(VIRTIO_BLK_T_IN, GuestAddress(at)).unwrap();
            d.ram.write_obj(1u64, GuestAddress(at + 8)).unwrap();
            let descs = [(at, 16, F_NEXT, 9), (at + 0x1000, 512, F_WRITE | F_NEXT, 10), (at + 16, 1, F_WRITE, 0)];
            d.offer_raw(8, &descs, 8);
            (8u32, at + 16)
        };
        d.notify();
        d.complete();
        assert_eq!(d.take_used(), vec![(head, 513)], "{what}: the next good request is served");
        assert_eq!(d.status(st), OK);
    }
}

#[test]
fn chains_that_revisit_descriptors_are_refused() {
    let (_disk, mut d) = driver();
    // Every descriptor of the table, the last pointing back to the first: longer than the
    // queue allows, so the walk stops and the head comes back without a status.
    let mut descs = vec![(SCRATCH, 16, F_NEXT, 1)];
    for i in 1..16u16 {
        descs.push((SCRATCH + 0x1000 * u64::from(i), 512, F_WRITE | F_NEXT, (i + 1) % 16));
    }
    d.ram.write_obj(VIRTIO_BLK_T_IN, GuestAddress(SCRATCH)).unwrap();
    d.offer_raw(0, &descs, 0);
    d.notify();
    d.complete();
    assert_eq!(d.take_used(), vec![(0, 0)]);
}

#[test]
fn an_avail_index_jump_needs_reset() {
    let (_disk, mut d) = driver();
    d.ram.write_obj(100u16, GuestAddress(AVAIL_RING + 2)).unwrap();
    d.notify();
    assert_eq!(reg_read(&mut d.transport, 0x70) & 0x40, 0x40);
    reg_write(&mut d.transport, 0x70, 0);
    assert_eq!(reg_read(&mut d.transport, 0x70), 0, "reset clears it");
}

#[test]
fn a_driver_offering_a_head_still_in_flight_past_the_queue_size_needs_reset() {
    let (_disk, mut d) = driver();
    d.transport.device().hold_submissions(true);
    let (head, _) = d.request(SCRATCH, VIRTIO_BLK_T_IN, 2, &[(SCRATCH + 0x1000, 512, true)]);
    d.notify();
    // The same chain again and again, while the first is still in flight.
    for _ in 0..QUEUE_SIZE {
        d.offer_raw(head, &[], head);
        d.notify();
    }
    assert_eq!(d.transport.device().in_flight(), usize::from(QUEUE_SIZE), "never more than the queue holds");
    assert_eq!(reg_read(&mut d.transport, 0x70) & 0x40, 0x40);
    reg_write(&mut d.transport, 0x70, 0);
    assert_eq!(d.transport.device().in_flight(), 0, "the reset drained them");
}

#[test]
fn a_hold_outlasts_a_device_reset_that_drains_the_held_requests() {
    let (_disk, mut d) = driver();
    d.transport.device().hold_submissions(true);
    let (_, status) = d.request(SCRATCH, VIRTIO_BLK_T_IN, 2, &[(SCRATCH + 0x1000, 512, true)]);
    d.notify();
    assert_eq!(d.transport.device().in_flight(), 1, "held: pinned and queued");
    // The guest resets the device: the held read is submitted and waited for, not delivered.
    d.reset_and_bring_up();
    assert_eq!(d.transport.device().in_flight(), 0, "the reset drained it");
    assert_eq!(d.status(status), 0xff, "a reset delivers nothing to the guest");
    assert_eq!(d.ram.stats().pinned_pages, 0, "the drained read released its pins");

    // The hold still applies to requests after the reset, until it is lifted.
    let (head, status) = d.request(SCRATCH, VIRTIO_BLK_T_IN, 3, &[(SCRATCH + 0x1000, 512, true)]);
    d.notify();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(d.transport.device().poll_completions(), 0, "a held read completed");
    assert_eq!(d.transport.device().in_flight(), 1);
    d.transport.device().hold_submissions(false);
    d.complete();
    assert_eq!(d.take_used(), vec![(u32::from(head), 513)]);
    assert_eq!(d.status(status), OK);
    assert_eq!(d.bytes(SCRATCH + 0x1000, 512), expected(3 * 512, 512));
}
