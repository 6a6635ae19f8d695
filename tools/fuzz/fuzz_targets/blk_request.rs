//! virtio-blk request parsing against a guest RAM the input fills: the input's bytes are the
//! first bytes of a 64 KiB RAM holding a 16-entry queue (descriptor table at 0, available ring
//! at 0x100, used ring at 0x200) and whatever headers and buffers the descriptors point at;
//! every chain the available ring offers is parsed as the device parses it. Any input must
//! give a request inside RAM and the disk or a refusal, never a panic or an access outside
//! RAM. Seeds: `seeds/blk_request/` (one read, one write, a flush, a GET_ID, a broken chain).
#![no_main]

use devices::block::request::{parse_request, MAX_REQUEST_BYTES};
use devices::block::RequestKind;
use libfuzzer_sys::fuzz_target;
use memory::{Bytes, GuestAddress, GuestRam};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

const RAM: usize = 64 << 10;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// The disk's size in sectors (1 MiB).
const DISK_SECTORS: u64 = 2048;

fuzz_target!(|data: &[u8]| {
    let ram = GuestRam::new(&[(GuestAddress(0), RAM)]).expect("64 KiB of guest RAM");
    ram.write_slice(&data[..data.len().min(RAM)], GuestAddress(0)).expect("inside RAM");
    let mut queue = Queue::new(QUEUE_SIZE).expect("a valid queue size");
    queue.try_set_desc_table_address(vm_memory::GuestAddress(DESC)).expect("aligned");
    queue.try_set_avail_ring_address(vm_memory::GuestAddress(AVAIL)).expect("aligned");
    queue.try_set_used_ring_address(vm_memory::GuestAddress(USED)).expect("aligned");
    queue.set_ready(true);
    let size = u64::from(QUEUE_SIZE);
    let reserved = [(DESC, 16 * size), (AVAIL, 6 + 2 * size), (USED, 6 + 8 * size)];
    let Ok(chains) = queue.iter(&ram) else { return };
    for chain in chains.take(usize::from(QUEUE_SIZE)) {
        let Ok(request) = parse_request(chain, &ram, DISK_SECTORS, &reserved) else { continue };
        let len = request.data_len();
        assert!(len <= MAX_REQUEST_BYTES, "{len} data bytes");
        for segment in &request.data {
            assert!(segment.addr + u64::from(segment.len) <= RAM as u64, "{segment:?} outside RAM");
        }
        if matches!(request.kind, RequestKind::In | RequestKind::Out) {
            assert!(request.sector * 512 + len <= DISK_SECTORS * 512, "{request:?} past the disk");
        }
    }
});
