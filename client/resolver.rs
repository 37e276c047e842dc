//! The resolver side of a balanced channel: something that keeps telling the
//! balancer the current endpoint set, whatever the source.
//!
//! A resolver publishes whole sets (grpc-go's model): the balancer reconciles
//! each set against its connections, so a resolver never has to describe
//! changes and a reset after a reconnect is just another set.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

/// One endpoint as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub address: String,
    /// Labels from the registry (zone, weight, version...).
    pub metadata: HashMap<String, String>,
    /// A draining endpoint finishes in-flight RPCs and gets no new ones.
    pub draining: bool,
}

impl Endpoint {
    /// A serving endpoint with no metadata.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            metadata: HashMap::new(),
            draining: false,
        }
    }
}

/// What the resolver has said so far.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    /// The last endpoint set, or `None` before the first one arrived.
    pub endpoints: Option<Arc<Vec<Endpoint>>>,
    /// The last resolution error, cleared by the next set.
    pub error: Option<String>,
}

/// Where a resolver publishes; handed to [`Resolver::resolve`].
#[derive(Debug, Clone)]
pub struct ResolverSink {
    tx: watch::Sender<Resolution>,
}

impl ResolverSink {
    /// Creates a sink and the receiver the balancer reads.
    pub fn new() -> (Self, watch::Receiver<Resolution>) {
        let (tx, rx) = watch::channel(Resolution::default());
        (Self { tx }, rx)
    }

    /// Publishes a complete endpoint set; it replaces the previous one.
    pub fn update(&self, endpoints: Vec<Endpoint>) {
        self.tx.send_replace(Resolution {
            endpoints: Some(Arc::new(endpoints)),
            error: None,
        });
    }

    /// Reports that the source cannot be reached; the last set stays in use.
    pub fn error(&self, error: impl Into<String>) {
        let error = error.into();
        self.tx.send_if_modified(|resolution| {
            let changed = resolution.error.as_deref() != Some(error.as_str());
            resolution.error = Some(error);
            changed
        });
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

/// A source of endpoint sets. The balanced channel runs the returned future
/// in its own task (so discovery moves without traffic) and drops it when
/// the channel goes away.
pub trait Resolver: Send + 'static {
    /// Publishes endpoint sets into `sink` until it closes.
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
            sink.update(self.addresses.into_iter().map(Endpoint::new).collect());
            sink.closed().await;
        })
    }
}
