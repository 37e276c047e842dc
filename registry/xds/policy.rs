//! A service config's traffic policy in xDS terms, for stock clients that
//! never read a gRPC service config: what [`super::resources`] adds to the
//! Cluster and the routes of a service that has one.
//!
//! - `loadBalancingConfig` → the Cluster's `load_balancing_policy`, an
//!   ordered list (gRFC A52) ending in `round_robin`, so that every client
//!   finds an entry it supports and none NACKs; `ring_hash_experimental`
//!   becomes the `ring_hash` extension (A42) with the config's ring sizes;
//! - outlier detection → the Cluster's `outlier_detection` (A50), every
//!   field written, because xDS's defaults are not A50's JSON defaults;
//! - `circuitBreakers` (a switchboard extension) → the Cluster's
//!   `circuit_breakers` (A32);
//! - `methodConfig` → one route per method name, with `retry_policy` (A44)
//!   and `max_stream_duration` (A31);
//! - ring_hash's `requestHashHeader` → a `hash_policy` on every route
//!   (A42), since xDS clients take a request's hash from the route, not
//!   from the policy's config.
//!
//! What xDS cannot say (hedging, wait-for-ready, retry throttling, health
//! checking, a backoff multiplier other than 2) is left out; docs/xds.md
//! lists it.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::load_balancing_policy::Policy;
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, LoadBalancingPolicy, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{RoutingPriority, TypedExtensionConfig};
use envoy_types::pb::envoy::config::route::v3::retry_policy::RetryBackOff;
use envoy_types::pb::envoy::config::route::v3::route_action::MaxStreamDuration;
use envoy_types::pb::envoy::config::route::v3::route_action::{hash_policy, HashPolicy};
use envoy_types::pb::envoy::config::route::v3::{route_match, RetryPolicy as XdsRetryPolicy};
use envoy_types::pb::envoy::extensions::load_balancing_policies::client_side_weighted_round_robin::v3::ClientSideWeightedRoundRobin;
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::pick_first::v3::PickFirst;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::ring_hash::HashFunction;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value, UInt64Value};
use envoy_types::util::pack_any;

use crate::service_config::outlier::OutlierDetectionConfig;
use crate::service_config::{
    CallPolicy, LbPolicy, MethodConfig, RetryPolicy, RingHashConfig, ServiceConfig,
};

/// The longest duration protobuf allows (10,000 years); clients NACK
/// anything longer, so longer values in a config are sent as this.
const MAX_PROTO_SECONDS: u64 = 315_576_000_000;

/// The Cluster's `load_balancing_policy`: the endpoint-picking policy of
/// every known `loadBalancingConfig` entry, in the config's order, then
/// `round_robin` as the entry every xDS client supports. `None` when the
/// config names no policy, so the Cluster keeps the legacy `ROUND_ROBIN`.
pub fn load_balancing_policy(config: &ServiceConfig) -> Option<LoadBalancingPolicy> {
    if config.lb_policies().is_empty() {
        return None;
    }
    let mut policies: Vec<Policy> = Vec::new();
    let wanted = config
        .lb_policies()
        .iter()
        .map(|policy| endpoint_picking(policy.picking()))
        .chain(std::iter::once(endpoint_picking(&LbPolicy::RoundRobin)));
    for entry in wanted {
        // A client takes the first entry it supports, so a repeat could
        // never be taken: each type once, where it first appears.
        let type_url = entry.typed_config.as_ref().map(|any| &any.type_url);
        let seen = policies.iter().any(|policy| {
            policy
                .typed_extension_config
                .as_ref()
                .and_then(|config| config.typed_config.as_ref())
                .map(|any| &any.type_url)
                == type_url
        });
        if !seen {
            policies.push(Policy {
                typed_extension_config: Some(entry),
            });
        }
    }
    Some(LoadBalancingPolicy { policies })
}

/// The xDS policy extension that picks as `policy` does. Outlier detection
/// is not one: it goes to the Cluster's own field, around whatever the
/// client picks with.
fn endpoint_picking(policy: &LbPolicy) -> TypedExtensionConfig {
    let (name, typed_config) = match policy {
        LbPolicy::PickFirst => ("pick_first", pack_any(PickFirst::default())),
        LbPolicy::LeastRequest { choice_count } => (
            "least_request",
            pack_any(LeastRequest {
                choice_count: Some(UInt32Value {
                    value: *choice_count,
                }),
                ..Default::default()
            }),
        ),
        // A58's policy weighs endpoints by the load they report (ORCA),
        // not by registered weights; it is the closest xDS has, and
        // behaves as round_robin for backends that report nothing.
        LbPolicy::WeightedRoundRobin => (
            "client_side_weighted_round_robin",
            pack_any(ClientSideWeightedRoundRobin::default()),
        ),
        LbPolicy::RingHash(config) => ("ring_hash", pack_any(ring_hash(config))),
        LbPolicy::RoundRobin | LbPolicy::OutlierDetection { .. } => {
            ("round_robin", pack_any(RoundRobin::default()))
        }
    };
    TypedExtensionConfig {
        name: format!("envoy.load_balancing_policies.{name}"),
        typed_config: Some(typed_config),
    }
}

/// A42's `ring_hash` for `config`. Both sizes are written: xDS's default
/// maximum is 8M where the service config's is 4096, and clients read an
/// absent field as xDS's default. `XX_HASH` is named rather than left at
/// `DEFAULT_HASH` (also xxHash), which grpc-go NACKs.
fn ring_hash(config: &RingHashConfig) -> RingHash {
    RingHash {
        hash_function: HashFunction::XxHash as i32,
        minimum_ring_size: Some(UInt64Value {
            value: config.min_ring_size,
        }),
        maximum_ring_size: Some(UInt64Value {
            value: config.max_ring_size,
        }),
        ..Default::default()
    }
}

/// Every route's `hash_policy`: the header of the ring_hash config the
/// Cluster offers (the list's first ring_hash), or none. gRPC's xDS
/// clients never read `requestHashHeader` (A76 is for service configs);
/// they hash what the route's policy names (A42), and without one pick a
/// random hash per call, as the service config does without a header.
/// Clients that pick another policy of the list ignore it.
pub fn hash_policy(config: &ServiceConfig) -> Vec<HashPolicy> {
    let header = config
        .lb_policies()
        .iter()
        .find_map(|policy| match policy.picking() {
            LbPolicy::RingHash(ring) => Some(ring.hash_header),
            _ => None,
        })
        .flatten();
    header
        .map(|header| HashPolicy {
            policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
                header_name: header.as_str().to_owned(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .into_iter()
        .collect()
}

/// The Cluster's `outlier_detection` for `config` (A50's mapping).
///
/// Every field is set: where a field is left out, xDS's default applies,
/// and those differ from A50's JSON (success-rate ejection is on unless
/// `enforcing_success_rate` is 0). An algorithm the config leaves off gets
/// `enforcing_* = 0`, and so do the consecutive-error algorithms, which
/// gRPC does not implement, so that Envoy ejects as gRPC does.
pub fn outlier_detection(config: &OutlierDetectionConfig) -> OutlierDetection {
    let count = |value: u32| Some(UInt32Value { value });
    let success = config.success_rate;
    let failure = config.failure_percentage;
    OutlierDetection {
        interval: Some(proto_duration(config.interval)),
        base_ejection_time: Some(proto_duration(config.base_ejection_time)),
        max_ejection_time: Some(proto_duration(config.max_ejection_time)),
        max_ejection_percent: count(config.max_ejection_percent),
        enforcing_success_rate: count(success.map_or(0, |s| s.enforcement_percentage)),
        // A50's JSON defaults where the algorithm is off: unused, but
        // explicit, so a reader of the resource sees no xDS default.
        success_rate_stdev_factor: count(success.map_or(1900, |s| s.stdev_factor)),
        success_rate_minimum_hosts: count(success.map_or(5, |s| s.minimum_hosts)),
        success_rate_request_volume: count(success.map_or(100, |s| s.request_volume)),
        enforcing_failure_percentage: count(failure.map_or(0, |f| f.enforcement_percentage)),
        failure_percentage_threshold: count(failure.map_or(85, |f| f.threshold)),
        failure_percentage_minimum_hosts: count(failure.map_or(5, |f| f.minimum_hosts)),
        failure_percentage_request_volume: count(failure.map_or(50, |f| f.request_volume)),
        enforcing_consecutive_5xx: count(0),
        enforcing_consecutive_gateway_failure: count(0),
        enforcing_consecutive_local_origin_failure: count(0),
        enforcing_local_origin_success_rate: count(0),
        enforcing_failure_percentage_local_origin: count(0),
        ..Default::default()
    }
}

/// The Cluster's `circuit_breakers` for `config`: `maxRequests` at the
/// default priority, the only threshold gRPC reads (A32).
pub fn circuit_breakers(config: &ServiceConfig) -> Option<CircuitBreakers> {
    let breakers = config.circuit_breakers()?;
    Some(CircuitBreakers {
        thresholds: vec![Thresholds {
            priority: RoutingPriority::Default as i32,
            max_requests: Some(UInt32Value {
                value: breakers.max_requests,
            }),
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// One route's match and the method config it applies, in the order
/// clients must try them: gRPC and Envoy take the first route that
/// matches, so exact methods come before whole services, and the
/// catch-all (prefix `""`) is last, as the service config's own lookup
/// prefers the most specific entry.
pub fn method_routes(
    config: Option<&ServiceConfig>,
) -> Vec<(route_match::PathSpecifier, Option<&MethodConfig>)> {
    let mut methods = Vec::new();
    let mut services = Vec::new();
    let mut default = None;
    for method in config.map(ServiceConfig::methods).unwrap_or_default() {
        for name in &method.names {
            match (&name.service, &name.method) {
                (Some(service), Some(m)) => methods.push((
                    route_match::PathSpecifier::Path(format!("/{service}/{m}")),
                    Some(method),
                )),
                (Some(service), None) => services.push((
                    route_match::PathSpecifier::Prefix(format!("/{service}/")),
                    Some(method),
                )),
                // Validation refuses a method without a service, so this is
                // the default entry (`{}`).
                (None, _) => default = Some(method),
            }
        }
    }
    methods.extend(services);
    methods.push((route_match::PathSpecifier::Prefix(String::new()), default));
    methods
}

/// The route's `retry_policy` for `method` (A44), or `None` when it has
/// none or retries only on codes gRPC cannot read from `retry_on`.
pub fn retry_policy(method: &MethodConfig) -> Option<XdsRetryPolicy> {
    let Some(CallPolicy::Retry(retry)) = &method.policy else {
        return None;
    };
    retry_on(retry).map(|retry_on| XdsRetryPolicy {
        retry_on,
        num_retries: Some(UInt32Value {
            value: retry.max_attempts.saturating_sub(1),
        }),
        retry_back_off: Some(RetryBackOff {
            base_interval: Some(proto_duration(retry.initial_backoff)),
            // Clients NACK a max below the base; A6 allows it, and means
            // every backoff is the cap, which a max equal to the base says.
            max_interval: Some(proto_duration(retry.max_backoff.max(retry.initial_backoff))),
        }),
        ..Default::default()
    })
}

/// `retryableStatusCodes` as Envoy's gRPC `retry_on` conditions: the five
/// A44 reads; others have no condition and are left out. `None` if no code
/// is left, since an empty `retry_on` retries nothing.
fn retry_on(retry: &RetryPolicy) -> Option<String> {
    use tonic::Code::*;
    let conditions: Vec<&str> = retry
        .retryable_codes
        .iter()
        .filter_map(|code| match code {
            Cancelled => Some("cancelled"),
            DeadlineExceeded => Some("deadline-exceeded"),
            Internal => Some("internal"),
            ResourceExhausted => Some("resource-exhausted"),
            Unavailable => Some("unavailable"),
            _ => None,
        })
        .collect();
    (!conditions.is_empty()).then(|| conditions.join(","))
}

/// The route's `max_stream_duration` for `method`'s `timeout` (A31). Both
/// fields carry it: gRPC reads `grpc_timeout_header_max` first and caps
/// the caller's deadline with it, as the service config's timeout does;
/// Envoy uses it to cap the `grpc-timeout` header and `max_stream_duration`
/// for calls without one.
pub fn max_stream_duration(method: &MethodConfig) -> Option<MaxStreamDuration> {
    let timeout = proto_duration(method.timeout?);
    Some(MaxStreamDuration {
        max_stream_duration: Some(timeout),
        grpc_timeout_header_max: Some(timeout),
        ..Default::default()
    })
}

/// `duration` as a protobuf Duration, capped at protobuf's maximum.
fn proto_duration(duration: Duration) -> ProtoDuration {
    if duration.as_secs() >= MAX_PROTO_SECONDS {
        return ProtoDuration {
            seconds: MAX_PROTO_SECONDS as i64,
            nanos: 0,
        };
    }
    ProtoDuration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}
