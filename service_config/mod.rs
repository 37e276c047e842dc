//! The gRPC service config: how to call a service, not only where. It is
//! the JSON document gRPC users already write (gRFC A2, A6, A21), held as a
//! typed, validated value: the client applies it to every call, and the
//! registry can hold one per service and push it.
//!
//! - [`ServiceConfig::from_json`] parses and validates; a bad document is
//!   refused whole with a [`ConfigError`] naming the field (gRFC A21: no
//!   half-applied config);
//! - [`ServiceConfig::method`] finds the [`MethodConfig`] of a call's path,
//!   most specific first: `/S/M`, then `S`'s default, then the default;
//! - [`ServiceConfig::to_json`] writes it back in the same format.
//!
//! Fields this crate does not use are ignored, as gRPC ignores them, so a
//! config written for grpc-go or grpc-java is accepted unchanged.

mod balancing;
mod json;
pub mod outlier;
pub mod ring_hash;

pub use balancing::LbPolicy;
pub use json::ConfigError;
pub use ring_hash::{HashHeader, RingHashConfig};

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// Most attempts a retry or hedging policy may make, whatever it asks for
/// (gRPC clamps to the same).
pub const MAX_ATTEMPTS: u32 = 5;

/// A validated service config.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceConfig {
    /// `loadBalancingConfig`: policies in order of preference, each a name
    /// and its own config as written (so it is written back unchanged).
    load_balancing: Vec<LbPolicyConfig>,
    /// Every entry of `load_balancing` this crate knows, typed, in order;
    /// the first is the chosen policy.
    lb_policies: Vec<LbPolicy>,
    /// `methodConfig`, in document order; read through
    /// [`ServiceConfig::methods`], so the lookup index cannot go stale.
    methods: Vec<MethodConfig>,
    /// `retryThrottling`: the token bucket shared by every call to the
    /// service.
    pub retry_throttling: Option<RetryThrottling>,
    /// `healthCheckConfig.serviceName`: the `grpc.health.v1` service name
    /// to watch on each backend.
    pub health_check_service: Option<String>,
    /// `circuitBreakers`: a switchboard extension, read through
    /// [`ServiceConfig::circuit_breakers`] so it is always validated.
    circuit_breakers: Option<CircuitBreakers>,
    /// `slowStartConfig` of the chosen policy (a switchboard extension).
    slow_start: Option<SlowStartConfig>,
    /// `zonePreference`: a switchboard extension, see [`ZonePreference`].
    pub zone_preference: Option<ZonePreference>,
    /// Where each method name points in `methods`.
    index: HashMap<String, usize>,
}

/// `slowStartConfig`, a switchboard extension inside a `round_robin`,
/// `weighted_round_robin` or `least_request_experimental` entry (Envoy's
/// `slow_start_config`): a backend that joins a serving service ramps up
/// to its full share over `window` instead of taking it at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStartConfig {
    /// `slowStartWindow`: how long the ramp lasts (required, above 0).
    pub window: Duration,
    /// `aggression`: the curve's exponent is `1 / aggression`; 1 is
    /// linear, more ramps faster at first (default 1, above 0).
    pub aggression: f64,
    /// `minWeightPercent`: the weight a just-joined backend starts at, as a
    /// percentage of its full weight (default 10, 0 to 100).
    pub min_weight_percent: f64,
}

/// `zonePreference`, a switchboard extension: whether clients that know
/// their zone keep calls in it, and how much capacity loss it takes to
/// spill. The client's zone itself is the client's to say
/// ([`Builder::zone`](crate::client::Builder::zone), an xDS node's
/// `locality.zone`); a service config cannot know where its callers run.
/// Without one, a client with a zone prefers it with the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZonePreference {
    /// `enabled` (default true): false spreads calls over every zone
    /// alike, for services whose cross-zone calls cost nothing.
    pub enabled: bool,
    /// `overprovisioningFactor` as a percentage (Envoy's EDS
    /// `overprovisioning_factor`, default 140): the local zone keeps every
    /// call while `factor × ready / serving ≥ 1`, and that share of calls
    /// below it. 100 to 10,000.
    pub overprovisioning_percent: u32,
}

impl ZonePreference {
    /// Envoy's default factor, 1.4.
    pub const DEFAULT_OVERPROVISIONING_PERCENT: u32 = 140;
}

impl Default for ZonePreference {
    fn default() -> Self {
        Self {
            enabled: true,
            overprovisioning_percent: Self::DEFAULT_OVERPROVISIONING_PERCENT,
        }
    }
}

/// `circuitBreakers`, a switchboard extension to the gRPC service config
/// (which has no such field): limits that xDS carries to stock clients as
/// the cluster's circuit breakers (gRFC A32). Other gRPC clients reading
/// the config as a service config ignore it, as they ignore any unknown
/// field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakers {
    /// `maxRequests`: the most RPCs in flight to the whole service from one
    /// client channel; further RPCs fail with UNAVAILABLE at once. Above 0.
    pub max_requests: u32,
}

/// One entry of `loadBalancingConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LbPolicyConfig {
    /// The policy's name, e.g. `round_robin`.
    pub name: String,
    /// Its config object, as written.
    pub config: serde_json::Value,
}

/// One `methodConfig` entry: what applies to the methods it names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MethodConfig {
    /// The methods it applies to.
    pub names: Vec<MethodName>,
    /// `timeout`: the deadline of the whole call, every attempt included;
    /// a shorter deadline set by the caller wins.
    pub timeout: Option<Duration>,
    /// `waitForReady`: queue instead of failing fast while no backend is
    /// Ready. A caller's own choice wins.
    pub wait_for_ready: Option<bool>,
    /// `retryPolicy` or `hedgingPolicy`: at most one of them.
    pub policy: Option<CallPolicy>,
}

/// Which methods a [`MethodConfig`] covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct MethodName {
    /// The full service name (`pkg.Service`); `None` for every service.
    pub service: Option<String>,
    /// The method; `None` for every method of `service`.
    pub method: Option<String>,
}

impl MethodName {
    /// The key a call's path is looked up by: `/S/M`, `/S/` or ``.
    fn key(&self) -> String {
        match (&self.service, &self.method) {
            (Some(s), Some(m)) => format!("/{s}/{m}"),
            (Some(s), None) => format!("/{s}/"),
            _ => String::new(),
        }
    }
}

/// How failed attempts of a call are retried.
#[derive(Debug, Clone, PartialEq)]
pub enum CallPolicy {
    /// One attempt at a time, the next after a backoff.
    Retry(RetryPolicy),
    /// Attempts in parallel, spaced by a delay; the first answer wins.
    Hedging(HedgingPolicy),
}

/// `retryPolicy` (gRFC A6).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 2 to [`MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// The first backoff, before jitter.
    pub initial_backoff: Duration,
    /// The largest backoff, before jitter.
    pub max_backoff: Duration,
    /// How much each backoff grows.
    pub backoff_multiplier: f64,
    /// The statuses that are retried.
    pub retryable_codes: CodeSet,
}

impl RetryPolicy {
    /// The backoff before retry `n` (1 for the first retry since the
    /// start or the last pushback), before jitter.
    pub fn backoff(&self, n: u32) -> Duration {
        let exponent = n.saturating_sub(1).min(64) as i32;
        let secs = self.initial_backoff.as_secs_f64() * self.backoff_multiplier.powi(exponent);
        let max = self.max_backoff.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }
}

/// `hedgingPolicy` (gRFC A6).
#[derive(Debug, Clone, PartialEq)]
pub struct HedgingPolicy {
    /// Attempts in all, the first included: 2 to [`MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// The wait before each further attempt; zero sends them all at once.
    pub hedging_delay: Duration,
    /// Statuses that do not end the call: the next hedge goes at once.
    pub non_fatal_codes: CodeSet,
}

/// `retryThrottling` (gRFC A6): a bucket of tokens per service. Every
/// retryable failure takes one; every success gives back `token_ratio`;
/// retries and hedges stop while the bucket is at or below half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryThrottling {
    /// The bucket's size, in thousandths of a token (1 to 1,000,000).
    pub max_milli_tokens: u32,
    /// What a success gives back, in thousandths of a token.
    pub milli_token_ratio: u32,
}

/// A set of gRPC status codes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct CodeSet(u32);

impl CodeSet {
    /// The set of `codes`.
    pub fn of(codes: &[tonic::Code]) -> Self {
        let mut set = Self::default();
        for &code in codes {
            set.insert(code);
        }
        set
    }

    /// Adds `code`.
    pub fn insert(&mut self, code: tonic::Code) {
        self.0 |= 1 << (code as u32);
    }

    /// Whether `code` is in the set.
    pub fn contains(&self, code: tonic::Code) -> bool {
        self.0 & (1 << (code as u32)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The codes, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = tonic::Code> + '_ {
        (0..17)
            .filter(|i| self.0 & (1 << i) != 0)
            .map(tonic::Code::from_i32)
    }
}

impl fmt::Debug for CodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(crate::metrics::code_name))
            .finish()
    }
}

impl ServiceConfig {
    /// Parses and validates a JSON service config.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        json::parse(text)
    }

    /// The config as JSON, in the format [`ServiceConfig::from_json`] reads.
    pub fn to_json(&self) -> String {
        json::write(self)
    }

    /// A config of `methods` and nothing else; checks what
    /// [`ServiceConfig::from_json`] checks.
    pub fn with_methods(methods: Vec<MethodConfig>) -> Result<Self, ConfigError> {
        Self {
            methods,
            ..Self::default()
        }
        .validated()
    }

    /// `loadBalancingConfig` as written, known names or not.
    pub fn load_balancing(&self) -> &[LbPolicyConfig] {
        &self.load_balancing
    }

    /// The policy the config chose: the first entry of
    /// `loadBalancingConfig` this crate knows.
    pub fn lb_policy(&self) -> Option<&LbPolicy> {
        self.lb_policies.first()
    }

    /// Every entry of `loadBalancingConfig` this crate knows, typed, in
    /// the config's order of preference (the first is
    /// [`ServiceConfig::lb_policy`]): what the registry offers xDS
    /// clients, each of which takes the first it supports.
    pub fn lb_policies(&self) -> &[LbPolicy] {
        &self.lb_policies
    }

    /// `circuitBreakers`, the switchboard extension, if set.
    pub fn circuit_breakers(&self) -> Option<CircuitBreakers> {
        self.circuit_breakers
    }

    /// The chosen policy's slow start, if it has one.
    pub fn slow_start(&self) -> Option<SlowStartConfig> {
        self.slow_start
    }

    /// The zone preference in force: the config's, or the default one.
    pub fn zone_preference(&self) -> ZonePreference {
        self.zone_preference.unwrap_or_default()
    }

    /// A copy with `circuitBreakers` set; checks it as
    /// [`ServiceConfig::from_json`] does.
    pub fn with_circuit_breakers(
        mut self,
        circuit_breakers: CircuitBreakers,
    ) -> Result<Self, ConfigError> {
        self.circuit_breakers = Some(circuit_breakers);
        self.validated()
    }

    /// A copy with `loadBalancingConfig` replaced by `policies` (name and
    /// JSON object each); checks them as [`ServiceConfig::from_json`] does.
    pub fn with_load_balancing(
        mut self,
        policies: Vec<LbPolicyConfig>,
    ) -> Result<Self, ConfigError> {
        self.load_balancing = policies;
        self.validated()
    }

    /// The `methodConfig` entries, in document order (entries that named
    /// no method are dropped).
    pub fn methods(&self) -> &[MethodConfig] {
        &self.methods
    }

    /// Sets `retryThrottling`.
    pub fn with_retry_throttling(mut self, throttling: RetryThrottling) -> Self {
        self.retry_throttling = Some(throttling);
        self
    }

    /// The config of the method at `path` (`/pkg.Service/Method`): its own
    /// entry, else its service's, else the default; `None` if no entry
    /// covers it. The winner applies whole: gRPC does not merge entries.
    pub fn method(&self, path: &str) -> Option<&MethodConfig> {
        if self.index.is_empty() {
            return None;
        }
        let service_default = path.rfind('/').map(|slash| &path[..=slash]);
        [Some(path), service_default, Some("")]
            .into_iter()
            .flatten()
            .find_map(|key| self.index.get(key))
            .map(|&i| &self.methods[i])
    }

    /// Checks the rules a typed config could break, clamps attempts to
    /// [`MAX_ATTEMPTS`] and builds the lookup.
    fn validated(mut self) -> Result<Self, ConfigError> {
        self.lb_policies = balancing::known(&self.load_balancing, "loadBalancingConfig")?;
        self.slow_start = balancing::slow_start(&self.load_balancing, "loadBalancingConfig")?;
        self.index.clear();
        for method in &mut self.methods {
            match &mut method.policy {
                Some(CallPolicy::Retry(retry)) => {
                    retry.max_attempts = retry.max_attempts.min(MAX_ATTEMPTS)
                }
                Some(CallPolicy::Hedging(hedging)) => {
                    hedging.max_attempts = hedging.max_attempts.min(MAX_ATTEMPTS)
                }
                None => {}
            }
        }
        for (i, method) in self.methods.iter().enumerate() {
            let at = |field: &str| format!("methodConfig[{i}].{field}");
            for (j, name) in method.names.iter().enumerate() {
                if name.service.is_none() && name.method.is_some() {
                    return Err(ConfigError::new(
                        at(&format!("name[{j}].service")),
                        "must be set when method is",
                    ));
                }
                if self.index.insert(name.key(), i).is_some() {
                    return Err(ConfigError::new(
                        at(&format!("name[{j}]")),
                        "names a method another entry already names",
                    ));
                }
            }
            match &method.policy {
                Some(CallPolicy::Retry(retry)) => {
                    let at = |field: &str| at(&format!("retryPolicy.{field}"));
                    check_attempts(retry.max_attempts, || at("maxAttempts"))?;
                    if retry.initial_backoff.is_zero() {
                        return Err(ConfigError::new(at("initialBackoff"), "must be above 0"));
                    }
                    if retry.max_backoff.is_zero() {
                        return Err(ConfigError::new(at("maxBackoff"), "must be above 0"));
                    }
                    if !(retry.backoff_multiplier > 0.0 && retry.backoff_multiplier.is_finite()) {
                        return Err(ConfigError::new(
                            at("backoffMultiplier"),
                            "must be a number above 0",
                        ));
                    }
                    if retry.retryable_codes.is_empty() {
                        return Err(ConfigError::new(
                            at("retryableStatusCodes"),
                            "must name at least one status code",
                        ));
                    }
                }
                Some(CallPolicy::Hedging(hedging)) => {
                    check_attempts(hedging.max_attempts, || at("hedgingPolicy.maxAttempts"))?;
                }
                None => {}
            }
        }
        if let Some(breakers) = &self.circuit_breakers {
            if breakers.max_requests == 0 {
                return Err(ConfigError::new(
                    "circuitBreakers.maxRequests",
                    "must be a positive integer, got 0",
                ));
            }
        }
        if let Some(throttling) = &self.retry_throttling {
            if throttling.max_milli_tokens == 0 || throttling.max_milli_tokens > 1_000_000 {
                return Err(ConfigError::new(
                    "retryThrottling.maxTokens",
                    "must be above 0 and at most 1000",
                ));
            }
            if throttling.milli_token_ratio == 0 {
                return Err(ConfigError::new(
                    "retryThrottling.tokenRatio",
                    "must be at least 0.001",
                ));
            }
        }
        Ok(self)
    }
}

fn check_attempts(attempts: u32, at: impl Fn() -> String) -> Result<(), ConfigError> {
    if attempts < 2 {
        return Err(ConfigError::new(at(), "must be an integer of at least 2"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
