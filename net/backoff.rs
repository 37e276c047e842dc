//! gRPC's connection backoff: exponential delays with jitter, as specified in
//! grpc/doc/connection-backoff.md (initial 1 s, multiplier 1.6, jitter ±20 %,
//! max 120 s, minimum connect timeout 20 s).

use std::time::Duration;

/// The parameters of an exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Growth factor per consecutive failure.
    pub multiplier: f64,
    /// Fraction of the delay added or removed at random (0.2 = ±20 %).
    pub jitter: f64,
    /// Upper bound of the delay before jitter.
    pub max: Duration,
    /// The least time one connection attempt is given.
    pub min_connect_timeout: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            multiplier: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(120),
            min_connect_timeout: Duration::from_secs(20),
        }
    }
}

impl BackoffConfig {
    /// Short delays for tests and demos: 50 ms growing to 1 s.
    pub fn fast() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            min_connect_timeout: Duration::from_secs(2),
            ..Self::default()
        }
    }
}

/// The delays of one run of consecutive failures; [`Backoff::reset`] after a
/// success.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    /// Delay before jitter for the next failure.
    current: Duration,
}

impl Backoff {
    /// Starts a run at the initial delay.
    pub fn new(config: BackoffConfig) -> Self {
        Self {
            current: config.initial,
            config,
        }
    }

    /// The delay to wait after the failure that just happened.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current.min(self.config.max);
        self.current = base
            .mul_f64(self.config.multiplier.max(1.0))
            .min(self.config.max);
        let spread = self.config.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + spread * (rand::random::<f64>() * 2.0 - 1.0);
        base.mul_f64(factor)
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.current = self.config.initial;
    }

    /// The parameters in use.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_the_multiplier_within_jitter_and_caps() {
        let mut backoff = Backoff::new(BackoffConfig::default());
        let mut expected = 1.0f64;
        for _ in 0..20 {
            let delay = backoff.next_delay().as_secs_f64();
            assert!(
                delay >= expected * 0.8 - 1e-9 && delay <= expected * 1.2 + 1e-9,
                "{delay} vs {expected}"
            );
            expected = (expected * 1.6).min(120.0);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(1200));
    }
}
