//! The etcd [`Store`]: several registry replicas share one etcd cluster, and
//! any replica answers any request.
//!
//! Layout under the prefix (default `/switchboard/`), every key but the
//! last on the endpoint's etcd lease:
//! - `services/<service>/<address>`: the endpoint (a protobuf `Endpoint`),
//!   what watchers follow;
//! - `leases/<lease id>`: `<etcd lease> <ttl ms> <service> <address>`, so
//!   any replica can take a lease over by its id;
//! - `holders/<service>/<address>`: `<lease id> <ttl ms> <granted unix ms>`,
//!   so operators can act on an address and see the lease's age;
//! - `removed/<lease id>`: an operator's removal, on a lease of its own
//!   that outlives any TTL, so the holder is told and does not re-register.
//!
//! The epoch is the etcd cluster's id, the version etcd's revision, so both
//! survive replica restarts.
//!
//! A lease bound to a KeepAlive stream of this replica also has a local
//! deadline in a [`LeaseTable`] (stall protection included): the replica
//! revokes the etcd lease when the stream breaks or the heartbeats stop.
//! Heartbeats never wait on etcd. The etcd lease lives [`ETCD_TTL_FACTOR`]
//! TTLs and is refreshed in the background once per TTL rather than on each
//! heartbeat (every TTL/3): a third of the etcd load per endpoint. The
//! margin is what lets a replica stalled for 2×TTL (last refresh up to
//! 1⅓ TTL earlier) find its leases still in etcd, and what a backend has to
//! move to another replica with the same lease when its replica dies.
//! While etcd is down, heartbeats still succeed (the backends are alive;
//! etcd keeps the leases and renews them when it comes back), writes get
//! UNAVAILABLE and the replica's health is NOT_SERVING.
//!
//! One etcd watch per watched service per replica (a hub) feeds
//! all of the replica's watchers. A compacted or broken etcd watch is
//! followed by a re-list whose difference is sent as a delta: never an
//! empty reset. A hub nobody watched for two checks in a row ends.

mod hub;
pub mod local;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::hub::{difference, follow, to_delta, Hub, Subscription};
use super::lease::{LeaseId, LeaseTable, StreamId};
use super::metrics::RegistryMetrics;
use super::store::{
    Grant, LeasedEndpoint, LeasedSnapshot, NewEndpoint, Position, ServiceCount, ServiceSnapshot,
    Store, UpdateStream,
};
use super::{RegistryConfig, RegistryError};
use crate::discovery::{Endpoint, EndpointSet, EndpointState, Update, Versioned};
use crate::proto::registry as pb;

/// The etcd lease lives this many switchboard TTLs; see the module doc.
pub const ETCD_TTL_FACTOR: u32 = 4;
/// How long an operator's removal is remembered: far longer than any TTL.
const REMOVED_TTL_SECS: i64 = 3600;
/// How often etcd's reachability is checked.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a probe or a background etcd call may take.
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The etcd store's own metrics, next to the registry's.
#[derive(Debug, Clone, Default)]
struct EtcdMetrics {
    reachable: Gauge,
    watch_resyncs: Counter,
    lease_refreshes: Counter,
    lease_refresh_failures: Counter,
}

/// Registry state in etcd, shared by every replica on the same prefix.
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// The expiry, stall, reachability and removal tasks.
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    client: Client,
    prefix: String,
    /// The etcd cluster id.
    epoch: u64,
    /// Local deadlines of the leases bound to this replica's streams.
    leases: LeaseTable,
    /// The etcd lease and its last refresh, for each local lease.
    bound: Mutex<HashMap<LeaseId, Bound>>,
    /// Removals this replica heard of, to answer their holders at once.
    removed: Mutex<HashSet<LeaseId>>,
    /// One per watched service.
    hubs: tokio::sync::Mutex<HashMap<String, Arc<Hub>>>,
    max_endpoints_per_service: usize,
    max_services: usize,
    metrics: RegistryMetrics,
    etcd_metrics: EtcdMetrics,
    /// Whether etcd answers, as the last probe found.
    reachable: tokio::sync::watch::Sender<bool>,
    /// Set when the store is dropped, to end its background tasks.
    stop: tokio::sync::watch::Sender<bool>,
    /// Set when this replica shuts down: its streams end, its backends
    /// carry their leases to another replica.
    closing: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Copy)]
struct Bound {
    etcd: i64,
    ttl: Duration,
    refreshed: Instant,
    refreshing: bool,
}

/// A lease record as stored under `leases/`.
struct Record {
    etcd: i64,
    ttl: Duration,
    service: String,
    address: String,
}

/// A holder record as stored under `holders/`.
struct Holder {
    lease: LeaseId,
    ttl: Duration,
    granted_unix_ms: u64,
}

impl Holder {
    fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let mut parts = text.split(' ');
        Some(Self {
            lease: parts.next()?.parse().ok()?,
            ttl: Duration::from_millis(parts.next()?.parse().ok()?),
            granted_unix_ms: parts.next()?.parse().ok()?,
        })
    }
}

fn unreachable(err: etcd_client::Error) -> RegistryError {
    let why = match &err {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    RegistryError::Unavailable(format!("etcd unreachable: {why}"))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn endpoint_not_found(service: &str, address: &str) -> RegistryError {
    RegistryError::EndpointNotFound {
        service: service.to_owned(),
        address: address.to_owned(),
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` and keeps the state under `prefix`,
    /// capped and counted as `config` says.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        config: &RegistryConfig,
    ) -> Result<Self, RegistryError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(ETCD_CALL_TIMEOUT)
            .with_timeout(ETCD_CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(unreachable)?;
        let status = client.status().await.map_err(unreachable)?;
        let epoch = status.header().map_or(0, |h| h.cluster_id());
        let etcd_metrics = EtcdMetrics::default();
        etcd_metrics.reachable.set(1);
        let inner = Arc::new(Inner {
            client,
            prefix: prefix.to_owned(),
            epoch,
            leases: LeaseTable::default(),
            bound: Mutex::new(HashMap::new()),
            removed: Mutex::new(HashSet::new()),
            hubs: tokio::sync::Mutex::new(HashMap::new()),
            max_endpoints_per_service: config.max_endpoints_per_service,
            max_services: config.max_services,
            metrics: config.metrics.clone(),
            etcd_metrics,
            reachable: tokio::sync::watch::channel(true).0,
            stop: tokio::sync::watch::channel(false).0,
            closing: std::sync::atomic::AtomicBool::new(false),
        });
        let stalls = inner.clone();
        let tasks = vec![
            tokio::spawn(expire_leases(inner.clone())),
            tokio::spawn(async move { stalls.leases.watch_for_stalls().await }),
            tokio::spawn(probe(inner.clone())),
            tokio::spawn(follow_removals(inner.clone())),
        ];
        Ok(Self { inner, tasks })
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.inner.stop.send_replace(true);
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

    fn holder_key(&self, service: &str, address: &str) -> String {
        format!("{}holders/{service}/{address}", self.prefix)
    }

    fn lease_key(&self, id: LeaseId) -> String {
        format!("{}leases/{id}", self.prefix)
    }

    fn removed_key(&self, id: LeaseId) -> String {
        format!("{}removed/{id}", self.prefix)
    }

    fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    async fn stopped(&self) {
        let _ = self.stop.subscribe().wait_for(|stopped| *stopped).await;
    }

    /// The lease `id`'s record, or why there is none: removed by an
    /// operator, or not found.
    async fn record(&self, id: LeaseId) -> Result<Record, RegistryError> {
        let reply = self
            .client
            .clone()
            .txn(Txn::new().and_then(vec![
                TxnOp::get(self.lease_key(id), None),
                TxnOp::get(
                    self.removed_key(id),
                    Some(GetOptions::new().with_count_only()),
                ),
            ]))
            .await
            .map_err(unreachable)?;
        let mut replies = reply.op_responses().into_iter();
        let (Some(TxnOpResponse::Get(record)), Some(TxnOpResponse::Get(removed))) =
            (replies.next(), replies.next())
        else {
            return Err(RegistryError::Unavailable(
                "etcd unreachable: unexpected transaction reply".into(),
            ));
        };
        let missing = || {
            if removed.count() > 0 {
                RegistryError::RemovedByOperator(id.to_string())
            } else {
                RegistryError::LeaseNotFound(id.to_string())
            }
        };
        let kv = record.kvs().first().ok_or_else(missing)?;
        let text = std::str::from_utf8(kv.value()).map_err(|_| missing())?;
        let mut parts = text.splitn(4, ' ');
        let mut next = || parts.next().ok_or_else(missing);
        Ok(Record {
            etcd: next()?.parse().map_err(|_| missing())?,
            ttl: Duration::from_millis(next()?.parse().map_err(|_| missing())?),
            service: next()?.to_owned(),
            address: next()?.to_owned(),
        })
    }

    /// Ends a lease of this replica, locally at once and in etcd in the
    /// background (callers may not await), retrying while etcd is away.
    fn revoke_in_background(self: &Arc<Self>, id: LeaseId) {
        let Some(bound) = self
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
        else {
            return;
        };
        let inner = self.clone();
        tokio::spawn(async move {
            // Past the etcd lease's own TTL there is nothing left to end.
            let give_up = Instant::now() + bound.ttl * ETCD_TTL_FACTOR;
            let mut pause = Duration::from_millis(100);
            loop {
                match inner.client.clone().lease_revoke(bound.etcd).await {
                    Ok(_) => return,
                    // Already gone (expired, or revoked by another replica).
                    Err(etcd_client::Error::GRpcStatus(status))
                        if status.code() == tonic::Code::NotFound =>
                    {
                        return
                    }
                    Err(err) if Instant::now() >= give_up || inner.is_stopped() => {
                        tracing::warn!(%err, "could not revoke an etcd lease; it ends with its TTL");
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// Refreshes the etcd lease behind local lease `id` in the background,
    /// unless a refresh is already under way or not due.
    fn refresh_if_due(self: &Arc<Self>, id: LeaseId) {
        let etcd = {
            let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b) = bound.get_mut(&id) else { return };
            if b.refreshing || b.refreshed.elapsed() < b.ttl {
                return;
            }
            b.refreshing = true;
            b.etcd
        };
        let inner = self.clone();
        tokio::spawn(async move {
            // Opening the keepalive stream sends one keepalive and reads its
            // answer: that is the whole refresh.
            let refreshed = tokio::time::timeout(
                ETCD_CALL_TIMEOUT,
                inner.client.clone().lease_keep_alive(etcd),
            )
            .await;
            let mut bound = inner.bound.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b) = bound.get_mut(&id) else { return };
            b.refreshing = false;
            match refreshed {
                Ok(Ok(_)) => {
                    b.refreshed = Instant::now();
                    inner.etcd_metrics.lease_refreshes.inc();
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                    // etcd no longer has it (answered TTL 0): revoked
                    // elsewhere, or expired while nobody refreshed it. The
                    // next heartbeat is told.
                    bound.remove(&id);
                    drop(bound);
                    if let Some(lease) = inner.leases.revoke(id) {
                        tracing::info!(service = %lease.service, address = %lease.address, "etcd lease gone; endpoint no longer held here");
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    // Retried at the next heartbeat; the etcd lease has
                    // three more TTLs to live.
                    inner.etcd_metrics.lease_refresh_failures.inc();
                }
            }
        });
    }

    /// The endpoints under `service` and the revision they were read at.
    async fn list_service(&self, service: &str) -> Result<(Vec<Endpoint>, u64), RegistryError> {
        self.list_service_at(service, None).await
    }

    /// The endpoints under `service` as of `revision` (now if `None`; an
    /// error once etcd compacted it away), and the revision read.
    async fn list_service_at(
        &self,
        service: &str,
        revision: Option<u64>,
    ) -> Result<(Vec<Endpoint>, u64), RegistryError> {
        let mut options = GetOptions::new().with_prefix();
        if let Some(revision) = revision {
            options = options.with_revision(revision as i64);
        }
        let reply = self
            .client
            .clone()
            .get(self.service_prefix(service), Some(options))
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

    /// Subscribes to `service`'s hub, starting the hub if there is none. A
    /// watcher older than the hub's history (it resumed at a replica that
    /// started watching after it) gets the difference from its version, read
    /// from etcd's history, rather than a reset; a reset only once etcd
    /// compacted that version away.
    async fn subscribe(
        self: &Arc<Self>,
        service: &str,
        from: Option<Position>,
    ) -> Result<(Subscription, Arc<Hub>), RegistryError> {
        let (mut subscription, hub) = self.hub_subscription(service, from).await?;
        if let (Some(version), Some(reset)) =
            (subscription.older_than_history, subscription.first.first())
        {
            if let (Update::Reset(now), Ok((then, _))) = (
                &reset.update,
                self.list_service_at(service, Some(version)).await,
            ) {
                let mut old = EndpointSet::new();
                old.apply(Update::Reset(then));
                let delta = to_delta(&old, difference(&old, now.clone()));
                subscription.first = match delta.is_empty() {
                    true => Vec::new(),
                    false => vec![Arc::new(Versioned {
                        epoch: reset.epoch,
                        version: reset.version,
                        update: Update::Delta(delta),
                    })],
                };
            }
        }
        Ok((subscription, hub))
    }

    /// Subscribes to `service`'s hub, starting the hub if there is none.
    /// Under the hubs lock, so a hub cannot retire between the two.
    async fn hub_subscription(
        self: &Arc<Self>,
        service: &str,
        from: Option<Position>,
    ) -> Result<(Subscription, Arc<Hub>), RegistryError> {
        let mut hubs = self.hubs.lock().await;
        if let Some(hub) = hubs.get(service) {
            return Ok((hub.subscribe(self.epoch, from), hub.clone()));
        }
        let (endpoints, revision) = self.list_service(service).await?;
        let hub = Arc::new(Hub::new(endpoints, revision));
        let subscription = hub.subscribe(self.epoch, from);
        tokio::spawn(follow(self.clone(), service.to_owned(), hub.clone()));
        hubs.insert(service.to_owned(), hub.clone());
        Ok((subscription, hub))
    }

    /// Removes `hub` if still nobody watches it; true if it was removed.
    async fn retire_hub(&self, service: &str, hub: &Arc<Hub>) -> bool {
        let mut hubs = self.hubs.lock().await;
        if !hub.idle() || !hubs.get(service).is_some_and(|h| Arc::ptr_eq(h, hub)) {
            return false;
        }
        hubs.remove(service);
        true
    }

    /// Refuses a new endpoint past the caps. Checked before the write, so
    /// replicas registering at the same instant may pass a cap by a few.
    async fn check_caps(&self, service: &str, address: &str) -> Result<(), RegistryError> {
        let mut client = self.client.clone();
        let count_only = || Some(GetOptions::new().with_prefix().with_count_only());
        let present = client
            .txn(Txn::new().and_then(vec![
                TxnOp::get(self.service_prefix(service), count_only()),
                TxnOp::get(
                    self.endpoint_key(service, address),
                    Some(GetOptions::new().with_count_only()),
                ),
            ]))
            .await
            .map_err(unreachable)?;
        let counts: Vec<i64> = present
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(get) => get.count(),
                _ => 0,
            })
            .collect();
        let (in_service, at_address) = (counts.first().copied(), counts.get(1).copied());
        if at_address.unwrap_or(0) > 0 {
            // A takeover adds nothing.
            return Ok(());
        }
        let in_service = in_service.unwrap_or(0) as usize;
        if in_service >= self.max_endpoints_per_service {
            return Err(RegistryError::ResourceExhausted {
                what: format!("endpoints per service ({service})"),
                limit: self.max_endpoints_per_service,
            });
        }
        if in_service == 0 {
            let services = self.service_counts().await?;
            if services.len() >= self.max_services {
                return Err(RegistryError::ResourceExhausted {
                    what: "services".into(),
                    limit: self.max_services,
                });
            }
        }
        Ok(())
    }

    /// Endpoints per service, by name.
    async fn service_counts(&self) -> Result<BTreeMap<String, usize>, RegistryError> {
        let prefix = format!("{}services/", self.prefix);
        let reply = self
            .client
            .clone()
            .get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(unreachable)?;
        let mut counts = BTreeMap::new();
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
        Ok(counts)
    }

    /// Notes an operator's removal of `id` heard from etcd: a holder bound
    /// here stops being kept alive and is told at its next heartbeat.
    fn note_removed(&self, id: LeaseId) {
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        if removed.len() >= 100_000 {
            removed.clear();
        }
        removed.insert(id);
        drop(removed);
        self.bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.leases.revoke(id);
    }

    fn was_removed(&self, id: LeaseId) -> bool {
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    /// Sets the endpoint at `key` to `state`, if it is still on the etcd
    /// lease `etcd` (any lease when `None`). `Ok(false)` if it is not there.
    async fn set_state(
        &self,
        key: &str,
        etcd: Option<i64>,
        state: pb::EndpointState,
    ) -> Result<bool, RegistryError> {
        let mut client = self.client.clone();
        // A concurrent re-registration wins: retried on the fresh value.
        for _ in 0..5 {
            let reply = client.get(key, None).await.map_err(unreachable)?;
            let Some(kv) = reply
                .kvs()
                .first()
                .filter(|kv| etcd.is_none_or(|e| kv.lease() == e))
            else {
                return Ok(false);
            };
            let Ok(mut endpoint) = pb::Endpoint::decode(kv.value()) else {
                return Ok(false);
            };
            endpoint.set_state(state);
            let written = client
                .txn(
                    Txn::new()
                        .when(vec![Compare::mod_revision(
                            key,
                            CompareOp::Equal,
                            kv.mod_revision(),
                        )])
                        .and_then(vec![TxnOp::put(
                            key,
                            endpoint.encode_to_vec(),
                            Some(PutOptions::new().with_lease(kv.lease())),
                        )]),
                )
                .await
                .map_err(unreachable)?;
            if written.succeeded() {
                return Ok(true);
            }
        }
        Err(RegistryError::Unavailable(
            "the endpoint kept changing; try again".into(),
        ))
    }
}

/// Revokes the etcd leases whose local heartbeats stopped.
async fn expire_leases(inner: Arc<Inner>) {
    loop {
        let (expired, next) = inner.leases.take_expired(Instant::now());
        for (id, lease) in expired {
            tracing::info!(service = %lease.service, address = %lease.address, "lease expired");
            inner.metrics.expiries.inc();
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

/// Keeps `reachable` (the replica's health) and its gauge up to date.
async fn probe(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let ok = matches!(
            tokio::time::timeout(ETCD_CALL_TIMEOUT, inner.client.clone().status()).await,
            Ok(Ok(_))
        );
        inner.etcd_metrics.reachable.set(i64::from(ok));
        let changed = inner.reachable.send_if_modified(|was| {
            let changed = *was != ok;
            *was = ok;
            changed
        });
        if changed {
            match ok {
                true => tracing::info!("etcd reachable again; serving"),
                false => tracing::warn!("etcd unreachable; NOT_SERVING, watchers keep their sets"),
            }
        }
    }
}

/// Hears of operators' removals made through any replica.
async fn follow_removals(inner: Arc<Inner>) {
    let prefix = format!("{}removed/", inner.prefix);
    loop {
        if let Ok(mut stream) = inner
            .client
            .clone()
            .watch(
                prefix.clone(),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
        {
            while let Ok(Some(reply)) = stream.message().await {
                for event in reply.events() {
                    if event.event_type() != etcd_client::EventType::Put {
                        continue;
                    }
                    let id = event
                        .kv()
                        .and_then(|kv| kv.key_str().ok())
                        .and_then(|k| k.strip_prefix(prefix.as_str()))
                        .and_then(|id| id.parse::<LeaseId>().ok());
                    if let Some(id) = id {
                        inner.note_removed(id);
                    }
                }
            }
        }
        // A removal missed while the watch was down is still found through
        // the `removed/` key once the holder's etcd lease is gone.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tonic::async_trait]
impl Store for EtcdStore {
    fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    async fn register(&self, new: NewEndpoint) -> Result<Grant, RegistryError> {
        let inner = &self.inner;
        inner.check_caps(&new.service, &new.address).await?;
        let mut client = inner.client.clone();
        let etcd_ttl = (new.ttl * ETCD_TTL_FACTOR).as_secs().max(5) as i64;
        let etcd = client
            .lease_grant(etcd_ttl, None)
            .await
            .map_err(unreachable)?
            .id();
        let id = LeaseId::random();
        let on_lease = || Some(PutOptions::new().with_lease(etcd));
        let endpoint = pb::Endpoint::from(&Endpoint {
            address: new.address.to_string(),
            metadata: new.metadata,
            state: EndpointState::Serving,
        });
        let txn = Txn::new().and_then(vec![
            TxnOp::put(
                inner.lease_key(id),
                format!(
                    "{etcd} {} {} {}",
                    new.ttl.as_millis(),
                    new.service,
                    new.address
                ),
                on_lease(),
            ),
            TxnOp::put(
                inner.holder_key(&new.service, &new.address),
                format!("{id} {} {}", new.ttl.as_millis(), unix_ms()),
                on_lease(),
            ),
            TxnOp::put(
                inner.endpoint_key(&new.service, &new.address),
                endpoint.encode_to_vec(),
                Some(PutOptions::new().with_lease(etcd).with_prev_key()),
            ),
        ]);
        let reply = match client.txn(txn).await {
            Ok(reply) => reply,
            Err(err) => {
                let _ = client.lease_revoke(etcd).await;
                return Err(unreachable(err));
            }
        };
        // A takeover: the old holder's etcd lease ends (its record with it).
        let previous = reply.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Put(put) => put.prev_key().map(|kv| kv.lease()),
            _ => None,
        });
        if let Some(previous) = previous.filter(|&p| p != etcd && p != 0) {
            let _ = client.lease_revoke(previous).await;
            tracing::info!(service = %new.service, address = %new.address, "endpoint re-registered under a new lease");
        } else {
            tracing::info!(service = %new.service, address = %new.address, ttl = ?new.ttl, "endpoint registered");
        }
        inner
            .leases
            .grant(id, new.service.clone(), new.address.clone(), new.ttl);
        inner
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Bound {
                    etcd,
                    ttl: new.ttl,
                    refreshed: Instant::now(),
                    refreshing: false,
                },
            );
        inner.metrics.registrations.inc();
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
        if inner.was_removed(lease) {
            return Err(RegistryError::RemovedByOperator(lease.to_string()));
        }
        let local = inner
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&lease);
        if !local {
            // A lease granted (or kept) by another replica moves here; or
            // one this replica let go, which etcd explains.
            let record = inner.record(lease).await?;
            inner.leases.grant(
                lease,
                record.service.into(),
                record.address.into(),
                record.ttl,
            );
            inner
                .bound
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    lease,
                    Bound {
                        etcd: record.etcd,
                        ttl: record.ttl,
                        // Due at once: the last replica may not have refreshed
                        // it for a while.
                        refreshed: Instant::now() - record.ttl,
                        refreshing: false,
                    },
                );
        }
        let ttl = match inner.leases.refresh(lease, stream) {
            Ok(ttl) => ttl,
            // Expired here meanwhile: etcd says whether it still exists.
            Err(_) => {
                return Err(inner
                    .record(lease)
                    .await
                    .err()
                    .unwrap_or_else(|| RegistryError::LeaseNotFound(lease.to_string())))
            }
        };
        inner.refresh_if_due(lease);
        Ok(ttl)
    }

    fn stream_ended(&self, stream: StreamId, leases: &HashSet<LeaseId>) {
        if self
            .inner
            .closing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Their backends move to another replica with the same leases.
            for &id in leases {
                self.inner.leases.revoke_if_bound(id, stream);
                self.inner
                    .bound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            return;
        }
        for &id in leases {
            if let Some(lease) = self.inner.leases.revoke_if_bound(id, stream) {
                tracing::info!(service = %lease.service, address = %lease.address, "keepalive stream ended; endpoint removed");
                self.inner.metrics.stream_breaks.inc();
                self.inner.revoke_in_background(id);
            }
        }
    }

    async fn drain(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let record = inner.record(lease).await?;
        let key = inner.endpoint_key(&record.service, &record.address);
        if !inner
            .set_state(&key, Some(record.etcd), pb::EndpointState::Draining)
            .await?
        {
            return Err(RegistryError::LeaseNotFound(lease.to_string()));
        }
        inner.metrics.drains.inc();
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
        inner
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease);
        inner.metrics.deregistrations.inc();
        Ok(())
    }

    async fn watch(
        &self,
        service: &str,
        from: Option<Position>,
    ) -> Result<UpdateStream, RegistryError> {
        let (subscription, hub) = self.inner.subscribe(service, from).await?;
        let Subscription {
            first,
            receiver,
            skip_through,
            ..
        } = subscription;
        let epoch = self.inner.epoch;
        let rest = futures_util::stream::unfold(
            (receiver, hub, skip_through),
            move |(mut receiver, hub, mut skip_through)| async move {
                loop {
                    let update: Arc<Versioned> = match receiver.recv().await {
                        Ok(update) => update,
                        Err(RecvError::Lagged(_)) => {
                            let mut fresh = hub.subscribe(epoch, None);
                            receiver = fresh.receiver;
                            skip_through = 0;
                            fresh.first.pop()?
                        }
                        Err(RecvError::Closed) => return None,
                    };
                    if update.version > skip_through {
                        return Some((update, (receiver, hub, skip_through)));
                    }
                }
            },
        );
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
        Ok(self
            .inner
            .service_counts()
            .await?
            .into_iter()
            .map(|(service, endpoints)| ServiceCount { service, endpoints })
            .collect())
    }

    fn lease_count(&self) -> usize {
        self.inner.leases.len()
    }

    async fn leased_endpoints(&self, service: &str) -> Result<LeasedSnapshot, RegistryError> {
        let inner = &self.inner;
        let holders_prefix = format!("{}holders/{service}/", inner.prefix);
        let prefix = || Some(GetOptions::new().with_prefix());
        // One transaction: both ranges at the same revision.
        let reply = inner
            .client
            .clone()
            .txn(Txn::new().and_then(vec![
                TxnOp::get(inner.service_prefix(service), prefix()),
                TxnOp::get(holders_prefix.clone(), prefix()),
            ]))
            .await
            .map_err(unreachable)?;
        let version = reply.header().map_or(0, |h| h.revision()) as u64;
        let mut ranges = reply.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (endpoints, holders) = (ranges.next(), ranges.next());
        let holders: HashMap<&str, Holder> = holders
            .iter()
            .flat_map(|h| h.kvs())
            .filter_map(|kv| {
                let address = kv.key_str().ok()?.strip_prefix(holders_prefix.as_str())?;
                Some((address, Holder::parse(kv.value())?))
            })
            .collect();
        let now = unix_ms();
        let endpoints = endpoints
            .iter()
            .flat_map(|e| e.kvs())
            .filter_map(|kv| pb::Endpoint::decode(kv.value()).ok().map(Endpoint::from))
            .map(|endpoint| {
                let holder = holders.get(endpoint.address.as_str());
                LeasedEndpoint {
                    lease_age: holder.map_or(Duration::ZERO, |h| {
                        Duration::from_millis(now.saturating_sub(h.granted_unix_ms))
                    }),
                    ttl: holder.map_or(Duration::ZERO, |h| h.ttl),
                    endpoint,
                }
            })
            .collect();
        Ok(LeasedSnapshot {
            epoch: inner.epoch,
            version,
            endpoints,
        })
    }

    async fn drain_address(&self, service: &str, address: &str) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let key = inner.endpoint_key(service, address);
        if !inner
            .set_state(&key, None, pb::EndpointState::Draining)
            .await?
        {
            return Err(endpoint_not_found(service, address));
        }
        inner.metrics.drains.inc();
        Ok(())
    }

    async fn deregister_address(&self, service: &str, address: &str) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let mut client = inner.client.clone();
        let reply = client
            .get(inner.holder_key(service, address), None)
            .await
            .map_err(unreachable)?;
        let (lease, etcd) = reply
            .kvs()
            .first()
            .and_then(|kv| Some((Holder::parse(kv.value())?.lease, kv.lease())))
            .ok_or_else(|| endpoint_not_found(service, address))?;
        // Remembered before the lease ends, so no heartbeat in between can
        // be told "not found" and re-register.
        let memory = client
            .lease_grant(REMOVED_TTL_SECS, None)
            .await
            .map_err(unreachable)?
            .id();
        client
            .put(
                inner.removed_key(lease),
                "",
                Some(PutOptions::new().with_lease(memory)),
            )
            .await
            .map_err(unreachable)?;
        inner.note_removed(lease);
        match client.lease_revoke(etcd).await {
            Ok(_) => {}
            Err(etcd_client::Error::GRpcStatus(status))
                if status.code() == tonic::Code::NotFound =>
            {
                return Err(endpoint_not_found(service, address))
            }
            Err(err) => return Err(unreachable(err)),
        }
        inner.metrics.deregistrations.inc();
        Ok(())
    }

    fn closing(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn serving(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.inner.reachable.subscribe())
    }

    fn register_metrics(&self, registry: &mut PromRegistry) {
        let r = registry.sub_registry_with_prefix("switchboard_registry_etcd");
        let m = &self.inner.etcd_metrics;
        r.register(
            "reachable",
            "Whether etcd answered the last probe (1) or not (0)",
            m.reachable.clone(),
        );
        r.register(
            "watch_resyncs",
            "Service watches re-listed after a broken or compacted etcd watch",
            m.watch_resyncs.clone(),
        );
        r.register(
            "lease_refreshes",
            "etcd leases refreshed (once per TTL per endpoint)",
            m.lease_refreshes.clone(),
        );
        r.register(
            "lease_refresh_failures",
            "etcd lease refreshes that failed (retried at the next heartbeat)",
            m.lease_refresh_failures.clone(),
        );
    }
}
