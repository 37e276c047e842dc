//! `loadBalancingConfig` as typed policies: what the client builds, what
//! the registry translates into xDS, and what both refuse.
//!
//! The list is in order of preference, and each reader takes the first
//! entry it knows (gRFC A24): names this crate does not know are kept for
//! other clients, but a list with no known name at all is refused. Every
//! known entry is checked, not only the first, so a typo in a fallback is
//! caught where it is written.

use std::time::Duration;

use serde_json::{Map, Value};

use super::json::{duration, object, uint};
use super::outlier::{FailurePercentageEjection, OutlierDetectionConfig, SuccessRateEjection};
use super::ring_hash::{
    HashHeader, RingHashConfig, DEFAULT_MAX_RING_SIZE, DEFAULT_MIN_RING_SIZE,
    MAX_POINTS_PER_ENDPOINT, RING_SIZE_CAP, RING_SIZE_UPPER_BOUND,
};
use super::{ConfigError, LbPolicyConfig, SlowStartConfig};

/// A load-balancing policy the service config chose, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum LbPolicy {
    /// `pick_first`: the first address that connects.
    PickFirst,
    /// `round_robin`: every Ready address in turn.
    RoundRobin,
    /// `least_request_experimental` (or `least_request`): the less loaded
    /// of `choice_count` random Ready addresses.
    LeastRequest {
        /// Addresses compared per pick, 2 to 10 (gRFC A48).
        choice_count: u32,
    },
    /// `weighted_round_robin`: in proportion to each endpoint's `weight`.
    WeightedRoundRobin,
    /// `ring_hash_experimental` (gRFC A42, A76): consistent hashing of
    /// each request's key onto a ring of the endpoints.
    RingHash(RingHashConfig),
    /// `outlier_detection_experimental` (gRFC A50) around a child policy.
    OutlierDetection {
        /// When and how it ejects.
        config: OutlierDetectionConfig,
        /// The policy that picks among the addresses not ejected.
        child: Box<LbPolicy>,
    },
}

impl LbPolicy {
    /// The names a config may use, for error messages.
    pub const NAMES: [&'static str; 6] = [
        "pick_first",
        "round_robin",
        "least_request_experimental",
        "weighted_round_robin",
        "ring_hash_experimental",
        "outlier_detection_experimental",
    ];

    /// The policy that picks: this one, or the child of outlier detection.
    pub fn picking(&self) -> &LbPolicy {
        match self {
            LbPolicy::OutlierDetection { child, .. } => child.picking(),
            other => other,
        }
    }

    /// Outlier detection's settings, if the policy has it.
    pub fn outlier_detection(&self) -> Option<&OutlierDetectionConfig> {
        match self {
            LbPolicy::OutlierDetection { config, .. } => Some(config),
            _ => None,
        }
    }
}

/// The first known policy of `list` (whose entries are at
/// `loadBalancingConfig[i]`, or under `at`), every known entry checked.
pub(super) fn choose(list: &[LbPolicyConfig], at: &str) -> Result<Option<LbPolicy>, ConfigError> {
    Ok(known(list, at)?.into_iter().next())
}

/// Every known policy of `list`, in order, each checked; an error if the
/// list names policies but none this crate knows.
pub(super) fn known(list: &[LbPolicyConfig], at: &str) -> Result<Vec<LbPolicy>, ConfigError> {
    let mut policies = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{at}[{i}].{}", entry.name);
        if let Some(policy) = parse(&entry.name, &entry.config, &at)? {
            policies.push(policy);
        }
    }
    if policies.is_empty() && !list.is_empty() {
        let names: Vec<&str> = list.iter().map(|p| p.name.as_str()).collect();
        return Err(ConfigError::new(
            at,
            format!(
                "names no policy this version knows ({}); known: {}",
                names.join(", "),
                LbPolicy::NAMES.join(", ")
            ),
        ));
    }
    Ok(policies)
}

/// The `slowStartConfig` of the policy `list` chooses (or of outlier
/// detection's child), if it has one.
pub(super) fn slow_start(
    list: &[LbPolicyConfig],
    at: &str,
) -> Result<Option<SlowStartConfig>, ConfigError> {
    for (i, entry) in list.iter().enumerate() {
        let at = format!("{at}[{i}].{}", entry.name);
        if parse(&entry.name, &entry.config, &at)?.is_none() {
            continue;
        }
        let fields = object(&entry.config, &at)?;
        if matches!(
            entry.name.as_str(),
            "outlier_detection_experimental" | "outlier_detection"
        ) {
            let child_at = format!("{at}.childPolicy");
            let children = match fields.get("childPolicy") {
                Some(children) => super::json::policy_list(children, &child_at)?,
                None => return Ok(None),
            };
            return slow_start(&children, &child_at);
        }
        return slow_start_of(fields, &at);
    }
    Ok(None)
}

/// An entry's `slowStartConfig`, checked.
fn slow_start_of(
    fields: &Map<String, Value>,
    at: &str,
) -> Result<Option<SlowStartConfig>, ConfigError> {
    let Some(value) = fields.get("slowStartConfig") else {
        return Ok(None);
    };
    let at = format!("{at}.slowStartConfig");
    let config = object(value, &at)?;
    let window = match config.get("slowStartWindow") {
        Some(value) => duration(value, &format!("{at}.slowStartWindow"))?,
        None => {
            return Err(ConfigError::new(
                format!("{at}.slowStartWindow"),
                "is required",
            ))
        }
    };
    if window.is_zero() {
        return Err(ConfigError::new(
            format!("{at}.slowStartWindow"),
            "must be above 0s",
        ));
    }
    let number = |key: &str, default: f64| -> Result<f64, ConfigError> {
        match config.get(key) {
            None => Ok(default),
            Some(value) => value
                .as_f64()
                .ok_or_else(|| ConfigError::new(format!("{at}.{key}"), "must be a number")),
        }
    };
    let aggression = number("aggression", 1.0)?;
    if !(aggression > 0.0 && aggression.is_finite()) {
        return Err(ConfigError::new(
            format!("{at}.aggression"),
            "must be above 0",
        ));
    }
    let min_weight_percent = number("minWeightPercent", 10.0)?;
    if !(0.0..=100.0).contains(&min_weight_percent) {
        return Err(ConfigError::new(
            format!("{at}.minWeightPercent"),
            "must be 0 to 100",
        ));
    }
    Ok(Some(SlowStartConfig {
        window,
        aggression,
        min_weight_percent,
    }))
}

/// One entry, or `None` if its name is not one this crate knows.
fn parse(name: &str, config: &Value, at: &str) -> Result<Option<LbPolicy>, ConfigError> {
    let fields = object(config, at)?;
    if matches!(
        name,
        "round_robin" | "weighted_round_robin" | "least_request_experimental" | "least_request"
    ) {
        slow_start_of(fields, at)?;
    }
    Ok(Some(match name {
        "pick_first" => LbPolicy::PickFirst,
        "round_robin" => LbPolicy::RoundRobin,
        "least_request_experimental" | "least_request" => {
            let choice_count = match fields.get("choiceCount") {
                None => 2,
                Some(value) => uint(value, &format!("{at}.choiceCount"))?,
            };
            if !(2..=10).contains(&choice_count) {
                return Err(ConfigError::new(
                    format!("{at}.choiceCount"),
                    "must be 2 to 10",
                ));
            }
            LbPolicy::LeastRequest { choice_count }
        }
        "weighted_round_robin" => LbPolicy::WeightedRoundRobin,
        "ring_hash_experimental" | "ring_hash" => LbPolicy::RingHash(ring_hash(fields, at)?),
        "outlier_detection_experimental" | "outlier_detection" => outlier(fields, at)?,
        _ => return Ok(None),
    }))
}

/// gRFC A50's config; an absent field takes A50's default, an absent
/// ejection kind is off.
fn outlier(fields: &Map<String, Value>, at: &str) -> Result<LbPolicy, ConfigError> {
    let field = |key: &str| format!("{at}.{key}");
    let time = |key: &str, default: Duration| -> Result<Duration, ConfigError> {
        match fields.get(key) {
            None => Ok(default),
            Some(value) => duration(value, &field(key)),
        }
    };
    let interval = time("interval", Duration::from_secs(10))?;
    if interval.is_zero() {
        return Err(ConfigError::new(field("interval"), "must be above 0s"));
    }
    let base_ejection_time = time("baseEjectionTime", Duration::from_secs(30))?;
    let max_ejection_time = time("maxEjectionTime", Duration::from_secs(300))?;
    let max_ejection_percent = percent(fields, "maxEjectionPercent", 10, at)?;
    let success_rate = match fields.get("successRateEjection") {
        None => None,
        Some(value) => {
            let at = field("successRateEjection");
            let fields = object(value, &at)?;
            Some(SuccessRateEjection {
                stdev_factor: count(fields, "stdevFactor", 1900, &at)?,
                enforcement_percentage: percent(fields, "enforcementPercentage", 100, &at)?,
                minimum_hosts: count(fields, "minimumHosts", 5, &at)?,
                request_volume: count(fields, "requestVolume", 100, &at)?,
            })
        }
    };
    let failure_percentage = match fields.get("failurePercentageEjection") {
        None => None,
        Some(value) => {
            let at = field("failurePercentageEjection");
            let fields = object(value, &at)?;
            Some(FailurePercentageEjection {
                threshold: percent(fields, "threshold", 85, &at)?,
                enforcement_percentage: percent(fields, "enforcementPercentage", 100, &at)?,
                minimum_hosts: count(fields, "minimumHosts", 5, &at)?,
                request_volume: count(fields, "requestVolume", 50, &at)?,
            })
        }
    };
    let child_at = field("childPolicy");
    let Some(children) = fields.get("childPolicy") else {
        return Err(ConfigError::new(child_at, "is required"));
    };
    let children = super::json::policy_list(children, &child_at)?;
    let child = choose(&children, &child_at)?
        .ok_or_else(|| ConfigError::new(&child_at, "must name a policy"))?;
    if matches!(child, LbPolicy::OutlierDetection { .. }) {
        return Err(ConfigError::new(
            child_at,
            "outlier detection inside outlier detection is not supported",
        ));
    }
    Ok(LbPolicy::OutlierDetection {
        config: OutlierDetectionConfig {
            interval,
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent,
            success_rate,
            failure_percentage,
            ..OutlierDetectionConfig::default()
        },
        child: Box::new(child),
    })
}

/// A42's config with A76's `requestHashHeader`, checked as grpc-go checks
/// it: sizes above 8M and a minimum above the maximum are refused, sizes
/// above [`RING_SIZE_CAP`] are lowered to it.
fn ring_hash(fields: &Map<String, Value>, at: &str) -> Result<RingHashConfig, ConfigError> {
    let size = |key: &str, default: u64| -> Result<u64, ConfigError> {
        let at = format!("{at}.{key}");
        let size = match fields.get(key) {
            None => return Ok(default),
            Some(value) => value.as_u64().ok_or_else(|| {
                ConfigError::new(&at, format!("must be a non-negative integer, got {value}"))
            })?,
        };
        match size {
            // A42: 0, like an absent field, means the default.
            0 => Ok(default),
            size if size > RING_SIZE_UPPER_BOUND => Err(ConfigError::new(
                at,
                format!("must be at most {RING_SIZE_UPPER_BOUND} (8M), got {size}"),
            )),
            size => Ok(size),
        }
    };
    let min_ring_size = size("minRingSize", DEFAULT_MIN_RING_SIZE)?;
    let max_ring_size = size("maxRingSize", DEFAULT_MAX_RING_SIZE)?;
    if min_ring_size > max_ring_size {
        return Err(ConfigError::new(
            format!("{at}.minRingSize"),
            format!("must not exceed maxRingSize ({max_ring_size}), got {min_ring_size}"),
        ));
    }
    let points_per_endpoint = match fields.get("pointsPerEndpoint") {
        None => None,
        Some(value) => {
            let at = format!("{at}.pointsPerEndpoint");
            match value.as_u64() {
                Some(points @ 1..) if points <= u64::from(MAX_POINTS_PER_ENDPOINT) => {
                    Some(points as u32)
                }
                _ => {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "must be an integer from 1 to {MAX_POINTS_PER_ENDPOINT}, got {value}"
                        ),
                    ))
                }
            }
        }
    };
    let hash_header = match fields.get("requestHashHeader") {
        None => None,
        Some(value) => {
            let at = format!("{at}.requestHashHeader");
            let name = value.as_str().ok_or_else(|| {
                ConfigError::new(&at, format!("must be a header name, got {value}"))
            })?;
            // A76: empty is the same as absent.
            match name {
                "" => None,
                name => Some(
                    HashHeader::new(name).map_err(|err| ConfigError::new(at, err.to_string()))?,
                ),
            }
        }
    };
    Ok(RingHashConfig {
        min_ring_size: min_ring_size.min(RING_SIZE_CAP),
        max_ring_size: max_ring_size.min(RING_SIZE_CAP),
        points_per_endpoint,
        hash_header,
    })
}

fn count(
    fields: &Map<String, Value>,
    key: &str,
    default: u32,
    at: &str,
) -> Result<u32, ConfigError> {
    match fields.get(key) {
        None => Ok(default),
        Some(value) => uint(value, &format!("{at}.{key}")),
    }
}

fn percent(
    fields: &Map<String, Value>,
    key: &str,
    default: u32,
    at: &str,
) -> Result<u32, ConfigError> {
    let value = count(fields, key, default, at)?;
    if value > 100 {
        return Err(ConfigError::new(
            format!("{at}.{key}"),
            format!("must be a percentage (0-100), got {value}"),
        ));
    }
    Ok(value)
}
