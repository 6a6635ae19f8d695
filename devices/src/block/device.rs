//! `BlockDevice`: virtio-blk as the MMIO transport sees it, plus what the VMM and the clone
//! path need: capture/restore, disk clone, deterministic completion for tests, and the
//! completion subscriber for a running VM's event loop.

use std::sync::{Arc, Mutex, MutexGuard};

use memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueState, QueueT};

use super::completion::BlockCompletions;
use super::core::{BlockCore, ID_BYTES};
use super::disk::{CowDisk, SECTOR_SIZE};
use super::frozen::FrozenDisk;
use super::request::{BlockRequest, RequestKind, SEG_MAX, SIZE_MAX};
use super::BlockError;
use crate::interrupt::DeviceInterrupt;
use crate::persist::Persist;
use crate::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Largest queue the device offers.
pub const BLOCK_QUEUE_SIZE: u16 = 256;

/// virtio-blk's state as plain data (guest physical addresses only): the live queue and
/// every request in flight, which a clone re-executes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub features: u64,
    #[serde(with = "crate::virtio::queue_serde::option")]
    pub queue: Option<QueueState>,
    pub in_flight: Vec<BlockRequest>,
}

impl BlockState {
    /// Checks a saved state (a snapshot file is input) against a disk of `disk_sectors`
    /// before anything is restored from it; returns its queue, validated.
    pub fn check(&self, disk_sectors: u64) -> Result<Option<Queue>, BlockError> {
        let Some(saved) = self.queue else {
            return match self.in_flight.first() {
                Some(r) => {
                    Err(BlockError::BadSavedRequest { head: r.head, reason: "in flight without a queue".into() })
                }
                None => Ok(None),
            };
        };
        if saved.max_size != BLOCK_QUEUE_SIZE {
            return Err(BlockError::BadState(format!(
                "queue max size {}, the device has {BLOCK_QUEUE_SIZE}",
                saved.max_size
            )));
        }
        let queue = Queue::try_from(saved).map_err(|e| BlockError::BadState(e.to_string()))?;
        for request in &self.in_flight {
            request.check_saved(disk_sectors, queue.size())?;
        }
        Ok(Some(queue))
    }
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

    /// The device's counters (shared with its serving half; read without its lock).
    pub fn metrics(&self) -> Arc<crate::metrics::BlockMetrics> {
        Arc::clone(&self.lock().metrics)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, BlockCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device state as plain data. Take it with the vCPUs paused.
    pub fn state(&self) -> BlockState {
        self.state_locked(&self.lock())
    }

    /// The state, read under the device lock `core` the caller holds.
    fn state_locked(&self, core: &BlockCore) -> BlockState {
        BlockState {
            features: self.features,
            queue: core.queue.as_ref().map(Queue::state),
            in_flight: core.in_flight(),
        }
    }

    /// The clone instant, atomic against completions: with the device locked (so no request
    /// completes into the used ring meanwhile) captures the state, clones the disk, and runs
    /// `clone_ram` (e.g. `|| ram.clone_cow()`). Call it with the vCPUs paused.
    pub fn capture_and_clone<R>(&self, clone_ram: impl FnOnce() -> R) -> Result<(BlockState, CowDisk, R), BlockError> {
        let mut core = self.lock();
        let state = self.state_locked(&core);
        let disk = core.disk.clone_cow()?;
        let ram = clone_ram();
        Ok((state, disk, ram))
    }

    /// The snapshot instant: like `capture_and_clone`, but the disk is frozen (a clone no VM
    /// writes, `CowDisk::freeze`). Sectors of writes in flight count as changed since the
    /// freeze: they may land after it, and a reset re-executes them.
    pub fn capture_and_freeze<R>(
        &self,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(BlockState, FrozenDisk, R), BlockError> {
        let mut core = self.lock();
        let state = self.state_locked(&core);
        let mut frozen = core.disk.freeze()?;
        for write in state.in_flight.iter().filter(|r| r.kind == RequestKind::Out) {
            core.disk.mark_changed_since_freeze(write.sector, write.data_len() / SECTOR_SIZE);
            frozen.mark_unsettled(write.sector, write.data_len() / SECTOR_SIZE);
        }
        let ram = freeze_ram();
        Ok((state, frozen, ram))
    }

    /// Brings this device back to `state` and its disk to `disk`'s bytes (a reset), at one
    /// instant with `reset_ram`: with the device locked (no completion lands meanwhile) runs
    /// `reset_ram`; if that fails nothing has changed and its error is returned. Then waits
    /// out what is still in flight without delivering it, resets the disk and the queue, and
    /// re-executes the requests in flight in `state`. `state` is checked first.
    pub fn reset_with<E: From<BlockError>>(
        &mut self,
        disk: &FrozenDisk,
        state: &BlockState,
        reset_ram: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        if disk.sectors() != self.sectors {
            return Err(BlockError::DiskMismatch { sectors: disk.sectors(), disk_sectors: self.sectors }.into());
        }
        let queue = state.check(self.sectors)?;
        let mut core = self.lock();
        reset_ram()?;
        core.drain(false);
        core.disk.reset_to(disk)?;
        core.broken = false;
        core.queue = None;
        if let Some(mut queue) = queue {
            for request in &state.in_flight {
                core.start(&mut queue, request.clone());
            }
            core.queue = Some(queue);
            core.submit();
        }
        drop(core);
        self.features = state.features;
        Ok(())
    }

    /// Like `capture_and_clone` without the disk clone (a snapshot of RAM and state only):
    /// captures the state and runs `freeze_ram` with the device locked.
    pub fn capture_with<R>(&self, freeze_ram: impl FnOnce() -> R) -> (BlockState, R) {
        let core = self.lock();
        let state = self.state_locked(&core);
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

/// What a restored virtio-blk is built on: the VM's own RAM, disk and interrupt.
pub struct BlockArgs {
    pub ram: Arc<GuestRam>,
    pub disk: CowDisk,
    pub interrupt: Arc<DeviceInterrupt>,
}

impl Persist for BlockDevice {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockError;

    /// Takes the device lock; on a running VM use `capture_with` (or `capture_and_clone`,
    /// `capture_and_freeze`), which also freeze the RAM under it.
    fn save(&self) -> Result<BlockState, BlockError> {
        Ok(self.state())
    }

    /// A clone's device: `state` captured from the source, `args` the clone's own RAM, disk
    /// and interrupt. Every request that was in flight is re-executed now, against the
    /// clone's pages.
    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, BlockError> {
        let queue = state.check(args.disk.sectors())?;
        let mut device = BlockDevice::new(args.ram, args.disk, args.interrupt)?;
        device.features = state.features;
        if let Some(mut queue) = queue {
            let mut core = device.lock();
            for request in &state.in_flight {
                core.start(&mut queue, request.clone());
            }
            core.queue = Some(queue);
            core.submit();
        }
        Ok(device)
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
