//! virtio-rng (the entropy device, virtio id 4): fills the guest's buffers with bytes from the
//! host's `getrandom(2)`, optionally under a rate limit (Firecracker's entropy device
//! `rate_limiter`). Every buffer is pinned for write while it is filled and until its used
//! entry is published, so a clone made meanwhile copies it eagerly. A request stays in flight
//! between calls only when the host holds it (`RngDevice::hold_requests`, tests and fuzzing);
//! one the rate limit defers is put back in the ring (the driver still owns it) and taken again
//! when the limiter's timer fires.
//!
//! A clone or a restored VM gets fresh host entropy for every request after the clone
//! instant, never the source's bytes.

mod device;
mod persist;
mod rate_limiter;

pub use device::{RngArgs, RngDevice, RngStats, RNG_QUEUE_SIZE};
pub use persist::RngState;
pub use rate_limiter::{
    BadLimiterState, RateLimiter, RateLimiterConfig, RateLimiterState, TokenBucketConfig, TokenBucketState,
};

/// What a VM's entropy device is configured with (`--entropy`, `PUT /entropy`, a config
/// file's `entropy`): Firecracker's `EntropyDeviceConfig` (no `rate_limiter`: no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl EntropyConfig {
    /// Refuses a bucket the limiter cannot count in (a size above 2^63 - 1 tokens), naming it.
    pub fn check(&self) -> Result<(), String> {
        let limiter = self.rate_limiter.unwrap_or_default();
        for (which, bucket) in [("bandwidth", limiter.bandwidth), ("ops", limiter.ops)] {
            if let Some(b) = bucket.filter(|b| i64::try_from(b.size).is_err()) {
                return Err(format!("rate_limiter.{which}.size {} is above {}", b.size, i64::MAX));
            }
        }
        Ok(())
    }
}

/// What went wrong with one entropy request, or with a saved state.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("descriptor chain at head {head} loops, leaves the table or is unreadable")]
    BrokenChain { head: u16 },
    #[error("descriptor chain at head {head} has more than {max} descriptors")]
    ChainTooLong { head: u16, max: usize },
    #[error("buffer {addr:#x}+{len:#x} of chain {head} is device-readable: entropy buffers must be device-writable")]
    ReadOnlyBuffer { head: u16, addr: u64, len: u32 },
    #[error("buffer {addr:#x}+{len:#x} of chain {head} is not inside guest RAM")]
    OutsideRam { head: u16, addr: u64, len: u32 },
    #[error("cannot pin an entropy buffer")]
    Pin(#[source] memory::MemoryError),
    #[error("the host's getrandom failed: {0}")]
    Entropy(getrandom::Error),
    #[error("cannot create the rate limiter's timer")]
    Timer(#[source] std::io::Error),
    #[error("saved entropy device state is invalid: {0}")]
    BadState(String),
    #[error(transparent)]
    BadLimiter(#[from] BadLimiterState),
}
