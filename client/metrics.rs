//! The channel's metrics, in Prometheus form, under gRPC's own names where
//! gRPC has them (gRFC A94's subchannel metrics, A66's per-attempt and
//! per-call metrics, A96's retry counts) and `switchboard_client_*` for the
//! rest.
//!
//! The library opens no port: the application registers a [`ClientMetrics`]
//! into the [`Registry`] it already serves on its own `/metrics`, through
//! [`Builder::metrics`](super::Builder::metrics) or, to share one set of
//! metrics between several channels,
//! [`Builder::with_metrics`](super::Builder::with_metrics).
//!
//! Every series carries the channel's target as `grpc_target`; those of one
//! backend add its address as `endpoint`. Label sets are resolved once per
//! channel and once per subchannel, so counting on the RPC path is an atomic
//! add, never a lookup or an allocation. Series of an endpoint that went
//! away stay (at their last value) until the process exits, as in grpc-go.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::code_name;

/// The labels of a channel's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    grpc_target: Arc<str>,
}

/// The labels of one backend's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    grpc_target: Arc<str>,
    endpoint: Arc<str>,
}

/// The labels of a channel's RPCs that ended before any pick.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetCodeLabels {
    grpc_target: Arc<str>,
    code: &'static str,
}

/// The labels of one backend's RPC outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    grpc_target: Arc<str>,
    endpoint: Arc<str>,
    code: &'static str,
}

/// The labels of one method's series (gRFC A66).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_method: Arc<str>,
    grpc_target: Arc<str>,
}

/// The labels of one method's calls or attempts that ended with a status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodStatusLabels {
    grpc_method: Arc<str>,
    grpc_target: Arc<str>,
    grpc_status: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// gRFC A66's latency buckets, in seconds.
fn latency() -> Histogram {
    Histogram::new([
        0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006,
        0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16,
        0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
    ])
}

/// gRFC A96's buckets for counts of retries per call.
fn per_call() -> Histogram {
    Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 10.0])
}

/// The families of calls and attempts.
#[derive(Clone, Debug)]
struct CallFamilies {
    attempts_started: Family<MethodLabels, Counter>,
    attempt_duration: Histograms<MethodStatusLabels>,
    call_duration: Histograms<MethodStatusLabels>,
    retries: Histograms<MethodLabels>,
    transparent_retries: Histograms<MethodLabels>,
    hedges: Histograms<MethodLabels>,
    throttled: Family<TargetLabels, Counter>,
    pushbacks: Family<TargetLabels, Counter>,
}

impl Default for CallFamilies {
    fn default() -> Self {
        Self {
            attempts_started: Family::default(),
            attempt_duration: Family::new_with_constructor(latency),
            call_duration: Family::new_with_constructor(latency),
            retries: Family::new_with_constructor(per_call),
            transparent_retries: Family::new_with_constructor(per_call),
            hedges: Family::new_with_constructor(per_call),
            throttled: Family::default(),
            pushbacks: Family::default(),
        }
    }
}

/// Every client metric, for any number of channels. Cheap to clone: clones
/// count into the same series. Register it once per [`Registry`].
#[derive(Clone, Debug, Default)]
pub struct ClientMetrics {
    attempts_succeeded: Family<EndpointLabels, Counter>,
    attempts_failed: Family<EndpointLabels, Counter>,
    disconnections: Family<EndpointLabels, Counter>,
    open_connections: Family<EndpointLabels, Gauge>,
    picks: Family<EndpointLabels, Counter>,
    rpcs: Family<RpcLabels, Counter>,
    unpicked: Family<TargetCodeLabels, Counter>,
    endpoints: Family<TargetLabels, Gauge>,
    endpoints_ready: Family<TargetLabels, Gauge>,
    resolver_updates: Family<TargetLabels, Counter>,
    resolver_errors: Family<TargetLabels, Counter>,
    calls: CallFamilies,
}

impl ClientMetrics {
    /// Metrics not yet registered anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric in `registry` (once per registry: a second
    /// registration would export each family twice).
    pub fn register(&self, registry: &mut Registry) {
        // gRFC A94's names, `.` turned into `_` as Prometheus wants them.
        registry.register(
            "grpc_subchannel_connection_attempts_succeeded",
            "Connection attempts that reached Ready (the server's SETTINGS arrived)",
            self.attempts_succeeded.clone(),
        );
        registry.register(
            "grpc_subchannel_connection_attempts_failed",
            "Connection attempts that failed",
            self.attempts_failed.clone(),
        );
        registry.register(
            "grpc_subchannel_disconnections",
            "Ready connections that ended",
            self.disconnections.clone(),
        );
        registry.register(
            "grpc_subchannel_open_connections",
            "Ready connections open now",
            self.open_connections.clone(),
        );
        // gRFC A66 and A96, as OpenTelemetry's Prometheus exporter names
        // them.
        let calls = &self.calls;
        registry.register(
            "grpc_client_attempt_started",
            "Attempts started, transparent retries and hedges included",
            calls.attempts_started.clone(),
        );
        registry.register_with_unit(
            "grpc_client_attempt_duration",
            "Attempt durations, by final status",
            prometheus_client::registry::Unit::Seconds,
            calls.attempt_duration.clone(),
        );
        registry.register_with_unit(
            "grpc_client_call_duration",
            "Call durations over all attempts, by the status the caller got",
            prometheus_client::registry::Unit::Seconds,
            calls.call_duration.clone(),
        );
        registry.register(
            "grpc_client_call_retries",
            "Retries per call under a retry policy (calls with none are not counted)",
            calls.retries.clone(),
        );
        registry.register(
            "grpc_client_call_transparent_retries",
            "Requests sent again per call because the server refused them unseen",
            calls.transparent_retries.clone(),
        );
        registry.register(
            "grpc_client_call_hedges",
            "Hedged attempts per call after the first",
            calls.hedges.clone(),
        );
        let ours = registry.sub_registry_with_prefix("switchboard_client");
        ours.register(
            "retries_throttled",
            "Retries and hedges the retry throttle held back",
            calls.throttled.clone(),
        );
        ours.register(
            "retry_pushbacks",
            "Attempts whose server sent grpc-retry-pushback-ms",
            calls.pushbacks.clone(),
        );
        ours.register(
            "picks",
            "RPCs the balancer sent to each endpoint",
            self.picks.clone(),
        );
        ours.register(
            "rpcs",
            "RPCs that ended, by endpoint and status code",
            self.rpcs.clone(),
        );
        ours.register(
            "unpicked_rpcs",
            "RPCs that ended before reaching any endpoint (none ready, deadline while queued), by status code",
            self.unpicked.clone(),
        );
        ours.register(
            "endpoints",
            "Endpoints the resolver names now, draining ones included",
            self.endpoints.clone(),
        );
        ours.register(
            "endpoints_ready",
            "Endpoints RPCs are sent to now (gRPC's grpc.lb.rr.endpoints.ready, for every policy)",
            self.endpoints_ready.clone(),
        );
        ours.register(
            "resolver_updates",
            "Endpoint updates the resolver delivered",
            self.resolver_updates.clone(),
        );
        ours.register(
            "resolver_errors",
            "Times the resolver could not reach its source",
            self.resolver_errors.clone(),
        );
    }

    /// The handles of the channel to `target`.
    pub(crate) fn channel(&self, target: &str) -> ChannelMetrics {
        let labels = TargetLabels {
            grpc_target: Arc::from(target),
        };
        ChannelMetrics {
            endpoints: self.endpoints.get_or_create(&labels).clone(),
            endpoints_ready: self.endpoints_ready.get_or_create(&labels).clone(),
            resolver_updates: self.resolver_updates.get_or_create(&labels).clone(),
            resolver_errors: self.resolver_errors.get_or_create(&labels).clone(),
            throttled: self.calls.throttled.get_or_create(&labels).clone(),
            pushbacks: self.calls.pushbacks.get_or_create(&labels).clone(),
            methods: Arc::default(),
            target: labels.grpc_target,
            families: self.clone(),
        }
    }
}

/// One channel's series, resolved when the channel is built.
#[derive(Clone, Debug)]
pub struct ChannelMetrics {
    families: ClientMetrics,
    target: Arc<str>,
    endpoints: Gauge,
    endpoints_ready: Gauge,
    resolver_updates: Counter,
    resolver_errors: Counter,
    throttled: Counter,
    pushbacks: Counter,
    /// Each method's series, resolved on its first call.
    methods: Arc<RwLock<HashMap<Box<str>, Arc<MethodMetrics>>>>,
}

impl ChannelMetrics {
    /// The series of the method at `path` (`/pkg.Service/Method`).
    pub(crate) fn method(&self, path: &str) -> Arc<MethodMetrics> {
        if let Some(method) = self
            .methods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
        {
            return method.clone();
        }
        let labels = MethodLabels {
            grpc_method: Arc::from(path.trim_start_matches('/')),
            grpc_target: self.target.clone(),
        };
        let calls = &self.families.calls;
        let method = Arc::new(MethodMetrics {
            started: calls.attempts_started.get_or_create(&labels).clone(),
            retries: calls.retries.get_or_create(&labels).clone(),
            transparent_retries: calls.transparent_retries.get_or_create(&labels).clone(),
            hedges: calls.hedges.get_or_create(&labels).clone(),
            attempts: Default::default(),
            calls: Default::default(),
            families: calls.clone(),
            labels,
        });
        self.methods
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(path.into())
            .or_insert(method)
            .clone()
    }

    /// The throttle held a retry or hedge back.
    pub(crate) fn throttled(&self) {
        self.throttled.inc();
    }

    /// A server sent a pushback.
    pub(crate) fn pushback(&self) {
        self.pushbacks.inc();
    }

    /// The series of the subchannel to `address`.
    pub(crate) fn endpoint(&self, address: &Arc<str>) -> EndpointMetrics {
        let labels = EndpointLabels {
            grpc_target: self.target.clone(),
            endpoint: address.clone(),
        };
        let families = &self.families;
        EndpointMetrics {
            attempts_succeeded: families.attempts_succeeded.get_or_create(&labels).clone(),
            attempts_failed: families.attempts_failed.get_or_create(&labels).clone(),
            disconnections: families.disconnections.get_or_create(&labels).clone(),
            open_connections: families.open_connections.get_or_create(&labels).clone(),
            picks: families.picks.get_or_create(&labels).clone(),
            rpcs: families.rpcs.clone(),
            codes: Default::default(),
            labels,
        }
    }

    /// An RPC ended with `code` before any endpoint was picked for it.
    pub(crate) fn unpicked(&self, code: tonic::Code) {
        self.families
            .unpicked
            .get_or_create(&TargetCodeLabels {
                grpc_target: self.target.clone(),
                code: code_name(code),
            })
            .inc();
    }

    /// The resolver delivered an update.
    pub(crate) fn resolver_update(&self) {
        self.resolver_updates.inc();
    }

    /// The resolver could not reach its source.
    pub(crate) fn resolver_error(&self) {
        self.resolver_errors.inc();
    }

    /// The balancer published: `known` endpoints, `ready` of them in use.
    pub(crate) fn published(&self, known: usize, ready: usize) {
        self.endpoints.set(i64::try_from(known).unwrap_or(i64::MAX));
        self.endpoints_ready
            .set(i64::try_from(ready).unwrap_or(i64::MAX));
    }

    /// Sets the gauges to 0 when dropped: the channel is gone, nothing is
    /// known or ready any more.
    pub(crate) fn gauges_guard(&self) -> GaugesGuard {
        GaugesGuard(self.clone())
    }
}

/// See [`ChannelMetrics::gauges_guard`].
#[derive(Debug)]
pub(crate) struct GaugesGuard(ChannelMetrics);

impl Drop for GaugesGuard {
    fn drop(&mut self) {
        self.0.published(0, 0);
    }
}

/// GRPC status codes run from 0 to 16.
const CODES: usize = 17;

/// One subchannel's series. RPC outcomes by code are resolved on the first
/// RPC that ends with that code, then kept.
#[derive(Debug)]
pub struct EndpointMetrics {
    labels: EndpointLabels,
    attempts_succeeded: Counter,
    attempts_failed: Counter,
    disconnections: Counter,
    open_connections: Gauge,
    picks: Counter,
    rpcs: Family<RpcLabels, Counter>,
    codes: [OnceLock<Counter>; CODES],
}

impl EndpointMetrics {
    /// A connection attempt reached Ready; the returned guard counts the
    /// connection as open until it drops.
    pub(crate) fn connected(self: &Arc<Self>) -> OpenConnection {
        self.attempts_succeeded.inc();
        self.open_connections.inc();
        OpenConnection(self.clone())
    }

    /// A connection attempt failed.
    pub(crate) fn attempt_failed(&self) {
        self.attempts_failed.inc();
    }

    /// A Ready connection ended.
    pub(crate) fn disconnected(&self) {
        self.disconnections.inc();
    }

    /// The balancer picked this endpoint for an RPC.
    pub(crate) fn picked(&self) {
        self.picks.inc();
    }

    /// An RPC sent here ended with `code`.
    pub(crate) fn rpc_ended(&self, code: tonic::Code) {
        let index = usize::try_from(code as i32).map_or(CODES - 1, |i| i.min(CODES - 1));
        self.codes[index]
            .get_or_init(|| {
                self.rpcs
                    .get_or_create(&RpcLabels {
                        grpc_target: self.labels.grpc_target.clone(),
                        endpoint: self.labels.endpoint.clone(),
                        code: code_name(code),
                    })
                    .clone()
            })
            .inc();
    }
}

/// One method's series on one channel; those by status are resolved on the
/// first attempt or call that ends with it, then kept.
#[derive(Debug)]
pub(crate) struct MethodMetrics {
    labels: MethodLabels,
    families: CallFamilies,
    started: Counter,
    retries: Histogram,
    transparent_retries: Histogram,
    hedges: Histogram,
    attempts: [OnceLock<Histogram>; CODES],
    calls: [OnceLock<Histogram>; CODES],
}

impl MethodMetrics {
    /// An attempt started.
    pub(crate) fn attempt_started(&self) {
        self.started.inc();
    }

    /// An attempt ended with `code` after `elapsed`.
    pub(crate) fn attempt_ended(&self, code: tonic::Code, elapsed: Duration) {
        self.by_status(&self.attempts, &self.families.attempt_duration, code)
            .observe(elapsed.as_secs_f64());
    }

    /// A call ended with `code` after `elapsed`, with how many retries,
    /// transparent retries and hedges it took.
    pub(crate) fn call_ended(&self, code: tonic::Code, elapsed: Duration) {
        self.by_status(&self.calls, &self.families.call_duration, code)
            .observe(elapsed.as_secs_f64());
    }

    /// A call took `retries`, `transparent` and `hedges` extra attempts;
    /// zeros are not recorded (gRFC A96).
    pub(crate) fn extra_attempts(&self, retries: u32, transparent: u32, hedges: u32) {
        for (count, histogram) in [
            (retries, &self.retries),
            (transparent, &self.transparent_retries),
            (hedges, &self.hedges),
        ] {
            if count > 0 {
                histogram.observe(f64::from(count));
            }
        }
    }

    fn by_status<'a>(
        &self,
        cache: &'a [OnceLock<Histogram>; CODES],
        family: &Histograms<MethodStatusLabels>,
        code: tonic::Code,
    ) -> &'a Histogram {
        let index = usize::try_from(code as i32).map_or(CODES - 1, |i| i.min(CODES - 1));
        cache[index].get_or_init(|| {
            family
                .get_or_create(&MethodStatusLabels {
                    grpc_method: self.labels.grpc_method.clone(),
                    grpc_target: self.labels.grpc_target.clone(),
                    grpc_status: code_name(code),
                })
                .clone()
        })
    }
}

/// Counts one connection as open while it lives.
#[derive(Debug)]
pub(crate) struct OpenConnection(Arc<EndpointMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_target_endpoint_and_code() {
        let metrics = ClientMetrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let channel = metrics.channel("static:///a:1");
        let endpoint = Arc::new(channel.endpoint(&Arc::from("a:1")));
        let open = endpoint.connected();
        endpoint.picked();
        endpoint.rpc_ended(tonic::Code::Ok);
        endpoint.rpc_ended(tonic::Code::Ok);
        endpoint.rpc_ended(tonic::Code::Unavailable);
        channel.published(2, 1);
        let text = crate::metrics::render(&registry);
        for line in [
            r#"grpc_subchannel_connection_attempts_succeeded_total{grpc_target="static:///a:1",endpoint="a:1"} 1"#,
            r#"grpc_subchannel_open_connections{grpc_target="static:///a:1",endpoint="a:1"} 1"#,
            r#"switchboard_client_picks_total{grpc_target="static:///a:1",endpoint="a:1"} 1"#,
            r#"switchboard_client_rpcs_total{grpc_target="static:///a:1",endpoint="a:1",code="OK"} 2"#,
            r#"switchboard_client_rpcs_total{grpc_target="static:///a:1",endpoint="a:1",code="UNAVAILABLE"} 1"#,
            r#"switchboard_client_endpoints_ready{grpc_target="static:///a:1"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        let method = channel.method("/grpc.examples.echo.Echo/UnaryEcho");
        method.attempt_started();
        method.attempt_ended(tonic::Code::Unavailable, Duration::from_millis(3));
        method.call_ended(tonic::Code::Ok, Duration::from_millis(9));
        method.extra_attempts(1, 0, 0);
        assert!(Arc::ptr_eq(
            &method,
            &channel.method("/grpc.examples.echo.Echo/UnaryEcho")
        ));
        let text = crate::metrics::render(&registry);
        let echo = r#"grpc_method="grpc.examples.echo.Echo/UnaryEcho",grpc_target="static:///a:1""#;
        for line in [
            format!("grpc_client_attempt_started_total{{{echo}}} 1"),
            format!(
                r#"grpc_client_attempt_duration_seconds_count{{{echo},grpc_status="UNAVAILABLE"}} 1"#
            ),
            format!(r#"grpc_client_call_duration_seconds_count{{{echo},grpc_status="OK"}} 1"#),
            format!("grpc_client_call_retries_count{{{echo}}} 1"),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        let hedges = format!("grpc_client_call_hedges_count{{{echo}}} 0");
        assert!(text.lines().any(|l| l == hedges), "zeros are not recorded");
        drop(open);
        let text = crate::metrics::render(&registry);
        assert!(text.contains(
            r#"grpc_subchannel_open_connections{grpc_target="static:///a:1",endpoint="a:1"} 0"#
        ));
    }
}
