//! Cloning RAM and disk while a virtio-blk read and a DMA-engine transfer are in flight: the
//! source ends with the full data, the clone holds the clone-instant bytes and, after it
//! re-executes its copy of each request, the full data too; the disks then diverge.

#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;

use common::*;
use devices::block::{BlockArgs, BlockDevice};
use devices::dma::{DmaArgs, DmaEngine, DmaSource, TransferSpec};
use devices::virtio::MmioTransport;
use devices::{DeviceInterrupt, Persist};
use memory::{Bytes, GuestAddress};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const READ_BUF: u64 = SCRATCH + 0x1000;
const READ_LEN: usize = 8192;
const READ_SECTOR: u64 = 4;
const DMA_DST: u64 = 0x20_0000;
const DMA_LEN: usize = 64 << 10;
const DMA_CHUNK: u64 = 4096;
const PATTERN: u64 = 0x0123_4567_89ab_cdef;

fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| PATTERN.to_le_bytes()[i % 8]).collect()
}

fn disk_bytes(sector: u64, len: usize) -> Vec<u8> {
    (sector * 512..sector * 512 + len as u64).map(disk_byte).collect()
}

/// One request at `at` through the driver, completed; returns the data buffer's bytes.
fn io(d: &mut Driver, at: u64, kind: u32, sector: u64, data: Option<&[u8]>, len: usize) -> Vec<u8> {
    let buf = at + 0x1000;
    if let Some(data) = data {
        d.ram.write_slice(data, GuestAddress(buf)).unwrap();
    }
    let (_, status) = d.request(at, kind, sector, &[(buf, len as u32, data.is_none())]);
    d.notify();
    d.complete();
    assert_eq!(d.status(status), 0, "request at {at:#x}");
    d.bytes(buf, len)
}

#[test]
fn clone_during_blk_read_and_dma_reexecutes_both() {
    let disk = TempDisk::new(64);
    let ram = new_ram();
    let mut source = Driver::new(Arc::clone(&ram), disk.open());
    ram.write_slice(&vec![0xaa; READ_LEN], GuestAddress(READ_BUF)).unwrap();
    ram.write_slice(&vec![0x11; DMA_LEN], GuestAddress(DMA_DST)).unwrap();

    // A virtio-blk read, pinned and queued for the kernel but not started yet.
    source.transport.device().hold_submissions(true);
    source.request(SCRATCH, VIRTIO_BLK_T_IN, READ_SECTOR, &[(READ_BUF, READ_LEN as u32, true)]);
    source.notify();
    assert_eq!(source.transport.device().in_flight(), 1);
    // A DMA transfer three chunks in.
    let mut dma = DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled());
    let spec = TransferSpec {
        source: DmaSource::Pattern(PATTERN),
        dst: DMA_DST,
        len: DMA_LEN as u64,
        chunk: DMA_CHUNK,
        pacing_us: 0,
    };
    dma.start(spec).unwrap();
    for _ in 0..3 {
        assert!(dma.step());
    }

    // The clone instant (vCPUs would be paused here).
    let transport_state = source.transport.state();
    let dma_state = dma.state();
    let (blk_state, clone_disk, clone_ram) = source.transport.device().capture_and_clone(|| ram.clone_cow()).unwrap();
    let clone_ram = Arc::new(clone_ram.unwrap());
    let driver_at_clone = source.indices();
    assert_eq!(blk_state.in_flight.len(), 1);
    assert_eq!(blk_state.in_flight[0].data[0].addr, READ_BUF);
    assert_eq!((dma_state.in_flight, dma_state.progress), (Some(spec), 3 * DMA_CHUNK));

    // The source finishes both; its buffers end with exactly the full data.
    source.transport.device().hold_submissions(false);
    source.complete();
    dma.run_to_completion();
    assert_eq!(source.take_used().len(), 1);
    assert_eq!(source.bytes(READ_BUF, READ_LEN), disk_bytes(READ_SECTOR, READ_LEN));
    assert_eq!(source.bytes(DMA_DST, DMA_LEN), pattern_bytes(DMA_LEN));

    // The clone holds the clone-instant bytes...
    let mut at_clone = vec![0u8; DMA_LEN];
    clone_ram.read_slice(&mut at_clone, GuestAddress(DMA_DST)).unwrap();
    let done = 3 * DMA_CHUNK as usize;
    assert_eq!(&at_clone[..done], &pattern_bytes(done)[..]);
    assert!(at_clone[done..].iter().all(|&b| b == 0x11));
    let mut read_at_clone = vec![0u8; READ_LEN];
    clone_ram.read_slice(&mut read_at_clone, GuestAddress(READ_BUF)).unwrap();
    assert_eq!(read_at_clone, vec![0xaa; READ_LEN]);

    // ...and after re-executing its copies, the full data.
    let device = BlockDevice::restore(
        BlockArgs { ram: Arc::clone(&clone_ram), disk: clone_disk, interrupt: DeviceInterrupt::polled() },
        &blk_state,
    )
    .unwrap();
    let transport = MmioTransport::restore(device, &transport_state).unwrap();
    let mut clone = Driver::resume(Arc::clone(&clone_ram), transport, driver_at_clone);
    clone.complete();
    assert_eq!(clone.take_used().len(), 1, "the clone completes its copy of the read");
    assert_eq!(clone.bytes(READ_BUF, READ_LEN), disk_bytes(READ_SECTOR, READ_LEN));
    let mut clone_dma =
        DmaEngine::restore(DmaArgs { ram: Arc::clone(&clone_ram), interrupt: DeviceInterrupt::polled() }, &dma_state)
            .unwrap();
    assert_eq!(clone_dma.progress(), 0, "restarted from byte 0");
    clone_dma.run_to_completion();
    assert_eq!(clone.bytes(DMA_DST, DMA_LEN), pattern_bytes(DMA_LEN));

    // The disks diverge: writes after the clone are invisible to the other side.
    io(&mut source, SCRATCH + 0x4_0000, VIRTIO_BLK_T_OUT, 20, Some(&[b'S'; 512]), 512);
    io(&mut clone, SCRATCH + 0x4_0000, VIRTIO_BLK_T_OUT, 20, Some(&[b'C'; 1024]), 1024);
    assert_eq!(
        io(&mut source, SCRATCH + 0x5_0000, VIRTIO_BLK_T_IN, 20, None, 1024),
        [&[b'S'; 512][..], &disk_bytes(21, 512)].concat()
    );
    // A clone of the clone sees the clone's writes, and the two diverge again.
    let clone2_disk = clone.transport.device().clone_disk().unwrap();
    let clone2_ram = Arc::new(clone_ram.clone_cow().unwrap());
    let state2 = clone.transport.device().state();
    let device2 = BlockDevice::restore(
        BlockArgs { ram: Arc::clone(&clone2_ram), disk: clone2_disk, interrupt: DeviceInterrupt::polled() },
        &state2,
    )
    .unwrap();
    let transport2 = MmioTransport::restore(device2, &clone.transport.state()).unwrap();
    let mut clone2 = Driver::resume(clone2_ram, transport2, clone.indices());
    io(&mut clone2, SCRATCH + 0x5_0000, VIRTIO_BLK_T_OUT, 21, Some(&[b'E'; 512]), 512);
    assert_eq!(
        io(&mut clone2, SCRATCH + 0x6_0000, VIRTIO_BLK_T_IN, 20, None, 1024),
        [&[b'C'; 512][..], &[b'E'; 512]].concat()
    );
    assert_eq!(io(&mut clone, SCRATCH + 0x5_0000, VIRTIO_BLK_T_IN, 20, None, 1024), vec![b'C'; 1024]);
    assert_eq!(std::fs::read(&disk.0).unwrap()[20 * 512], disk_byte(20 * 512), "the frozen base never changes");
}
