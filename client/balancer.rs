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

use super::channel::config::{ConfigSelector, PolicyChoice};
use super::error::{Error, ResolverError};
use super::metrics::ChannelMetrics;
use super::policy::{Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, Subchannels};
use super::resolver::{Endpoint, ResolveNow, ResolverEvent};
use super::subchannel::{ConnectConfig, ConnectivityState, ReadyConnection, SubchannelEvent};
use crate::discovery::{Applied, EndpointSet};

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
    /// The policy RPCs are picked by (`outlier_detection` when that wraps
    /// it); it changes when a new service config names another one.
    pub policy: &'static str,
}

impl Default for BalancerState {
    fn default() -> Self {
        Self {
            policy: "",
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
    /// Policy switches where the new policy took over with a Ready
    /// subchannel while the old one still served (graceful).
    pub graceful_switches: AtomicU64,
    /// Policy switches made at once, the old policy having nothing Ready.
    pub immediate_switches: AtomicU64,
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
    /// The policy RPCs are picked by.
    active: Slot,
    /// A policy the config switched to, connecting while `active` still
    /// serves: it takes over once it has a Ready subchannel (grpc-go's
    /// graceful switch), or at once if `active` has nothing Ready.
    pending: Option<Slot>,
    /// The config in force, and the policy it asks for.
    config: ConfigSelector,
    /// The subchannel settings the builder gave.
    connect: Arc<ConnectConfig>,
    endpoints: EndpointSet,
    /// `endpoints` as observers see it, rebuilt only when it changes.
    endpoint_list: Arc<Vec<Endpoint>>,
    /// Whether no endpoint serves (none at all, or all draining).
    all_draining: bool,
    resolver_error: Option<ResolverError>,
    /// Asks the resolver to look again when a connection fails.
    resolve_now: ResolveNow,
}

/// One policy with the subchannels it owns: policies never share
/// subchannels, since one may close or eject what another uses.
struct Slot {
    policy: Box<dyn Policy>,
    subchannels: Subchannels,
    events: mpsc::UnboundedReceiver<SubchannelEvent>,
    timer: Option<Instant>,
    /// The policy's last picker.
    current: Option<PolicyPicker>,
}

impl Slot {
    fn new(policy: Box<dyn Policy>, connect: Arc<ConnectConfig>) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Self {
            policy,
            subchannels: Subchannels::new(connect, events_tx),
            events,
            timer: None,
            current: None,
        }
    }

    fn is_ready(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| c.connectivity == ConnectivityState::Ready)
    }

    /// Whether a pending policy should take over now: when Ready, or when
    /// Idle. A lazy policy (ring_hash) is Idle until picks reach it and
    /// picks only reach the active one, so waiting for it to be Ready would
    /// wait forever; grpc-go's graceful switch likewise swaps as soon as
    /// the new policy is not Connecting.
    fn can_take_over(&self) -> bool {
        self.current.as_ref().is_some_and(|c| {
            matches!(
                c.connectivity,
                ConnectivityState::Ready | ConnectivityState::Idle
            )
        })
    }

    fn endpoints_changed(&mut self, endpoints: &EndpointSet, changes: &Applied) {
        let Slot {
            policy,
            subchannels,
            timer,
            ..
        } = self;
        policy.endpoints_changed(
            endpoints,
            changes,
            &mut PolicyContext::new(subchannels, timer),
        );
    }

    /// Applies one of this slot's subchannel events; true if it failed a
    /// connection (the resolver may want to look again).
    fn on_subchannel(&mut self, event: SubchannelEvent) -> bool {
        // Events of a removed subchannel are stale; ids are never reused.
        let Some(subchannel) = self.subchannels.get_mut(event.id) else {
            return false;
        };
        subchannel.set_state(event.state);
        let failed = subchannel.last_error().is_some();
        let Slot {
            policy,
            subchannels,
            timer,
            ..
        } = self;
        policy.subchannel_changed(event.id, &mut PolicyContext::new(subchannels, timer));
        failed
    }

    fn timer_fired(&mut self) {
        self.timer = None;
        let Slot {
            policy,
            subchannels,
            timer,
            ..
        } = self;
        policy.timer_fired(&mut PolicyContext::new(subchannels, timer));
    }

    fn take_picker(&mut self) -> bool {
        match self.policy.take_picker() {
            Some(fresh) => {
                self.current = Some(fresh);
                true
            }
            None => false,
        }
    }
}

/// What woke the balancer.
enum Wake {
    Resolver(Option<ResolverEvent>),
    Active(SubchannelEvent),
    Pending(SubchannelEvent),
    ActiveTimer,
    PendingTimer,
}

/// Runs the balancer until the channel is dropped (the task is aborted).
pub(crate) async fn run(
    service: String,
    config: ConfigSelector,
    policy: Box<dyn Policy>,
    connect: Arc<ConnectConfig>,
    mut resolver: mpsc::UnboundedReceiver<ResolverEvent>,
    resolve_now: ResolveNow,
    outputs: Outputs,
) {
    let connect_now = config
        .choice()
        .map_or_else(|| connect.clone(), |choice| choice.connect(&connect));
    let mut balancer = Balancer {
        service,
        active: Slot::new(policy, connect_now),
        pending: None,
        config,
        connect,
        endpoints: EndpointSet::new(),
        endpoint_list: Arc::default(),
        all_draining: true,
        resolver_error: None,
        resolve_now,
    };
    let mut resolver_alive = true;
    // Zeroes the gauges when the task ends (aborted with its channel),
    // after its last publication.
    let _gauges = outputs.metrics.as_ref().map(ChannelMetrics::gauges_guard);
    loop {
        let wake = balancer.wake(&mut resolver, resolver_alive).await;
        let started = std::time::Instant::now();
        match wake {
            Wake::Resolver(Some(event)) => {
                count_resolver_event(&outputs, &event);
                balancer.on_resolver(event, &outputs.stats);
                while let Ok(event) = resolver.try_recv() {
                    count_resolver_event(&outputs, &event);
                    balancer.on_resolver(event, &outputs.stats);
                }
            }
            // The resolver finished; keep the last set.
            Wake::Resolver(None) => resolver_alive = false,
            Wake::Active(event) => {
                balancer.on_subchannel(event, false);
                while let Ok(event) = balancer.active.events.try_recv() {
                    balancer.on_subchannel(event, false);
                }
            }
            Wake::Pending(event) => {
                balancer.on_subchannel(event, true);
                while let Some(Ok(event)) = balancer.pending.as_mut().map(|p| p.events.try_recv()) {
                    balancer.on_subchannel(event, true);
                }
            }
            Wake::ActiveTimer => balancer.active.timer_fired(),
            Wake::PendingTimer => {
                if let Some(pending) = &mut balancer.pending {
                    pending.timer_fired();
                }
            }
        }
        balancer.publish(&outputs, started);
    }
}

/// Counts a resolver update or error in the channel's metrics.
fn count_resolver_event(outputs: &Outputs, event: &ResolverEvent) {
    if let Some(metrics) = &outputs.metrics {
        match event {
            ResolverEvent::Update(_) | ResolverEvent::ServiceConfig(_) => metrics.resolver_update(),
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
    /// Waits for the next thing to do.
    async fn wake(
        &mut self,
        resolver: &mut mpsc::UnboundedReceiver<ResolverEvent>,
        resolver_alive: bool,
    ) -> Wake {
        let active_timer = self.active.timer;
        let pending_timer = self.pending.as_ref().and_then(|p| p.timer);
        let pending_events = async {
            match &mut self.pending {
                Some(pending) => pending.events.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = resolver.recv(), if resolver_alive => Wake::Resolver(event),
            Some(event) = self.active.events.recv() => Wake::Active(event),
            Some(event) = pending_events => Wake::Pending(event),
            _ = sleep_until(active_timer), if active_timer.is_some() => Wake::ActiveTimer,
            _ = sleep_until(pending_timer), if pending_timer.is_some() => Wake::PendingTimer,
        }
    }

    fn on_resolver(&mut self, event: ResolverEvent, stats: &BalancerStats) {
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
                    policy = self.active.policy.name(),
                    added = ?changes.added,
                    updated = ?changes.updated,
                    removed = ?changes.removed,
                    "endpoints changed"
                );
                self.endpoint_list =
                    Arc::new(self.endpoints.iter().map(|e| (**e).clone()).collect());
                self.all_draining = self.endpoints.iter().all(|e| e.is_draining());
                self.active.endpoints_changed(&self.endpoints, &changes);
                if let Some(pending) = &mut self.pending {
                    pending.endpoints_changed(&self.endpoints, &changes);
                }
            }
            ResolverEvent::Error(error) => self.resolver_error = Some(error),
            ResolverEvent::ServiceConfig(config) => {
                let before = self.config.choice();
                if !self.config.set_source(config) {
                    return;
                }
                tracing::info!(service = %self.service, "service config changed");
                match self.config.choice() {
                    Some(choice) if Some(&choice) != before.as_ref() => {
                        self.switch_to(choice, stats)
                    }
                    _ => {}
                }
            }
        }
    }

    /// Starts `choice` beside the active policy, or in its place when the
    /// active one has nothing Ready to protect.
    fn switch_to(&mut self, choice: PolicyChoice, stats: &BalancerStats) {
        let mut slot = Slot::new(choice.build(), choice.connect(&self.connect));
        tracing::info!(
            service = %self.service,
            from = self.active.policy.name(),
            to = slot.policy.name(),
            "switching balancing policy"
        );
        if self.endpoints.is_known() {
            let everything = Applied {
                added: self.endpoints.iter().map(|e| e.address.clone()).collect(),
                ..Applied::default()
            };
            slot.endpoints_changed(&self.endpoints, &everything);
        }
        // A pending policy that had not taken over yet is simply dropped.
        match self.active.is_ready() {
            true => self.pending = Some(slot),
            false => {
                self.pending = None;
                self.active = slot;
                stats.immediate_switches.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_subchannel(&mut self, event: SubchannelEvent, pending: bool) {
        let slot = match pending {
            false => &mut self.active,
            true => match &mut self.pending {
                Some(pending) => pending,
                None => return,
            },
        };
        // A failed attempt or a lost connection may mean the backend moved.
        if slot.on_subchannel(event) {
            self.resolve_now.request();
        }
    }

    /// Publishes the picker (if the policy has a new one) and the state.
    fn publish(&mut self, outputs: &Outputs, started: std::time::Instant) {
        if let Some(pending) = &mut self.pending {
            pending.take_picker();
            if pending.can_take_over() || !self.active.is_ready() {
                let switches = match pending.is_ready() && self.active.is_ready() {
                    true => &outputs.stats.graceful_switches,
                    false => &outputs.stats.immediate_switches,
                };
                switches.fetch_add(1, Ordering::Relaxed);
                let pending = self.pending.take().expect("checked");
                tracing::info!(
                    service = %self.service,
                    policy = pending.policy.name(),
                    "new balancing policy took over"
                );
                // The old policy's subchannels close once their RPCs end.
                self.active = pending;
                outputs.stats.pickers.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.active.take_picker() {
            outputs.stats.pickers.fetch_add(1, Ordering::Relaxed);
        }
        let (picker, ready) = match &self.active.current {
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
            policy: self.active.policy.name(),
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
        let (connectivity, last) = match &self.active.current {
            Some(current) => (current.connectivity, current.last_error.clone()),
            None => (ConnectivityState::Connecting, None),
        };
        let connectivity = match connectivity {
            // The picker had connections that all closed since.
            ConnectivityState::Ready => ConnectivityState::Connecting,
            // Idle stays Idle: a lazy policy (ring_hash) connects when an
            // RPC arrives, and says so.
            other => other,
        };
        let error = Error::NoReadyEndpoint { service, last };
        (connectivity, Some(Arc::new(error)))
    }
}
