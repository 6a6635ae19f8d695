//! The entropy device's saved form (`Persist`): the live queue, the rate limiter's buckets
//! and the requests held in flight. A restored device pops those requests again and fills
//! them with its own fresh entropy: a clone never repeats its source's bytes.

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
    /// Checks a saved state (a snapshot file is input) before anything is built from it.
    pub fn check(&self) -> Result<Option<Queue>, RngError> {
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
        Ok(Some(queue))
    }
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
        let queue = state.check()?;
        if let Some(queue) = &queue {
            if !queue.is_valid(&*args.ram) {
                return Err(RngError::BadState("queue rings are not inside guest RAM".into()));
            }
        }
        let limiter = RateLimiter::restore(&state.rate_limiter, args.clock.now())?;
        let mut device = RngDevice::with_limiter(args, limiter)?;
        device.features = state.features;
        device.host_stepped = state.host_stepped;
        device.queue = queue.map(|mut q| {
            q.set_next_avail(q.next_used());
            q
        });
        Ok(device)
    }
}
