//! Per-caller quotas as token buckets: a caller may spend `per_minute` units a minute, refilled
//! continuously, with at most a minute's worth banked. Used for request rates (keyshares) and for
//! batch counts and bytes (ingest), keyed by the caller's certificate identity.

use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Callers whose buckets are kept (a meter is a caller when it submits itself). Beyond this the
/// least recently seen caller's bucket is forgotten, and it starts over full when it returns —
/// the callers actually submitting are the most recent, so minting identities cannot reset them.
pub const MAX_CALLERS: usize = 1_000_000;

/// Token buckets by caller.
pub struct Quota {
    per_minute: f64,
    buckets: Mutex<lru::LruCache<String, (f64, Instant)>>,
}

/// Why a quota refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverQuota {
    /// Retry after this long.
    RetryIn(Duration),
    /// The cost is more than a minute's worth: it can never pass; split the request.
    TooLarge,
}

impl Quota {
    /// `per_minute` units a minute per caller (at least 1).
    pub fn new(per_minute: u64) -> Self {
        Quota {
            per_minute: per_minute.max(1) as f64,
            buckets: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(MAX_CALLERS).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// The units a minute this quota allows.
    pub fn per_minute(&self) -> u64 {
        self.per_minute as u64
    }

    /// Takes `cost` units from `caller`'s bucket, or says why not (and takes nothing).
    pub fn take(&self, caller: &str, cost: u64) -> Result<(), OverQuota> {
        self.take_if(caller, cost, || true)
    }

    /// As [`Quota::take`], but only if `also` (another quota's check) passes while this one
    /// would: a request charged to two quotas is charged to both or to neither.
    pub fn take_if(
        &self,
        caller: &str,
        cost: u64,
        also: impl FnOnce() -> bool,
    ) -> Result<(), OverQuota> {
        if cost as f64 > self.per_minute {
            return Err(OverQuota::TooLarge);
        }
        let cost = cost as f64;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) =
            buckets.get_or_insert_mut(caller.to_owned(), || (self.per_minute, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_minute / 60.0;
        *tokens = (*tokens + refill).min(self.per_minute);
        *last = now;
        if *tokens < cost {
            let missing = cost - *tokens;
            return Err(OverQuota::RetryIn(Duration::from_secs_f64(
                missing * 60.0 / self.per_minute,
            )));
        }
        if !also() {
            return Err(OverQuota::RetryIn(Duration::ZERO));
        }
        *tokens -= cost;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_caller_and_say_when_to_retry() {
        let q = Quota::new(60);
        assert!(q.take("a", 60).is_ok());
        let Err(OverQuota::RetryIn(wait)) = q.take("a", 30) else {
            panic!("not refused")
        };
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(q.take("b", 1).is_ok(), "another caller has its own bucket");
        // More than a minute's worth can never pass: refused as too large, not let through.
        assert_eq!(q.take("c", 61), Err(OverQuota::TooLarge));
        // Many other callers do not reset a caller's bucket.
        for i in 0..20_000 {
            let _ = q.take(&format!("sybil-{i}"), 1);
        }
        assert!(
            q.take("a", 1).is_err(),
            "a's spent bucket was reset by other callers"
        );
        // Charged to both quotas or neither.
        let bytes = Quota::new(100);
        assert!(bytes.take("d", 100).is_ok());
        let batches = Quota::new(10);
        assert!(batches
            .take_if("d", 5, || bytes.take("d", 1).is_ok())
            .is_err());
        assert!(
            batches.take("d", 10).is_ok(),
            "the refused request took batch tokens"
        );
    }
}
