//! The seam between the registry's gRPC service and whatever holds its
//! state. A [`Store`] owns the leases, the endpoint sets, their versions and
//! epoch, and the streams of their changes; the service validates requests,
//! checks tokens and caps per connection, and speaks the wire format, for
//! any store alike.
//!
//! [`MemoryStore`](super::memory::MemoryStore) is the first implementation
//! and the default: everything in this process, nothing to install. A store
//! on a distributed database supplies its own epoch (the cluster's identity)
//! and versions (its revisions), and can resume a watcher from a
//! [`Position`] it handed out earlier.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;

use super::lease::{LeaseId, StreamId};
use super::RegistryError;
use crate::discovery::{Endpoint, Versioned};
use crate::service_config::ServiceConfig;

/// The changes of one service as a store streams them: a reset first, then
/// deltas, and a fresh reset whenever the watcher fell too far behind for
/// deltas to be trusted. Items are shared by every watcher of the service.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Arc<Versioned>> + Send + 'static>>;

/// One service's config as it changes: the current value (`None`: the
/// service has no config), then the latest after each change.
pub type ConfigWatch = tokio::sync::watch::Receiver<Option<StoredConfig>>;

/// Where a watcher stands: the epoch and version of the last update it
/// applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The store history the version belongs to.
    pub epoch: u64,
    /// The version the watcher's set has.
    pub version: u64,
}

/// A validated Register request.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    /// The service to join.
    pub service: Arc<str>,
    /// The endpoint's address.
    pub address: Arc<str>,
    /// Its labels.
    pub metadata: HashMap<String, String>,
    /// How long the lease lives without a heartbeat.
    pub ttl: Duration,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The lease that now holds the endpoint.
    pub lease: LeaseId,
    /// Its time to live.
    pub ttl: Duration,
    /// The store history it belongs to.
    pub epoch: u64,
}

/// One service's endpoints at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSnapshot {
    /// The store history.
    pub epoch: u64,
    /// The version of the set.
    pub version: u64,
    /// The endpoints, by address.
    pub endpoints: Vec<Endpoint>,
}

/// A service and how many endpoints it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCount {
    /// The service name.
    pub service: String,
    /// Its endpoints, draining ones included.
    pub endpoints: usize,
}

/// One endpoint with its lease, as operators inspect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedEndpoint {
    /// The endpoint as watchers see it.
    pub endpoint: Endpoint,
    /// How long ago its lease was granted.
    pub lease_age: Duration,
    /// Its lease's time to live.
    pub ttl: Duration,
}

/// One service's endpoints with their leases, at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedSnapshot {
    /// The store history.
    pub epoch: u64,
    /// The version of the set.
    pub version: u64,
    /// The endpoints, by address.
    pub endpoints: Vec<LeasedEndpoint>,
}

/// One service's config as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredConfig {
    /// Increases with every change of this service's config within one
    /// store history.
    pub version: u64,
    /// The config as JSON, as [`ServiceConfig::to_json`] writes it.
    pub json: Arc<str>,
    /// The same, parsed and validated.
    pub config: Arc<ServiceConfig>,
}

impl StoredConfig {
    /// A stored config from its JSON, which must parse: stores keep only
    /// what the service validated.
    pub fn from_json(version: u64, json: &str) -> Result<Self, RegistryError> {
        let config = ServiceConfig::from_json(json)
            .map_err(|e| RegistryError::Unavailable(format!("stored {e}")))?;
        Ok(Self {
            version,
            json: json.into(),
            config: Arc::new(config),
        })
    }
}

/// Holds the registry's state. Every method changes nothing when it
/// returns an error.
#[tonic::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The identity of this store's history; versions compare only within
    /// one epoch.
    fn epoch(&self) -> u64;

    /// Grants a lease and puts the endpoint under it. An endpoint already
    /// at the address is taken over: its old lease ends.
    async fn register(&self, endpoint: NewEndpoint) -> Result<Grant, RegistryError>;

    /// Renews `lease` by one TTL and binds it to KeepAlive stream `stream`;
    /// returns the TTL.
    async fn keep_alive(&self, lease: LeaseId, stream: StreamId)
        -> Result<Duration, RegistryError>;

    /// KeepAlive stream `stream` ended: the `leases` it carried that are
    /// still bound to it end now, and their endpoints leave every watcher.
    /// Not async, so it can run in a `Drop`; a store that must do I/O for
    /// it starts that work itself.
    fn stream_ended(&self, stream: StreamId, leases: &HashSet<LeaseId>);

    /// Marks the endpoint of `lease` DRAINING.
    async fn drain(&self, lease: LeaseId) -> Result<(), RegistryError>;

    /// Ends `lease` and removes its endpoint.
    async fn deregister(&self, lease: LeaseId) -> Result<(), RegistryError>;

    /// Sets the service config of `service` (already validated); returns
    /// its new version.
    async fn set_config(&self, service: &str, config: &ServiceConfig)
        -> Result<u64, RegistryError>;

    /// The service config of `service`, if it has one.
    async fn config(&self, service: &str) -> Result<Option<StoredConfig>, RegistryError>;

    /// Removes the service config of `service`; false if it had none.
    async fn delete_config(&self, service: &str) -> Result<bool, RegistryError>;

    /// Follows the service config of `service`, as this process knows it:
    /// what Watch and xDS streams push.
    async fn watch_config(&self, service: &str) -> Result<ConfigWatch, RegistryError>;

    /// The changes of `service`. With a `from` the store can continue (same
    /// epoch, history still held) the stream opens with the deltas after
    /// it; otherwise with a reset.
    async fn watch(
        &self,
        service: &str,
        from: Option<Position>,
    ) -> Result<UpdateStream, RegistryError>;

    /// The current endpoints of `service` (empty if unknown).
    async fn resolve(&self, service: &str) -> Result<ServiceSnapshot, RegistryError>;

    /// Every service with at least one endpoint, sorted by name.
    async fn list(&self) -> Result<Vec<ServiceCount>, RegistryError>;

    /// How many leases this store holds now.
    fn lease_count(&self) -> usize;

    /// The endpoints of `service` with their leases' age and TTL (empty if
    /// unknown).
    async fn leased_endpoints(&self, service: &str) -> Result<LeasedSnapshot, RegistryError>;

    /// An operator marks the endpoint at `address` DRAINING, whichever
    /// lease holds it.
    async fn drain_address(&self, service: &str, address: &str) -> Result<(), RegistryError>;

    /// An operator removes the endpoint at `address`. Its lease ends and is
    /// remembered as removed, so the holder's next heartbeat is refused with
    /// [`RegistryError::RemovedByOperator`] rather than "not found" (which
    /// would have it register again).
    async fn deregister_address(&self, service: &str, address: &str) -> Result<(), RegistryError>;

    /// Whether the store can serve now, as it changes; the registry's
    /// health follows it. `None`: always (an in-process store).
    fn serving(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }

    /// The registry is shutting down: the KeepAlive streams it ends now are
    /// not backends going away. A store other replicas share keeps those
    /// leases for the backends to carry on elsewhere.
    fn closing(&self) {}

    /// Adds the store's own metrics, if it has any, next to the registry's.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}
