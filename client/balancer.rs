//! The balancer task: applies resolver updates and subchannel state changes
//! to the policy, and publishes the result as a [`Published`] picker for the
//! RPC path and a [`BalancerState`] for observers.
//!
//! All decisions happen here, off the RPC path; an RPC only loads the
//! current picker (lock-free) and asks it for a connection. Events are
//! handled in batches (everything queued when the task wakes), and one
//! picker is built per batch, so a thousand endpoints connecting at once do
//! not cost a thousand pickers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::error::{Error, ResolverError};
use super::metrics::ChannelMetrics;
use super::policy::{Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, Subchannels};
use super::resolver::{Endpoint, ResolveNow, ResolverEvent};
use super::subchannel::{ConnectConfig, ConnectivityState, ReadyConnection, SubchannelEvent};
use crate::discovery::EndpointSet;

/// What the channel looks like now, for tests, the CLI and users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerState {
    /// The aggregate connectivity state.
    pub connectivity: ConnectivityState,
    /// The endpoint set last resolved (draining ones included), in the
    /// resolver's order; shared, not copied, between states.
    pub endpoints: Arc<Vec<Endpoint>>,
    /// The addresses RPCs are being sent to.
    pub ready: Vec<Arc<str>>,
    /// Why RPCs would fail now, if they would: the error a fail-fast RPC
    /// gets (its `Display` is the status message).
    pub last_error: Option<Arc<Error>>,
    /// Why the resolver cannot reach its source (e.g. the registry is
    /// down), while the last known endpoints stay in use; the text of a
    /// [`ResolverError`].
    pub resolver_error: Option<String>,
}

impl Default for BalancerState {
    fn default() -> Self {
        Self {
            connectivity: ConnectivityState::Idle,
            endpoints: Arc::default(),
            ready: Vec::new(),
            last_error: None,
            resolver_error: None,
        }
    }
}

impl BalancerState {
    /// Whether `address` is among the addresses RPCs are sent to.
    pub fn is_ready(&self, address: &str) -> bool {
        self.ready.iter().any(|a| &**a == address)
    }
}

/// The picker the RPC path reads, with what RPCs need to know when it has
/// nothing to offer.
pub struct Published {
    /// The policy's picker.
    pub picker: Arc<dyn Picker>,
    /// The aggregate state when it was published.
    pub connectivity: ConnectivityState,
    /// Why no connection is ready, for the UNAVAILABLE status.
    pub error: Option<Arc<Error>>,
}

impl Published {
    /// Before the first picker: everything waits.
    pub fn empty() -> Self {
        Self {
            picker: Arc::new(NoConnection),
            connectivity: ConnectivityState::Idle,
            error: None,
        }
    }
}

/// A picker with nothing to pick.
struct NoConnection;

impl Picker for NoConnection {
    fn pick(&self, _info: &PickInfo<'_>) -> Pick {
        Pick::Queue
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        &[]
    }
}

/// Time the balancer task has spent working, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct BalancerStats {
    /// Nanoseconds spent handling events and publishing.
    pub busy_nanos: AtomicU64,
    /// Batches of events handled.
    pub batches: AtomicU64,
    /// Pickers published.
    pub pickers: AtomicU64,
}

impl BalancerStats {
    /// Time spent working so far.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed))
    }
}

/// Where the balancer publishes.
pub struct Outputs {
    /// The picker the RPC path loads.
    pub picker: Arc<ArcSwap<Published>>,
    /// Wakes RPCs waiting for a new picker.
    pub picker_changed: watch::Sender<()>,
    /// The observable state.
    pub state: watch::Sender<BalancerState>,
    /// Work counters.
    pub stats: Arc<BalancerStats>,
    /// The channel's metrics, if it has any.
    pub metrics: Option<ChannelMetrics>,
}

/// The balancer's view of the world between events.
struct Balancer {
    service: String,
    policy: Box<dyn Policy>,
    subchannels: Subchannels,
    endpoints: EndpointSet,
    /// `endpoints` as observers see it, rebuilt only when it changes.
    endpoint_list: Arc<Vec<Endpoint>>,
    /// Whether no endpoint serves (none at all, or all draining).
    all_draining: bool,
    resolver_error: Option<ResolverError>,
    /// The policy's last picker.
    current: Option<PolicyPicker>,
    timer: Option<Instant>,
    /// Asks the resolver to look again when a connection fails.
    resolve_now: ResolveNow,
}

/// Runs the balancer until the channel is dropped (the task is aborted).
pub async fn run(
    service: String,
    policy: Box<dyn Policy>,
    config: Arc<ConnectConfig>,
    mut resolver: mpsc::UnboundedReceiver<ResolverEvent>,
    resolve_now: ResolveNow,
    outputs: Outputs,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut balancer = Balancer {
        service,
        policy,
        subchannels: Subchannels::new(config, events_tx),
        endpoints: EndpointSet::new(),
        endpoint_list: Arc::default(),
        all_draining: true,
        resolver_error: None,
        current: None,
        timer: None,
        resolve_now,
    };
    let mut resolver_alive = true;
    // Zeroes the gauges when the task ends (aborted with its channel),
    // after its last publication.
    let _gauges = outputs.metrics.as_ref().map(ChannelMetrics::gauges_guard);
    loop {
        let timer = balancer.timer;
        tokio::select! {
            event = resolver.recv(), if resolver_alive => {
                let started = std::time::Instant::now();
                match event {
                    Some(event) => {
                        count_resolver_event(&outputs, &event);
                        balancer.on_resolver(event);
                        while let Ok(event) = resolver.try_recv() {
                            count_resolver_event(&outputs, &event);
                            balancer.on_resolver(event);
                        }
                    }
                    // The resolver finished; keep the last set.
                    None => resolver_alive = false,
                }
                balancer.publish(&outputs, started);
            }
            Some(event) = events.recv() => {
                let started = std::time::Instant::now();
                balancer.on_subchannel(event);
                while let Ok(event) = events.try_recv() {
                    balancer.on_subchannel(event);
                }
                balancer.publish(&outputs, started);
            }
            _ = sleep_until(timer), if timer.is_some() => {
                let started = std::time::Instant::now();
                balancer.timer = None;
                let Balancer { policy, subchannels, timer, .. } = &mut balancer;
                policy.timer_fired(&mut PolicyContext::new(subchannels, timer));
                balancer.publish(&outputs, started);
            }
        }
    }
}

/// Counts a resolver update or error in the channel's metrics.
fn count_resolver_event(outputs: &Outputs, event: &ResolverEvent) {
    if let Some(metrics) = &outputs.metrics {
        match event {
            ResolverEvent::Update(_) => metrics.resolver_update(),
            ResolverEvent::Error(_) => metrics.resolver_error(),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Balancer {
    fn on_resolver(&mut self, event: ResolverEvent) {
        match event {
            ResolverEvent::Update(update) => {
                let changes = self.endpoints.apply(update);
                for anomaly in &changes.anomalies {
                    tracing::debug!(service = %self.service, %anomaly, "resolver update did not fit the set");
                }
                // Any update clears a resolver error: the source answered.
                self.resolver_error = None;
                if changes.is_empty() && self.endpoint_list.len() == self.endpoints.len() {
                    return;
                }
                tracing::debug!(
                    service = %self.service,
                    policy = self.policy.name(),
                    added = ?changes.added,
                    updated = ?changes.updated,
                    removed = ?changes.removed,
                    "endpoints changed"
                );
                self.endpoint_list =
                    Arc::new(self.endpoints.iter().map(|e| (**e).clone()).collect());
                self.all_draining = self.endpoints.iter().all(|e| e.is_draining());
                let Balancer {
                    policy,
                    subchannels,
                    endpoints,
                    timer,
                    ..
                } = self;
                policy.endpoints_changed(
                    endpoints,
                    &changes,
                    &mut PolicyContext::new(subchannels, timer),
                );
            }
            ResolverEvent::Error(error) => self.resolver_error = Some(error),
        }
    }

    fn on_subchannel(&mut self, event: SubchannelEvent) {
        // Events of a removed subchannel are stale; ids are never reused.
        let Some(subchannel) = self.subchannels.get_mut(event.id) else {
            return;
        };
        subchannel.set_state(event.state);
        // A failed attempt or a lost connection may mean the backend moved.
        if subchannel.last_error().is_some() {
            self.resolve_now.request();
        }
        let Balancer {
            policy,
            subchannels,
            timer,
            ..
        } = self;
        policy.subchannel_changed(event.id, &mut PolicyContext::new(subchannels, timer));
    }

    /// Publishes the picker (if the policy has a new one) and the state.
    fn publish(&mut self, outputs: &Outputs, started: std::time::Instant) {
        if let Some(fresh) = self.policy.take_picker() {
            outputs.stats.pickers.fetch_add(1, Ordering::Relaxed);
            self.current = Some(fresh);
        }
        let (picker, ready) = match &self.current {
            Some(current) => (
                current.picker.clone(),
                current.picker.connections().to_vec(),
            ),
            None => (Arc::new(NoConnection) as Arc<dyn Picker>, Vec::new()),
        };
        let (connectivity, error) = self.aggregate(!ready.is_empty());
        outputs.picker.store(Arc::new(Published {
            picker,
            connectivity,
            error: error.clone(),
        }));
        outputs.picker_changed.send_replace(());
        if let Some(metrics) = &outputs.metrics {
            metrics.published(self.endpoint_list.len(), ready.len());
        }
        let state = BalancerState {
            connectivity,
            endpoints: self.endpoint_list.clone(),
            ready: ready.iter().map(|c| c.address.clone()).collect(),
            last_error: error,
            resolver_error: self.resolver_error.as_ref().map(ToString::to_string),
        };
        outputs.state.send_if_modified(|current| {
            let changed = *current != state;
            if changed {
                *current = state;
            }
            changed
        });
        outputs.stats.batches.fetch_add(1, Ordering::Relaxed);
        outputs
            .stats
            .busy_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The channel's state and, when RPCs would fail, why.
    fn aggregate(&self, any_ready: bool) -> (ConnectivityState, Option<Arc<Error>>) {
        let service = self.service.clone();
        if any_ready {
            return (ConnectivityState::Ready, None);
        }
        if !self.endpoints.is_known() {
            return match &self.resolver_error {
                Some(error) => (
                    ConnectivityState::TransientFailure,
                    Some(Arc::new(Error::Resolver(error.clone()))),
                ),
                None => (ConnectivityState::Connecting, None),
            };
        }
        if self.all_draining {
            let error = Error::NoEndpoints {
                service,
                all_draining: !self.endpoints.is_empty(),
                resolver: self.resolver_error.clone(),
            };
            return (ConnectivityState::TransientFailure, Some(Arc::new(error)));
        }
        let (connectivity, last) = match &self.current {
            Some(current) => (current.connectivity, current.last_error.clone()),
            None => (ConnectivityState::Connecting, None),
        };
        let connectivity = match connectivity {
            // The picker had connections that all closed since.
            ConnectivityState::Ready | ConnectivityState::Idle => ConnectivityState::Connecting,
            other => other,
        };
        let error = Error::NoReadyEndpoint { service, last };
        (connectivity, Some(Arc::new(error)))
    }
}
