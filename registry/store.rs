//! The endpoint sets of every service and the fan-out of their changes.
//!
//! Services live in a `DashMap`, so traffic for one service never contends
//! with another. Each service owns a bounded `broadcast` channel of deltas:
//! publishing costs one `Arc` per change whatever the number of watchers, and
//! a watcher that falls behind loses its place in the ring instead of growing
//! a queue (it then asks for a fresh snapshot, see [`super::watch`]).
//!
//! Snapshots and subscriptions are taken under the service's map lock, the
//! same lock every change is published under, so a watcher sees each change
//! exactly once: either inside its snapshot or as a later delta.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::lease::LeaseId;
use super::RegistryError;
use crate::proto::registry::{
    watch_response::Event, Delta, Endpoint, EndpointState, ResolveResponse, ServiceSummary,
    Snapshot, WatchResponse,
};

/// One change message as shared by every watcher of a service.
pub type SharedUpdate = Arc<WatchResponse>;

/// Every service's endpoint set.
pub struct Store {
    /// Identifies this registry instance in every message.
    epoch: u64,
    /// Source of versions: bumped by every change of any service, so a
    /// service's version keeps increasing even if its entry is dropped while
    /// unused and created again.
    revision: AtomicU64,
    /// The services, by name.
    services: DashMap<Arc<str>, ServiceEntry>,
    /// Cap on endpoints in one service.
    max_endpoints_per_service: usize,
    /// Cap on services that have endpoints.
    max_services: usize,
    /// Services that have endpoints now (entries that are only watched do
    /// not count, so watchers cannot use up the cap).
    populated: AtomicUsize,
    /// How many changes a watcher may lag before it is reset.
    watch_buffer: usize,
    /// Until when Watch holds back its first snapshot (see
    /// `RegistryConfig::warmup`).
    warm_until: Instant,
}

/// One service: its endpoints and its watchers' channel.
struct ServiceEntry {
    /// Version of the last change.
    version: u64,
    /// Endpoints by address.
    endpoints: BTreeMap<Arc<str>, Registration>,
    /// Deltas to watchers.
    updates: broadcast::Sender<SharedUpdate>,
}

/// An endpoint and the lease that holds it.
struct Registration {
    lease: LeaseId,
    metadata: HashMap<String, String>,
    state: EndpointState,
}

impl Store {
    /// Creates an empty store for the registry instance `epoch`.
    pub fn new(
        epoch: u64,
        max_endpoints_per_service: usize,
        watch_buffer: usize,
        warmup: Duration,
        max_services: usize,
    ) -> Self {
        Self {
            epoch,
            revision: AtomicU64::new(0),
            services: DashMap::new(),
            max_endpoints_per_service,
            max_services,
            populated: AtomicUsize::new(0),
            watch_buffer: watch_buffer.max(1),
            warm_until: Instant::now() + warmup,
        }
    }

    /// Until when a new Watch holds back its first snapshot.
    pub fn warm_until(&self) -> Instant {
        self.warm_until
    }

    /// The registry instance's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Adds or replaces the endpoint at `address`, held by `lease`. Returns
    /// the lease that held the address before, if another one did.
    pub fn upsert(
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
        let registration = Registration {
            lease,
            metadata,
            state: EndpointState::Serving,
        };
        let endpoint = registration.to_proto(address);
        let (previous, delta) = match entry.endpoints.get_mut(address) {
            Some(existing) => {
                let unchanged = existing.metadata == registration.metadata
                    && existing.state == registration.state;
                let previous = std::mem::replace(existing, registration).lease;
                let delta = (!unchanged).then(|| Delta {
                    updated: vec![endpoint],
                    ..Delta::default()
                });
                (Some(previous).filter(|old| *old != lease), delta)
            }
            None => {
                if entry.endpoints.is_empty() && !self.take_service_slot() {
                    return Err(RegistryError::ResourceExhausted {
                        what: "services".into(),
                        limit: self.max_services,
                    });
                }
                if entry.endpoints.len() >= self.max_endpoints_per_service {
                    return Err(RegistryError::ResourceExhausted {
                        what: format!("endpoints per service ({service})"),
                        limit: self.max_endpoints_per_service,
                    });
                }
                entry.endpoints.insert(address.clone(), registration);
                let delta = Delta {
                    added: vec![endpoint],
                    ..Delta::default()
                };
                (None, Some(delta))
            }
        };
        if let Some(delta) = delta {
            self.publish(entry, Event::Delta(delta));
        }
        Ok(previous)
    }

    /// Removes the endpoint at `address` if `lease` still holds it.
    pub fn remove(&self, service: &str, address: &str, lease: LeaseId) -> bool {
        let removed = match self.services.get_mut(service) {
            Some(mut entry) => {
                let entry = &mut *entry;
                if entry
                    .endpoints
                    .get(address)
                    .is_some_and(|r| r.lease == lease)
                {
                    entry.endpoints.remove(address);
                    if entry.endpoints.is_empty() {
                        self.populated.fetch_sub(1, Ordering::AcqRel);
                    }
                    let delta = Delta {
                        removed: vec![address.to_owned()],
                        ..Delta::default()
                    };
                    self.publish(entry, Event::Delta(delta));
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
    pub fn set_state(
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
        let Some(registration) = entry
            .endpoints
            .get_mut(address)
            .filter(|r| r.lease == lease)
        else {
            return false;
        };
        if registration.state != state {
            registration.state = state;
            let delta = Delta {
                updated: vec![registration.to_proto(address)],
                ..Delta::default()
            };
            self.publish(entry, Event::Delta(delta));
        }
        true
    }

    /// The current set of `service` as a reset message, and a receiver of
    /// every change after it.
    pub fn subscribe(&self, service: &str) -> (WatchResponse, broadcast::Receiver<SharedUpdate>) {
        // Read the entry first: a write lock is only needed to create it.
        if let Some(entry) = self.services.get(service) {
            return (self.reset_message(&entry), entry.updates.subscribe());
        }
        let entry = self
            .services
            .entry(Arc::from(service))
            .or_insert_with(|| self.new_entry())
            .downgrade();
        (self.reset_message(&entry), entry.updates.subscribe())
    }

    /// The current endpoint set of `service` (empty if unknown).
    pub fn resolve(&self, service: &str) -> ResolveResponse {
        match self.services.get(service) {
            Some(entry) => ResolveResponse {
                epoch: self.epoch,
                version: entry.version,
                endpoints: entry.endpoint_list(),
            },
            None => ResolveResponse {
                epoch: self.epoch,
                version: self.revision.load(Ordering::Acquire),
                endpoints: Vec::new(),
            },
        }
    }

    /// Every service with at least one endpoint, sorted by name.
    pub fn list(&self) -> Vec<ServiceSummary> {
        let mut services: Vec<ServiceSummary> = self
            .services
            .iter()
            .filter(|entry| !entry.endpoints.is_empty())
            .map(|entry| ServiceSummary {
                service: entry.key().to_string(),
                endpoints: entry.endpoints.len().try_into().unwrap_or(u32::MAX),
            })
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        services
    }

    /// Drops the entry of `service` once it has neither endpoints nor
    /// watchers, so names that come and go do not accumulate.
    pub fn release(&self, service: &str) {
        self.services.remove_if(service, |_, entry| {
            entry.endpoints.is_empty() && entry.updates.receiver_count() == 0
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
        ServiceEntry {
            version: self.revision.load(Ordering::Acquire),
            endpoints: BTreeMap::new(),
            updates: broadcast::channel(self.watch_buffer).0,
        }
    }

    fn reset_message(&self, entry: &ServiceEntry) -> WatchResponse {
        WatchResponse {
            epoch: self.epoch,
            version: entry.version,
            event: Some(Event::Reset(Snapshot {
                endpoints: entry.endpoint_list(),
            })),
        }
    }

    /// Stamps a change with the next version and sends it to every watcher.
    /// Called with the entry's lock held, which orders it against snapshots.
    fn publish(&self, entry: &mut ServiceEntry, event: Event) {
        entry.version = self.revision.fetch_add(1, Ordering::AcqRel) + 1;
        let update = WatchResponse {
            epoch: self.epoch,
            version: entry.version,
            event: Some(event),
        };
        // An error only means nobody is watching right now.
        let _ = entry.updates.send(Arc::new(update));
    }
}

impl ServiceEntry {
    fn endpoint_list(&self) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .map(|(address, registration)| registration.to_proto(address))
            .collect()
    }
}

impl Registration {
    fn to_proto(&self, address: &str) -> Endpoint {
        Endpoint {
            address: address.to_owned(),
            metadata: self.metadata.clone(),
            state: self.state as i32,
        }
    }
}
