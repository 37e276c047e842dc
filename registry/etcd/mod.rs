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
//!
//! Service configs live at `configs/<service>` (JSON, off any lease),
//! versioned by their key's mod revision. One prefix watch per replica
//! feeds them to every stream that follows a config.

mod hub;
mod keys;
pub mod local;
mod store;
mod tasks;
mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
use prost::Message;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::hub::{follow, Hub};
use self::keys::{unix_ms, Holder};
use self::tasks::{expire_leases, follow_configs, follow_removals, probe};
use super::configs::ConfigFeed;
use super::lease::{LeaseId, LeaseTable, RemovedLeases, StreamId, REMOVED_MEMORY};
use super::metrics::RegistryMetrics;
use super::store::{
    ConfigWatch, Grant, LeasedEndpoint, LeasedSnapshot, NewEndpoint, Position, ServiceCount,
    ServiceSnapshot, Store, StoredConfig, UpdateStream,
};
use super::{Cap, RegistryConfig, RegistryError};
use crate::discovery::{Endpoint, EndpointSet, EndpointState, Update, Versioned};
use crate::proto::registry as pb;
use crate::registry::fanout::Subscription;
use crate::service_config::ServiceConfig;

/// The etcd lease lives this many switchboard TTLs; see the module doc.
pub const ETCD_TTL_FACTOR: u32 = 4;
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
    removed: RemovedLeases,
    /// One per watched service.
    hubs: tokio::sync::Mutex<HashMap<String, Arc<Hub>>>,
    /// Every service config, fed by one prefix watch.
    configs: ConfigFeed,
    /// Whether `configs` has been listed from etcd at least once.
    configs_listed: tokio::sync::watch::Sender<bool>,
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

fn unreachable(err: etcd_client::Error) -> RegistryError {
    let why = match &err {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    RegistryError::Unavailable(format!("etcd unreachable: {why}"))
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
            removed: RemovedLeases::default(),
            hubs: tokio::sync::Mutex::new(HashMap::new()),
            configs: ConfigFeed::default(),
            configs_listed: tokio::sync::watch::channel(false).0,
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
            tokio::spawn(follow_configs(inner.clone())),
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
    fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    async fn stopped(&self) {
        let _ = self.stop.subscribe().wait_for(|stopped| *stopped).await;
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
                cap: Cap::EndpointsPerService,
                limit: self.max_endpoints_per_service,
                service: Some(service.to_string()),
            });
        }
        if in_service == 0 {
            let services = self.service_counts().await?;
            if services.len() >= self.max_services {
                return Err(RegistryError::exhausted(Cap::Services, self.max_services));
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
