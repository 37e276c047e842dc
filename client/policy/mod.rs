//! The seam every balancing policy plugs into, shaped after grpc-go's
//! balancer API.
//!
//! A [`Policy`] is driven by the balancer task, never from the RPC path. It
//! sees the whole endpoint set with metadata and state, and what each update
//! changed; it owns [`Subchannels`] (indexed by id) and hears of each one's
//! state changes; it may ask for a timer. After each batch of events the
//! balancer asks it for a new [`Picker`], an immutable snapshot that RPCs
//! read lock-free. A picker's [`Pick`] can carry an [`OnDone`] callback that
//! receives each call's [`CallOutcome`] (status and latency): the hook that
//! lets weighted, least-request and outlier-ejecting policies exist without
//! touching the channel.

pub mod least_request;
pub mod outlier_detection;
pub mod pick_first;
pub mod ready_set;
pub mod ring_hash;
pub mod round_robin;
pub mod slow_start;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod weighted_round_robin;
pub mod wrapped;
pub mod zone_aware;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::error::ConnectError;
use crate::client::subchannel::{
    ConnectConfig, ConnectivityState, ReadyConnection, Subchannel, SubchannelEvent,
};
use crate::discovery::{Applied, EndpointSet};

/// Identifies a subchannel within its balancer; never reused.
pub type SubchannelId = u64;

/// A load-balancing policy: which endpoints get connections, and which
/// connections RPCs may be sent on.
pub trait Policy: Send + 'static {
    /// The policy's name as grpc-go spells it.
    fn name(&self) -> &'static str;

    /// The endpoint set changed as `changes` says; `endpoints` is the whole
    /// set now, draining endpoints included.
    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        changes: &Applied,
        cx: &mut PolicyContext<'_>,
    );

    /// Subchannel `id` changed state; its new state is in `cx.subchannels()`.
    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>);

    /// The timer asked for with [`PolicyContext::schedule`] is due.
    fn timer_fired(&mut self, _cx: &mut PolicyContext<'_>) {}

    /// A new picker if what RPCs may use changed since the last call. The
    /// balancer asks once per batch of events, so a burst of N changes
    /// builds one picker, not N.
    fn take_picker(&mut self) -> Option<PolicyPicker>;
}

/// What a policy publishes.
pub struct PolicyPicker {
    /// Chooses a connection for each RPC.
    pub picker: Arc<dyn Picker>,
    /// The policy's aggregate state (Ready when anything can be picked).
    pub connectivity: ConnectivityState,
    /// The most recent connection error, for the status of failing RPCs.
    pub last_error: Option<Arc<ConnectError>>,
}

/// Chooses a connection for each RPC. Built by the policy, read by RPCs.
pub trait Picker: Send + Sync + 'static {
    /// Picks for one RPC.
    fn pick(&self, info: &PickInfo<'_>) -> Pick;

    /// The connections this picker chooses from, for observers.
    fn connections(&self) -> &[Arc<ReadyConnection>];
}

/// What a picker knows of the RPC it picks for. Borrowed from the request,
/// so it costs nothing to a policy that reads none of it.
#[derive(Debug, Clone, Copy)]
pub struct PickInfo<'a> {
    /// The gRPC method, `/package.Service/Method`.
    pub method: &'a str,
    /// The request's headers (its metadata), for policies that route by
    /// them, as ring_hash does with its `requestHashHeader`.
    pub headers: &'a http::HeaderMap,
    /// The call's own hash, from a [`RequestHash`](ring_hash::RequestHash)
    /// in its extensions, if the caller put one there.
    pub hash: Option<u64>,
}

/// A picker's answer.
pub enum Pick {
    /// Send the RPC on `connection`; `done` learns how it went.
    Connection {
        /// Where the RPC goes.
        connection: Arc<ReadyConnection>,
        /// Called once with the call's outcome.
        done: Option<OnDone>,
    },
    /// Nothing to pick yet: wait for the next picker (or fail fast when the
    /// channel is in TransientFailure and the RPC is not wait-for-ready).
    Queue,
    /// Fail this RPC with this status.
    Fail(tonic::Status),
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pick::Connection { connection, done } => f
                .debug_struct("Connection")
                .field("address", &connection.address)
                .field("done", &done.is_some())
                .finish(),
            Pick::Queue => f.write_str("Queue"),
            Pick::Fail(status) => f.debug_tuple("Fail").field(status).finish(),
        }
    }
}

/// Receives the outcome of one picked call.
pub type OnDone = Box<dyn FnOnce(&CallOutcome) + Send + Sync>;

/// How one call went, as its picker's [`OnDone`] hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOutcome {
    /// The gRPC status code: from the server's trailers, UNAVAILABLE when
    /// the connection failed, DEADLINE_EXCEEDED when the call's deadline
    /// passed first, CANCELLED when the caller gave up before that.
    pub code: tonic::Code,
    /// From the pick until the end of the response (or the failure).
    pub latency: Duration,
}

/// What a policy can do while handling an event.
pub struct PolicyContext<'a> {
    subchannels: &'a mut Subchannels,
    timer: &'a mut Option<Instant>,
    /// The time policies go by: `None` reads the clock, which is what the
    /// balancer wants; a test pins it so that timers and ejection terms
    /// are stepped, never slept through.
    now: Option<Instant>,
}

impl<'a> PolicyContext<'a> {
    /// A context over `subchannels`; `timer` holds the earliest due time.
    pub fn new(subchannels: &'a mut Subchannels, timer: &'a mut Option<Instant>) -> Self {
        Self {
            subchannels,
            timer,
            now: None,
        }
    }

    /// The same context at the fixed instant `now`, for tests.
    #[cfg(test)]
    pub(crate) fn at(mut self, now: Instant) -> Self {
        self.now = Some(now);
        self
    }

    /// A context for a child policy: the same subchannels and time, but
    /// timer requests go to `timer`, so that a wrapper's own timer and its
    /// child's do not overwrite each other.
    pub fn for_child<'b>(&'b mut self, timer: &'b mut Option<Instant>) -> PolicyContext<'b> {
        PolicyContext {
            subchannels: self.subchannels,
            timer,
            now: self.now,
        }
    }

    /// The policy's subchannels.
    pub fn subchannels(&mut self) -> &mut Subchannels {
        self.subchannels
    }

    /// The current time, which policies use instead of the clock so that
    /// tests can step it.
    pub fn now(&self) -> Instant {
        self.now.unwrap_or_else(Instant::now)
    }

    /// Calls [`Policy::timer_fired`] after `after` (the earliest request
    /// wins while one is pending).
    pub fn schedule(&mut self, after: Duration) {
        self.schedule_at(self.now() + after);
    }

    /// Calls [`Policy::timer_fired`] at `at` (the earliest request wins
    /// while one is pending).
    pub fn schedule_at(&mut self, at: Instant) {
        if self.timer.is_none_or(|due| at < due) {
            *self.timer = Some(at);
        }
    }
}

/// Makes the subchannel for an address the first time a policy asks for
/// one. The seam between policies and sockets: the balancer's factory
/// spawns a task that dials, the tests' (`test_utils`) one that records, so
/// a policy can be driven without I/O.
pub(crate) trait SubchannelFactory: Send + Sync {
    /// The Idle subchannel `id` for `address`.
    fn create(&mut self, id: SubchannelId, address: Arc<str>) -> Subchannel;
}

/// The balancer's factory: a subchannel task per address.
struct Spawner {
    config: Arc<ConnectConfig>,
    events: mpsc::UnboundedSender<SubchannelEvent>,
}

impl SubchannelFactory for Spawner {
    fn create(&mut self, id: SubchannelId, address: Arc<str>) -> Subchannel {
        Subchannel::spawn(id, address, self.config.clone(), self.events.clone())
    }
}

/// The subchannels of one balancer, by id and by address. Removing one
/// shuts it down gracefully: in-flight RPCs finish before its connection
/// closes.
pub struct Subchannels {
    by_id: HashMap<SubchannelId, Subchannel>,
    by_address: HashMap<Arc<str>, SubchannelId>,
    next_id: SubchannelId,
    factory: Box<dyn SubchannelFactory>,
}

impl Subchannels {
    /// An empty set whose subchannels report to `events`.
    pub fn new(config: Arc<ConnectConfig>, events: mpsc::UnboundedSender<SubchannelEvent>) -> Self {
        Self::with_factory(Box::new(Spawner { config, events }))
    }

    /// An empty set whose subchannels `factory` makes.
    pub(crate) fn with_factory(factory: Box<dyn SubchannelFactory>) -> Self {
        Self {
            by_id: HashMap::new(),
            by_address: HashMap::new(),
            next_id: 0,
            factory,
        }
    }

    /// The subchannel for `address`, created Idle if missing.
    pub fn get_or_create(&mut self, address: &str) -> SubchannelId {
        if let Some(&id) = self.by_address.get(address) {
            return id;
        }
        self.next_id += 1;
        let id = self.next_id;
        let address: Arc<str> = Arc::from(address);
        let subchannel = self.factory.create(id, address.clone());
        self.by_address.insert(address, id);
        self.by_id.insert(id, subchannel);
        id
    }

    /// The subchannel with `id`, if it still exists.
    pub fn get(&self, id: SubchannelId) -> Option<&Subchannel> {
        self.by_id.get(&id)
    }

    /// The subchannel with `id`, for the balancer to record its state.
    pub(crate) fn get_mut(&mut self, id: SubchannelId) -> Option<&mut Subchannel> {
        self.by_id.get_mut(&id)
    }

    /// The id of the subchannel for `address`, if there is one.
    pub fn id_of(&self, address: &str) -> Option<SubchannelId> {
        self.by_address.get(address).copied()
    }

    /// Shuts subchannel `id` down (gracefully, see the type's docs).
    pub fn remove(&mut self, id: SubchannelId) -> Option<Subchannel> {
        let subchannel = self.by_id.remove(&id)?;
        self.by_address.remove(subchannel.address());
        Some(subchannel)
    }

    /// Shuts down every subchannel `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&Subchannel) -> bool) {
        let Self {
            by_id, by_address, ..
        } = self;
        by_id.retain(|_, subchannel| {
            let kept = keep(subchannel);
            if !kept {
                by_address.remove(subchannel.address());
            }
            kept
        });
    }

    /// Every subchannel.
    pub fn iter(&self) -> impl Iterator<Item = &Subchannel> {
        self.by_id.values()
    }

    /// How many subchannels there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Counts subchannels by connectivity, so a policy can tell its aggregate
/// state in O(1) per change instead of scanning every subchannel.
#[derive(Debug, Default, Clone)]
pub struct StateCounts {
    states: HashMap<SubchannelId, ConnectivityState>,
    ready: usize,
    connecting: usize,
    idle: usize,
    failing: usize,
}

impl StateCounts {
    /// How many subchannels are in `state`.
    pub fn count(&self, state: ConnectivityState) -> usize {
        match state {
            ConnectivityState::Ready => self.ready,
            ConnectivityState::Connecting => self.connecting,
            ConnectivityState::Idle => self.idle,
            ConnectivityState::TransientFailure => self.failing,
        }
    }

    /// How many subchannels are counted.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Records that `id` is now in `state` (`None`: gone).
    pub fn set(&mut self, id: SubchannelId, state: Option<ConnectivityState>) {
        let previous = match state {
            Some(state) => self.states.insert(id, state),
            None => self.states.remove(&id),
        };
        if let Some(previous) = previous {
            *self.counter(previous) -= 1;
        }
        if let Some(state) = state {
            *self.counter(state) += 1;
        }
    }

    /// The state last recorded for `id`.
    pub fn get(&self, id: SubchannelId) -> Option<ConnectivityState> {
        self.states.get(&id).copied()
    }

    /// The aggregate as grpc-go's round_robin defines it: Ready if any is
    /// Ready, else Connecting if any is Connecting or Idle, else
    /// TransientFailure.
    pub fn aggregate(&self) -> ConnectivityState {
        if self.ready > 0 {
            ConnectivityState::Ready
        } else if self.connecting + self.idle > 0 {
            ConnectivityState::Connecting
        } else {
            ConnectivityState::TransientFailure
        }
    }

    fn counter(&mut self, state: ConnectivityState) -> &mut usize {
        match state {
            ConnectivityState::Ready => &mut self.ready,
            ConnectivityState::Connecting => &mut self.connecting,
            ConnectivityState::Idle => &mut self.idle,
            ConnectivityState::TransientFailure => &mut self.failing,
        }
    }
}
