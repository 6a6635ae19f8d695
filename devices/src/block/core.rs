//! The serving half of virtio-blk: takes requests off the queue, pins and submits them, and
//! completes them into the used ring. Lives behind the device's mutex, shared with the
//! completion thread.

use std::sync::Arc;

use memory::{Access, Bytes, GuestAddress, GuestRam, PinGuard};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::disk::{CowDisk, DiskLayer, DIRECT_IO_ALIGN, SECTOR_SIZE};
use super::request::{parse_request, BlockRequest, RequestKind};
use super::uring::{IoVecs, Op, OpTag, Uring};
use super::BlockError;
use crate::interrupt::{DeviceInterrupt, INT_USED_RING};
use crate::metrics::{bump, BlockMetrics};

/// Bytes of the id string GET_ID returns.
pub const ID_BYTES: usize = 20;

/// A request between submission and its used-ring entry.
struct InFlight {
    request: BlockRequest,
    /// Declared before `pins`: the kernel's view of the buffers goes first.
    iovecs: Vec<IoVecs>,
    /// Held, never read: dropping them unpins (after the used-ring entry is written).
    _pins: Vec<PinGuard>,
    /// Operations that will still complete: staged, or taken by the kernel and not reaped.
    /// The pins go only when this is zero, so never while the kernel may touch the buffers.
    ops_left: usize,
    failed: bool,
}

/// Where one in-flight request lives. `generation` counts the requests the slot has held;
/// the current one's operations carry it in their tag, so a completion for an earlier
/// request can never finish the one in the slot now.
#[derive(Default)]
struct Slot {
    generation: u32,
    request: Option<InFlight>,
}

pub(crate) struct BlockCore {
    pub ram: Arc<GuestRam>,
    pub disk: CowDisk,
    pub queue: Option<Queue>,
    pub interrupt: Arc<DeviceInterrupt>,
    pub id: [u8; ID_BYTES],
    /// Set when the driver broke the queue itself (bad avail index): serve nothing more.
    pub broken: bool,
    /// While set, requests are queued for the kernel but not handed to it (`submit`).
    pub held: bool,
    pub metrics: Arc<BlockMetrics>,
    uring: Uring,
    slots: Vec<Slot>,
}

impl BlockCore {
    pub fn new(
        ram: Arc<GuestRam>,
        disk: CowDisk,
        interrupt: Arc<DeviceInterrupt>,
        id: [u8; ID_BYTES],
    ) -> Result<Self, BlockError> {
        Ok(BlockCore {
            ram,
            disk,
            queue: None,
            interrupt,
            id,
            broken: false,
            held: false,
            metrics: Arc::default(),
            uring: Uring::new()?,
            slots: Vec::new(),
        })
    }

    /// Makes io_uring signal `event` on every completion (the event loop's subscriber).
    pub fn register_completion_event(&mut self, event: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()> {
        self.uring.register_eventfd(event)
    }

    fn requests(&self) -> impl Iterator<Item = &InFlight> {
        self.slots.iter().filter_map(|s| s.request.as_ref())
    }

    /// The requests in flight, as plain data.
    pub fn in_flight(&self) -> Vec<BlockRequest> {
        self.requests().map(|f| f.request.clone()).collect()
    }

    pub fn in_flight_count(&self) -> usize {
        self.requests().count()
    }

    /// Guest ranges of the queue's rings, which no request buffer may overlap.
    fn ring_ranges(queue: &Queue) -> [(u64, u64); 3] {
        let size = u64::from(queue.size());
        [(queue.desc_table(), 16 * size), (queue.avail_ring(), 6 + 2 * size), (queue.used_ring(), 6 + 8 * size)]
    }

    /// Serves every request the driver made available.
    pub fn process_queue(&mut self) {
        let Some(mut queue) = self.queue.take() else { return };
        let reserved = Self::ring_ranges(&queue);
        let ram = Arc::clone(&self.ram);
        loop {
            let chain = match queue.iter(&*ram) {
                Ok(mut iter) => iter.next(),
                Err(_) => {
                    // The avail index jumped by more than the queue size.
                    self.broken = true;
                    None
                }
            };
            let Some(chain) = chain else { break };
            if self.in_flight_count() >= usize::from(queue.size()) {
                // Each request in flight holds a descriptor: the driver offered one twice.
                self.broken = true;
                break;
            }
            match parse_request(chain, &ram, self.disk.sectors(), &reserved) {
                Ok(request) => self.start(&mut queue, request),
                Err(bad) => {
                    bump(&self.metrics.invalid_reqs_count, 1);
                    self.complete_now(&mut queue, bad.head, bad.status, VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        self.queue = Some(queue);
        self.submit();
    }

    /// Hands queued kernel operations over, unless held. Operations the kernel did not take
    /// fail their requests; a request with operations in the kernel still waits for them.
    pub fn submit(&mut self) {
        if self.held {
            return;
        }
        if let Err(failure) = self.uring.submit() {
            for tag in failure.dead {
                self.op_done(tag, false, true);
            }
        }
    }

    /// Starts `request`: completes it at once if it needs no I/O, else pins and queues it.
    pub fn start(&mut self, queue: &mut Queue, request: BlockRequest) {
        let (head, status) = (request.head, request.status);
        match request.kind {
            RequestKind::Unsupported(_) => {
                bump(&self.metrics.invalid_reqs_count, 1);
                self.complete_now(queue, head, Some(status), VIRTIO_BLK_S_UNSUPP, 0)
            }
            RequestKind::GetId => {
                let seg = request.data[0];
                let n = (seg.len as usize).min(ID_BYTES);
                let written = self
                    .ram
                    .pin(GuestAddress(seg.addr), n, Access::Write)
                    .and_then(|pin| pin.write_at(0, &self.id[..n]));
                bump(if written.is_ok() { &self.metrics.get_id_count } else { &self.metrics.execute_fails }, 1);
                let code = if written.is_ok() { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR };
                self.complete_now(queue, head, Some(status), code, if written.is_ok() { n as u32 } else { 0 });
            }
            RequestKind::In | RequestKind::Out | RequestKind::Flush => {
                if let Err(_e) = self.queue_io(request) {
                    bump(&self.metrics.execute_fails, 1);
                    self.complete_now(queue, head, Some(status), VIRTIO_BLK_S_IOERR, 0);
                }
            }
        }
    }

    /// Pins the buffers and queues the kernel operations of an IN, OUT or FLUSH.
    fn queue_io(&mut self, request: BlockRequest) -> Result<(), BlockError> {
        let access = if request.kind == RequestKind::In { Access::Write } else { Access::Read };
        let pins = request
            .data
            .iter()
            .filter(|_| request.kind != RequestKind::Flush)
            .map(|s| self.ram.pin(GuestAddress(s.addr), s.len as usize, access))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BlockError::Pin)?;
        let buffers: Vec<(*mut u8, u64)> = pins.iter().map(|p| (p.host_ptr(), p.len() as u64)).collect();
        let offset = request.sector * SECTOR_SIZE;
        let count = request.data_len() / SECTOR_SIZE;
        // (layer, byte offset on disk, iovecs)
        let mut plan: Vec<(DiskLayer, u64, IoVecs)> = Vec::new();
        match request.kind {
            RequestKind::In => {
                for extent in self.disk.plan_read(request.sector, count) {
                    let start = (extent.sector - request.sector) * SECTOR_SIZE;
                    let iov = slice_buffers(&buffers, start, extent.count * SECTOR_SIZE);
                    plan.push((extent.layer, extent.sector * SECTOR_SIZE, iov));
                }
            }
            RequestKind::Out => {
                self.disk.mark_written(request.sector, count);
                plan.push((DiskLayer::Top, offset, slice_buffers(&buffers, 0, count * SECTOR_SIZE)));
            }
            _ => {}
        }
        let is_flush = request.kind == RequestKind::Flush;
        let is_read = request.kind == RequestKind::In;
        let ops_left = if is_flush { 1 } else { plan.len() };
        if ops_left == 0 {
            return Err(BlockError::Io { result: -libc::EINVAL });
        }
        let tag = self.take_slot();
        let mut entry = InFlight { request, iovecs: Vec::new(), _pins: pins, ops_left, failed: false };
        if is_flush {
            self.uring.push(&Op::Fsync { fd: self.disk.top().fd(false) }, tag);
        }
        for (layer, disk_offset, iov) in plan {
            let file = match layer {
                DiskLayer::Top => self.disk.top(),
                DiskLayer::Base => self.disk.base().unwrap_or(self.disk.top()),
            };
            let aligned = disk_offset.is_multiple_of(DIRECT_IO_ALIGN)
                && iov.0.iter().all(|v| {
                    (v.iov_base as u64).is_multiple_of(DIRECT_IO_ALIGN)
                        && (v.iov_len as u64).is_multiple_of(DIRECT_IO_ALIGN)
                });
            let fd = file.fd(aligned);
            entry.iovecs.push(iov);
            let iovecs = entry.iovecs.last().expect("just pushed");
            let op = if is_read {
                Op::Read { fd, offset: disk_offset, iovecs }
            } else {
                Op::Write { fd, offset: disk_offset, iovecs }
            };
            self.uring.push(&op, tag);
        }
        self.slots[tag.slot as usize].request = Some(entry);
        Ok(())
    }

    /// A free slot for a new request, in its next generation.
    fn take_slot(&mut self) -> OpTag {
        let index = self.slots.iter().position(|s| s.request.is_none()).unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        });
        let slot = &mut self.slots[index];
        slot.generation = slot.generation.wrapping_add(1);
        // `process_queue` keeps requests in flight at most the queue size (256): it fits.
        OpTag { slot: index as u32, generation: slot.generation }
    }

    /// Counts one operation of `tag`'s request as over (`ok`: it succeeded); finishes the
    /// request, delivering it if `deliver`, when it was the last. A tag of a request that is
    /// gone is ignored. Returns whether a request finished.
    fn op_done(&mut self, tag: OpTag, ok: bool, deliver: bool) -> bool {
        let Some(slot) = self.slots.get_mut(tag.slot as usize) else { return false };
        let Some(entry) = slot.request.as_mut().filter(|_| slot.generation == tag.generation) else { return false };
        entry.failed |= !ok;
        entry.ops_left = entry.ops_left.saturating_sub(1);
        if entry.ops_left > 0 {
            return false;
        }
        self.finish(tag.slot as usize, deliver);
        true
    }

    /// Takes every completion the kernel has posted; returns how many requests finished.
    fn reap_with(&mut self, deliver: bool) -> usize {
        let completions = self.uring.reap();
        completions.into_iter().filter(|&(tag, result)| self.op_done(tag, result >= 0, deliver)).count()
    }

    /// Blocks until the kernel posts a completion. Pins are never released on a guess, so a
    /// wait that cannot block (an error other than a signal) falls back to polling.
    fn wait_for_kernel(&mut self) {
        match self.uring.wait() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }

    /// Takes every available completion; finishes requests whose last operation ended.
    /// Returns how many requests completed.
    pub fn reap(&mut self) -> usize {
        self.reap_with(true)
    }

    /// Submits what is queued (unless held), then blocks until at least one request completes
    /// and reaps. Returns 0 at once if the kernel holds nothing to wait for.
    pub fn wait_and_reap(&mut self) -> usize {
        self.submit();
        loop {
            let done = self.reap();
            if done > 0 || self.uring.in_kernel() == 0 {
                return done;
            }
            self.wait_for_kernel();
        }
    }

    /// Waits for every request in flight. With `deliver` false (reset) nothing is written
    /// to the guest, but the buffers stay pinned until the kernel is done with them. What is
    /// held is handed to the kernel; a hold (the host's choice, not device state) stays on for
    /// later requests.
    pub fn drain(&mut self, deliver: bool) {
        let held = std::mem::replace(&mut self.held, false);
        self.drain_unheld(deliver);
        self.held = held;
    }

    fn drain_unheld(&mut self, deliver: bool) {
        self.submit();
        // After an unheld submit every operation left is in the kernel (the others failed).
        while self.in_flight_count() > 0 && self.uring.in_kernel() > 0 {
            if self.reap_with(deliver) == 0 {
                self.wait_for_kernel();
            }
        }
        self.reap_with(deliver);
    }

    /// Writes the status, returns the head to the used ring, then unpins and interrupts.
    fn finish(&mut self, slot: usize, deliver: bool) {
        let Some(entry) = self.slots[slot].request.take() else { return };
        if deliver {
            self.count_done(&entry);
            let code = if entry.failed { VIRTIO_BLK_S_IOERR } else { VIRTIO_BLK_S_OK };
            let written = if entry.request.kind == RequestKind::In && !entry.failed {
                entry.request.data_len() as u32
            } else {
                0
            };
            if let Some(mut queue) = self.queue.take() {
                self.complete_now(&mut queue, entry.request.head, Some(entry.request.status), code, written);
                self.queue = Some(queue);
            }
        }
        drop(entry); // unpins: the memory layer marks the written pages dirty
    }

    /// Counts a request delivered to the guest.
    fn count_done(&self, entry: &InFlight) {
        let m = &self.metrics;
        let (count, bytes) = match (entry.failed, entry.request.kind) {
            (true, _) => (&m.execute_fails, None),
            (false, RequestKind::In) => (&m.read_count, Some(&m.read_bytes)),
            (false, RequestKind::Out) => (&m.write_count, Some(&m.write_bytes)),
            (false, RequestKind::Flush) => (&m.flush_count, None),
            (false, _) => return,
        };
        bump(count, 1);
        if let Some(bytes) = bytes {
            bump(bytes, entry.request.data_len());
        }
    }

    /// Writes status `code`, adds `head` to the used ring and raises the interrupt.
    fn complete_now(&mut self, queue: &mut Queue, head: u16, status: Option<u64>, code: u32, data_written: u32) {
        let mut used_len = data_written;
        if let Some(addr) = status {
            if self.ram.write_obj(code as u8, GuestAddress(addr)).is_ok() {
                used_len += 1;
            }
        }
        if queue.add_used(&*self.ram, head, used_len).is_err() {
            self.broken = true;
        }
        self.interrupt.raise(INT_USED_RING);
    }
}

/// The iovecs covering `len` bytes from byte `start` of the concatenated `buffers`.
fn slice_buffers(buffers: &[(*mut u8, u64)], start: u64, len: u64) -> IoVecs {
    let mut out = Vec::new();
    let (mut skip, mut want) = (start, len);
    for &(ptr, blen) in buffers {
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(want);
        // SAFETY: skip < blen, so the pointer stays inside the pinned buffer.
        out.push(libc::iovec { iov_base: unsafe { ptr.add(skip as usize) }.cast(), iov_len: take as usize });
        want -= take;
        skip = 0;
        if want == 0 {
            break;
        }
    }
    IoVecs(out)
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
