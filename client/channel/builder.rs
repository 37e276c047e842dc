//! Configuring a [`BalancedChannel`]: its target, policy, timeouts,
//! security, health checking and metrics, then building it.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::call::RetrySettings;
use super::config::{ConfigSelector, Explicit};
use super::{BalancedChannel, Shared, Tasks};
use crate::client::backoff::BackoffConfig;
use crate::client::balancer::{self, BalancerState, BalancerStats, Outputs, Published};
use crate::client::dns_resolver::DnsResolver;
use crate::client::health::HealthCheck;
use crate::client::least_request::{LeastRequest, LeastRequestConfig};
use crate::client::metrics::ClientMetrics;
use crate::client::outlier_detection::{OutlierDetection, OutlierDetectionConfig};
use crate::client::pick_first::PickFirst;
use crate::client::policy::Policy;
use crate::client::registry_resolver::RegistryResolver;
use crate::client::resolver::{Resolver, ResolverSink, StaticResolver};
use crate::client::retry::replay::ChannelBudget;
use crate::client::ring_hash::{RingHash, RingHashConfig};
use crate::client::round_robin::RoundRobin;
use crate::client::subchannel::{ConnectConfig, Keepalive};
use crate::client::target::{Target, TargetError};
use crate::client::weighted_round_robin::WeightedRoundRobin;
use crate::registry::auth::Token;
use crate::service_config::{ConfigError, LbPolicy, ServiceConfig, SlowStartConfig};
use crate::tls::ClientTls;

/// The built-in balancing policies, by the names grpc gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// Stick to the first address that connects.
    #[default]
    PickFirst,
    /// Rotate over every Ready address.
    RoundRobin,
    /// The less loaded of two random Ready addresses (power of two
    /// choices), optionally weighted by latency.
    LeastRequest(LeastRequestConfig),
    /// Rotate over every Ready address in proportion to its `weight`
    /// metadata, smoothly interleaved.
    WeightedRoundRobin,
    /// Consistent hashing of each call's key onto a ring of the endpoints,
    /// connecting lazily (gRFC A42, A76).
    RingHash(RingHashConfig),
}

impl PolicyKind {
    /// Every name [`PolicyKind::from_str`] accepts.
    pub const NAMES: [&'static str; 5] = [
        "pick_first",
        "round_robin",
        "least_request",
        "weighted_round_robin",
        "ring_hash",
    ];

    pub(crate) fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::PickFirst => Box::new(PickFirst::default()),
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::LeastRequest(config) => Box::new(LeastRequest::new(config)),
            PolicyKind::WeightedRoundRobin => Box::new(WeightedRoundRobin::default()),
            PolicyKind::RingHash(config) => Box::new(RingHash::new(config)),
        }
    }

    /// The name as grpc spells it.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::PickFirst => "pick_first",
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::LeastRequest(_) => "least_request",
            PolicyKind::WeightedRoundRobin => "weighted_round_robin",
            PolicyKind::RingHash(_) => "ring_hash",
        }
    }
}

/// The policy that picks under a service config's choice; outlier
/// detection, if any, is a wrapper the builder adds.
impl From<&LbPolicy> for PolicyKind {
    fn from(policy: &LbPolicy) -> Self {
        match policy.picking() {
            LbPolicy::PickFirst => PolicyKind::PickFirst,
            LbPolicy::RoundRobin => PolicyKind::RoundRobin,
            // This client compares two choices, whatever `choiceCount` says.
            LbPolicy::LeastRequest { .. } => {
                PolicyKind::LeastRequest(LeastRequestConfig::default())
            }
            LbPolicy::WeightedRoundRobin => PolicyKind::WeightedRoundRobin,
            LbPolicy::RingHash(config) => PolicyKind::RingHash(*config),
            // `picking` never answers a wrapper.
            LbPolicy::OutlierDetection { child, .. } => PolicyKind::from(&**child),
        }
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    /// A policy by name, with its default settings.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pick_first" => Ok(PolicyKind::PickFirst),
            "round_robin" => Ok(PolicyKind::RoundRobin),
            "least_request" => Ok(PolicyKind::LeastRequest(LeastRequestConfig::default())),
            "weighted_round_robin" => Ok(PolicyKind::WeightedRoundRobin),
            // Keyed by a per-call RequestHash only; a header comes with
            // `RingHashConfig::with_hash_header`.
            "ring_hash" => Ok(PolicyKind::RingHash(RingHashConfig::default())),
            other => Err(format!(
                "unknown policy {other:?}: use one of {}",
                PolicyKind::NAMES.join(", ")
            )),
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Configures and builds a [`BalancedChannel`].
pub struct Builder {
    service: String,
    /// The target as given (or the service, for a custom resolver): the
    /// `grpc_target` label of the channel's metrics.
    target: String,
    source: Source,
    registry_token: Option<Token>,
    registry_tls: Option<ClientTls>,
    /// `None` until set: the service config may name one.
    policy: Option<PolicyKind>,
    custom_policy: Option<Box<dyn Policy>>,
    outlier_detection: Option<OutlierDetectionConfig>,
    slow_start: Option<SlowStartConfig>,
    zone: Option<String>,
    connect: ConnectConfig,
    wait_for_ready: bool,
    default_timeout: Option<Duration>,
    dns_refresh: Option<Duration>,
    metrics: Option<ClientMetrics>,
    service_config: ServiceConfig,
    service_config_lookup: bool,
    retries: bool,
    transparent_retries: bool,
    per_call_buffer: usize,
    per_channel_buffer: usize,
}

/// Most request bytes one call keeps for replay by default (grpc-go's and
/// grpc-core's 256 KiB).
pub const DEFAULT_PER_CALL_RETRY_BUFFER: usize = 256 << 10;
/// Most request bytes all calls of a channel keep by default (grpc-java's
/// 16 MiB).
pub const DEFAULT_PER_CHANNEL_RETRY_BUFFER: usize = 16 << 20;

impl Builder {
    /// Starts from a target string (`registry://host:port/service`,
    /// `static:///host:port,...` or `dns:///host:port`).
    pub fn new(target: &str) -> Result<Self, TargetError> {
        let parsed: Target = target.parse()?;
        let mut builder = Self::from_source(parsed.service(), Source::Target(parsed));
        target.clone_into(&mut builder.target);
        Ok(builder)
    }

    /// Starts from a custom resolver; `service` names it in errors.
    pub fn with_resolver(service: impl Into<String>, resolver: Box<dyn Resolver>) -> Self {
        Self::from_source(service.into(), Source::Custom(resolver))
    }

    fn from_source(service: String, source: Source) -> Self {
        Self {
            target: service.clone(),
            service,
            source,
            registry_token: None,
            registry_tls: None,
            policy: None,
            custom_policy: None,
            outlier_detection: None,
            slow_start: None,
            zone: None,
            connect: ConnectConfig::default(),
            wait_for_ready: false,
            default_timeout: None,
            dns_refresh: None,
            metrics: None,
            service_config: ServiceConfig::default(),
            service_config_lookup: true,
            retries: true,
            transparent_retries: true,
            per_call_buffer: DEFAULT_PER_CALL_RETRY_BUFFER,
            per_channel_buffer: DEFAULT_PER_CHANNEL_RETRY_BUFFER,
        }
    }

    /// Calls under `config` (see [`service_config`](crate::service_config)):
    /// each method's timeout, wait-for-ready and retry or hedging policy,
    /// the channel's retry throttling, its health checking
    /// (`healthCheckConfig`) when [`Builder::health_check`] is not set, and
    /// its balancing policy when it names a built-in one and
    /// [`Builder::policy`] names none. A caller's
    /// own shorter deadline, or its [`WaitForReady`](super::WaitForReady),
    /// still wins.
    pub fn service_config(mut self, config: ServiceConfig) -> Self {
        self.service_config = config;
        self
    }

    /// [`Builder::service_config`] from its JSON text; a bad document is an
    /// error naming the field.
    pub fn service_config_json(self, json: &str) -> Result<Self, ConfigError> {
        Ok(self.service_config(ServiceConfig::from_json(json)?))
    }

    /// Ignores the service config the registry pushes for the service (on
    /// by default): the channel keeps the builder's
    /// ([`Builder::service_config`]) whatever the registry holds, as
    /// grpc-go's `WithDisableServiceConfig`. Without this, the registry's
    /// config wins over the builder's while it has one, and applies live:
    /// new method timeouts and retries from the next call, a new balancing
    /// policy once it has a Ready backend.
    pub fn disable_service_config_lookup(mut self) -> Self {
        self.service_config_lookup = false;
        self
    }

    /// Turns the service config's retry and hedging policies off (on by
    /// default). Transparent retries of requests that never reached the
    /// server's application stay on: they are always safe.
    pub fn disable_retries(mut self) -> Self {
        self.retries = false;
        self
    }

    /// Turns off the one transparent resend of a request the server's
    /// transport refused unseen (REFUSED_STREAM, or past a graceful
    /// GOAWAY): the caller gets that UNAVAILABLE. For callers that run
    /// their own retry layer above the channel, and for measuring what the
    /// resend saves. A request that never left this process (its
    /// connection closed before it was written) is still picked again: it
    /// is the same attempt, not a retry.
    pub fn disable_transparent_retries(mut self) -> Self {
        self.transparent_retries = false;
        self
    }

    /// Caps the request bytes kept so a call can be retried: `per_call` for
    /// one call, `per_channel` for all of them (defaults 256 KiB and
    /// 16 MiB). A call past either cap is committed to the attempt it is
    /// on: it goes on, but is not retried.
    pub fn retry_buffer(mut self, per_call: usize, per_channel: usize) -> Self {
        self.per_call_buffer = per_call;
        self.per_channel_buffer = per_channel;
        self
    }

    /// Sets the balancing policy (default pick_first, as in gRPC).
    pub fn policy(mut self, policy: PolicyKind) -> Self {
        self.policy = Some(policy);
        self.custom_policy = None;
        self
    }

    /// Balances with a policy of your own instead of a built-in one (see
    /// [`Policy`](crate::client::policy::Policy)).
    pub fn custom_policy(mut self, policy: impl Policy) -> Self {
        self.custom_policy = Some(Box::new(policy));
        self
    }

    /// Wraps the policy (built-in or custom) in outlier detection: backends
    /// whose calls fail far more than they should are ejected for a while
    /// (see [`outlier_detection`](crate::client::outlier_detection)). Off by
    /// default, as in gRPC.
    pub fn outlier_detection(mut self, config: OutlierDetectionConfig) -> Self {
        self.outlier_detection = Some(config);
        self
    }

    /// Ramps each backend that joins a serving service up to its full
    /// share over a window (see [`slow_start`](crate::client::slow_start)),
    /// for round_robin, weighted_round_robin and least_request. Off by
    /// default; the service config's `slowStartConfig` turns it on too.
    pub fn slow_start(mut self, config: SlowStartConfig) -> Self {
        self.slow_start = Some(config);
        self
    }

    /// Says the client runs in `zone`: calls go to endpoints whose `zone`
    /// metadata matches while that zone has enough Ready capacity, and
    /// spill to other zones as it loses it (see
    /// [`zone_aware`](crate::client::zone_aware)). For round_robin,
    /// weighted_round_robin and least_request; without it, zones are
    /// ignored.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the reconnect backoff and connect timeout of every subchannel.
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.connect.backoff = backoff;
        self
    }

    /// Sets the HTTP/2 keepalive: while RPCs are in flight, a ping after
    /// `interval` of silence, and the connection dropped when one goes
    /// unanswered for `timeout` (default 10 s and 5 s; idle connections are
    /// never pinged). Servers you do not control punish intervals below
    /// their limit (5 minutes by default for grpc-go, grpc-java and grpcio)
    /// with GOAWAY `too_many_pings`; the channel then doubles its interval.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.connect.keepalive = Arc::new(Keepalive::new(interval, timeout));
        self
    }

    /// Sets how long one connection attempt may take (gRPC's minimum
    /// connect timeout, 20 s by default).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect.backoff.min_connect_timeout = timeout;
        self
    }

    /// Gives every RPC that has no deadline of its own (no
    /// `Request::set_timeout`) this one.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = Some(timeout);
        self
    }

    /// Presents `token` to the registry (a `registry://` target whose
    /// registry demands a read token).
    pub fn registry_token(mut self, token: Token) -> Self {
        self.registry_token = Some(token);
        self
    }

    /// Connects to backends over TLS with `tls` (mutual TLS if it holds a
    /// client certificate). Without it, backends are reached in plaintext.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.connect.tls = Some(tls);
        self
    }

    /// Watches the registry over TLS with `tls` (a `registry://` target).
    /// Independent of [`Builder::tls`]: give both when both are on TLS.
    pub fn registry_tls(mut self, tls: ClientTls) -> Self {
        self.registry_tls = Some(tls);
        self
    }

    /// Turns on client-side health checking (grpc-go's `healthCheckConfig`):
    /// every subchannel watches `grpc.health.v1.Health/Watch` for `service`
    /// (`""` for the whole server) on its own connection, and a backend that
    /// is not SERVING is not picked until it is again. Backends without the
    /// health service count as SERVING. Off by default.
    pub fn health_check(mut self, service: impl Into<String>) -> Self {
        self.connect.health_check = Some(Arc::new(HealthCheck::new(service)));
        self
    }

    /// How often a `dns:///` target is resolved again (default 30 s); it is
    /// also resolved again when a connection fails.
    pub fn dns_refresh(mut self, refresh: Duration) -> Self {
        self.dns_refresh = Some(refresh);
        self
    }

    /// Registers the channel's metrics (see [`metrics`](crate::client::metrics)) in
    /// `registry`, which the application serves on its own `/metrics`; the
    /// channel opens no port. For several channels, register one
    /// [`ClientMetrics`] and give it to each with [`Builder::with_metrics`]
    /// instead: a registry takes each metric once.
    pub fn metrics(self, registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = ClientMetrics::new();
        metrics.register(registry);
        self.with_metrics(&metrics)
    }

    /// Counts the channel's metrics into `metrics`, registered by the
    /// application; series are told apart by their `grpc_target` label.
    pub fn with_metrics(mut self, metrics: &ClientMetrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Makes every RPC wait-for-ready (see [`WaitForReady`]).
    pub fn wait_for_ready(mut self, enabled: bool) -> Self {
        self.wait_for_ready = enabled;
        self
    }

    /// Starts the resolver and balancer tasks. Needs a tokio runtime.
    pub fn build(mut self) -> BalancedChannel {
        let metrics = self.metrics.as_ref().map(|m| m.channel(&self.target));
        self.connect.metrics = metrics.clone();
        let unpicked = metrics.clone();
        let (sink, resolution) = ResolverSink::new();
        let resolve_now = sink.resolve_now();
        let (picker_changed, picker_waiter) = watch::channel(());
        let picker = Arc::new(ArcSwap::from_pointee(Published::empty()));
        let explicit = Explicit {
            policy: self.policy,
            custom: self.custom_policy.is_some(),
            outlier_detection: self.outlier_detection,
            health_check: self.connect.health_check.is_some(),
            slow_start: self.slow_start,
            zone: self.zone,
        };
        let selector =
            ConfigSelector::new(self.service_config, self.service_config_lookup, explicit);
        let policy = match (self.custom_policy, selector.choice()) {
            (Some(custom), _) => {
                let configured = selector.in_force();
                let outlier_detection = self.outlier_detection.or_else(|| {
                    configured
                        .lb_policy()
                        .and_then(|p| p.outlier_detection().copied())
                });
                match outlier_detection {
                    Some(config) => Box::new(OutlierDetection::new(custom, config)),
                    None => custom,
                }
            }
            (None, Some(choice)) => choice.build(),
            (None, None) => PolicyKind::default().build(),
        };
        let (state_tx, state) = watch::channel(BalancerState {
            policy: policy.name(),
            ..BalancerState::default()
        });
        let balancer_stats = Arc::new(BalancerStats::default());
        let resolver: Box<dyn Resolver> = match self.source {
            Source::Target(Target::Registry { registry, service }) => Box::new(
                RegistryResolver::new(registry, service)
                    .with_token(self.registry_token)
                    .with_tls(self.registry_tls),
            ),
            Source::Target(Target::Static(addresses)) => Box::new(StaticResolver::new(addresses)),
            Source::Target(Target::Dns(name)) => {
                let mut resolver = DnsResolver::new(name);
                if let Some(refresh) = self.dns_refresh {
                    resolver = resolver.with_refresh(refresh);
                }
                Box::new(resolver)
            }
            Source::Custom(resolver) => resolver,
        };
        let connections = self.connect.stats.clone();
        let resolver = Tasks::spawn(resolver.resolve(sink));
        let calls = selector.calls();
        let balancer = Tasks::spawn(balancer::run(
            self.service.clone(),
            selector,
            policy,
            Arc::new(self.connect),
            resolution,
            resolve_now,
            Outputs {
                picker: picker.clone(),
                picker_changed,
                state: state_tx,
                stats: balancer_stats.clone(),
                metrics,
            },
        ));
        BalancedChannel {
            shared: Arc::new(Shared {
                service: self.service,
                picker,
                picker_waiter,
                state,
                balancer_stats,
                wait_for_ready: self.wait_for_ready,
                default_timeout: self.default_timeout,
                connections,
                calls_in_flight: Arc::default(),
                metrics: unpicked,
                config: calls,
                retries: RetrySettings {
                    enabled: self.retries,
                    transparent: self.transparent_retries,
                    per_call_buffer: self.per_call_buffer,
                    budget: Arc::new(ChannelBudget::new(self.per_channel_buffer)),
                    stats: Arc::default(),
                },
                _tasks: [resolver, balancer],
            }),
        }
    }
}

/// Where a builder's endpoints will come from.
enum Source {
    /// A target string's resolver, built with the builder's settings.
    Target(Target),
    /// A resolver the user supplied.
    Custom(Box<dyn Resolver>),
}
