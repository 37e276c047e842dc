//! The channel's metrics, in Prometheus form, under gRPC's own names where
//! gRPC has them (gRFC A94's subchannel metrics) and `switchboard_client_*`
//! for the rest.
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

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
        let ours = registry.sub_registry_with_prefix("switchboard_client");
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
}

impl ChannelMetrics {
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
        drop(open);
        let text = crate::metrics::render(&registry);
        assert!(text.contains(
            r#"grpc_subchannel_open_connections{grpc_target="static:///a:1",endpoint="a:1"} 0"#
        ));
    }
}
