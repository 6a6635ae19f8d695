//! Runs a DMA engine's transfers in the background, one chunk per pacing interval.
//!
//! The runner never polls: with no transfer to run (none in flight, or host-stepped) it
//! blocks on the engine's `Doorbell` until a start rings it, and between chunks it sleeps on
//! the same doorbell, so stopping it (VM shutdown, drop) wakes it at once whatever pacing a
//! guest or a snapshot asked for.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::DmaEngine;

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

    fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    /// Blocks until rung (and clears it) or stopped; false if stopped.
    fn wait_for_ring(&self) -> bool {
        let bell = self.changed.wait_while(self.lock(), |b| !b.rung && !b.stopped).unwrap_or_else(|e| e.into_inner());
        Self::take_ring(bell)
    }

    fn take_ring(mut bell: MutexGuard<'_, Bell>) -> bool {
        bell.rung = false;
        !bell.stopped
    }

    /// Sleeps for `pause` unless stopped first; false if stopped. A ring meanwhile is kept
    /// for the next `wait_for_ring` (it does not cut the pacing short).
    fn sleep(&self, pause: Duration) -> bool {
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

/// The background thread driving one engine; stops (at once, even mid-pacing) when dropped.
pub struct DmaRunner {
    doorbell: Arc<Doorbell>,
    thread: Option<JoinHandle<()>>,
}

impl DmaRunner {
    pub fn spawn(engine: Arc<Mutex<DmaEngine>>) -> std::io::Result<DmaRunner> {
        DmaRunner::spawn_with(engine, || {})
    }

    /// `spawn`, with `thread_start` run first on the new thread (the VMM installs the thread's
    /// seccomp filter there).
    pub fn spawn_with(engine: Arc<Mutex<DmaEngine>>, thread_start: fn()) -> std::io::Result<DmaRunner> {
        let doorbell = Arc::clone(engine.lock().unwrap_or_else(|e| e.into_inner()).doorbell());
        let bell = Arc::clone(&doorbell);
        let thread = std::thread::Builder::new().name("dma-engine".into()).spawn(move || {
            thread_start();
            loop {
                let (running, pacing_us) = {
                    let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
                    match engine.host_stepped() {
                        true => (false, 0),
                        false => (engine.step(), engine.pacing_us()),
                    }
                };
                // The engine lock is not held while waiting, so the guest and the clone path get in.
                let go_on = if running { bell.sleep(Duration::from_micros(pacing_us)) } else { bell.wait_for_ring() };
                if !go_on {
                    break;
                }
            }
        })?;
        Ok(DmaRunner { doorbell, thread: Some(thread) })
    }
}

impl Drop for DmaRunner {
    fn drop(&mut self) {
        self.doorbell.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
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
