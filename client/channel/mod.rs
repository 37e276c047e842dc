//! [`BalancedChannel`]: the tower service that tonic-generated clients take,
//! balancing each RPC over the backends a resolver names.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;

use crate::client::backoff::BackoffConfig;
use crate::client::balancer::{self, BalancerState, BalancerStats, Outputs, Published};
use crate::client::dns_resolver::DnsResolver;
use crate::client::error::{source_chain, Error};
use crate::client::health::HealthCheck;
use crate::client::least_request::{LeastRequest, LeastRequestConfig};
use crate::client::metrics::{ChannelMetrics, ClientMetrics, EndpointMetrics};
use crate::client::outlier_detection::{OutlierDetection, OutlierDetectionConfig};
use crate::client::pick_first::PickFirst;
use crate::client::policy::{CallOutcome, OnDone, Pick, PickInfo, Policy};
use crate::client::registry_resolver::RegistryResolver;
use crate::client::resolver::{Resolver, ResolverSink, StaticResolver};
use crate::client::round_robin::RoundRobin;
use crate::client::subchannel::{
    ConnectConfig, ConnectionStats, ConnectivityState, InFlightGuard, Keepalive,
};
use crate::client::target::{Target, TargetError};
use crate::client::weighted_round_robin::WeightedRoundRobin;
use crate::registry::auth::Token;
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
}

impl PolicyKind {
    /// Every name [`PolicyKind::from_str`] accepts.
    pub const NAMES: [&'static str; 4] = [
        "pick_first",
        "round_robin",
        "least_request",
        "weighted_round_robin",
    ];

    fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::PickFirst => Box::new(PickFirst::default()),
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::LeastRequest(config) => Box::new(LeastRequest::new(config)),
            PolicyKind::WeightedRoundRobin => Box::new(WeightedRoundRobin::default()),
        }
    }

    /// The name as grpc spells it.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::PickFirst => "pick_first",
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::LeastRequest(_) => "least_request",
            PolicyKind::WeightedRoundRobin => "weighted_round_robin",
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

/// Marks a request as wait-for-ready: instead of failing fast when no
/// backend is Ready, it waits for one until its deadline. Insert it into a
/// `tonic::Request`'s extensions.
#[derive(Debug, Clone, Copy)]
pub struct WaitForReady;

/// Configures and builds a [`BalancedChannel`].
pub struct Builder {
    service: String,
    /// The target as given (or the service, for a custom resolver): the
    /// `grpc_target` label of the channel's metrics.
    target: String,
    source: Source,
    registry_token: Option<Token>,
    registry_tls: Option<ClientTls>,
    policy: PolicyKind,
    custom_policy: Option<Box<dyn Policy>>,
    outlier_detection: Option<OutlierDetectionConfig>,
    connect: ConnectConfig,
    wait_for_ready: bool,
    default_timeout: Option<Duration>,
    dns_refresh: Option<Duration>,
    metrics: Option<ClientMetrics>,
}

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
            policy: PolicyKind::default(),
            custom_policy: None,
            outlier_detection: None,
            connect: ConnectConfig::default(),
            wait_for_ready: false,
            default_timeout: None,
            dns_refresh: None,
            metrics: None,
        }
    }

    /// Sets the balancing policy (default pick_first, as in gRPC).
    pub fn policy(mut self, policy: PolicyKind) -> Self {
        self.policy = policy;
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
        let (state_tx, state) = watch::channel(BalancerState::default());
        let picker = Arc::new(ArcSwap::from_pointee(Published::empty()));
        let mut policy = self.custom_policy.unwrap_or_else(|| self.policy.build());
        if let Some(config) = self.outlier_detection {
            policy = Box::new(OutlierDetection::new(policy, config));
        }
        let policy_name = policy.name();
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
        let balancer = Tasks::spawn(balancer::run(
            self.service.clone(),
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
                policy: policy_name,
                picker,
                picker_waiter,
                state,
                balancer_stats,
                wait_for_ready: self.wait_for_ready,
                default_timeout: self.default_timeout,
                connections,
                metrics: unpicked,
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

/// A gRPC channel that balances RPCs over a live endpoint set. Clone it
/// freely; the background tasks stop when the last clone is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use switchboard::client::{BalancedChannel, PolicyKind};
/// use switchboard::proto::echo::{echo_client::EchoClient, EchoRequest};
///
/// let channel = BalancedChannel::builder("registry://127.0.0.1:50050/lb.example.grpc.io")?
///     .policy(PolicyKind::RoundRobin)
///     .build();
/// let mut client = EchoClient::new(channel);
/// let reply = client.unary_echo(EchoRequest { message: "hi".into() }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BalancedChannel {
    shared: Arc<Shared>,
}

struct Shared {
    service: String,
    policy: &'static str,
    picker: Arc<ArcSwap<Published>>,
    picker_waiter: watch::Receiver<()>,
    state: watch::Receiver<BalancerState>,
    balancer_stats: Arc<BalancerStats>,
    wait_for_ready: bool,
    default_timeout: Option<Duration>,
    connections: Arc<ConnectionStats>,
    /// Counts the RPCs that end before any pick; per-endpoint outcomes are
    /// counted by each connection.
    metrics: Option<ChannelMetrics>,
    _tasks: [Tasks; 2],
}

/// Aborts a background task when dropped.
struct Tasks(JoinHandle<()>);

impl Tasks {
    fn spawn(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(future))
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl BalancedChannel {
    /// A builder for `target` (see [`Builder::new`]).
    pub fn builder(target: &str) -> Result<Builder, TargetError> {
        Builder::new(target)
    }

    /// The name of the policy in use (`pick_first`, `round_robin`,
    /// `least_request`, `weighted_round_robin`, a custom policy's, or
    /// `outlier_detection` around any of them).
    pub fn policy(&self) -> &'static str {
        self.shared.policy
    }

    /// How much work the balancer task has done: its busy time, batches of
    /// events and pickers built.
    pub fn balancer_stats(&self) -> &BalancerStats {
        &self.shared.balancer_stats
    }

    /// A receiver of the channel's state: connectivity, endpoints, the
    /// addresses in use and the last error.
    pub fn watch_state(&self) -> watch::Receiver<BalancerState> {
        self.shared.state.clone()
    }

    /// The channel's state now.
    pub fn state(&self) -> BalancerState {
        self.shared.state.borrow().clone()
    }

    /// Counters of the channel's backend connections: attempts, successes,
    /// failures, disconnections and `too_many_pings` GOAWAYs.
    pub fn connection_stats(&self) -> &ConnectionStats {
        &self.shared.connections
    }

    /// RPCs in flight now on each connection in use, by address.
    pub fn in_flight(&self) -> Vec<(String, usize)> {
        self.shared
            .picker
            .load()
            .picker
            .connections()
            .iter()
            .map(|c| (c.address.to_string(), c.in_flight.count()))
            .collect()
    }

    /// Waits until the channel is Ready or `timeout` passes; returns the
    /// state it ended in.
    pub async fn wait_ready(&self, timeout: Duration) -> ConnectivityState {
        let mut state = self.watch_state();
        let ready = state.wait_for(|s| s.connectivity == ConnectivityState::Ready);
        let reached = matches!(tokio::time::timeout(timeout, ready).await, Ok(Ok(_)));
        if reached {
            ConnectivityState::Ready
        } else {
            self.state().connectivity
        }
    }
}

/// The error type of [`BalancedChannel`]; always holds a [`tonic::Status`],
/// which tonic clients hand back unchanged.
pub type BoxError = Box<dyn StdError + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for BalancedChannel {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    /// Always ready: an RPC that finds no Ready backend fails fast (or
    /// waits, if wait-for-ready) in `call`, with a status that says why.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared
                .send(request)
                .await
                .map_err(|status| Box::new(status) as BoxError)
        })
    }
}

impl Shared {
    async fn send(
        &self,
        mut request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<ResponseBody>, Status> {
        let timeout = match grpc_timeout(request.headers()) {
            Some(timeout) => Some(timeout),
            None => self.default_timeout.inspect(|timeout| {
                // Tell the server too, so it can stop working on it in time.
                let millis = timeout.as_millis().clamp(1, 99_999_999);
                if let Ok(value) = http::HeaderValue::from_str(&format!("{millis}m")) {
                    request.headers_mut().insert("grpc-timeout", value);
                }
            }),
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        let wait_for_ready =
            self.wait_for_ready || request.extensions().get::<WaitForReady>().is_some();
        let picked = AtomicBool::new(false);
        let attempt = self.send_to_ready(request, wait_for_ready, deadline, &picked);
        let sent = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or_else(|_| Err(self.deadline_exceeded().into())),
            None => attempt.await,
        };
        if let (Err(status), Some(metrics)) = (&sent, &self.metrics) {
            if !picked.load(Ordering::Relaxed) {
                metrics.unpicked(status.code());
            }
        }
        sent
    }

    /// Picks a connection and sends; waits while connecting, fails fast in
    /// TransientFailure unless `wait_for_ready`.
    async fn send_to_ready(
        &self,
        mut request: http::Request<tonic::body::Body>,
        wait_for_ready: bool,
        deadline: Option<Instant>,
        picked: &AtomicBool,
    ) -> Result<http::Response<ResponseBody>, Status> {
        let mut waiter = None;
        loop {
            let published = self.picker.load();
            let pick = published.picker.pick(&PickInfo {
                method: request.uri().path(),
            });
            let (connection, done) = match pick {
                Pick::Connection { connection, done } => (connection, done),
                Pick::Fail(status) if !wait_for_ready => return Err(status),
                Pick::Fail(_) | Pick::Queue => {
                    if published.connectivity == ConnectivityState::TransientFailure
                        && !wait_for_ready
                    {
                        let error = published.error.clone().unwrap_or_else(|| {
                            Arc::new(Error::NoReadyEndpoint {
                                service: self.service.clone(),
                                last: None,
                            })
                        });
                        return Err(error.into_status());
                    }
                    // Subscribe, then look again, so a picker published in
                    // between is not missed.
                    let waiter = match &mut waiter {
                        Some(waiter) => waiter,
                        None => {
                            let mut fresh = self.picker_waiter.clone();
                            fresh.mark_unchanged();
                            waiter.insert(fresh)
                        }
                    };
                    if !Arc::ptr_eq(&published, &self.picker.load()) {
                        continue;
                    }
                    drop(published);
                    if waiter.changed().await.is_err() {
                        return Err(Error::BalancerStopped.into());
                    }
                    continue;
                }
            };
            drop(published);
            picked.store(true, Ordering::Relaxed);
            if let Some(metrics) = &connection.metrics {
                metrics.picked();
            }
            set_origin(&mut request, &connection.scheme, &connection.authority)?;
            let outcome = Outcome::new(
                connection.in_flight.start(),
                done,
                connection.metrics.clone(),
                deadline,
            );
            let mut sender = connection.sender.clone();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    // A trailers-only response carries its status in the
                    // headers.
                    let code = grpc_status(&parts.headers);
                    return Ok(http::Response::from_parts(
                        parts,
                        ResponseBody {
                            inner: body,
                            code,
                            outcome,
                        },
                    ));
                }
                Err(mut error) => match error.take_message() {
                    // Never left this process (the connection closed just
                    // before): safe to send elsewhere.
                    Some(unsent) => {
                        outcome.forget();
                        picked.store(false, Ordering::Relaxed);
                        request = unsent;
                        // Let the balancer hear of the closed connection.
                        tokio::task::yield_now().await;
                    }
                    None => {
                        outcome.finish(tonic::Code::Unavailable);
                        return Err(Error::RpcFailed {
                            address: connection.address.clone(),
                            detail: source_chain(error.error()),
                        }
                        .into());
                    }
                },
            }
        }
    }

    /// What an RPC whose deadline passed gets: the state it was waiting in.
    fn deadline_exceeded(&self) -> Error {
        let state = self.state.borrow();
        Error::DeadlineExceeded {
            service: self.service.clone(),
            connectivity: state.connectivity,
            waiting_on: state.last_error.clone(),
        }
    }
}

/// Points the request at the chosen backend: HTTP/2 needs a scheme and an
/// authority, which tonic leaves to the channel.
fn set_origin(
    request: &mut http::Request<tonic::body::Body>,
    scheme: &Scheme,
    authority: &Authority,
) -> Result<(), Status> {
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = Uri::from_parts(parts).map_err(|e| Error::InvalidUri {
        authority: authority.to_string(),
        detail: e.to_string(),
    })?;
    Ok(())
}

/// The `grpc-timeout` header, which tonic sets from `Request::set_timeout`.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The `grpc-status` header or trailer, if present.
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(tonic::Code::from_i32(value.parse().ok()?))
}

/// One RPC's bookkeeping: counted in flight on its subchannel until it ends,
/// and its outcome reported to the picker's [`OnDone`] and the endpoint's
/// metrics, exactly once.
struct Outcome {
    _in_flight: InFlightGuard,
    done: Option<OnDone>,
    /// Until the outcome is reported.
    metrics: Option<Arc<EndpointMetrics>>,
    started: Instant,
    /// The call's deadline: a call dropped after it timed out, which
    /// policies must tell from one the caller abandoned.
    deadline: Option<Instant>,
}

impl Outcome {
    fn new(
        in_flight: InFlightGuard,
        done: Option<OnDone>,
        metrics: Option<Arc<EndpointMetrics>>,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            _in_flight: in_flight,
            done,
            metrics,
            started: Instant::now(),
            deadline,
        }
    }

    /// Reports `code` (once; later calls do nothing).
    fn finish(mut self, code: tonic::Code) {
        self.report(code);
    }

    fn report(&mut self, code: tonic::Code) {
        if let Some(metrics) = self.metrics.take() {
            metrics.rpc_ended(code);
        }
        if let Some(done) = self.done.take() {
            done(&CallOutcome {
                code,
                latency: self.started.elapsed(),
            });
        }
    }

    /// The RPC never left: nothing to report.
    fn forget(mut self) {
        self.done = None;
        self.metrics = None;
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // Dropped before the status arrived: the deadline passed, or the
        // caller gave up.
        let code = match self.deadline {
            Some(deadline) if Instant::now() >= deadline => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Cancelled,
        };
        self.report(code);
    }
}

/// A response body that keeps its RPC counted as in flight on its
/// subchannel until it is read to the end or dropped, and tells the
/// picker's [`OnDone`] how the call ended.
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    /// The status, once the headers or trailers have said it.
    code: Option<tonic::Code>,
    outcome: Outcome,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // tonic drops a trailers-only response's body unread: its status,
        // from the headers, is the call's outcome, not a cancellation.
        if let Some(code) = self.code {
            self.outcome.report(code);
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // The trailers end the call: tonic may never poll again.
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.code = Some(code);
                    self.outcome.report(code);
                }
            }
            Poll::Ready(None) => {
                let code = self.code.unwrap_or(tonic::Code::Unknown);
                self.outcome.report(code);
            }
            Poll::Ready(Some(Err(_))) => self.outcome.report(tonic::Code::Unavailable),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut headers = http::HeaderMap::new();
        for (value, expected) in [
            ("100m", Duration::from_millis(100)),
            ("2S", Duration::from_secs(2)),
            ("5u", Duration::from_micros(5)),
        ] {
            headers.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(grpc_timeout(&headers), Some(expected));
        }
        headers.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&headers), None);
    }
}
