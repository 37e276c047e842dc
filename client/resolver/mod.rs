//! The resolver side of a balanced channel: something that keeps telling the
//! balancer about the endpoint set, whatever the source.
//!
//! A resolver publishes [`Update`]s: a reset to a whole set, or a delta. The
//! balancer applies them to its [`EndpointSet`](crate::discovery::EndpointSet)
//! with the one shared `apply` and hands the policy only what changed, so a
//! watch stream's deltas reach the policy as deltas, and a reset after a
//! reconnect costs only the difference.

pub mod dns;
pub mod registry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use crate::client::error::ResolverError;
use crate::service_config::ServiceConfig;

pub use crate::discovery::{Endpoint, EndpointState, Update};

/// What a resolver tells the balancer.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolverEvent {
    /// The endpoint set changed.
    Update(Update),
    /// The source cannot be reached; the last set stays in use.
    Error(ResolverError),
    /// The source's service config for the service, which the channel
    /// applies over its own default (unless the application opted out);
    /// `None`: the source has none, so the default applies again.
    ServiceConfig(Option<Arc<ServiceConfig>>),
}

/// The balancer's way to ask its resolver for a fresh answer, as grpc-go's
/// `ResolveNow`: a connection failed, so the set it came from may be stale.
/// Requests made while the resolver is busy are kept (at most one), and a
/// resolver may ignore them, as a watch-based one does since it is always
/// up to date.
#[derive(Debug, Clone, Default)]
pub struct ResolveNow(Arc<Notify>);

impl ResolveNow {
    /// Asks for a resolution soon; cheap, and never blocks.
    pub fn request(&self) {
        self.0.notify_one();
    }

    /// Resolves once a resolution has been asked for since the last time.
    pub async fn requested(&self) {
        self.0.notified().await
    }
}

/// Where a resolver publishes; handed to [`Resolver::resolve`].
#[derive(Debug, Clone)]
pub struct ResolverSink {
    tx: mpsc::UnboundedSender<ResolverEvent>,
    /// Nudges from the balancer; see [`ResolveNow`].
    resolve_now: ResolveNow,
}

impl ResolverSink {
    /// Creates a sink and the receiver the balancer reads.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<ResolverEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let resolve_now = ResolveNow::default();
        (Self { tx, resolve_now }, rx)
    }

    /// The handle the balancer nudges this sink's resolver with.
    pub fn resolve_now(&self) -> ResolveNow {
        self.resolve_now.clone()
    }

    /// Resolves when the balancer asks for a fresh resolution.
    pub async fn resolve_now_requested(&self) {
        self.resolve_now.requested().await
    }

    /// Publishes a change to the endpoint set.
    pub fn update(&self, update: Update) {
        let _ = self.tx.send(ResolverEvent::Update(update));
    }

    /// Publishes the source's service config (`None`: it has none).
    pub fn service_config(&self, config: Option<Arc<ServiceConfig>>) {
        let _ = self.tx.send(ResolverEvent::ServiceConfig(config));
    }

    /// Publishes a complete endpoint set; it replaces the previous one.
    pub fn reset(&self, endpoints: Vec<Endpoint>) {
        self.update(Update::Reset(endpoints));
    }

    /// Reports that the source cannot be reached; the last set stays in use.
    /// A custom resolver may pass its own text (it becomes
    /// [`ResolverError::Other`]).
    pub fn error(&self, error: impl Into<ResolverError>) {
        let _ = self.tx.send(ResolverEvent::Error(error.into()));
    }

    /// Resolves once the balancer is gone, so a resolver can stop.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Whether the balancer is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A boxed future, as resolvers return.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of endpoint updates. The balanced channel runs the returned future
/// in its own task (so discovery moves without traffic) and drops it when
/// the channel goes away.
pub trait Resolver: Send + 'static {
    /// Publishes endpoint updates into `sink` until it closes.
    fn resolve(self: Box<Self>, sink: ResolverSink) -> BoxFuture;
}

/// The classic fixed list: publishes its addresses once.
#[derive(Debug, Clone)]
pub struct StaticResolver {
    addresses: Vec<String>,
}

impl StaticResolver {
    /// A resolver that always answers `addresses`.
    pub fn new(addresses: Vec<String>) -> Self {
        Self { addresses }
    }
}

impl Resolver for StaticResolver {
    fn resolve(self: Box<Self>, sink: ResolverSink) -> BoxFuture {
        Box::pin(async move {
            sink.reset(self.addresses.into_iter().map(Endpoint::new).collect());
            sink.closed().await;
        })
    }
}
