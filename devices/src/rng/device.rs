//! `RngDevice`: the entropy device as the MMIO transport drives it, its rate-limit timer for
//! the event loop, and `Persist`.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use memory::{Access, GuestAddress, GuestRam, PinGuard};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestMemoryBackend;

use super::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterState};
use super::RngError;
use crate::clock::{Clock, WakeTimer};
use crate::host_events::HostEvents;
use crate::interrupt::{DeviceInterrupt, INT_USED_RING};
use crate::persist::Persist;
use crate::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Largest queue the device offers.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most descriptors in one request.
const MAX_DESCRIPTORS: usize = 16;
/// Most bytes one request gets (Linux asks for at most a page or two); the rest of a larger
/// buffer is left alone and the used length says how much was filled.
const MAX_REQUEST_BYTES: u32 = 64 << 10;

/// The host resources a new or restored entropy device needs.
#[derive(Debug)]
pub struct RngArgs {
    pub ram: Arc<GuestRam>,
    pub interrupt: Arc<DeviceInterrupt>,
    /// Time for the rate limiter (`MonotonicClock::shared()` in a VM).
    pub clock: Arc<dyn Clock>,
}

/// The entropy device's saved form: the live queue and the rate limiter's buckets. Nothing is
/// ever in flight between calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub features: u64,
    #[serde(with = "crate::virtio::queue_serde::option")]
    pub queue: Option<QueueState>,
    pub rate_limiter: RateLimiterState,
}

/// What the device did, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Requests answered with entropy.
    pub requests: u64,
    pub bytes: u64,
    /// Times the rate limit put a request back.
    pub deferred: u64,
    /// Requests answered with nothing (malformed, or a failed pin or getrandom).
    pub failed: u64,
}

/// A virtio-rng device.
pub struct RngDevice {
    ram: Arc<GuestRam>,
    interrupt: Arc<DeviceInterrupt>,
    clock: Arc<dyn Clock>,
    features: u64,
    queue: Option<Queue>,
    limiter: RateLimiter,
    /// Armed while the limiter defers a request.
    timer: WakeTimer,
    /// The clock time the deferred request may go.
    blocked_until: Option<Duration>,
    broken: bool,
    stats: RngStats,
    last_error: Option<RngError>,
}

impl std::fmt::Debug for RngDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RngDevice")
            .field("stats", &self.stats)
            .field("blocked_until", &self.blocked_until)
            .finish_non_exhaustive()
    }
}

impl RngDevice {
    /// A device filling buffers from the host's getrandom, limited by `rate_limiter`.
    pub fn new(args: RngArgs, rate_limiter: RateLimiterConfig) -> Result<RngDevice, RngError> {
        let limiter = RateLimiter::new(rate_limiter, args.clock.now());
        Self::with_limiter(args, limiter)
    }

    fn with_limiter(args: RngArgs, limiter: RateLimiter) -> Result<RngDevice, RngError> {
        Ok(RngDevice {
            ram: args.ram,
            interrupt: args.interrupt,
            clock: args.clock,
            features: 0,
            queue: None,
            limiter,
            timer: WakeTimer::new().map_err(RngError::Timer)?,
            blocked_until: None,
            broken: false,
            stats: RngStats::default(),
            last_error: None,
        })
    }

    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// The last request error (the guest got a used length of 0 for it).
    pub fn last_error(&self) -> Option<&RngError> {
        self.last_error.as_ref()
    }

    /// The clock time a deferred request may go, if the rate limit holds one back.
    pub fn blocked_until(&self) -> Option<Duration> {
        self.blocked_until
    }

    /// Serves every request the driver made available, until the rate limit says wait.
    pub fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        if self.blocked_until.is_some_and(|until| self.clock.now() < until) {
            return;
        }
        self.blocked_until = None;
        let Some(mut queue) = self.queue.take() else { return };
        let mut used = false;
        loop {
            let chain = match queue.iter(&*self.ram) {
                Ok(mut iter) => iter.next(),
                Err(_) => {
                    // The avail index jumped by more than the queue size.
                    self.broken = true;
                    None
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.take(MAX_DESCRIPTORS + 1).collect();
            let filled = match self.check_request(head, &descriptors) {
                Ok(bytes) => match self.limiter.consume(u64::from(bytes), self.clock.now()) {
                    Ok(()) => self.fill(&descriptors, bytes),
                    Err(retry_at) => {
                        // The driver keeps the request; it goes when the timer fires.
                        queue.go_to_previous_position();
                        self.stats.deferred += 1;
                        self.blocked_until = Some(retry_at);
                        let _ = self.timer.arm(&*self.clock, Some(retry_at));
                        break;
                    }
                },
                Err(e) => Err(e),
            };
            let len = filled.unwrap_or_else(|e| {
                self.stats.failed += 1;
                self.last_error = Some(e);
                0
            });
            if queue.add_used(&*self.ram, head, len).is_err() {
                self.broken = true;
                break;
            }
            used = true;
        }
        self.queue = Some(queue);
        if used {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// Checks a chain (a guest's input): whole, not too long, every buffer device-writable and
    /// inside RAM. Returns the bytes to fill.
    fn check_request(&self, head: u16, descriptors: &[Descriptor]) -> Result<u32, RngError> {
        match descriptors.last() {
            None => return Err(RngError::BrokenChain { head }),
            Some(_) if descriptors.len() > MAX_DESCRIPTORS => {
                return Err(RngError::ChainTooLong { head, max: MAX_DESCRIPTORS })
            }
            // The iterator stops early, silently, on a loop, a `next` past the table or an
            // unreadable descriptor: the last one it gave still says "next" then.
            Some(last) if last.has_next() => return Err(RngError::BrokenChain { head }),
            Some(_) => {}
        }
        let mut total = 0u32;
        for d in descriptors {
            let (addr, len) = (d.addr().0, d.len());
            if !d.is_write_only() {
                return Err(RngError::ReadOnlyBuffer { head, addr, len });
            }
            if !self.ram.check_range(GuestAddress(addr), len as usize) {
                return Err(RngError::OutsideRam { head, addr, len });
            }
            total = total.saturating_add(len);
        }
        Ok(total.min(MAX_REQUEST_BYTES))
    }

    /// Pins the first `bytes` of the chain's buffers for write, fills them from getrandom, and
    /// returns how many bytes it wrote. The pins drop after the caller publishes the used entry.
    fn fill(&mut self, descriptors: &[Descriptor], bytes: u32) -> Result<u32, RngError> {
        let mut pins: Vec<PinGuard> = Vec::new();
        let mut left = bytes as usize;
        for d in descriptors.iter().filter(|d| d.len() > 0) {
            if left == 0 {
                break;
            }
            let n = left.min(d.len() as usize);
            pins.push(self.ram.pin(d.addr(), n, Access::Write).map_err(RngError::Pin)?);
            left -= n;
        }
        let mut entropy = vec![0u8; bytes as usize];
        getrandom::fill(&mut entropy).map_err(RngError::Entropy)?;
        let mut at = 0;
        for pin in &pins {
            pin.write_at(0, &entropy[at..at + pin.len()]).map_err(RngError::Pin)?;
            at += pin.len();
        }
        self.stats.requests += 1;
        self.stats.bytes += u64::from(bytes);
        Ok(bytes)
    }

    /// The state, read at one instant (the caller holds the transport's lock).
    fn state(&self) -> RngState {
        RngState {
            features: self.features,
            queue: self.queue.as_ref().map(Queue::state),
            rate_limiter: self.limiter.state(),
        }
    }
}

impl RngState {
    /// Checks a saved state (a snapshot file is input) before anything is built from it.
    pub fn check(&self) -> Result<Option<Queue>, RngError> {
        let Some(saved) = self.queue else { return Ok(None) };
        if saved.max_size != RNG_QUEUE_SIZE {
            return Err(RngError::BadState(format!(
                "queue max size {}, the device has {RNG_QUEUE_SIZE}",
                saved.max_size
            )));
        }
        Queue::try_from(saved).map(Some).map_err(|e| RngError::BadState(e.to_string()))
    }
}

impl Persist for RngDevice {
    type State = RngState;
    type ConstructorArgs = RngArgs;
    type Error = RngError;

    fn save(&self) -> Result<RngState, RngError> {
        Ok(self.state())
    }

    /// The device as saved, with a limiter that refills from now on. A request deferred at
    /// the capture is still in the ring: the VMM notifies the queue on resume and it goes
    /// when the limiter allows.
    fn restore(args: RngArgs, state: &RngState) -> Result<RngDevice, RngError> {
        let queue = state.check()?;
        if let Some(queue) = &queue {
            if !queue.is_valid(&*args.ram) {
                return Err(RngError::BadState("queue rings are not inside guest RAM".into()));
            }
        }
        let limiter = RateLimiter::restore(&state.rate_limiter, args.clock.now())?;
        let mut device = Self::with_limiter(args, limiter)?;
        device.features = state.features;
        device.queue = queue;
        Ok(device)
    }
}

impl VirtioDevice for RngDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn interrupt(&self) -> &Arc<DeviceInterrupt> {
        &self.interrupt
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, mut queues: Vec<Queue>, features: u64) -> Result<(), VirtioError> {
        let queue = queues.pop().ok_or(VirtioError::QueueInvalid { queue: 0 })?;
        if !queue.is_valid(&*self.ram) {
            return Err(VirtioError::QueueInvalid { queue: 0 });
        }
        self.queue = Some(queue);
        self.features = features;
        self.broken = false;
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        self.process_queue();
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    /// Nothing is in flight between calls, so nothing to wait for.
    fn reset(&mut self) {
        self.queue = None;
        self.features = 0;
        self.broken = false;
        self.blocked_until = None;
        let _ = self.timer.arm(&*self.clock, None);
    }
}

impl HostEvents for RngDevice {
    /// The rate limiter's timer.
    fn host_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    fn process_host(&mut self) {
        self.timer.acknowledge();
        self.process_queue();
        // Still early (a real timer and a test's manual clock may disagree): wake again.
        if let Some(until) = self.blocked_until {
            let _ = self.timer.arm(&*self.clock, Some(until));
        }
    }
}
