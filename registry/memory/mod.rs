//! The in-memory [`Store`]: the default, embedded registry state. Nothing to
//! install; a restart starts empty (see `RegistryConfig::warmup`).
//!
//! Services live in a `DashMap`, so traffic for one service never contends
//! with another. Each service owns a [`Fanout`]: its endpoint set and its
//! watchers' ring, the same one the etcd store's hubs use.
//!
//! Snapshots and subscriptions are taken under the service's map lock, the
//! same lock every change is published under, so a watcher sees each change
//! exactly once: either inside its snapshot or as a later delta.
//!
//! Leases live in a [`LeaseTable`] with one expiry task, the shape
//! mini-redis uses for key expiry, and a stall watch that keeps a paused
//! registry from taking its own pause for its backends' death.

mod watcher;
use watcher::watch_stream;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::configs::ConfigFeed;
use super::fanout::{Fanout, Subscription};
use super::lease::{LeaseId, LeaseTable, RemovedLeases, StreamId};
use super::metrics::RegistryMetrics;
use super::store::{
    ConfigWatch, Grant, LeasedEndpoint, LeasedSnapshot, NewEndpoint, Position, ServiceCount,
    ServiceSnapshot, Store, StoredConfig, UpdateStream,
};
use super::{Cap, RegistryConfig, RegistryError};
use crate::discovery::{Delta, Endpoint, EndpointState, Update};
use crate::service_config::ServiceConfig;

/// The registry's state in this process.
pub struct MemoryStore {
    inner: Arc<Inner>,
    /// Aborts the expiry task when the store goes.
    expiry: JoinHandle<()>,
    /// Aborts the stall watch when the store goes.
    stalls: JoinHandle<()>,
}

struct Inner {
    /// Identifies this store instance in every message.
    epoch: u64,
    /// Source of versions: bumped by every change of any service, so a
    /// service's version keeps increasing even if its entry is dropped while
    /// unused and created again.
    revision: AtomicU64,
    services: DashMap<Arc<str>, ServiceEntry>,
    /// Service configs, by service; versions come from `revision` too.
    configs: ConfigFeed,
    leases: LeaseTable,
    /// Cap on endpoints in one service.
    max_endpoints_per_service: usize,
    /// Cap on services that have endpoints.
    max_services: usize,
    /// Services that have endpoints now (entries that are only watched do
    /// not count, so watchers cannot use up the cap).
    populated: AtomicUsize,
    /// How many changes a watcher may lag before it is reset.
    watch_buffer: usize,
    /// Until when Watch holds back its first snapshot.
    warm_until: Instant,
    /// Leases an operator removed.
    removed: RemovedLeases,
    /// Counts registrations, removals and watcher resets.
    metrics: RegistryMetrics,
}

/// One service: its endpoints and their watchers, and the lease holding
/// each endpoint.
struct ServiceEntry {
    fanout: Fanout,
    leases: HashMap<Arc<str>, LeaseId>,
}

impl MemoryStore {
    /// An empty store with a fresh random epoch, capped as `config` says.
    /// Starts the lease expiry task, so it needs a tokio runtime.
    pub fn new(config: &RegistryConfig) -> Self {
        let epoch = loop {
            let epoch: u64 = rand::random();
            if epoch != 0 {
                break epoch;
            }
        };
        let inner = Arc::new(Inner {
            epoch,
            revision: AtomicU64::new(0),
            services: DashMap::new(),
            configs: ConfigFeed::default(),
            leases: LeaseTable::default(),
            max_endpoints_per_service: config.max_endpoints_per_service,
            max_services: config.max_services,
            populated: AtomicUsize::new(0),
            watch_buffer: config.watch_buffer.max(1),
            warm_until: Instant::now() + config.warmup,
            removed: RemovedLeases::default(),
            metrics: config.metrics.clone(),
        });
        let expiry = tokio::spawn(expire_leases(inner.clone()));
        let watched = inner.clone();
        let stalls = tokio::spawn(async move { watched.leases.watch_for_stalls().await });
        Self {
            inner,
            expiry,
            stalls,
        }
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        self.expiry.abort();
        self.stalls.abort();
    }
}

#[tonic::async_trait]
impl Store for MemoryStore {
    fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    async fn register(&self, new: NewEndpoint) -> Result<Grant, RegistryError> {
        let inner = &self.inner;
        let NewEndpoint {
            service,
            address,
            metadata,
            ttl,
        } = new;
        let id = LeaseId::random();
        // The lease exists before the endpoint shows, so a concurrent
        // takeover of the same address can always find and end it.
        inner
            .leases
            .grant(id, service.clone(), address.clone(), ttl);
        match inner.upsert(&service, &address, metadata, id) {
            Ok(Some(previous)) => {
                inner.leases.revoke(previous);
                tracing::info!(%service, %address, "endpoint re-registered under a new lease");
            }
            Ok(None) => tracing::info!(%service, %address, ttl = ?ttl, "endpoint registered"),
            Err(err) => {
                inner.leases.revoke(id);
                // A refused first endpoint may have left an empty entry.
                inner.release(&service);
                return Err(err);
            }
        }
        inner.metrics.registrations.inc();
        Ok(Grant {
            lease: id,
            ttl,
            epoch: inner.epoch,
        })
    }

    async fn keep_alive(
        &self,
        lease: LeaseId,
        stream: StreamId,
    ) -> Result<Duration, RegistryError> {
        self.inner.leases.refresh(lease, stream).map_err(|err| {
            match self.inner.removed.contains(lease) {
                true => RegistryError::RemovedByOperator(lease.to_string()),
                false => err,
            }
        })
    }

    fn stream_ended(&self, stream: StreamId, leases: &HashSet<LeaseId>) {
        for &id in leases {
            if let Some(lease) = self.inner.leases.revoke_if_bound(id, stream) {
                tracing::info!(service = %lease.service, address = %lease.address, "keepalive stream ended; endpoint removed");
                if self.inner.remove(&lease.service, &lease.address, id) {
                    self.inner.metrics.stream_breaks.inc();
                }
            }
        }
    }

    async fn drain(&self, id: LeaseId) -> Result<(), RegistryError> {
        let lease = self.inner.leases.get(id)?;
        if !self
            .inner
            .set_state(&lease.service, &lease.address, id, EndpointState::Draining)
        {
            return Err(RegistryError::LeaseNotFound(id.to_string()));
        }
        tracing::info!(service = %lease.service, address = %lease.address, "endpoint draining");
        self.inner.metrics.drains.inc();
        Ok(())
    }

    async fn deregister(&self, id: LeaseId) -> Result<(), RegistryError> {
        let lease = self
            .inner
            .leases
            .revoke(id)
            .ok_or_else(|| RegistryError::LeaseNotFound(id.to_string()))?;
        tracing::info!(service = %lease.service, address = %lease.address, reason = "deregistered", "endpoint removed");
        self.inner.remove(&lease.service, &lease.address, id);
        self.inner.metrics.deregistrations.inc();
        Ok(())
    }

    async fn set_config(
        &self,
        service: &str,
        config: &ServiceConfig,
    ) -> Result<u64, RegistryError> {
        let version = self.inner.revision.fetch_add(1, Ordering::Relaxed) + 1;
        let stored = StoredConfig {
            version,
            json: config.to_json().into(),
            config: Arc::new(config.clone()),
        };
        self.inner.configs.put(service, Some(stored));
        Ok(version)
    }

    async fn config(&self, service: &str) -> Result<Option<StoredConfig>, RegistryError> {
        Ok(self.inner.configs.get(service))
    }

    async fn delete_config(&self, service: &str) -> Result<bool, RegistryError> {
        Ok(self.inner.configs.put(service, None))
    }

    async fn watch_config(&self, service: &str) -> Result<ConfigWatch, RegistryError> {
        Ok(self.inner.configs.watch(service))
    }

    /// This store keeps no history beyond its watchers' ring, so a resumed
    /// watch skips its reset only when it missed nothing (same epoch, same
    /// version: a connection blip); otherwise it opens with a reset.
    async fn watch(
        &self,
        service: &str,
        from: Option<Position>,
    ) -> Result<UpdateStream, RegistryError> {
        Ok(watch_stream(self.inner.clone(), service.to_owned(), from))
    }

    async fn resolve(&self, service: &str) -> Result<ServiceSnapshot, RegistryError> {
        let inner = &self.inner;
        Ok(match inner.services.get(service) {
            Some(entry) => ServiceSnapshot {
                epoch: inner.epoch,
                version: entry.fanout.version(),
                endpoints: entry.fanout.set().iter().map(|e| (**e).clone()).collect(),
            },
            None => ServiceSnapshot {
                epoch: inner.epoch,
                version: inner.revision.load(Ordering::Acquire),
                endpoints: Vec::new(),
            },
        })
    }

    async fn list(&self) -> Result<Vec<ServiceCount>, RegistryError> {
        let mut services: Vec<ServiceCount> = self
            .inner
            .services
            .iter()
            .filter(|entry| !entry.fanout.set().is_empty())
            .map(|entry| ServiceCount {
                service: entry.key().to_string(),
                endpoints: entry.fanout.set().len(),
            })
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(services)
    }

    fn lease_count(&self) -> usize {
        self.inner.leases.len()
    }

    async fn leased_endpoints(&self, service: &str) -> Result<LeasedSnapshot, RegistryError> {
        let inner = &self.inner;
        let Some(entry) = inner.services.get(service) else {
            return Ok(LeasedSnapshot {
                epoch: inner.epoch,
                version: inner.revision.load(Ordering::Acquire),
                endpoints: Vec::new(),
            });
        };
        let now = Instant::now();
        let endpoints = entry
            .fanout
            .set()
            .iter()
            .map(|endpoint| {
                let lease = entry
                    .leases
                    .get(endpoint.address.as_str())
                    .and_then(|id| inner.leases.get(*id).ok());
                LeasedEndpoint {
                    endpoint: (**endpoint).clone(),
                    lease_age: lease
                        .as_ref()
                        .map_or(Duration::ZERO, |l| now.saturating_duration_since(l.granted)),
                    ttl: lease.map_or(Duration::ZERO, |l| l.ttl),
                }
            })
            .collect();
        Ok(LeasedSnapshot {
            epoch: inner.epoch,
            version: entry.fanout.version(),
            endpoints,
        })
    }

    async fn drain_address(&self, service: &str, address: &str) -> Result<(), RegistryError> {
        let id = self.inner.lease_at(service, address)?;
        if !self
            .inner
            .set_state(service, address, id, EndpointState::Draining)
        {
            return Err(RegistryError::EndpointNotFound {
                service: service.to_owned(),
                address: address.to_owned(),
            });
        }
        self.inner.metrics.drains.inc();
        Ok(())
    }

    async fn deregister_address(&self, service: &str, address: &str) -> Result<(), RegistryError> {
        let id = self.inner.lease_at(service, address)?;
        // Remembered before the lease ends, so no heartbeat in between can
        // be told "not found" and re-register.
        self.inner.removed.remember(id);
        self.inner.leases.revoke(id);
        if !self.inner.remove(service, address, id) {
            return Err(RegistryError::EndpointNotFound {
                service: service.to_owned(),
                address: address.to_owned(),
            });
        }
        self.inner.metrics.deregistrations.inc();
        Ok(())
    }
}

impl Inner {
    /// The lease holding the endpoint at `address` of `service`.
    fn lease_at(&self, service: &str, address: &str) -> Result<LeaseId, RegistryError> {
        self.services
            .get(service)
            .and_then(|entry| entry.leases.get(address).copied())
            .ok_or_else(|| RegistryError::EndpointNotFound {
                service: service.to_owned(),
                address: address.to_owned(),
            })
    }

    /// Adds or replaces the endpoint at `address`, held by `lease`. Returns
    /// the lease that held the address before, if another one did.
    fn upsert(
        &self,
        service: &Arc<str>,
        address: &Arc<str>,
        metadata: HashMap<String, String>,
        lease: LeaseId,
    ) -> Result<Option<LeaseId>, RegistryError> {
        let mut entry = self
            .services
            .entry(service.clone())
            .or_insert_with(|| self.new_entry());
        let entry = &mut *entry;
        let endpoint = Endpoint {
            address: address.to_string(),
            metadata,
            state: EndpointState::Serving,
        };
        let present = entry.fanout.set().contains(address);
        if !present {
            if entry.fanout.set().is_empty() && !self.take_service_slot() {
                return Err(RegistryError::exhausted(Cap::Services, self.max_services));
            }
            if entry.fanout.set().len() >= self.max_endpoints_per_service {
                return Err(RegistryError::ResourceExhausted {
                    cap: Cap::EndpointsPerService,
                    limit: self.max_endpoints_per_service,
                    service: Some(service.to_string()),
                });
            }
        }
        let delta = if present {
            Delta {
                updated: vec![endpoint],
                ..Delta::default()
            }
        } else {
            Delta {
                added: vec![endpoint],
                ..Delta::default()
            }
        };
        let previous = entry.leases.insert(address.clone(), lease);
        self.apply(entry, Update::Delta(delta));
        Ok(previous.filter(|old| *old != lease))
    }

    /// Removes the endpoint at `address` if `lease` still holds it.
    fn remove(&self, service: &str, address: &str, lease: LeaseId) -> bool {
        let removed = match self.services.get_mut(service) {
            Some(mut entry) => {
                let entry = &mut *entry;
                if entry.leases.get(address) == Some(&lease) {
                    entry.leases.remove(address);
                    let delta = Delta {
                        removed: vec![address.to_owned()],
                        ..Delta::default()
                    };
                    self.apply(entry, Update::Delta(delta));
                    if entry.fanout.set().is_empty() {
                        self.populated.fetch_sub(1, Ordering::AcqRel);
                    }
                    true
                } else {
                    false
                }
            }
            None => false,
        };
        self.release(service);
        removed
    }

    /// Sets the state of the endpoint at `address` if `lease` still holds it.
    fn set_state(
        &self,
        service: &str,
        address: &str,
        lease: LeaseId,
        state: EndpointState,
    ) -> bool {
        let Some(mut entry) = self.services.get_mut(service) else {
            return false;
        };
        let entry = &mut *entry;
        if entry.leases.get(address) != Some(&lease) {
            return false;
        }
        let Some(current) = entry.fanout.set().get(address) else {
            return false;
        };
        if current.state != state {
            let updated = (**current).clone().with_state(state);
            let delta = Delta {
                updated: vec![updated],
                ..Delta::default()
            };
            self.apply(entry, Update::Delta(delta));
        }
        true
    }

    /// Subscribes a watcher of `service` that holds `from` (if anything).
    fn subscribe(&self, service: &str, from: Option<Position>) -> Subscription {
        // Read the entry first: a write lock is only needed to create it.
        if let Some(entry) = self.services.get(service) {
            return entry.fanout.subscribe(from);
        }
        self.services
            .entry(Arc::from(service))
            .or_insert_with(|| self.new_entry())
            .downgrade()
            .fanout
            .subscribe(from)
    }

    /// Drops the entry of `service` once it has neither endpoints nor
    /// watchers, so names that come and go do not accumulate.
    fn release(&self, service: &str) {
        self.services.remove_if(service, |_, entry| {
            entry.fanout.set().is_empty() && entry.fanout.watchers() == 0
        });
    }

    /// Counts one more populated service, unless the cap is reached.
    fn take_service_slot(&self) -> bool {
        self.populated
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_services).then_some(n + 1)
            })
            .is_ok()
    }

    fn new_entry(&self) -> ServiceEntry {
        // No history beyond the ring: a resumed watch skips its reset only
        // when it missed nothing (a connection blip).
        let version = self.revision.load(Ordering::Acquire);
        ServiceEntry {
            fanout: Fanout::new(self.epoch, Vec::new(), version, self.watch_buffer, 0),
            leases: HashMap::new(),
        }
    }

    /// Applies `update` to the service's set and, if it changed anything,
    /// stamps it with the next version and sends it to every watcher. Called
    /// with the entry's lock held, which orders it against snapshots.
    fn apply(&self, entry: &mut ServiceEntry, update: Update) {
        entry
            .fanout
            .apply(update, || self.revision.fetch_add(1, Ordering::AcqRel) + 1);
    }
}

/// The one task that ends leases whose heartbeats stopped.
async fn expire_leases(inner: Arc<Inner>) {
    inner
        .leases
        .run_expiry(|id, lease| {
            tracing::info!(service = %lease.service, address = %lease.address, ttl = ?lease.ttl, "lease expired");
            if inner.remove(&lease.service, &lease.address, id) {
                inner.metrics.expiries.inc();
            }
        })
        .await
}
