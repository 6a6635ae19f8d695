//! `BlockDevice`: virtio-blk as the MMIO transport sees it, plus what the VMM and the clone
//! path need: capture/restore, disk clone, deterministic completion for tests, and the
//! completion subscriber for a running VM's event loop.

use std::sync::{Arc, Mutex, MutexGuard};

use memory::GuestRam;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueState, QueueT};

use super::completion::BlockCompletions;
use super::core::{BlockCore, ID_BYTES};
use super::disk::CowDisk;
use super::request::{BlockRequest, SEG_MAX, SIZE_MAX};
use super::BlockError;
use crate::interrupt::DeviceInterrupt;
use crate::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Largest queue the device offers.
pub const BLOCK_QUEUE_SIZE: u16 = 256;

/// virtio-blk's state as plain data (guest physical addresses only): the live queue and
/// every request in flight, which a clone re-executes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    pub features: u64,
    pub queue: Option<QueueState>,
    pub in_flight: Vec<BlockRequest>,
}

/// A virtio-blk device. Its serving state is shared with the completion thread.
pub struct BlockDevice {
    core: Arc<Mutex<BlockCore>>,
    interrupt: Arc<DeviceInterrupt>,
    features: u64,
    sectors: u64,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice").field("sectors", &self.sectors).finish_non_exhaustive()
    }
}

fn device_id(sectors: u64) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let text = format!("zygote-blk-{sectors}");
    let n = text.len().min(ID_BYTES);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

impl BlockDevice {
    /// A device serving `disk` from `ram`, interrupting through `interrupt`.
    pub fn new(ram: Arc<GuestRam>, disk: CowDisk, interrupt: Arc<DeviceInterrupt>) -> Result<Self, BlockError> {
        let sectors = disk.sectors();
        let core = BlockCore::new(ram, disk, Arc::clone(&interrupt), device_id(sectors))?;
        Ok(BlockDevice { core: Arc::new(Mutex::new(core)), interrupt, features: 0, sectors })
    }

    /// A clone's device: `state` captured from the source, `ram` and `disk` the clone's own.
    /// Every request that was in flight is re-executed now, against the clone's pages.
    pub fn restore(ram: Arc<GuestRam>, disk: CowDisk, interrupt: Arc<DeviceInterrupt>, state: &BlockState) -> Result<Self, BlockError> {
        let mut device = BlockDevice::new(ram, disk, interrupt)?;
        device.features = state.features;
        if let Some(q) = state.queue {
            let mut queue = Queue::try_from(q).map_err(|e| BlockError::BadState(e.to_string()))?;
            let mut core = device.lock();
            for request in &state.in_flight {
                core.start(&mut queue, request.clone());
            }
            core.queue = Some(queue);
            core.submit();
        }
        Ok(device)
    }

    fn lock(&self) -> MutexGuard<'_, BlockCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device state as plain data. Take it with the vCPUs paused.
    pub fn state(&self) -> BlockState {
        let core = self.lock();
        BlockState { features: self.features, queue: core.queue.as_ref().map(Queue::state), in_flight: core.in_flight() }
    }

    /// The clone instant, atomic against completions: with the device locked (so no request
    /// completes into the used ring meanwhile) captures the state, clones the disk, and runs
    /// `clone_ram` (e.g. `|| ram.clone_cow()`). Call it with the vCPUs paused.
    pub fn capture_and_clone<R>(&self, clone_ram: impl FnOnce() -> R) -> Result<(BlockState, CowDisk, R), BlockError> {
        let mut core = self.lock();
        let state = BlockState { features: self.features, queue: core.queue.as_ref().map(Queue::state), in_flight: core.in_flight() };
        let disk = core.disk.clone_cow()?;
        let ram = clone_ram();
        Ok((state, disk, ram))
    }

    /// Like `capture_and_clone` without the disk clone (a snapshot of RAM and state only):
    /// captures the state and runs `freeze_ram` with the device locked.
    pub fn capture_with<R>(&self, freeze_ram: impl FnOnce() -> R) -> (BlockState, R) {
        let core = self.lock();
        let state = BlockState { features: self.features, queue: core.queue.as_ref().map(Queue::state), in_flight: core.in_flight() };
        (state, freeze_ram())
    }

    /// A copy-on-write clone of the disk (see `CowDisk::clone_cow`).
    pub fn clone_disk(&self) -> Result<CowDisk, BlockError> {
        self.lock().disk.clone_cow()
    }

    /// Requests between submission and completion.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight_count()
    }

    /// While held, requests are pinned and queued but not handed to the kernel; releasing
    /// submits them. Lets tests (and batching callers) choose the instant I/O starts.
    pub fn hold_submissions(&self, held: bool) {
        let mut core = self.lock();
        core.held = held;
        core.submit();
    }

    /// Completes whatever has finished, without blocking; returns how many requests.
    pub fn poll_completions(&self) -> usize {
        self.lock().reap()
    }

    /// Blocks until every request in flight has completed into the used ring.
    pub fn complete_all(&self) {
        let mut core = self.lock();
        core.held = false;
        while core.in_flight_count() > 0 {
            core.wait_and_reap();
        }
    }

    /// The subscriber that completes requests as the kernel finishes them, for the VM's event
    /// loop. Call it once per device (io_uring takes one completion eventfd).
    pub fn completions(&self) -> Result<BlockCompletions, BlockError> {
        BlockCompletions::new(Arc::clone(&self.core))
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_FLUSH
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLOCK_QUEUE_SIZE]
    }

    fn interrupt(&self) -> &Arc<DeviceInterrupt> {
        &self.interrupt
    }

    /// capacity (u64 sectors), size_max (u32), seg_max (u32); the rest reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset.checked_add(i as u64).and_then(|o| config.get(o as usize)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mut queues: Vec<Queue>, features: u64) -> Result<(), VirtioError> {
        let queue = queues.pop().ok_or(VirtioError::QueueInvalid { queue: 0 })?;
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        if !queue.is_valid(&*core.ram) {
            return Err(VirtioError::QueueInvalid { queue: 0 });
        }
        core.queue = Some(queue);
        core.broken = false;
        drop(core);
        self.features = features;
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        let mut core = self.lock();
        if !core.broken {
            core.process_queue();
        }
    }

    fn needs_reset(&self) -> bool {
        self.lock().broken
    }

    fn reset(&mut self) {
        {
            let mut core = self.lock();
            core.drain(false);
            core.queue = None;
            core.broken = false;
        }
        self.features = 0;
    }
}
