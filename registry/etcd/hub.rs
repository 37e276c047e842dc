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
    /// The version of a watcher in this epoch that the hub's history does
    /// not reach back to: `first` is a reset, which etcd's own history may
    /// turn into the difference from there.
    pub older_than_history: Option<u64>,
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
        let update = Update::Delta(to_delta(&state.set, changes));
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
                    older_than_history: None,
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
                    older_than_history: None,
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
            older_than_history: from.filter(|p| p.epoch == epoch).map(|p| p.version),
        }
    }
}

/// What turns `set` into the final states `changes`.
pub(super) fn to_delta(set: &EndpointSet, changes: BTreeMap<String, Option<Endpoint>>) -> Delta {
    let mut delta = Delta::default();
    for (address, endpoint) in changes {
        match (endpoint, set.get(&address)) {
            (Some(endpoint), None) => delta.added.push(endpoint),
            (Some(endpoint), Some(old)) if **old != endpoint => delta.updated.push(endpoint),
            (None, Some(_)) => delta.removed.push(address),
            _ => {}
        }
    }
    delta
}

/// The difference between `set` and `endpoints`, as final states by address.
pub(super) fn difference(
    set: &EndpointSet,
    endpoints: Vec<Endpoint>,
) -> BTreeMap<String, Option<Endpoint>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::EndpointState;

    const EPOCH: u64 = 7;

    fn changes(items: &[(&str, Option<EndpointState>)]) -> BTreeMap<String, Option<Endpoint>> {
        items
            .iter()
            .map(|(address, state)| {
                (
                    address.to_string(),
                    state.map(|s| Endpoint::new(*address).with_state(s)),
                )
            })
            .collect()
    }

    fn delta(update: &Versioned) -> &Delta {
        match &update.update {
            Update::Delta(delta) => delta,
            Update::Reset(_) => panic!("expected a delta, got {update:?}"),
        }
    }

    /// A hub at revision 10 with `a`, then `b` added at 11 and `a` drained at 12.
    fn hub() -> Hub {
        let hub = Hub::new(vec![Endpoint::new("a")], 10);
        hub.publish(EPOCH, 11, changes(&[("b", Some(EndpointState::Serving))]));
        hub.publish(EPOCH, 12, changes(&[("a", Some(EndpointState::Draining))]));
        hub
    }

    #[test]
    fn one_reply_is_applied_as_its_final_state_per_address() {
        let hub = hub();
        let mut sub = hub.subscribe(
            EPOCH,
            Some(Position {
                epoch: EPOCH,
                version: 12,
            }),
        );
        // `c` added and deleted in one etcd reply: nothing to tell.
        hub.publish(EPOCH, 14, changes(&[("c", None)]));
        assert!(sub.receiver.try_recv().is_err());
        // `b` deleted, then put again in one reply: an update, not a removal.
        hub.publish(EPOCH, 16, changes(&[("b", Some(EndpointState::Draining))]));
        let update = sub.receiver.try_recv().unwrap();
        assert_eq!(update.version, 16);
        assert!(delta(&update).removed.is_empty());
        assert_eq!(delta(&update).updated.len(), 1);
    }

    #[test]
    fn a_resumed_watcher_gets_only_what_it_missed() {
        let hub = hub();
        let sub = hub.subscribe(
            EPOCH,
            Some(Position {
                epoch: EPOCH,
                version: 11,
            }),
        );
        assert_eq!(sub.first.len(), 1);
        assert_eq!(sub.first[0].version, 12);
        assert_eq!(delta(&sub.first[0]).updated[0].address, "a");
        let current = hub.subscribe(
            EPOCH,
            Some(Position {
                epoch: EPOCH,
                version: 12,
            }),
        );
        assert!(current.first.is_empty());
    }

    #[test]
    fn a_watcher_ahead_of_the_hub_skips_what_it_has() {
        let hub = hub();
        let mut sub = hub.subscribe(
            EPOCH,
            Some(Position {
                epoch: EPOCH,
                version: 20,
            }),
        );
        assert!(sub.first.is_empty());
        assert_eq!(sub.skip_through, 20);
        hub.publish(EPOCH, 18, changes(&[("c", Some(EndpointState::Serving))]));
        assert_eq!(sub.receiver.try_recv().unwrap().version, 18);
    }

    #[test]
    fn another_epoch_or_a_version_before_the_history_gets_a_reset() {
        let hub = Hub::new(vec![Endpoint::new("a")], 10);
        for revision in 11..11 + HISTORY as u64 + 5 {
            let state = match revision % 2 {
                0 => EndpointState::Serving,
                _ => EndpointState::Draining,
            };
            hub.publish(EPOCH, revision, changes(&[("a", Some(state))]));
        }
        for from in [
            Some(Position {
                epoch: EPOCH + 1,
                version: 20,
            }),
            Some(Position {
                epoch: EPOCH,
                version: 12,
            }),
            None,
        ] {
            let sub = hub.subscribe(EPOCH, from);
            assert_eq!(sub.first.len(), 1, "{from:?}");
            assert!(matches!(&sub.first[0].update, Update::Reset(e) if e.len() == 1));
        }
    }

    #[test]
    fn a_relist_sends_the_difference_never_an_empty_reset() {
        let hub = hub();
        let mut sub = hub.subscribe(EPOCH, None);
        let reset = sub.first.pop().unwrap();
        assert!(matches!(&reset.update, Update::Reset(e) if e.len() == 2));
        // After compaction etcd lists `b` and a new `c`; `a` went meanwhile.
        let listed = vec![Endpoint::new("b"), Endpoint::new("c")];
        let changes = {
            let state = hub.state.lock().unwrap();
            difference(&state.set, listed)
        };
        hub.publish(EPOCH, 30, changes);
        let update = sub.receiver.try_recv().unwrap();
        let delta = delta(&update);
        assert_eq!(delta.removed, vec!["a".to_string()]);
        assert_eq!(delta.added.len(), 1);
        assert!(delta.updated.is_empty(), "unchanged `b` is not re-sent");
    }
}
