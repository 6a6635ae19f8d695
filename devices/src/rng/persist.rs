//! The entropy device's saved form (`Persist`): the live queue, the rate limiter's buckets
//! and the requests held in flight. A restored device pops those requests again and fills
//! them with its own fresh entropy: a clone never repeats its source's bytes.

use std::time::Duration;

use memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::device::{RngArgs, RngDevice, RNG_QUEUE_SIZE};
use super::rate_limiter::{RateLimiter, RateLimiterState};
use super::RngError;
use crate::persist::Persist;

/// The entropy device's saved form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub features: u64,
    #[serde(with = "crate::virtio::queue_serde::option")]
    pub queue: Option<QueueState>,
    pub rate_limiter: RateLimiterState,
    /// Whether requests are held until the host releases them (`RngDevice::hold_requests`).
    #[serde(default)]
    pub host_stepped: bool,
    /// Heads of the requests held in flight, in the order popped: the last ones the queue
    /// popped, so its used index is where they start.
    #[serde(default)]
    pub in_flight: Vec<u16>,
}

impl RngState {
    /// Checks a saved state (a snapshot file is input) against `ram` before anything is built
    /// from it: queue, heads in flight, buckets.
    pub fn check(&self, ram: &GuestRam) -> Result<Option<Queue>, RngError> {
        RateLimiter::restore(&self.rate_limiter, Duration::ZERO)?;
        let Some(saved) = self.queue else {
            if !self.in_flight.is_empty() {
                return Err(RngError::BadState(format!("{} requests in flight without a queue", self.in_flight.len())));
            }
            return Ok(None);
        };
        if saved.max_size != RNG_QUEUE_SIZE {
            return Err(RngError::BadState(format!(
                "queue max size {}, the device has {RNG_QUEUE_SIZE}",
                saved.max_size
            )));
        }
        let queue = Queue::try_from(saved).map_err(|e| RngError::BadState(e.to_string()))?;
        let popped_unused = queue.next_avail().wrapping_sub(queue.next_used());
        if usize::from(popped_unused) != self.in_flight.len() {
            return Err(RngError::BadState(format!(
                "{} requests in flight, the queue has {popped_unused} popped and unused",
                self.in_flight.len()
            )));
        }
        if let Some(head) = self.in_flight.iter().find(|&&h| h >= queue.size()) {
            return Err(RngError::BadState(format!("head {head} in flight, the queue has {}", queue.size())));
        }
        if !queue.is_valid(ram) {
            return Err(RngError::BadState("queue rings are not inside guest RAM".into()));
        }
        Ok(Some(queue))
    }
}

impl RngDevice {
    /// Checks `state` against this device's RAM, as `reset_to` will.
    pub fn check_state(&self, state: &RngState) -> Result<(), RngError> {
        state.check(&self.ram).map(drop)
    }

    /// Brings the device back to `state` in place (a VM reset to its snapshot, after the RAM
    /// reset, which is refused while a held request pins a buffer): what it holds is dropped,
    /// the queue rewound to its used index so the requests held in `state` are popped again at
    /// the next notification, the buckets as saved, refilling from now on. `state` is checked
    /// first; if it is bad nothing changes.
    pub fn reset_to(&mut self, state: &RngState) -> Result<(), RngError> {
        let queue = state.check(&self.ram)?;
        self.limiter = RateLimiter::restore(&state.rate_limiter, self.clock.now())?;
        self.held.clear();
        self.features = state.features;
        self.host_stepped = state.host_stepped;
        self.queue = queue.map(rewound);
        self.broken = false;
        self.blocked_until = None;
        let _ = self.timer.arm(&*self.clock, None);
        Ok(())
    }
}

/// `queue` with the requests it popped and did not use made available again.
fn rewound(mut queue: Queue) -> Queue {
    queue.set_next_avail(queue.next_used());
    queue
}

impl Persist for RngDevice {
    type State = RngState;
    type ConstructorArgs = RngArgs;
    type Error = RngError;

    /// The state at this instant; the caller holds the transport's lock across this and the
    /// RAM freeze, so no held request is filled in between.
    fn save(&self) -> Result<RngState, RngError> {
        Ok(RngState {
            features: self.features,
            queue: self.queue.as_ref().map(Queue::state),
            rate_limiter: self.limiter.state(),
            host_stepped: self.host_stepped,
            in_flight: self.held.iter().map(|r| r.head).collect(),
        })
    }

    /// The device as saved, with a limiter that refills from now on, its queue rewound to its
    /// used index: the requests held at the capture are popped again (and charged to the
    /// bucket again) at the next notification, which the VMM sends on resume. A request
    /// deferred at the capture is still in the ring and goes when the limiter allows.
    fn restore(args: RngArgs, state: &RngState) -> Result<RngDevice, RngError> {
        let queue = state.check(&args.ram)?;
        let limiter = RateLimiter::restore(&state.rate_limiter, args.clock.now())?;
        let mut device = RngDevice::with_limiter(args, limiter)?;
        device.features = state.features;
        device.host_stepped = state.host_stepped;
        device.queue = queue.map(rewound);
        Ok(device)
    }
}
