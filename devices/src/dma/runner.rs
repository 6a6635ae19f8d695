//! Runs a DMA engine's transfers in the background, one chunk per pacing interval.
//!
//! The runner never polls: with no transfer to run (none in flight, or host-stepped) it
//! blocks on the engine's `Doorbell` until a start rings it, and between chunks it sleeps on
//! the same doorbell, so stopping it (VM shutdown, drop) wakes it at once whatever pacing a
//! guest or a snapshot asked for.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::doorbell::Doorbell;
use super::DmaEngine;

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
