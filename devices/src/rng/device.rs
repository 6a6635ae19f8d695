//! `RngDevice`: the entropy device as the MMIO transport drives it, and its rate-limit timer
//! for the event loop. Its saved form is in `persist.rs`.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use memory::{Access, GuestAddress, GuestRam, PinGuard};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use super::rate_limiter::{RateLimiter, RateLimiterConfig};
use super::RngError;
use crate::clock::{Clock, WakeTimer};
use crate::host_events::HostEvents;
use crate::interrupt::{DeviceInterrupt, INT_USED_RING};
use crate::metrics::{bump, EntropyMetrics};
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

/// A request popped and not yet published: its buffers pinned for write (or why it gets
/// nothing). Only a host-stepped device keeps one between calls.
pub(super) struct HeldRequest {
    pub(super) head: u16,
    outcome: Result<Vec<PinGuard>, RngError>,
}

/// A virtio-rng device.
pub struct RngDevice {
    pub(super) ram: Arc<GuestRam>,
    interrupt: Arc<DeviceInterrupt>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) features: u64,
    pub(super) queue: Option<Queue>,
    pub(super) limiter: RateLimiter,
    /// Armed while the limiter defers a request.
    pub(super) timer: WakeTimer,
    /// The clock time the deferred request may go.
    pub(super) blocked_until: Option<Duration>,
    pub(super) broken: bool,
    /// Hold every request popped (pinned, unfilled) until `release_held` (tests, fuzzing).
    pub(super) host_stepped: bool,
    /// Requests held, in the order popped: always the last ones popped, so the queue's used
    /// index is where they start.
    pub(super) held: VecDeque<HeldRequest>,
    stats: RngStats,
    metrics: Arc<EntropyMetrics>,
    last_error: Option<RngError>,
}

impl std::fmt::Debug for RngDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RngDevice")
            .field("stats", &self.stats)
            .field("blocked_until", &self.blocked_until)
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl RngDevice {
    /// A device filling buffers from the host's getrandom, limited by `rate_limiter`.
    pub fn new(args: RngArgs, rate_limiter: RateLimiterConfig) -> Result<RngDevice, RngError> {
        let limiter = RateLimiter::new(rate_limiter, args.clock.now());
        Self::with_limiter(args, limiter)
    }

    pub(super) fn with_limiter(args: RngArgs, limiter: RateLimiter) -> Result<RngDevice, RngError> {
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
            host_stepped: false,
            held: VecDeque::new(),
            stats: RngStats::default(),
            metrics: Arc::default(),
            last_error: None,
        })
    }

    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// The counters (Firecracker's `entropy` group), shared with the metrics writer.
    pub fn metrics(&self) -> Arc<EntropyMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The last request error (the guest got a used length of 0 for it).
    pub fn last_error(&self) -> Option<&RngError> {
        self.last_error.as_ref()
    }

    /// The clock time a deferred request may go, if the rate limit holds one back.
    pub fn blocked_until(&self) -> Option<Duration> {
        self.blocked_until
    }

    /// Puts the rate limit on `clock` from now on (tests drive a VM's limit with a
    /// `ManualClock`): the buckets keep what they hold and refill from the new clock's now; a
    /// deferred request is looked at again when the device is next notified or its timer is
    /// served.
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.limiter.restart_at(clock.now());
        self.clock = clock;
        self.blocked_until = None;
        let _ = self.timer.arm(&*self.clock, None);
    }

    /// Host stepping: while on, every request popped is pinned and held, unfilled, until
    /// `release_held`, so a test can clone, snapshot or reset with it in flight. A clone or
    /// restored VM inherits the setting. Turning it off releases what is held at the next
    /// notification (or `release_held`), before anything newer.
    pub fn hold_requests(&mut self, held: bool) {
        self.host_stepped = held;
    }

    /// Requests held in flight.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Fills and publishes every held request, in the order popped; returns how many.
    pub fn release_held(&mut self) -> usize {
        let Some(mut queue) = self.queue.take() else { return 0 };
        let released = self.held.len();
        while let Some(request) = self.held.pop_front() {
            if !self.publish(&mut queue, request) {
                break;
            }
        }
        self.queue = Some(queue);
        if released > 0 {
            self.interrupt.raise(INT_USED_RING);
        }
        released
    }

    /// Serves every request the driver made available, until the rate limit says wait. A
    /// device that is not host-stepped first releases what it still holds, so used entries
    /// keep the order the requests were popped in.
    pub fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        if !self.host_stepped {
            self.release_held();
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
            let outcome = match self.check_request(head, &descriptors) {
                Ok(bytes) => match self.limiter.consume(u64::from(bytes), self.clock.now()) {
                    Ok(()) => self.pin(&descriptors, bytes),
                    Err(retry_at) => {
                        // The driver keeps the request; it goes when the timer fires.
                        queue.go_to_previous_position();
                        self.stats.deferred += 1;
                        bump(&self.metrics.entropy_rate_limiter_throttled, 1);
                        self.blocked_until = Some(retry_at);
                        let _ = self.timer.arm(&*self.clock, Some(retry_at));
                        break;
                    }
                },
                Err(e) => Err(e),
            };
            let request = HeldRequest { head, outcome };
            if self.host_stepped {
                self.held.push_back(request);
                continue;
            }
            if !self.publish(&mut queue, request) {
                break;
            }
            used = true;
        }
        self.queue = Some(queue);
        if used {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// Fills a popped request's pinned buffers from getrandom and publishes its used entry;
    /// the pins drop after that. False if the used ring could not be written.
    fn publish(&mut self, queue: &mut Queue, request: HeldRequest) -> bool {
        let filled = request.outcome.and_then(|pins| {
            let len = self.fill(&pins)?;
            Ok((len, pins))
        });
        let (len, _pins) = filled.unwrap_or_else(|e| {
            self.stats.failed += 1;
            bump(&self.metrics.entropy_event_fails, 1);
            if matches!(e, RngError::Entropy(_)) {
                bump(&self.metrics.host_rng_fails, 1);
            }
            self.last_error = Some(e);
            (0, Vec::new())
        });
        if queue.add_used(&*self.ram, request.head, len).is_err() {
            self.broken = true;
            return false;
        }
        true
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

    /// Pins the first `bytes` of the chain's buffers for write.
    fn pin(&self, descriptors: &[Descriptor], bytes: u32) -> Result<Vec<PinGuard>, RngError> {
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
        Ok(pins)
    }

    /// Fills the pinned buffers from getrandom; returns how many bytes it wrote.
    fn fill(&mut self, pins: &[PinGuard]) -> Result<u32, RngError> {
        let bytes: usize = pins.iter().map(PinGuard::len).sum();
        let mut entropy = vec![0u8; bytes];
        getrandom::fill(&mut entropy).map_err(RngError::Entropy)?;
        let mut at = 0;
        for pin in pins {
            pin.write_at(0, &entropy[at..at + pin.len()]).map_err(RngError::Pin)?;
            at += pin.len();
        }
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.stats.requests += 1;
        self.stats.bytes += u64::from(bytes);
        bump(&self.metrics.entropy_bytes, u64::from(bytes));
        Ok(bytes)
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
        let queue = queues.pop().filter(|q| q.is_valid(&*self.ram));
        let Some(queue) = queue else {
            bump(&self.metrics.activate_fails, 1);
            return Err(VirtioError::QueueInvalid { queue: 0 });
        };
        self.queue = Some(queue);
        self.features = features;
        self.broken = false;
        Ok(())
    }

    fn queue_notify(&mut self, _index: u16) {
        bump(&self.metrics.entropy_event_count, 1);
        self.process_queue();
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    /// Held requests are dropped unpublished (their pins with them); nothing else is in
    /// flight between calls, so nothing to wait for.
    fn reset(&mut self) {
        self.held.clear();
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
        bump(&self.metrics.rate_limiter_event_count, 1);
        self.timer.acknowledge();
        self.process_queue();
        // Still early (a real timer and a test's manual clock may disagree): wake again.
        if let Some(until) = self.blocked_until {
            let _ = self.timer.arm(&*self.clock, Some(until));
        }
    }
}
