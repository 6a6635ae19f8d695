//! Device event sources for a VM's event loop (rust-vmm `event-manager`, used as its authors
//! meant: one `EventManager` on its own thread, one `MutEventSubscriber` per event source that
//! registers its fds in `init` and serves them in `process`).
//!
//! `init` cannot return an error, so a subscriber keeps the error its registration hit and the
//! loop's owner takes it right after `add_subscriber`: a device whose eventfd is not watched
//! would otherwise hang its guest without a word.

pub use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

/// An event subscriber a device hands to the VMM's event loop.
pub trait DeviceSubscriber: MutEventSubscriber + Send {
    /// The error from registering this subscriber's fds in `init`, if any (taken once).
    fn take_init_error(&mut self) -> Option<event_manager::Error>;
}

/// Adds `events` to `ops`, keeping the first failure in `error` (for `init`).
pub fn watch(ops: &mut EventOps, events: Events, error: &mut Option<event_manager::Error>) {
    if let Err(e) = ops.add(events) {
        error.get_or_insert(e);
    }
}
