//! A token-bucket rate limiter on bytes and operations, configured with Firecracker's fields
//! (`rate_limiter: {bandwidth: {size, one_time_burst, refill_time}, ops: {...}}`, refill_time in
//! milliseconds), so the API can pass a Firecracker client's JSON through unchanged.
//!
//! A bucket holds up to `size` tokens and refills linearly from empty to full in `refill_time`;
//! `one_time_burst` tokens are spent first and never refill. A request bigger than the bucket is
//! let through when the bucket is full and leaves it in debt, so it waits as long as its size
//! says. Time comes from the device's `Clock`, so tests decide when a bucket refills.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One bucket's configuration. `size` or `refill_time` 0 means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, before the bucket's own.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill from empty to full.
    pub refill_time: u64,
}

/// A limit on bytes (`bandwidth`) and on requests (`ops`); either may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

/// A bucket's saved form: its configuration and what is left of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    pub config: TokenBucketConfig,
    /// Tokens in the bucket (negative: debt left by a request bigger than the bucket).
    pub budget: i64,
    pub one_time_burst: u64,
}

/// The limiter's saved form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    pub bandwidth: Option<TokenBucketState>,
    pub ops: Option<TokenBucketState>,
}

#[derive(Clone, Copy, Debug)]
struct TokenBucket {
    config: TokenBucketConfig,
    budget: i64,
    one_time_burst: u64,
    /// Clock time up to which refills have been counted.
    refilled_to: Duration,
}

fn refill_nanos(config: &TokenBucketConfig) -> u128 {
    u128::from(config.refill_time) * 1_000_000
}

impl TokenBucket {
    /// A full bucket, or `None` for a configuration that limits nothing.
    fn new(config: TokenBucketConfig, now: Duration) -> Option<TokenBucket> {
        let size = i64::try_from(config.size).ok().filter(|&s| s > 0 && config.refill_time > 0)?;
        Some(TokenBucket { config, budget: size, one_time_burst: config.one_time_burst, refilled_to: now })
    }

    fn size(&self) -> i64 {
        // Checked in `new` and `restore`.
        self.config.size as i64
    }

    /// Adds the tokens that the time since the last refill earned.
    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.refilled_to).as_nanos();
        let (size, period) = (u128::from(self.config.size), refill_nanos(&self.config));
        let tokens = elapsed * size / period;
        if tokens == 0 {
            return;
        }
        // budget <= size always.
        let room: u128 = self.size().abs_diff(self.budget).into();
        if tokens >= room {
            self.budget = self.size();
            self.refilled_to = now;
        } else {
            self.budget += i64::try_from(tokens).unwrap_or(i64::MAX);
            // Keep the fraction of a token that was earned but not added.
            let used = (tokens * period).div_ceil(size);
            self.refilled_to += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        }
    }

    /// When `tokens` could be taken, if not now.
    fn wait_for(&mut self, tokens: u64, now: Duration) -> Option<Duration> {
        self.refill(now);
        let tokens = tokens.saturating_sub(self.one_time_burst);
        // A request bigger than the bucket needs a full bucket.
        let need = i64::try_from(tokens).unwrap_or(i64::MAX).min(self.size());
        if self.budget >= need {
            return None;
        }
        let missing = u128::from(need.abs_diff(self.budget));
        let wait = (missing * refill_nanos(&self.config)).div_ceil(u128::from(self.config.size));
        Some(self.refilled_to + Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX)))
    }

    /// Takes `tokens`, after `wait_for` said they are there.
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        let rest = i64::try_from(tokens - from_burst).unwrap_or(i64::MAX);
        self.budget = self.budget.saturating_sub(rest);
    }

    fn state(&self) -> TokenBucketState {
        TokenBucketState { config: self.config, budget: self.budget, one_time_burst: self.one_time_burst }
    }
}

/// The error for a saved limiter that cannot be right.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("saved token bucket {which} is invalid: {reason}")]
pub struct BadLimiterState {
    pub which: &'static str,
    pub reason: String,
}

fn restore_bucket(
    which: &'static str,
    saved: Option<TokenBucketState>,
    now: Duration,
) -> Result<Option<TokenBucket>, BadLimiterState> {
    let Some(saved) = saved else { return Ok(None) };
    let bad = |reason: String| BadLimiterState { which, reason };
    let Some(mut bucket) = TokenBucket::new(saved.config, now) else {
        return Err(bad(format!(
            "size {} or refill_time {} is zero or too large",
            saved.config.size, saved.config.refill_time
        )));
    };
    // Debt is at most one request, and a request is at most u32::MAX bytes.
    if saved.budget > bucket.size() || saved.budget < -i64::from(u32::MAX) {
        return Err(bad(format!("budget {} outside -{}..={}", saved.budget, u32::MAX, bucket.size())));
    }
    if saved.one_time_burst > saved.config.one_time_burst {
        return Err(bad(format!(
            "burst left {} above the configured {}",
            saved.one_time_burst, saved.config.one_time_burst
        )));
    }
    bucket.budget = saved.budget;
    bucket.one_time_burst = saved.one_time_burst;
    Ok(Some(bucket))
}

/// Limits bytes and operations; both buckets must allow a request for it to go.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Full buckets at clock time `now`.
    pub fn new(config: RateLimiterConfig, now: Duration) -> RateLimiter {
        RateLimiter {
            bandwidth: config.bandwidth.and_then(|c| TokenBucket::new(c, now)),
            ops: config.ops.and_then(|c| TokenBucket::new(c, now)),
        }
    }

    /// A limiter as saved, refilling from `now` on (the time a VM was not running earns
    /// nothing). Every number is checked.
    pub fn restore(state: &RateLimiterState, now: Duration) -> Result<RateLimiter, BadLimiterState> {
        Ok(RateLimiter {
            bandwidth: restore_bucket("bandwidth", state.bandwidth, now)?,
            ops: restore_bucket("ops", state.ops, now)?,
        })
    }

    /// Counts refills from `now` on, on another clock's time line; the buckets keep what they
    /// hold.
    pub fn restart_at(&mut self, now: Duration) {
        for bucket in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            bucket.refilled_to = now;
        }
    }

    pub fn state(&self) -> RateLimiterState {
        RateLimiterState { bandwidth: self.bandwidth.map(|b| b.state()), ops: self.ops.map(|b| b.state()) }
    }

    /// Whether this limiter limits anything.
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Takes one operation of `bytes` at clock time `now`, or says when to try again (nothing
    /// is taken then).
    pub fn consume(&mut self, bytes: u64, now: Duration) -> Result<(), Duration> {
        let waits = [
            self.bandwidth.as_mut().and_then(|b| b.wait_for(bytes, now)),
            self.ops.as_mut().and_then(|b| b.wait_for(1, now)),
        ];
        if let Some(retry) = waits.into_iter().flatten().max() {
            return Err(retry);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, burst: u64, refill_time: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig { size, one_time_burst: burst, refill_time })
    }

    #[test]
    fn bytes_refill_linearly_and_the_retry_time_is_exact() {
        let mut limiter =
            RateLimiter::new(RateLimiterConfig { bandwidth: bucket(1000, 0, 100), ops: None }, Duration::ZERO);
        assert_eq!(limiter.consume(600, Duration::ZERO), Ok(()));
        // 400 left; 600 more need 200 tokens = 20 ms.
        assert_eq!(limiter.consume(600, Duration::ZERO), Err(20 * MS));
        assert_eq!(limiter.consume(600, 19 * MS), Err(20 * MS));
        assert_eq!(limiter.consume(600, 20 * MS), Ok(()));
        assert_eq!(limiter.state().bandwidth.unwrap().budget, 0);
    }

    #[test]
    fn ops_bucket_and_one_time_burst() {
        let mut limiter =
            RateLimiter::new(RateLimiterConfig { bandwidth: None, ops: bucket(2, 1, 1000) }, Duration::ZERO);
        for _ in 0..3 {
            assert_eq!(limiter.consume(1 << 20, Duration::ZERO), Ok(()), "2 ops + 1 burst");
        }
        assert_eq!(limiter.consume(1, Duration::ZERO), Err(500 * MS));
        assert_eq!(limiter.consume(1, 500 * MS), Ok(()));
    }

    #[test]
    fn a_request_bigger_than_the_bucket_waits_for_a_full_bucket_then_leaves_debt() {
        let mut limiter =
            RateLimiter::new(RateLimiterConfig { bandwidth: bucket(100, 0, 10), ops: None }, Duration::ZERO);
        assert_eq!(limiter.consume(250, Duration::ZERO), Ok(()), "full bucket: let through");
        assert_eq!(limiter.state().bandwidth.unwrap().budget, -150);
        // Needs 1 token back from -150: 151 tokens = 15.1 ms.
        assert_eq!(limiter.consume(1, Duration::ZERO), Err(Duration::from_micros(15_100)));
    }

    #[test]
    fn fractions_of_a_token_are_not_lost() {
        let mut limiter = RateLimiter::new(RateLimiterConfig { bandwidth: bucket(3, 0, 1), ops: None }, Duration::ZERO);
        assert_eq!(limiter.consume(3, Duration::ZERO), Ok(()));
        // One token per 333.3 µs: by 1.5 ms 4.5 tokens were earned. Polls every 500 µs each
        // earn 1.5 tokens; rounding each down on its own would give only 3.
        let mut got = 0;
        for step in 1..=3u32 {
            while limiter.consume(1, step * Duration::from_micros(500)).is_ok() {
                got += 1;
            }
        }
        assert_eq!(got, 4);
    }

    #[test]
    fn no_limit_without_size_or_refill_time() {
        let mut limiter =
            RateLimiter::new(RateLimiterConfig { bandwidth: bucket(0, 0, 10), ops: bucket(5, 0, 0) }, Duration::ZERO);
        assert!(!limiter.is_limited());
        assert_eq!(limiter.consume(u64::MAX, Duration::ZERO), Ok(()));
    }

    #[test]
    fn restore_checks_every_number() {
        let mut limiter = RateLimiter::new(
            RateLimiterConfig { bandwidth: bucket(100, 50, 10), ops: bucket(4, 0, 10) },
            Duration::ZERO,
        );
        limiter.consume(120, Duration::ZERO).unwrap();
        let state = limiter.state();
        let restored = RateLimiter::restore(&state, Duration::from_secs(99)).unwrap();
        assert_eq!(restored.state(), state);
        let mut bad = state;
        bad.bandwidth.as_mut().unwrap().budget = 101;
        assert_eq!(RateLimiter::restore(&bad, Duration::ZERO).unwrap_err().which, "bandwidth");
        let mut bad = state;
        bad.ops.as_mut().unwrap().config.refill_time = 0;
        assert_eq!(RateLimiter::restore(&bad, Duration::ZERO).unwrap_err().which, "ops");
        let mut bad = state;
        bad.bandwidth.as_mut().unwrap().one_time_burst = 51;
        assert!(RateLimiter::restore(&bad, Duration::ZERO).is_err());
    }
}
