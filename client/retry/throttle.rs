//! `retryThrottling` (gRFC A6): one bucket of tokens per channel, kept in
//! thousandths so a token ratio of 0.001 counts exactly.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::service_config::RetryThrottling;

/// The token bucket of one channel's retries and hedges.
#[derive(Debug)]
pub(crate) struct Throttle {
    max: u32,
    ratio: u32,
    tokens: AtomicU32,
}

impl Throttle {
    /// A full bucket as `config` sizes it.
    pub(crate) fn new(config: RetryThrottling) -> Self {
        Self {
            max: config.max_milli_tokens,
            ratio: config.milli_token_ratio,
            tokens: AtomicU32::new(config.max_milli_tokens),
        }
    }

    /// Counts a failure that a retry or hedge could follow; says whether
    /// one may (the bucket is still above half).
    pub(crate) fn failure(&self) -> bool {
        let before = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(1000))
            })
            .unwrap_or(0);
        before.saturating_sub(1000) > self.max / 2
    }

    /// Whether a hedge may go now, without counting anything.
    pub(crate) fn allows(&self) -> bool {
        self.tokens.load(Ordering::Acquire) > self.max / 2
    }

    /// Counts a call that ended OK.
    pub(crate) fn success(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(self.ratio).min(self.max))
            });
    }

    /// Tokens now, in thousandths.
    #[cfg(test)]
    pub(crate) fn milli_tokens(&self) -> u32 {
        self.tokens.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stop_at_half_and_successes_refill() {
        // gRFC A6's example: 10 tokens, 0.1 back per success.
        let throttle = Throttle::new(RetryThrottling {
            max_milli_tokens: 10_000,
            milli_token_ratio: 100,
        });
        let allowed: Vec<bool> = (0..6).map(|_| throttle.failure()).collect();
        // 9, 8, 7, 6 are above 5; at 5 retries stop.
        assert_eq!(allowed, [true, true, true, true, false, false]);
        assert_eq!(throttle.milli_tokens(), 4_000);
        assert!(!throttle.allows());
        for _ in 0..11 {
            throttle.success();
        }
        assert_eq!(throttle.milli_tokens(), 5_100);
        assert!(throttle.allows());
        for _ in 0..100 {
            throttle.success();
        }
        assert_eq!(
            throttle.milli_tokens(),
            10_000,
            "capped at the bucket's size"
        );
    }
}
