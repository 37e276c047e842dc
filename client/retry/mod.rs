//! gRFC A6 retries and hedging, the parts that do not send anything: the
//! replayable request body, the throttle, and each retry decision. The
//! send path (`client/channel/call.rs`) drives them.
//!
//! The decision follows grpc-go's order: a server's "do not retry"
//! pushback, then the retryable codes, then the throttle (which counts the
//! failure), then the attempt limit; the wait is the pushback's or an
//! exponential backoff with ±20 % jitter, restarted by every pushback.

pub(crate) mod replay;
pub(crate) mod throttle;

use std::time::Duration;

use crate::service_config::RetryPolicy;
use throttle::Throttle;

/// The trailer a server slows or stops retries with.
pub(crate) const PUSHBACK: &str = "grpc-retry-pushback-ms";
/// The header that tells a server how many attempts came before.
pub(crate) const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// What a server's `grpc-retry-pushback-ms` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushback {
    /// Retry after exactly this long.
    After(Duration),
    /// Do not retry (a negative or unreadable value).
    Stop,
}

impl Pushback {
    /// The pushback in `headers`, if there is one.
    pub(crate) fn of(headers: &http::HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(PUSHBACK).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return Some(Self::Stop);
        }
        Some(
            match first.to_str().ok().and_then(|v| v.parse::<i32>().ok()) {
                Some(ms) if ms >= 0 => Self::After(Duration::from_millis(ms as u64)),
                _ => Self::Stop,
            },
        )
    }
}

/// Why a call was not retried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Its status is not one the policy retries.
    NotRetryable,
    /// The server said not to.
    Pushback,
    /// The channel's retry tokens are at or below half.
    Throttled,
    /// It made `maxAttempts` attempts.
    Exhausted,
}

/// The retries of one call under a retry policy.
pub(crate) struct Retries<'a> {
    policy: &'a RetryPolicy,
    throttle: Option<&'a Throttle>,
    /// Attempts made, the first included.
    attempts: u32,
    /// Retries since the start or the last pushback.
    since_pushback: u32,
}

impl<'a> Retries<'a> {
    /// A call about to make its first attempt.
    pub(crate) fn new(policy: &'a RetryPolicy, throttle: Option<&'a Throttle>) -> Self {
        Self {
            policy,
            throttle,
            attempts: 1,
            since_pushback: 0,
        }
    }

    /// Attempts made so far, the first included.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// After an attempt failed with `code` before any response headers:
    /// how long to wait before the next one, or why there is none.
    pub(crate) fn after_failure(
        &mut self,
        code: tonic::Code,
        pushback: Option<Pushback>,
    ) -> Result<Duration, Stop> {
        if pushback == Some(Pushback::Stop) {
            if let Some(throttle) = self.throttle {
                throttle.failure();
            }
            return Err(Stop::Pushback);
        }
        if !self.policy.retryable_codes.contains(code) {
            return Err(Stop::NotRetryable);
        }
        if let Some(throttle) = self.throttle {
            if !throttle.failure() {
                return Err(Stop::Throttled);
            }
        }
        if self.attempts >= self.policy.max_attempts {
            return Err(Stop::Exhausted);
        }
        self.attempts += 1;
        Ok(match pushback {
            Some(Pushback::After(delay)) => {
                self.since_pushback = 0;
                delay
            }
            _ => {
                self.since_pushback += 1;
                jittered(self.policy.backoff(self.since_pushback))
            }
        })
    }
}

/// `delay` times a random factor in [0.8, 1.2) (gRFC A6 as amended in
/// 2024), so clients that failed together do not retry together.
pub(crate) fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::service_config::{CodeSet, RetryThrottling};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            retryable_codes: CodeSet::of(&[Code::Unavailable]),
        }
    }

    fn headers(values: &[&str]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        for v in values {
            headers.append(PUSHBACK, v.parse().unwrap());
        }
        headers
    }

    #[test]
    fn pushback_values_are_read_as_grpc_reads_them() {
        assert_eq!(Pushback::of(&headers(&[])), None);
        assert_eq!(
            Pushback::of(&headers(&["250"])),
            Some(Pushback::After(Duration::from_millis(250)))
        );
        for stop in [&["-1"][..], &["x"], &["1", "2"], &["99999999999"]] {
            assert_eq!(
                Pushback::of(&headers(stop)),
                Some(Pushback::Stop),
                "{stop:?}"
            );
        }
    }

    #[test]
    fn retries_back_off_exponentially_until_the_attempts_run_out() {
        let policy = policy();
        let mut retries = Retries::new(&policy, None);
        let first = retries.after_failure(Code::Unavailable, None).unwrap();
        assert!((80..120).contains(&first.as_millis()), "{first:?}");
        let second = retries.after_failure(Code::Unavailable, None).unwrap();
        assert!((160..240).contains(&second.as_millis()), "{second:?}");
        assert_eq!(retries.attempts(), 3);
        assert_eq!(
            retries.after_failure(Code::Unavailable, None),
            Err(Stop::Exhausted)
        );
    }

    #[test]
    fn only_retryable_codes_are_retried_and_pushback_rules() {
        let policy = policy();
        let mut retries = Retries::new(&policy, None);
        assert_eq!(
            retries.after_failure(Code::Internal, None),
            Err(Stop::NotRetryable)
        );
        let pushed = Some(Pushback::After(Duration::from_millis(7)));
        assert_eq!(
            retries.after_failure(Code::Unavailable, pushed),
            Ok(Duration::from_millis(7)),
            "exactly the pushback, no jitter"
        );
        // The pushback restarted the backoff: the next wait is the first.
        let next = retries.after_failure(Code::Unavailable, None).unwrap();
        assert!((80..120).contains(&next.as_millis()), "{next:?}");
        let mut stopped = Retries::new(&policy, None);
        assert_eq!(
            stopped.after_failure(Code::Unavailable, Some(Pushback::Stop)),
            Err(Stop::Pushback)
        );
    }

    #[test]
    fn the_throttle_counts_failures_and_stops_retries() {
        let throttle = Throttle::new(RetryThrottling {
            max_milli_tokens: 3_000,
            milli_token_ratio: 1_000,
        });
        let policy = policy();
        // 3 tokens: the first failure leaves 2 (above 1.5), the second 1.
        assert!(Retries::new(&policy, Some(&throttle))
            .after_failure(Code::Unavailable, None)
            .is_ok());
        assert_eq!(
            Retries::new(&policy, Some(&throttle)).after_failure(Code::Unavailable, None),
            Err(Stop::Throttled)
        );
        // A "do not retry" pushback counts as a failure too.
        throttle.success();
        throttle.success();
        assert_eq!(
            Retries::new(&policy, Some(&throttle))
                .after_failure(Code::Unavailable, Some(Pushback::Stop)),
            Err(Stop::Pushback)
        );
        assert_eq!(throttle.milli_tokens(), 2_000);
    }
}
