//! One service's watchers in this process, whichever store feeds them: the
//! set they follow, a short history to resume them from, and a bounded
//! `broadcast` ring. Publishing costs one `Arc` per change whatever the
//! number of watchers, and a watcher that falls behind loses its place in
//! the ring instead of growing a queue: it is sent a fresh reset.
//!
//! A [`Fanout`] does no locking of its own. Each store publishes and
//! subscribes under the one lock that orders its changes (the memory
//! store's map entry, the etcd hub's mutex), so a watcher sees each change
//! exactly once: inside what it is sent first, or as a later delta.
//!
//! What watchers are sent is always [`EndpointSet::delta_of`] what the set
//! says changed, however the change was fed: a delta, a relisted reset or
//! a change feed's final states.

use std::collections::VecDeque;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::broadcast::{self, error::RecvError};

use super::store::{Position, UpdateStream};
use crate::discovery::{Applied, Endpoint, EndpointSet, Update, Versioned};

/// The fan-out of one service's changes to its watchers.
pub(crate) struct Fanout {
    epoch: u64,
    set: EndpointSet,
    /// The version the set is at.
    version: u64,
    /// The last updates, to resume watchers from.
    history: VecDeque<Arc<Versioned>>,
    /// How many updates `history` keeps.
    history_len: usize,
    /// The version before the oldest update in `history`.
    floor: u64,
    updates: broadcast::Sender<Arc<Versioned>>,
}

/// What a new watcher is sent first, and how it goes on.
pub(crate) struct Subscription {
    /// Updates to send before the live ones.
    pub first: Vec<Arc<Versioned>>,
    /// The live updates.
    pub receiver: broadcast::Receiver<Arc<Versioned>>,
    /// Live updates at or below this version are already in the watcher's
    /// set (it resumed from a replica that was further ahead).
    pub skip_through: u64,
    /// The version of a watcher in this epoch that the history does not
    /// reach back to: `first` is a reset, which a store with a longer
    /// history of its own may turn into the difference from there.
    // Only the etcd store has such a history.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub older_than_history: Option<u64>,
}

impl Fanout {
    /// A fan-out of `epoch` whose set is `endpoints` at `version`; a watcher
    /// may lag `buffer` updates and resume from the last `history_len`.
    pub(crate) fn new(
        epoch: u64,
        endpoints: Vec<Endpoint>,
        version: u64,
        buffer: usize,
        history_len: usize,
    ) -> Self {
        let mut set = EndpointSet::new();
        set.apply(Update::Reset(endpoints));
        Self {
            epoch,
            set,
            version,
            history: VecDeque::with_capacity(history_len),
            history_len,
            floor: version,
            updates: broadcast::channel(buffer.max(1)).0,
        }
    }

    /// The set as watchers know it.
    pub(crate) fn set(&self) -> &EndpointSet {
        &self.set
    }

    /// The version the set is at.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// How many watchers listen.
    pub(crate) fn watchers(&self) -> usize {
        self.updates.receiver_count()
    }

    /// Moves to `version` if it is later, with the set unchanged: a store
    /// whose versions count every change of every service passes them.
    pub(crate) fn advance(&mut self, version: u64) {
        self.version = self.version.max(version);
    }

    /// Applies `update`; if it changed anything, stamps it with `version()`
    /// (asked only then), sends it to every watcher and says true.
    pub(crate) fn apply(&mut self, update: Update, version: impl FnOnce() -> u64) -> bool {
        let applied = self.set.apply(update);
        self.publish(applied, version)
    }

    /// Sets each address to its final state (`None`: gone), then publishes
    /// as [`Fanout::apply`] does.
    // Only the etcd store's change feed speaks in final states.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn put_states(
        &mut self,
        states: impl IntoIterator<Item = (String, Option<Endpoint>)>,
        version: impl FnOnce() -> u64,
    ) -> bool {
        let applied = self.set.put_states(states);
        self.publish(applied, version)
    }

    fn publish(&mut self, applied: Applied, version: impl FnOnce() -> u64) -> bool {
        if applied.is_empty() {
            return false;
        }
        self.advance(version());
        let update = Arc::new(Versioned {
            epoch: self.epoch,
            version: self.version,
            update: Update::Delta(self.set.delta_of(&applied)),
        });
        self.history.push_back(update.clone());
        while self.history.len() > self.history_len {
            if let Some(oldest) = self.history.pop_front() {
                self.floor = oldest.version;
            }
        }
        // An error only means nobody is watching right now.
        let _ = self.updates.send(update);
        true
    }

    /// The whole set as this fan-out's next watcher would be sent it.
    pub(crate) fn reset(&self) -> Arc<Versioned> {
        Arc::new(Versioned {
            epoch: self.epoch,
            version: self.version,
            update: self.set.to_reset(),
        })
    }

    /// Subscribes a watcher that holds `from` (if anything). Within the
    /// epoch it gets only what it missed: the history after its version,
    /// or nothing when it is at or ahead of the set. Otherwise a reset.
    pub(crate) fn subscribe(&self, from: Option<Position>) -> Subscription {
        let receiver = self.updates.subscribe();
        let same_epoch = from.filter(|p| p.epoch == self.epoch);
        if let Some(from) = same_epoch {
            if from.version >= self.version {
                return Subscription {
                    first: Vec::new(),
                    receiver,
                    skip_through: from.version,
                    older_than_history: None,
                };
            }
            // Every update after `floor` is still in the history.
            if from.version >= self.floor {
                let missed = self
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
        Subscription {
            first: vec![self.reset()],
            receiver,
            skip_through: 0,
            older_than_history: same_epoch.map(|p| p.version),
        }
    }
}

/// The updates of one watcher, in order: what its subscription sends
/// first, then the live ones. A watcher that fell behind is counted in
/// `resets` and subscribed afresh through `resubscribe`, which owns
/// whatever must live as long as the watcher (and is dropped after the
/// receiver, so a store can see the watcher gone when it is).
pub(crate) fn follow<R>(
    service: Arc<str>,
    subscription: Subscription,
    resets: Counter,
    resubscribe: R,
) -> UpdateStream
where
    R: FnMut() -> Subscription + Send + 'static,
{
    let follower = Follower {
        receiver: subscription.receiver,
        first: subscription.first.into(),
        skip_through: subscription.skip_through,
        service,
        resets,
        resubscribe,
    };
    Box::pin(futures_util::stream::unfold(
        follower,
        |mut follower| async move {
            let update = follower.next().await?;
            Some((update, follower))
        },
    ))
}

/// The state of one watcher's stream.
struct Follower<R> {
    /// Declared first, so it is dropped before `resubscribe`.
    receiver: broadcast::Receiver<Arc<Versioned>>,
    first: VecDeque<Arc<Versioned>>,
    skip_through: u64,
    service: Arc<str>,
    resets: Counter,
    resubscribe: R,
}

impl<R: FnMut() -> Subscription> Follower<R> {
    async fn next(&mut self) -> Option<Arc<Versioned>> {
        loop {
            if let Some(update) = self.first.pop_front() {
                return Some(update);
            }
            let update = match self.receiver.recv().await {
                Ok(update) => update,
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        service = %self.service,
                        missed,
                        "watcher fell behind; sending a fresh snapshot"
                    );
                    self.resets.inc();
                    let fresh = (self.resubscribe)();
                    self.receiver = fresh.receiver;
                    self.skip_through = 0;
                    self.first = fresh.first.into();
                    continue;
                }
                Err(RecvError::Closed) => return None,
            };
            if update.version > self.skip_through {
                return Some(update);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures_util::{FutureExt, StreamExt};

    use super::*;
    use crate::discovery::{Delta, EndpointState};

    const EPOCH: u64 = 7;
    const HISTORY: usize = 256;

    fn at(version: u64) -> Option<Position> {
        Some(Position {
            epoch: EPOCH,
            version,
        })
    }

    fn states(items: &[(&str, Option<EndpointState>)]) -> BTreeMap<String, Option<Endpoint>> {
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

    fn put(fanout: &mut Fanout, version: u64, items: &[(&str, Option<EndpointState>)]) {
        fanout.advance(version);
        fanout.put_states(states(items), || version);
    }

    fn delta(update: &Versioned) -> &Delta {
        match &update.update {
            Update::Delta(delta) => delta,
            Update::Reset(_) => panic!("expected a delta, got {update:?}"),
        }
    }

    /// At version 10 with `a`, then `b` added at 11 and `a` drained at 12.
    fn fanout() -> Fanout {
        let mut fanout = Fanout::new(EPOCH, vec![Endpoint::new("a")], 10, HISTORY, HISTORY);
        put(&mut fanout, 11, &[("b", Some(EndpointState::Serving))]);
        put(&mut fanout, 12, &[("a", Some(EndpointState::Draining))]);
        fanout
    }

    #[test]
    fn final_states_are_published_as_what_changed() {
        let mut fanout = fanout();
        let mut sub = fanout.subscribe(at(12));
        // `c` added and deleted in one etcd reply: nothing to tell.
        put(&mut fanout, 14, &[("c", None)]);
        assert!(sub.receiver.try_recv().is_err());
        assert_eq!(fanout.version(), 14, "the set is at the later revision");
        // `b` deleted, then put again in one reply: an update, not a removal.
        put(&mut fanout, 16, &[("b", Some(EndpointState::Draining))]);
        let update = sub.receiver.try_recv().unwrap();
        assert_eq!(update.version, 16);
        assert!(delta(&update).removed.is_empty());
        assert_eq!(delta(&update).updated.len(), 1);
    }

    #[test]
    fn a_resumed_watcher_gets_only_what_it_missed() {
        let fanout = fanout();
        let sub = fanout.subscribe(at(11));
        assert_eq!(sub.first.len(), 1);
        assert_eq!(sub.first[0].version, 12);
        assert_eq!(delta(&sub.first[0]).updated[0].address, "a");
        assert!(fanout.subscribe(at(12)).first.is_empty());
    }

    #[test]
    fn a_watcher_ahead_skips_what_it_has() {
        let mut fanout = fanout();
        let sub = fanout.subscribe(at(20));
        assert!(sub.first.is_empty());
        assert_eq!(sub.skip_through, 20);
        let mut updates = follow("s".into(), sub, Counter::default(), || unreachable!());
        put(&mut fanout, 18, &[("c", Some(EndpointState::Serving))]);
        put(&mut fanout, 21, &[("d", Some(EndpointState::Serving))]);
        let next = updates.next().now_or_never().flatten().unwrap();
        assert_eq!(next.version, 21, "18 is already in the watcher's set");
    }

    #[test]
    fn another_epoch_or_a_version_before_the_history_gets_a_reset() {
        let mut fanout = Fanout::new(EPOCH, vec![Endpoint::new("a")], 10, HISTORY, HISTORY);
        for version in 11..11 + HISTORY as u64 + 5 {
            let state = match version % 2 {
                0 => EndpointState::Serving,
                _ => EndpointState::Draining,
            };
            put(&mut fanout, version, &[("a", Some(state))]);
        }
        let other_epoch = Some(Position {
            epoch: EPOCH + 1,
            version: 20,
        });
        for from in [other_epoch, at(12), None] {
            let sub = fanout.subscribe(from);
            assert_eq!(sub.first.len(), 1, "{from:?}");
            assert!(matches!(&sub.first[0].update, Update::Reset(e) if e.len() == 1));
            assert_eq!(sub.older_than_history, (from == at(12)).then_some(12));
        }
    }

    #[test]
    fn without_history_only_a_watcher_that_missed_nothing_skips_its_reset() {
        let mut fanout = Fanout::new(EPOCH, vec![Endpoint::new("a")], 10, HISTORY, 0);
        put(&mut fanout, 11, &[("b", Some(EndpointState::Serving))]);
        assert!(fanout.subscribe(at(11)).first.is_empty());
        let sub = fanout.subscribe(at(10));
        assert!(matches!(&sub.first[..], [reset] if matches!(reset.update, Update::Reset(_))));
    }

    #[test]
    fn a_relist_sends_the_difference_never_an_empty_reset() {
        let mut fanout = fanout();
        let mut sub = fanout.subscribe(None);
        let reset = sub.first.pop().unwrap();
        assert!(matches!(&reset.update, Update::Reset(e) if e.len() == 2));
        // After compaction etcd lists `b` and a new `c`; `a` went meanwhile.
        let listed = vec![Endpoint::new("b"), Endpoint::new("c")];
        assert!(fanout.apply(Update::Reset(listed), || 30));
        let update = sub.receiver.try_recv().unwrap();
        let delta = delta(&update);
        assert_eq!(delta.removed, vec!["a".to_string()]);
        assert_eq!(delta.added.len(), 1);
        assert!(delta.updated.is_empty(), "unchanged `b` is not re-sent");
    }

    #[test]
    fn a_watcher_that_fell_behind_is_counted_and_sent_a_fresh_reset() {
        let mut fanout = Fanout::new(EPOCH, Vec::new(), 0, 2, 0);
        let sub = fanout.subscribe(None);
        let resets = Counter::default();
        let shared = std::sync::Arc::new(std::sync::Mutex::new(None::<Subscription>));
        let handed = shared.clone();
        let mut updates = follow("s".into(), sub, resets.clone(), move || {
            handed.lock().unwrap().take().expect("one resubscription")
        });
        let first = updates.next().now_or_never().flatten().unwrap();
        assert!(matches!(first.update, Update::Reset(_)));
        for (version, address) in [(1, "a"), (2, "b"), (3, "c")] {
            put(
                &mut fanout,
                version,
                &[(address, Some(EndpointState::Serving))],
            );
        }
        *shared.lock().unwrap() = Some(fanout.subscribe(None));
        let next = updates.next().now_or_never().flatten().unwrap();
        assert!(matches!(&next.update, Update::Reset(e) if e.len() == 3));
        assert_eq!(next.version, fanout.version());
        assert_eq!(resets.get(), 1);
        put(&mut fanout, 4, &[("d", Some(EndpointState::Serving))]);
        let live = updates.next().now_or_never().flatten().unwrap();
        assert_eq!(delta(&live).added[0].address, "d");
    }
}
