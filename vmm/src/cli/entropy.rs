//! `--entropy [bytes=N,refill_ms=M[,burst=B]]`: a virtio-rng device, unlimited or with
//! Firecracker's bandwidth bucket (N bytes per M milliseconds, plus B bytes once).

use devices::rng::{RateLimiterConfig, TokenBucketConfig};

use crate::device_manager::EntropyConfig;

const KEYS: &str = "keys: bytes, refill_ms, burst";

/// Clap's value parser for `--entropy` (an empty value: no limit).
pub fn parse_entropy(text: &str) -> Result<EntropyConfig, String> {
    if text.is_empty() {
        return Ok(EntropyConfig::default());
    }
    let (mut bytes, mut refill_ms, mut burst) = (None, None, None);
    for part in text.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("{part:?} is not KEY=VALUE ({KEYS})"));
        };
        let slot = match key {
            "bytes" => &mut bytes,
            "refill_ms" => &mut refill_ms,
            "burst" => &mut burst,
            other => return Err(format!("unknown key {other:?} ({KEYS})")),
        };
        let number: u64 = value.parse().map_err(|_| format!("{key}={value:?} is not a whole number"))?;
        if slot.replace(number).is_some() {
            return Err(format!("{key} is given twice"));
        }
    }
    let (Some(size), Some(refill_time)) = (bytes, refill_ms) else {
        return Err("a limit needs both bytes=N and refill_ms=M".into());
    };
    if size == 0 || refill_time == 0 || i64::try_from(size).is_err() {
        return Err(format!("bytes={size} and refill_ms={refill_time} must be 1 to {}", i64::MAX));
    }
    let bucket = TokenBucketConfig { size, one_time_burst: burst.unwrap_or(0), refill_time };
    Ok(EntropyConfig { rate_limiter: Some(RateLimiterConfig { bandwidth: Some(bucket), ops: None }) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_value_is_no_limit_and_a_limit_needs_both_numbers() {
        assert_eq!(parse_entropy(""), Ok(EntropyConfig::default()));
        let limited = parse_entropy("bytes=4096,refill_ms=100,burst=10").unwrap();
        let bucket = TokenBucketConfig { size: 4096, one_time_burst: 10, refill_time: 100 };
        assert_eq!(limited.rate_limiter.and_then(|l| l.bandwidth), Some(bucket));
        for bad in ["bytes=1", "refill_ms=5", "bytes=0,refill_ms=5", "bytes=5,refill_ms=0", "bytes=x,refill_ms=1"] {
            assert!(parse_entropy(bad).is_err(), "{bad}");
        }
        assert!(parse_entropy("bytes=1,bytes=2,refill_ms=1").unwrap_err().contains("twice"));
        assert!(parse_entropy("ops=1").unwrap_err().contains("unknown key"));
        assert!(parse_entropy("bytes=9223372036854775808,refill_ms=1").is_err());
    }
}
