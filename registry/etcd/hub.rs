//! One etcd watch per watched service per replica, fanned out to every
//! watcher of that service on the replica, with a short history to resume
//! watchers from.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use prost::Message;
use tokio::sync::broadcast;

use super::Inner;
use crate::discovery::{Delta, Endpoint, EndpointSet, Update, Versioned};
use crate::proto::registry as pb;
use crate::registry::store::Position;

/// Updates a hub keeps to resume watchers from.
const HISTORY: usize = 256;
/// How often a hub checks whether anyone still watches; a hub idle at two
/// checks in a row ends its etcd watch.
const IDLE_CHECK: Duration = Duration::from_secs(15);
/// Pause before watching or listing again after etcd refused.
const RETRY: Duration = Duration::from_millis(250);

/// The fan-out of one service's etcd watch to this replica's watchers.
pub(super) struct Hub {
    updates: broadcast::Sender<Arc<Versioned>>,
    state: Mutex<HubState>,
}

struct HubState {
    set: EndpointSet,
    /// The etcd revision the set is at: the service's state at that
    /// revision of the whole store.
    version: u64,
    /// The last updates, to resume watchers from.
    history: VecDeque<Arc<Versioned>>,
    /// The version before the oldest update in `history`.
    floor: u64,
}

/// What a new watcher is sent first, and how it goes on.
pub(super) struct Subscription {
    /// Updates to send before the live ones.
    pub first: Vec<Arc<Versioned>>,
    /// The live updates.
    pub receiver: broadcast::Receiver<Arc<Versioned>>,
    /// Live updates at or below this version are already in the watcher's
    /// set (it resumed from a replica that was further ahead).
    pub skip_through: u64,
}

impl Hub {
    /// A hub whose set is `endpoints` as listed at `revision`.
    pub(super) fn new(endpoints: Vec<Endpoint>, revision: u64) -> Self {
        let mut set = EndpointSet::new();
        set.apply(Update::Reset(endpoints));
        Self {
            updates: broadcast::channel(HISTORY).0,
            state: Mutex::new(HubState {
                set,
                version: revision,
                history: VecDeque::new(),
                floor: revision,
            }),
        }
    }

    /// Whether any watcher still listens.
    pub(super) fn idle(&self) -> bool {
        self.updates.receiver_count() == 0
    }

    /// Applies the final state of each changed address (`None`: deleted)
    /// as of `revision`, and sends what changed to every watcher.
    fn publish(&self, epoch: u64, revision: u64, changes: BTreeMap<String, Option<Endpoint>>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.version = state.version.max(revision);
        let mut delta = Delta::default();
        for (address, endpoint) in changes {
            match (endpoint, state.set.get(&address)) {
                (Some(endpoint), None) => delta.added.push(endpoint),
                (Some(endpoint), Some(old)) if **old != endpoint => delta.updated.push(endpoint),
                (None, Some(_)) => delta.removed.push(address),
                _ => {}
            }
        }
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

    /// Subscribes a watcher that holds `from` (if anything). Within the
    /// epoch it gets only what it missed: the history after its version,
    /// or nothing when it is at or ahead of the hub. Otherwise a reset.
    pub(super) fn subscribe(&self, epoch: u64, from: Option<Position>) -> Subscription {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.updates.subscribe();
        if let Some(from) = from.filter(|p| p.epoch == epoch) {
            if from.version >= state.version {
                return Subscription {
                    first: Vec::new(),
                    receiver,
                    skip_through: from.version,
                };
            }
            // Every update after `floor` is still in the history.
            if from.version >= state.floor {
                let missed = state
                    .history
                    .iter()
                    .filter(|u| u.version > from.version)
                    .cloned()
                    .collect();
                return Subscription {
                    first: missed,
                    receiver,
                    skip_through: from.version,
                };
            }
        }
        let reset = Arc::new(Versioned {
            epoch,
            version: state.version,
            update: state.set.to_reset(),
        });
        Subscription {
            first: vec![reset],
            receiver,
            skip_through: 0,
        }
    }
}

/// The difference between `set` and `endpoints`, as final states by address.
fn difference(set: &EndpointSet, endpoints: Vec<Endpoint>) -> BTreeMap<String, Option<Endpoint>> {
    let present: HashSet<String> = endpoints.iter().map(|e| e.address.clone()).collect();
    let mut changes: BTreeMap<String, Option<Endpoint>> = endpoints
        .into_iter()
        .map(|e| (e.address.clone(), Some(e)))
        .collect();
    for old in set.iter() {
        if !present.contains(&old.address) {
            changes.insert(old.address.clone(), None);
        }
    }
    changes
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
                    let changes = {
                        let state = hub.state.lock().unwrap_or_else(|p| p.into_inner());
                        difference(&state.set, endpoints)
                    };
                    hub.publish(inner.epoch, revision, changes);
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
        let start = hub.state.lock().unwrap_or_else(|p| p.into_inner()).version as i64 + 1;
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
                hub.publish(inner.epoch, revision, changes);
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}
