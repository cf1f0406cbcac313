//! Per-caller quotas as token buckets: a caller may spend `per_minute` units a minute, refilled
//! continuously, with at most a minute's worth banked. Used for request rates (keyshares) and for
//! batch counts and bytes (ingest), keyed by the caller's certificate identity.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Callers whose buckets are kept. Certificates come from the PKI, so this only bounds memory
/// against a misissuing CA; when exceeded, every bucket starts over full.
pub const MAX_CALLERS: usize = 10_000;

/// Token buckets by caller.
pub struct Quota {
    per_minute: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Quota {
    /// `per_minute` units a minute per caller (at least 1).
    pub fn new(per_minute: u64) -> Self {
        Quota {
            per_minute: per_minute.max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The units a minute this quota allows.
    pub fn per_minute(&self) -> u64 {
        self.per_minute as u64
    }

    /// Takes `cost` units from `caller`'s bucket, or returns how long until they are there (and
    /// takes nothing). A cost above a minute's worth needs a full bucket and empties it.
    pub fn take(&self, caller: &str, cost: u64) -> Result<(), Duration> {
        let cost = (cost as f64).min(self.per_minute);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(caller) {
            buckets.clear();
        }
        let (tokens, last) = buckets
            .entry(caller.to_owned())
            .or_insert((self.per_minute, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_minute / 60.0;
        *tokens = (*tokens + refill).min(self.per_minute);
        *last = now;
        if *tokens >= cost {
            *tokens -= cost;
            Ok(())
        } else {
            let missing = cost - *tokens;
            Err(Duration::from_secs_f64(missing * 60.0 / self.per_minute))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_caller_and_say_when_to_retry() {
        let q = Quota::new(60);
        assert!(q.take("a", 60).is_ok());
        let wait = q.take("a", 30).unwrap_err();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(q.take("b", 1).is_ok(), "another caller has its own bucket");
        // More than a minute's worth needs a full bucket.
        assert!(q.take("c", 1_000).is_ok());
        assert!(q.take("c", 1).is_err());
    }
}
