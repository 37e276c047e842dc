//! [`BalancedChannel`]: the tower service that tonic-generated clients take,
//! balancing each RPC over the backends a resolver names.
//!
//! - [`builder`]: [`PolicyKind`] and the [`Builder`] that makes a channel;
//! - [`call`]: the send path of one call: its service config, deadline,
//!   retries and hedges (gRFC A6);
//! - [`attempt`]: one attempt, from its pick to the end of its response
//!   body, and its outcome;
//! - here: the channel itself, its shared state and its tasks.

mod attempt;
mod builder;
mod call;
pub(crate) mod config;

pub use attempt::ResponseBody;
pub use builder::{
    Builder, PolicyKind, DEFAULT_PER_CALL_RETRY_BUFFER, DEFAULT_PER_CHANNEL_RETRY_BUFFER,
};
pub use call::{RetryStats, WaitForReady};

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::balancer::{BalancerState, BalancerStats, Published};
use crate::client::metrics::ChannelMetrics;
use crate::client::subchannel::{ConnectionStats, ConnectivityState};
use crate::client::target::TargetError;

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
    picker: Arc<ArcSwap<Published>>,
    picker_waiter: watch::Receiver<()>,
    state: watch::Receiver<BalancerState>,
    balancer_stats: Arc<BalancerStats>,
    wait_for_ready: bool,
    default_timeout: Option<Duration>,
    connections: Arc<ConnectionStats>,
    /// Calls under the circuit breaker now (counted only while the config
    /// has one).
    calls_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Counts the RPCs that end before any pick; per-endpoint outcomes are
    /// counted by each connection.
    metrics: Option<ChannelMetrics>,
    /// The service config calls follow, and its retry token bucket: the
    /// balancer swaps it when the registry pushes a new one.
    config: Arc<ArcSwap<config::CallConfig>>,
    retries: call::RetrySettings,
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
    /// `outlier_detection` around any of them). It changes when a config
    /// from the registry names another policy and that one takes over.
    pub fn policy(&self) -> &'static str {
        self.shared.state.borrow().policy
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

    /// How many retries, transparent retries and hedges the channel sent,
    /// and how many the throttle held back.
    pub fn retry_stats(&self) -> &RetryStats {
        &self.shared.retries.stats
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
