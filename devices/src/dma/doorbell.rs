//! How a DMA engine and its background runner signal each other: the engine rings when a
//! transfer becomes runnable, the runner's owner stops it; the runner waits on either, and its
//! pacing sleep ends early only on a stop. The engine and the runner both depend on this
//! signal, never on each other's internals.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Bell {
    /// A transfer may have become runnable since the runner last looked.
    rung: bool,
    stopped: bool,
}

/// How an engine wakes its runner: rung when a transfer becomes runnable, stopped when the
/// runner is to end.
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    bell: Mutex<Bell>,
    changed: Condvar,
}

impl Doorbell {
    fn lock(&self) -> MutexGuard<'_, Bell> {
        self.bell.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the runner to look at the engine again.
    pub fn ring(&self) {
        self.lock().rung = true;
        self.changed.notify_all();
    }

    pub(super) fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    /// Blocks until rung (and clears it) or stopped; false if stopped.
    pub(super) fn wait_for_ring(&self) -> bool {
        let bell = self.changed.wait_while(self.lock(), |b| !b.rung && !b.stopped).unwrap_or_else(|e| e.into_inner());
        Self::take_ring(bell)
    }

    fn take_ring(mut bell: MutexGuard<'_, Bell>) -> bool {
        bell.rung = false;
        !bell.stopped
    }

    /// Sleeps for `pause` unless stopped first; false if stopped. A ring meanwhile is kept
    /// for the next `wait_for_ring` (it does not cut the pacing short).
    pub(super) fn sleep(&self, pause: Duration) -> bool {
        let deadline = Instant::now().checked_add(pause);
        let mut bell = self.lock();
        while !bell.stopped {
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return true;
            }
            bell = self.changed.wait_timeout(bell, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_ring_before_the_wait_is_not_lost_and_is_taken_once() {
        let bell = Doorbell::default();
        bell.ring();
        assert!(bell.wait_for_ring());
        assert!(!bell.lock().rung);
    }

    #[test]
    fn stop_wakes_a_wait_and_a_long_sleep_at_once() {
        for sleeping in [false, true] {
            let bell = Arc::new(Doorbell::default());
            let waiter = Arc::clone(&bell);
            let thread = std::thread::spawn(move || {
                if sleeping {
                    waiter.sleep(Duration::from_secs(3600))
                } else {
                    waiter.wait_for_ring()
                }
            });
            bell.stop();
            // join returns only because stop woke the thread: no time bound is asserted.
            assert!(!thread.join().unwrap(), "sleeping: {sleeping}");
        }
    }

    #[test]
    fn a_ring_during_a_sleep_neither_ends_it_nor_is_lost() {
        let bell = Doorbell::default();
        bell.ring();
        assert!(bell.sleep(Duration::from_millis(1)));
        assert!(bell.lock().rung, "kept for the next wait");
    }
}
