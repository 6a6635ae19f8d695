//! Requests in flight across a failed io_uring submit and a reused slot, with the integration
//! tests' driver (`devices/tests/common`) and the test-only fault injection of `Uring`.

#![allow(clippy::cast_possible_truncation)]

#[path = "../../tests/common/mod.rs"]
mod common;

use common::*;
use memory::{Bytes, GuestAddress};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use super::*;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const BEFORE: u8 = 0xaa;

fn disk_bytes(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(disk_byte).collect()
}

fn pinned_pages(d: &Driver) -> u64 {
    d.ram.stats().pinned_pages
}

/// A read of `len` bytes at `sector` into page-aligned `buf` (prefilled with `BEFORE`),
/// offered at `at`; returns (head, status address).
fn read(d: &mut Driver, at: u64, sector: u64, buf: u64, len: usize) -> (u16, u64) {
    d.ram.write_slice(&vec![BEFORE; len], GuestAddress(buf)).unwrap();
    d.request(at, VIRTIO_BLK_T_IN, sector, &[(buf, len as u32, true)])
}

#[test]
fn a_failed_submit_fails_only_what_the_kernel_never_took_and_unpins_nothing_it_holds() {
    let disk = TempDisk::new(64);
    let mut d = Driver::new(new_ram(), disk.open());
    // Sector 21 in the overlay over a frozen base (a disk clone made one), so a read of 20..24
    // takes three operations: base, top, base.
    drop(d.transport.device().clone_disk().unwrap());
    let written = SCRATCH + 0x1000;
    d.ram.write_slice(&[b'W'; 512], GuestAddress(written)).unwrap();
    d.request(SCRATCH, VIRTIO_BLK_T_OUT, 21, &[(written, 512, false)]);
    d.notify();
    d.complete();
    d.take_used();

    // A: submitted; the kernel holds it (its completion is not reaped).
    let (buf_a, buf_b, buf_c) = (SCRATCH + 0x1_0000, SCRATCH + 0x2_0000, SCRATCH + 0x3_0000);
    let (head_a, status_a) = read(&mut d, SCRATCH + 0x100, 40, buf_a, 8192);
    d.notify();
    // B (three operations) and C (one), queued together; the kernel takes only B's first two.
    d.transport.device().hold_submissions(true);
    let (head_b, status_b) = read(&mut d, SCRATCH + 0x200, 20, buf_b, 2048);
    let (head_c, status_c) = read(&mut d, SCRATCH + 0x300, 4, buf_c, 4096);
    d.notify();
    assert_eq!(d.transport.device().lock().uring.in_kernel(), 1, "A alone is in the kernel");
    d.transport.device().lock().uring.fail_next_submit_after = Some(2);
    d.transport.device().hold_submissions(false);

    // C never reached the kernel: failed at once, unpinned. A and B keep their pins.
    assert_eq!(d.take_used(), vec![(u32::from(head_c), 1)]);
    assert_eq!(d.status(status_c), IOERR);
    assert_eq!(d.transport.device().in_flight(), 2);
    assert_eq!(pinned_pages(&d), 2 + 1, "A's two pages and B's one stay pinned");
    assert_eq!(d.bytes(buf_c, 4096), vec![BEFORE; 4096]);
    // A clone now copies the pinned pages eagerly: the kernel's writes stay with this RAM.
    let clone = d.ram.clone_cow().unwrap();
    assert_eq!(d.ram.eager_copied_pages(), 3);

    d.complete();
    let mut used = d.take_used();
    used.sort_unstable();
    assert_eq!(used, vec![(u32::from(head_a), 8192 + 1), (u32::from(head_b), 1)]);
    assert_eq!((d.status(status_a), d.status(status_b)), (OK, IOERR), "B failed: one of its operations never ran");
    assert_eq!(d.bytes(buf_a, 8192), disk_bytes(40 * 512, 8192), "A's data is in the RAM that owns it");
    let b = d.bytes(buf_b, 2048);
    assert_eq!(
        (&b[..512], &b[512..1024]),
        (&disk_bytes(20 * 512, 512)[..], &[b'W'; 512][..]),
        "B's operations the kernel ran"
    );
    assert_eq!(&b[1024..], &[BEFORE; 1024][..], "B's dead operation never ran");
    assert_eq!(pinned_pages(&d), 0);
    let mut at_clone = vec![0u8; 512];
    clone.read_slice(&mut at_clone, GuestAddress(buf_b + 1024)).unwrap();
    assert_eq!(at_clone, vec![BEFORE; 512]);

    // The device goes on, on a fresh ring.
    let (_, status) = read(&mut d, SCRATCH + 0x400, 3, SCRATCH + 0x4_0000, 512);
    d.notify();
    d.complete();
    assert_eq!(d.status(status), OK);
    assert_eq!(d.bytes(SCRATCH + 0x4_0000, 512), disk_bytes(3 * 512, 512));
}

#[test]
fn a_completion_for_an_earlier_request_in_a_slot_finishes_nothing() {
    let disk = TempDisk::new(64);
    let mut d = Driver::new(new_ram(), disk.open());
    let (buf, len) = (SCRATCH + 0x1_0000, 4096);
    read(&mut d, SCRATCH, 1, buf, len);
    d.notify();
    d.complete();
    assert_eq!(d.take_used().len(), 1);
    let done = OpTag { slot: 0, generation: 1 };

    // A real kernel completion carrying the finished request's tag, not reaped yet.
    {
        let mut core = d.transport.device().lock();
        core.uring.push(&Op::Nop, done);
        assert!(core.uring.submit().is_ok());
    }
    // The next request takes the same slot, in the next generation, and is held.
    d.transport.device().hold_submissions(true);
    let (head, status) = read(&mut d, SCRATCH + 0x100, 9, buf, len);
    d.notify();
    {
        let mut core = d.transport.device().lock();
        assert_eq!((core.slots.len(), core.slots[0].generation), (1, 2));
        assert_eq!(core.wait_and_reap(), 0, "the stale completion finished a request");
        assert_eq!(core.uring.in_kernel(), 0, "the stale completion was reaped");
    }
    assert_eq!((d.transport.device().in_flight(), d.status(status)), (1, 0xff));
    assert_eq!(pinned_pages(&d), 1, "the held request keeps its pin");

    d.transport.device().hold_submissions(false);
    d.complete();
    assert_eq!(d.take_used(), vec![(u32::from(head), 4096 + 1)]);
    assert_eq!(d.bytes(buf, len), disk_bytes(9 * 512, len));
}
