//! Runs a DMA engine's transfers in the background, one chunk per pacing interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::DmaEngine;

/// How often an idle runner looks for a newly started transfer.
const IDLE_POLL: Duration = Duration::from_millis(1);

/// The background thread driving one engine; stops (between chunks) when dropped.
pub struct DmaRunner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DmaRunner {
    pub fn spawn(engine: Arc<Mutex<DmaEngine>>) -> std::io::Result<DmaRunner> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("dma-engine".into()).spawn(move || {
            while !thread_stop.load(Ordering::Acquire) {
                let (more, pacing) = {
                    let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
                    match engine.host_stepped() {
                        true => (false, 0),
                        false => (engine.step(), engine.pacing_us()),
                    }
                };
                // The lock is not held while pacing, so the guest and the clone path get in.
                std::thread::sleep(if more { Duration::from_micros(pacing) } else { IDLE_POLL });
            }
        })?;
        Ok(DmaRunner { stop, thread: Some(thread) })
    }
}

impl Drop for DmaRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
