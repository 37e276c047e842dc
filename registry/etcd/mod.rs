//! The etcd [`Store`]: several registry replicas share one etcd cluster, and
//! any replica answers any request.
//!
//! Layout under the prefix (default `/switchboard/`):
//! - `services/<service>/<address>`: the endpoint (a protobuf `Endpoint`),
//!   attached to its etcd lease;
//! - `leases/<lease id>`: `<etcd lease> <ttl ms> <service> <address>`, on
//!   the same etcd lease, so any replica can find a lease by its id.
//!
//! The epoch is the etcd cluster's id, the version etcd's revision, so both
//! survive replica restarts.
//!
//! A lease bound to a KeepAlive stream of this replica also has a local
//! deadline in a [`LeaseTable`] (stall protection included): the replica
//! revokes the etcd lease when the stream breaks or the heartbeats stop.
//! The etcd lease itself lives [`ETCD_TTL_FACTOR`] TTLs and is refreshed
//! once per TTL, not on every heartbeat (every TTL/3), which cuts etcd's
//! load per endpoint to a third; it only matters when a replica dies, and
//! then the backend moves to another replica with the same lease.
//!
//! One etcd watch per watched service per replica (a [`Hub`]) feeds all of
//! the replica's watchers. A compacted or broken etcd watch is followed by
//! a re-list whose difference is sent as a delta: never an empty reset.
//! Hubs stay once created (a service watched once is likely watched again).

pub mod local;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use futures_util::StreamExt;
use prost::Message;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::lease::{LeaseId, LeaseTable, StreamId};
use super::store::{
    Grant, LeasedEndpoint, LeasedSnapshot, NewEndpoint, Position, ServiceCount, ServiceSnapshot,
    Store, UpdateStream,
};
use super::RegistryError;
use crate::discovery::{Delta, Endpoint, EndpointSet, EndpointState, Update, Versioned};
use crate::proto::registry as pb;

/// The etcd lease lives this many switchboard TTLs; see the module doc.
pub const ETCD_TTL_FACTOR: u32 = 3;
/// Updates a hub keeps to resume watchers from.
const HISTORY: usize = 256;

/// Registry state in etcd, shared by every replica on the same prefix.
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// The expiry task and the stall watch, aborted with the store.
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    client: Client,
    prefix: String,
    /// The etcd cluster id.
    epoch: u64,
    /// Local deadlines of the leases bound to this replica's streams.
    leases: LeaseTable,
    /// The etcd lease and last etcd refresh of each local lease.
    bound: Mutex<HashMap<LeaseId, Bound>>,
    /// One per watched service.
    hubs: tokio::sync::Mutex<HashMap<String, Arc<Hub>>>,
}

#[derive(Clone, Copy)]
struct Bound {
    etcd: i64,
    refreshed: Instant,
}

/// A lease record as stored under `leases/`.
struct Record {
    etcd: i64,
    ttl: Duration,
    service: String,
    address: String,
}

fn unreachable(err: etcd_client::Error) -> RegistryError {
    RegistryError::Unavailable(format!("etcd unreachable: {err}"))
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` and keeps the state under `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, RegistryError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2));
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(unreachable)?;
        let status = client.status().await.map_err(unreachable)?;
        let epoch = status.header().map_or(0, |h| h.cluster_id());
        let inner = Arc::new(Inner {
            client,
            prefix: prefix.to_owned(),
            epoch,
            leases: LeaseTable::default(),
            bound: Mutex::new(HashMap::new()),
            hubs: tokio::sync::Mutex::new(HashMap::new()),
        });
        let stalls = inner.clone();
        let tasks = vec![
            tokio::spawn(expire_leases(inner.clone())),
            tokio::spawn(async move { stalls.leases.watch_for_stalls().await }),
        ];
        Ok(Self { inner, tasks })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Inner {
    fn endpoint_key(&self, service: &str, address: &str) -> String {
        format!("{}services/{service}/{address}", self.prefix)
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}services/{service}/", self.prefix)
    }

    fn lease_key(&self, id: LeaseId) -> String {
        format!("{}leases/{id}", self.prefix)
    }

    async fn record(&self, id: LeaseId) -> Result<Record, RegistryError> {
        let reply = self
            .client
            .clone()
            .get(self.lease_key(id), None)
            .await
            .map_err(unreachable)?;
        let not_found = || RegistryError::LeaseNotFound(id.to_string());
        let kv = reply.kvs().first().ok_or_else(not_found)?;
        let text = std::str::from_utf8(kv.value()).map_err(|_| not_found())?;
        let mut parts = text.splitn(4, ' ');
        let mut next = || parts.next().ok_or_else(not_found);
        Ok(Record {
            etcd: next()?.parse().map_err(|_| not_found())?,
            ttl: Duration::from_millis(next()?.parse().map_err(|_| not_found())?),
            service: next()?.to_owned(),
            address: next()?.to_owned(),
        })
    }

    /// Ends a lease of this replica: locally and in etcd, in the background
    /// (callers may not await).
    fn revoke_in_background(self: &Arc<Self>, id: LeaseId) {
        let Some(bound) = self.bound.lock().unwrap().remove(&id) else {
            return;
        };
        let mut client = self.client.clone();
        tokio::spawn(async move {
            if let Err(err) = client.lease_revoke(bound.etcd).await {
                tracing::warn!(%err, "could not revoke an etcd lease; it ends with its TTL");
            }
        });
    }

    /// The endpoints under `service` and the revision they were read at.
    async fn list_service(&self, service: &str) -> Result<(Vec<Endpoint>, u64), RegistryError> {
        let reply = self
            .client
            .clone()
            .get(
                self.service_prefix(service),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(unreachable)?;
        let revision = reply.header().map_or(0, |h| h.revision()) as u64;
        let endpoints = reply
            .kvs()
            .iter()
            .filter_map(|kv| pb::Endpoint::decode(kv.value()).ok().map(Endpoint::from))
            .collect();
        Ok((endpoints, revision))
    }

    async fn hub(self: &Arc<Self>, service: &str) -> Result<Arc<Hub>, RegistryError> {
        let mut hubs = self.hubs.lock().await;
        if let Some(hub) = hubs.get(service) {
            return Ok(hub.clone());
        }
        let (endpoints, revision) = self.list_service(service).await?;
        let mut set = EndpointSet::new();
        set.apply(Update::Reset(endpoints));
        let hub = Arc::new(Hub {
            updates: broadcast::channel(HISTORY).0,
            state: Mutex::new(HubState {
                set,
                version: revision,
                history: VecDeque::new(),
                floor: revision,
            }),
        });
        tokio::spawn(follow(self.clone(), service.to_owned(), hub.clone()));
        hubs.insert(service.to_owned(), hub.clone());
        Ok(hub)
    }
}

/// The fan-out of one service's etcd watch to this replica's watchers.
struct Hub {
    updates: broadcast::Sender<Arc<Versioned>>,
    state: Mutex<HubState>,
}

struct HubState {
    set: EndpointSet,
    /// The etcd revision the set is at.
    version: u64,
    /// The last updates, to resume watchers from.
    history: VecDeque<Arc<Versioned>>,
    /// The version before the oldest update in `history`.
    floor: u64,
}

impl Hub {
    /// Applies `delta` at `revision` and sends it to every watcher.
    fn publish(&self, epoch: u64, revision: u64, delta: Delta) {
        let mut state = self.state.lock().unwrap();
        state.version = state.version.max(revision);
        let update = Update::Delta(delta);
        if state.set.apply(update.clone()).is_empty() {
            return;
        }
        let versioned = Arc::new(Versioned {
            epoch,
            version: state.version,
            update,
        });
        if state.history.len() == HISTORY {
            if let Some(oldest) = state.history.pop_front() {
                state.floor = oldest.version;
            }
        }
        state.history.push_back(versioned.clone());
        let _ = self.updates.send(versioned);
    }

    /// What a watcher at `from` must be sent first, and its receiver of
    /// later updates, taken together under the lock.
    fn subscribe(
        &self,
        epoch: u64,
        from: Option<Position>,
    ) -> (Vec<Arc<Versioned>>, broadcast::Receiver<Arc<Versioned>>) {
        let state = self.state.lock().unwrap();
        let receiver = self.updates.subscribe();
        if let Some(from) = from.filter(|p| p.epoch == epoch && p.version <= state.version) {
            let missed: Vec<_> = state
                .history
                .iter()
                .filter(|u| u.version > from.version)
                .cloned()
                .collect();
            // Every update after `floor` is still in the history.
            let covered = from.version >= state.floor;
            if covered {
                return (missed, receiver);
            }
        }
        let reset = Arc::new(Versioned {
            epoch,
            version: state.version,
            update: state.set.to_reset(),
        });
        (vec![reset], receiver)
    }
}

/// The difference between `set` and `endpoints`, as one delta.
fn difference(set: &EndpointSet, endpoints: Vec<Endpoint>) -> Delta {
    let mut delta = Delta::default();
    let present: HashSet<String> = endpoints.iter().map(|e| e.address.clone()).collect();
    for endpoint in endpoints {
        match set.get(&endpoint.address) {
            None => delta.added.push(endpoint),
            Some(old) if **old != endpoint => delta.updated.push(endpoint),
            Some(_) => {}
        }
    }
    for old in set.iter() {
        if !present.contains(&old.address) {
            delta.removed.push(old.address.clone());
        }
    }
    delta
}

/// Follows one service's keys in etcd for ever, feeding its hub. After a
/// broken or compacted watch it re-lists and publishes the difference.
async fn follow(inner: Arc<Inner>, service: String, hub: Arc<Hub>) {
    let prefix = inner.service_prefix(&service);
    let mut relist = false;
    loop {
        if relist {
            match inner.list_service(&service).await {
                Ok((endpoints, revision)) => {
                    let delta = difference(&hub.state.lock().unwrap().set, endpoints);
                    hub.publish(inner.epoch, revision, delta);
                }
                Err(err) => {
                    tracing::warn!(%service, %err, "cannot re-list; watchers keep their set");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        relist = true;
        let start = hub.state.lock().unwrap().version as i64 + 1;
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut stream = match inner
            .client
            .clone()
            .watch(prefix.clone(), Some(options))
            .await
        {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(%service, %err, "cannot watch etcd; watchers keep their set");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Ok(Some(reply)) = stream.message().await {
            if reply.compact_revision() > 0 || reply.canceled() {
                tracing::info!(%service, "etcd watch compacted or cancelled; re-listing");
                break;
            }
            let revision = reply.header().map_or(0, |h| h.revision()) as u64;
            let mut delta = Delta::default();
            for event in reply.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(address) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(prefix.as_str()))
                else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => {
                        if let Ok(endpoint) = pb::Endpoint::decode(kv.value()) {
                            let endpoint = Endpoint::from(endpoint);
                            let present = hub.state.lock().unwrap().set.contains(address);
                            if present {
                                delta.updated.push(endpoint);
                            } else {
                                delta.added.push(endpoint);
                            }
                        }
                    }
                    EventType::Delete => delta.removed.push(address.to_owned()),
                }
            }
            hub.publish(inner.epoch, revision, delta);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Revokes the etcd leases whose local heartbeats stopped.
async fn expire_leases(inner: Arc<Inner>) {
    loop {
        let (expired, next) = inner.leases.take_expired(Instant::now());
        for (id, lease) in expired {
            tracing::info!(service = %lease.service, address = %lease.address, "lease expired");
            inner.revoke_in_background(id);
        }
        match next {
            Some(deadline) => tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = inner.leases.earlier_deadline() => {}
            },
            None => inner.leases.earlier_deadline().await,
        }
    }
}

/// An operator call the etcd store does not offer yet.
fn not_yet(method: &str) -> RegistryError {
    RegistryError::Unsupported(format!(
        "{method} is not supported by the etcd store yet; drain or stop the backend itself"
    ))
}

#[tonic::async_trait]
impl Store for EtcdStore {
    async fn leased_endpoints(&self, service: &str) -> Result<LeasedSnapshot, RegistryError> {
        // Lease ages live with the replica that binds each lease; the etcd
        // store does not gather them across replicas yet.
        let snapshot = self.resolve(service).await?;
        Ok(LeasedSnapshot {
            epoch: snapshot.epoch,
            version: snapshot.version,
            endpoints: snapshot
                .endpoints
                .into_iter()
                .map(|endpoint| LeasedEndpoint {
                    endpoint,
                    lease_age: Duration::ZERO,
                    ttl: Duration::ZERO,
                })
                .collect(),
        })
    }

    async fn drain_address(&self, _service: &str, _address: &str) -> Result<(), RegistryError> {
        Err(not_yet("DrainEndpoint"))
    }

    async fn deregister_address(
        &self,
        _service: &str,
        _address: &str,
    ) -> Result<(), RegistryError> {
        Err(not_yet("DeregisterEndpoint"))
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    async fn register(&self, new: NewEndpoint) -> Result<Grant, RegistryError> {
        let inner = &self.inner;
        let mut client = inner.client.clone();
        let etcd_ttl = (new.ttl * ETCD_TTL_FACTOR).as_secs().max(5) as i64;
        let etcd = client
            .lease_grant(etcd_ttl, None)
            .await
            .map_err(unreachable)?
            .id();
        let id = LeaseId::random();
        let record = format!(
            "{etcd} {} {} {}",
            new.ttl.as_millis(),
            new.service,
            new.address
        );
        let endpoint = pb::Endpoint::from(&Endpoint {
            address: new.address.to_string(),
            metadata: new.metadata,
            state: EndpointState::Serving,
        });
        let put = async {
            client
                .put(
                    inner.lease_key(id),
                    record,
                    Some(PutOptions::new().with_lease(etcd)),
                )
                .await?;
            client
                .put(
                    inner.endpoint_key(&new.service, &new.address),
                    endpoint.encode_to_vec(),
                    Some(PutOptions::new().with_lease(etcd).with_prev_key()),
                )
                .await
        };
        let reply = match put.await {
            Ok(reply) => reply,
            Err(err) => {
                let _ = client.lease_revoke(etcd).await;
                return Err(unreachable(err));
            }
        };
        // A takeover: the old holder's lease ends (its record with it).
        if let Some(previous) = reply.prev_key().filter(|kv| kv.lease() != etcd) {
            let _ = client.lease_revoke(previous.lease()).await;
        }
        inner
            .leases
            .grant(id, new.service.clone(), new.address.clone(), new.ttl);
        inner.bound.lock().unwrap().insert(
            id,
            Bound {
                etcd,
                refreshed: Instant::now(),
            },
        );
        tracing::info!(service = %new.service, address = %new.address, "endpoint registered");
        Ok(Grant {
            lease: id,
            ttl: new.ttl,
            epoch: inner.epoch,
        })
    }

    async fn keep_alive(
        &self,
        lease: LeaseId,
        stream: StreamId,
    ) -> Result<Duration, RegistryError> {
        let inner = &self.inner;
        let local = inner.bound.lock().unwrap().get(&lease).copied();
        let (bound, ttl) = match local {
            Some(bound) => (bound, inner.leases.refresh(lease, stream)?),
            None => {
                // A lease granted (or kept) by another replica moves here.
                let record = inner.record(lease).await?;
                inner.leases.grant(
                    lease,
                    record.service.into(),
                    record.address.into(),
                    record.ttl,
                );
                let bound = Bound {
                    etcd: record.etcd,
                    refreshed: Instant::now() - record.ttl,
                };
                inner.bound.lock().unwrap().insert(lease, bound);
                (bound, inner.leases.refresh(lease, stream)?)
            }
        };
        if bound.refreshed.elapsed() >= ttl {
            let mut client = inner.client.clone();
            let (mut keeper, mut replies) = client
                .lease_keep_alive(bound.etcd)
                .await
                .map_err(unreachable)?;
            keeper.keep_alive().await.map_err(unreachable)?;
            match replies.message().await.map_err(unreachable)? {
                Some(reply) if reply.ttl() > 0 => {
                    if let Some(b) = inner.bound.lock().unwrap().get_mut(&lease) {
                        b.refreshed = Instant::now();
                    }
                }
                _ => {
                    inner.leases.revoke(lease);
                    inner.bound.lock().unwrap().remove(&lease);
                    return Err(RegistryError::LeaseNotFound(lease.to_string()));
                }
            }
        }
        Ok(ttl)
    }

    fn stream_ended(&self, stream: StreamId, leases: &HashSet<LeaseId>) {
        for &id in leases {
            if let Some(lease) = self.inner.leases.revoke_if_bound(id, stream) {
                tracing::info!(service = %lease.service, address = %lease.address, "keepalive stream ended; endpoint removed");
                self.inner.revoke_in_background(id);
            }
        }
    }

    async fn drain(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let record = inner.record(lease).await?;
        let key = inner.endpoint_key(&record.service, &record.address);
        let mut client = inner.client.clone();
        let reply = client.get(key.clone(), None).await.map_err(unreachable)?;
        let kv = reply
            .kvs()
            .first()
            .filter(|kv| kv.lease() == record.etcd)
            .ok_or_else(|| RegistryError::LeaseNotFound(lease.to_string()))?;
        let mut endpoint = pb::Endpoint::decode(kv.value())
            .map_err(|_| RegistryError::LeaseNotFound(lease.to_string()))?;
        endpoint.set_state(pb::EndpointState::Draining);
        client
            .put(
                key,
                endpoint.encode_to_vec(),
                Some(PutOptions::new().with_lease(record.etcd)),
            )
            .await
            .map_err(unreachable)?;
        Ok(())
    }

    async fn deregister(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let record = inner.record(lease).await?;
        inner
            .client
            .clone()
            .lease_revoke(record.etcd)
            .await
            .map_err(unreachable)?;
        inner.leases.revoke(lease);
        inner.bound.lock().unwrap().remove(&lease);
        Ok(())
    }

    async fn watch(
        &self,
        service: &str,
        from: Option<Position>,
    ) -> Result<UpdateStream, RegistryError> {
        let hub = self.inner.hub(service).await?;
        let (first, receiver) = hub.subscribe(self.inner.epoch, from);
        let epoch = self.inner.epoch;
        let rest =
            futures_util::stream::unfold((receiver, hub), move |(mut receiver, hub)| async move {
                let update = match receiver.recv().await {
                    Ok(update) => update,
                    Err(RecvError::Lagged(_)) => {
                        let (mut first, fresh) = hub.subscribe(epoch, None);
                        receiver = fresh;
                        first.pop()?
                    }
                    Err(RecvError::Closed) => return None,
                };
                Some((update, (receiver, hub)))
            });
        Ok(Box::pin(futures_util::stream::iter(first).chain(rest)))
    }

    async fn resolve(&self, service: &str) -> Result<ServiceSnapshot, RegistryError> {
        let (endpoints, version) = self.inner.list_service(service).await?;
        Ok(ServiceSnapshot {
            epoch: self.inner.epoch,
            version,
            endpoints,
        })
    }

    async fn list(&self) -> Result<Vec<ServiceCount>, RegistryError> {
        let prefix = format!("{}services/", self.inner.prefix);
        let reply = self
            .inner
            .client
            .clone()
            .get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(unreachable)?;
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for kv in reply.kvs() {
            if let Some((service, _)) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(prefix.as_str()))
                .and_then(|rest| rest.split_once('/'))
            {
                *counts.entry(service.to_owned()).or_default() += 1;
            }
        }
        Ok(counts
            .into_iter()
            .map(|(service, endpoints)| ServiceCount { service, endpoints })
            .collect())
    }

    fn lease_count(&self) -> usize {
        self.inner.leases.len()
    }
}
