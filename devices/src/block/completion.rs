//! virtio-blk's io_uring completions as an event-loop subscriber: io_uring signals an eventfd
//! when operations finish, and the loop reaps them into the used ring.
//!
//! Why the VM's event loop rather than a thread of its own: it is the same one thread per
//! disk, but queue notifications (ioeventfds) and completions are then served in one place,
//! one after the other, so the device lock is never contended between those two.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::core::BlockCore;
use super::BlockError;
use crate::subscriber::{watch, DeviceSubscriber, EventOps, EventSet, Events, MutEventSubscriber};

/// Completes a block device's requests as the kernel finishes them.
pub struct BlockCompletions {
    core: Arc<Mutex<BlockCore>>,
    event: EventFd,
    init_error: Option<event_manager::Error>,
}

impl std::fmt::Debug for BlockCompletions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCompletions").field("event", &self.event.as_raw_fd()).finish_non_exhaustive()
    }
}

impl BlockCompletions {
    /// Registers a fresh eventfd with `core`'s io_uring (once per device: io_uring takes one).
    pub(crate) fn new(core: Arc<Mutex<BlockCore>>) -> Result<Self, BlockError> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(BlockError::Uring)?;
        core.lock().unwrap_or_else(|e| e.into_inner()).register_completion_event(&event).map_err(BlockError::Uring)?;
        Ok(BlockCompletions { core, event, init_error: None })
    }
}

impl MutEventSubscriber for BlockCompletions {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, Events::new(&self.event, EventSet::IN), &mut self.init_error);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reset the counter first: a completion landing after the reap signals again.
        let _ = self.event.read();
        self.core.lock().unwrap_or_else(|e| e.into_inner()).reap();
    }
}

impl DeviceSubscriber for BlockCompletions {
    fn take_init_error(&mut self) -> Option<event_manager::Error> {
        self.init_error.take()
    }
}
