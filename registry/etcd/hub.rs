//! One etcd watch per watched service per replica, fanned out to every
//! watcher of that service on the replica through a [`Fanout`] with a
//! short history to resume watchers from.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use prost::Message;

use super::Inner;
use crate::discovery::{Endpoint, Update};
use crate::proto::registry as pb;
use crate::registry::fanout::{Fanout, Subscription};
use crate::registry::store::Position;

/// Updates a hub keeps to resume watchers from, and how far a watcher may
/// lag.
const HISTORY: usize = 256;
/// How often a hub checks whether anyone still watches; a hub idle at two
/// checks in a row ends its etcd watch.
const IDLE_CHECK: Duration = Duration::from_secs(15);
/// Pause before watching or listing again after etcd refused.
const RETRY: Duration = Duration::from_millis(250);

/// The fan-out of one service's etcd watch to this replica's watchers.
/// Versions are etcd revisions: the service's state at that revision of
/// the whole store.
pub(super) struct Hub {
    fanout: Mutex<Fanout>,
}

impl Hub {
    /// A hub of `epoch` whose set is `endpoints` as listed at `revision`.
    pub(super) fn new(epoch: u64, endpoints: Vec<Endpoint>, revision: u64) -> Self {
        Self {
            fanout: Mutex::new(Fanout::new(epoch, endpoints, revision, HISTORY, HISTORY)),
        }
    }

    fn fanout(&self) -> MutexGuard<'_, Fanout> {
        self.fanout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any watcher still listens.
    pub(super) fn idle(&self) -> bool {
        self.fanout().watchers() == 0
    }

    /// Applies the final state of each changed address (`None`: deleted)
    /// as of `revision`, and sends what changed to every watcher.
    fn publish(&self, revision: u64, changes: BTreeMap<String, Option<Endpoint>>) {
        let mut fanout = self.fanout();
        fanout.advance(revision);
        fanout.put_states(changes, || revision);
    }

    /// Replaces the set with `endpoints` as listed at `revision`, and sends
    /// what changed to every watcher: never an empty reset.
    fn relisted(&self, revision: u64, endpoints: Vec<Endpoint>) {
        let mut fanout = self.fanout();
        fanout.advance(revision);
        fanout.apply(Update::Reset(endpoints), || revision);
    }

    /// Subscribes a watcher that holds `from` (if anything): see
    /// [`Fanout::subscribe`].
    pub(super) fn subscribe(&self, from: Option<Position>) -> Subscription {
        self.fanout().subscribe(from)
    }
}

/// Follows one service's keys in etcd, feeding its hub, until the store
/// stops or nobody has watched for a while. After a broken or compacted
/// etcd watch it re-lists and publishes the difference, so watchers never
/// see an empty reset.
pub(super) async fn follow(inner: Arc<Inner>, service: String, hub: Arc<Hub>) {
    let prefix = inner.service_prefix(&service);
    let mut relist = false;
    let mut idle_checks = 0;
    loop {
        if inner.is_stopped() {
            return;
        }
        if relist {
            match inner.list_service(&service).await {
                Ok((endpoints, revision)) => {
                    hub.relisted(revision, endpoints);
                    inner.etcd_metrics.watch_resyncs.inc();
                }
                Err(err) => {
                    tracing::debug!(%service, %err, "cannot re-list; watchers keep their set");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        relist = true;
        let start = hub.fanout().version() as i64 + 1;
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut stream = match inner
            .client
            .clone()
            .watch(prefix.clone(), Some(options))
            .await
        {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(%service, %err, "cannot watch etcd; watchers keep their set");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut check = tokio::time::interval(IDLE_CHECK);
        check.tick().await;
        loop {
            let reply = tokio::select! {
                reply = stream.message() => reply,
                () = inner.stopped() => return,
                _ = check.tick() => {
                    idle_checks = if hub.idle() { idle_checks + 1 } else { 0 };
                    if idle_checks >= 2 && inner.retire_hub(&service, &hub).await {
                        tracing::debug!(%service, "nobody watches; etcd watch ended");
                        return;
                    }
                    continue;
                }
            };
            let reply = match reply {
                Ok(Some(reply)) => reply,
                Ok(None) | Err(_) => break,
            };
            if reply.compact_revision() > 0 || reply.canceled() {
                tracing::info!(%service, "etcd watch compacted or cancelled; re-listing");
                break;
            }
            // The revision of the last event, not the header's (the store's
            // current revision, which may be ahead of events still to come).
            let mut revision = 0;
            let mut changes = BTreeMap::new();
            for event in reply.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(address) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(prefix.as_str()))
                else {
                    continue;
                };
                revision = revision.max(kv.mod_revision() as u64);
                let endpoint = match event.event_type() {
                    EventType::Put => pb::Endpoint::decode(kv.value()).ok().map(Endpoint::from),
                    EventType::Delete => None,
                };
                changes.insert(address.to_owned(), endpoint);
            }
            if revision > 0 {
                hub.publish(revision, changes);
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}
