//! The TAP as an event-loop source: the loop wakes the device when the TAP has frames, and the
//! device receives them into the posted buffers.
//!
//! Edge-triggered: a pass reads until the TAP is empty or the driver's buffers run out; frames
//! left waiting are read when the driver posts buffers and notifies the receive queue, so a
//! TAP with frames and no buffers does not spin the loop. Once the TAP has gone away (deleted
//! under the device), the subscriber stops watching it and drops it.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::core::NetCore;
use crate::subscriber::{watch, DeviceSubscriber, EventOps, EventSet, Events, MutEventSubscriber};

/// Receives frames as the TAP has them.
pub struct NetTapEvents {
    core: Arc<Mutex<NetCore>>,
    /// The TAP's fd: owned by the core's `Tap`, which stays open while this watches it.
    fd: RawFd,
    init_error: Option<event_manager::Error>,
}

impl std::fmt::Debug for NetTapEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetTapEvents").field("fd", &self.fd).finish_non_exhaustive()
    }
}

impl NetTapEvents {
    pub(crate) fn new(core: Arc<Mutex<NetCore>>, fd: RawFd) -> NetTapEvents {
        NetTapEvents { core, fd, init_error: None }
    }

    fn events(&self) -> Events {
        Events::new_raw(self.fd, EventSet::IN | EventSet::EDGE_TRIGGERED)
    }
}

impl MutEventSubscriber for NetTapEvents {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, self.events(), &mut self.init_error);
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        core.process_rx();
        if core.backend_gone && core.backend.is_some() {
            // Unwatch before the fd closes, so the loop never holds a stale fd number.
            let _ = ops.remove(self.events());
            core.backend = None;
        }
    }
}

impl DeviceSubscriber for NetTapEvents {
    fn take_init_error(&mut self) -> Option<event_manager::Error> {
        self.init_error.take()
    }
}
