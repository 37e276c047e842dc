//! The vocabulary of endpoint discovery, independent of any wire format: an
//! [`Endpoint`], an [`Update`] to a set of them (a reset to a whole set, or
//! a delta), and the one [`EndpointSet::apply`] that every consumer uses to
//! follow a stream of updates: the registry's stores and watch, the client's
//! resolvers and balancer, the demo, the tests and the benches.
//!
//! Like linkerd's discovery `Update`, these are the types the code reasons
//! in; the protobuf messages are converted at the edges (`proto.rs`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use indexmap::IndexMap;

/// Whether an endpoint takes new RPCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EndpointState {
    /// Takes new RPCs.
    #[default]
    Serving,
    /// Finishes the RPCs it has and takes no new ones.
    Draining,
}

impl fmt::Display for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndpointState::Serving => "SERVING",
            EndpointState::Draining => "DRAINING",
        })
    }
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub address: String,
    /// Labels from the registry (zone, weight, version...).
    pub metadata: HashMap<String, String>,
    /// Serving or draining.
    pub state: EndpointState,
}

impl Endpoint {
    /// A serving endpoint with no metadata.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            metadata: HashMap::new(),
            state: EndpointState::Serving,
        }
    }

    /// The same endpoint with `key` set to `value` in its metadata.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The same endpoint in `state`.
    pub fn with_state(mut self, state: EndpointState) -> Self {
        self.state = state;
        self
    }

    /// Whether it is draining (finishing its RPCs, taking no new ones).
    pub fn is_draining(&self) -> bool {
        self.state == EndpointState::Draining
    }

    /// The `weight` metadata as a positive integer, if it is one.
    pub fn weight(&self) -> Option<u32> {
        self.metadata
            .get("weight")
            .and_then(|w| w.parse().ok())
            .filter(|w| *w > 0)
    }
}

/// A change to an endpoint set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The whole set, replacing whatever was known.
    Reset(Vec<Endpoint>),
    /// Changes relative to the set known so far.
    Delta(Delta),
}

/// Endpoints that joined, changed or left.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    /// New endpoints.
    pub added: Vec<Endpoint>,
    /// Endpoints whose metadata or state changed.
    pub updated: Vec<Endpoint>,
    /// Addresses that left.
    pub removed: Vec<String>,
}

impl Delta {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

/// An update stamped with where it stands in its source's history: the
/// source's identity (`epoch`) and a version that grows with every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// Identifies the source's history (a registry instance, an etcd
    /// cluster); versions compare only within one epoch.
    pub epoch: u64,
    /// The version the set has after this update.
    pub version: u64,
    /// The change.
    pub update: Update,
}

/// What applying an update changed, by address: the work a consumer has to
/// do is this, not a diff of whole sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Addresses that joined.
    pub added: Vec<String>,
    /// Addresses whose metadata or state changed.
    pub updated: Vec<String>,
    /// Addresses that left.
    pub removed: Vec<String>,
    /// Whatever in the update did not fit the set it was applied to. The
    /// update is still applied as well as it can be; sources that keep the
    /// protocol never cause these.
    pub anomalies: Vec<Anomaly>,
}

impl Applied {
    /// Whether the set is unchanged.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

/// An update that did not fit the set it was applied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// A delta arrived before any reset.
    DeltaBeforeReset,
    /// A delta that changes nothing.
    EmptyDelta,
    /// An address was added while already present (applied as an update).
    AddedTwice(String),
    /// An address was updated while absent (applied as an add).
    UpdatedAbsent(String),
    /// An absent address was removed.
    RemovedAbsent(String),
    /// A version did not grow within one epoch.
    VersionNotIncreasing {
        /// The version held before.
        previous: u64,
        /// The version received.
        received: u64,
    },
    /// A delta claimed another epoch than the set's (only a reset may).
    DeltaFromOtherEpoch {
        /// The set's epoch.
        held: u64,
        /// The delta's.
        received: u64,
    },
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::DeltaBeforeReset => write!(f, "a delta arrived before any reset"),
            Anomaly::EmptyDelta => write!(f, "an empty delta"),
            Anomaly::AddedTwice(a) => write!(f, "{a} added while already present"),
            Anomaly::UpdatedAbsent(a) => write!(f, "{a} updated while absent"),
            Anomaly::RemovedAbsent(a) => write!(f, "{a} removed while absent"),
            Anomaly::VersionNotIncreasing { previous, received } => {
                write!(f, "version {received} after {previous}")
            }
            Anomaly::DeltaFromOtherEpoch { held, received } => {
                write!(f, "a delta of epoch {received} applied to epoch {held}")
            }
        }
    }
}

/// An endpoint set as a stream of updates builds it, in the source's order:
/// a reset's order, with endpoints added later by a delta placed in address
/// order (so a set built from deltas alone, like the registry's, is sorted
/// by address, as its snapshots are). pick_first tries endpoints in that
/// order.
#[derive(Debug, Clone, Default)]
pub struct EndpointSet {
    endpoints: IndexMap<String, Arc<Endpoint>>,
    /// Whether a reset has been applied (before one, the set is unknown
    /// rather than empty).
    known: bool,
    epoch: Option<u64>,
    version: Option<u64>,
}

impl EndpointSet {
    /// An unknown set: nothing applied yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `update` and says what changed. A reset is compared with the
    /// set held, so only real changes are reported; a delta is applied as
    /// given, each misfit noted in [`Applied::anomalies`].
    pub fn apply(&mut self, update: Update) -> Applied {
        let mut applied = Applied::default();
        match update {
            Update::Reset(endpoints) => {
                let mut fresh: IndexMap<String, Arc<Endpoint>> =
                    IndexMap::with_capacity(endpoints.len());
                for endpoint in endpoints {
                    let address = endpoint.address.clone();
                    let endpoint = match self.endpoints.get(&address) {
                        Some(held) if **held == endpoint => held.clone(),
                        Some(_) => {
                            applied.updated.push(address.clone());
                            Arc::new(endpoint)
                        }
                        None => {
                            applied.added.push(address.clone());
                            Arc::new(endpoint)
                        }
                    };
                    fresh.insert(address, endpoint);
                }
                applied.removed = self
                    .endpoints
                    .keys()
                    .filter(|address| !fresh.contains_key(*address))
                    .cloned()
                    .collect();
                self.endpoints = fresh;
                self.known = true;
            }
            Update::Delta(delta) => {
                if !self.known {
                    applied.anomalies.push(Anomaly::DeltaBeforeReset);
                }
                if delta.is_empty() {
                    applied.anomalies.push(Anomaly::EmptyDelta);
                }
                for endpoint in delta.added {
                    if self.endpoints.contains_key(&endpoint.address) {
                        applied
                            .anomalies
                            .push(Anomaly::AddedTwice(endpoint.address.clone()));
                    }
                    self.put(endpoint, &mut applied);
                }
                for endpoint in delta.updated {
                    if !self.endpoints.contains_key(&endpoint.address) {
                        applied
                            .anomalies
                            .push(Anomaly::UpdatedAbsent(endpoint.address.clone()));
                    }
                    self.put(endpoint, &mut applied);
                }
                for address in delta.removed {
                    if self.endpoints.shift_remove(&address).is_some() {
                        applied.removed.push(address);
                    } else {
                        applied.anomalies.push(Anomaly::RemovedAbsent(address));
                    }
                }
            }
        }
        applied
    }

    /// Applies a versioned update, also checking that versions grow within
    /// an epoch and that only a reset moves to another epoch.
    pub fn apply_versioned(&mut self, versioned: Versioned) -> Applied {
        let mut order = Vec::new();
        let is_reset = matches!(versioned.update, Update::Reset(_));
        match self.epoch {
            Some(held) if held != versioned.epoch && !is_reset => {
                order.push(Anomaly::DeltaFromOtherEpoch {
                    held,
                    received: versioned.epoch,
                });
            }
            Some(held) if held == versioned.epoch => {
                if let Some(previous) = self.version {
                    // A reset may repeat the version it describes (a fresh
                    // snapshot of an unchanged set); a delta must move on.
                    let stale = if is_reset {
                        versioned.version < previous
                    } else {
                        versioned.version <= previous
                    };
                    if stale {
                        order.push(Anomaly::VersionNotIncreasing {
                            previous,
                            received: versioned.version,
                        });
                    }
                }
            }
            _ => {}
        }
        if is_reset || self.epoch.is_none() {
            self.epoch = Some(versioned.epoch);
        }
        self.version = Some(versioned.version);
        let mut applied = self.apply(versioned.update);
        order.append(&mut applied.anomalies);
        applied.anomalies = order;
        applied
    }

    /// Adds or replaces one endpoint, noting it if that changed anything.
    fn put(&mut self, endpoint: Endpoint, applied: &mut Applied) {
        match self.endpoints.get(&endpoint.address) {
            Some(held) if **held == endpoint => {}
            Some(_) => {
                applied.updated.push(endpoint.address.clone());
                self.endpoints
                    .insert(endpoint.address.clone(), Arc::new(endpoint));
            }
            None => {
                applied.added.push(endpoint.address.clone());
                self.endpoints
                    .insert_sorted(endpoint.address.clone(), Arc::new(endpoint));
            }
        }
    }

    /// Whether a reset has been applied.
    pub fn is_known(&self) -> bool {
        self.known
    }

    /// The epoch of the last versioned update.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// The version of the last versioned update.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// The endpoint at `address`.
    pub fn get(&self, address: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(address)
    }

    /// Whether `address` is in the set.
    pub fn contains(&self, address: &str) -> bool {
        self.endpoints.contains_key(address)
    }

    /// The endpoints, in the source's order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.values()
    }

    /// The addresses, in the source's order.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.endpoints.keys().map(String::as_str)
    }

    /// How many endpoints there are.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether there are none (or nothing is known yet).
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The whole set as a reset.
    pub fn to_reset(&self) -> Update {
        Update::Reset(self.endpoints.values().map(|e| (**e).clone()).collect())
    }

    /// Sets each address to its final state (`None`: absent), as a store's
    /// change feed reports them, and says what that changed. Unlike a delta,
    /// a state may repeat what is held or remove what is absent: nothing is
    /// an anomaly, and only real changes are reported.
    pub fn put_states(
        &mut self,
        states: impl IntoIterator<Item = (String, Option<Endpoint>)>,
    ) -> Applied {
        let mut applied = Applied::default();
        for (address, state) in states {
            match state {
                Some(endpoint) => self.put(endpoint, &mut applied),
                None => {
                    if self.endpoints.shift_remove(&address).is_some() {
                        applied.removed.push(address);
                    }
                }
            }
        }
        applied
    }

    /// The delta that brings a follower of this set, as it was before
    /// `applied`, to the set as it is now. Whatever a change was fed as (a
    /// relisted reset, a change feed's final states), its followers are
    /// told exactly what changed.
    pub fn delta_of(&self, applied: &Applied) -> Delta {
        let held = |address: &String| self.endpoints.get(address).map(|e| (**e).clone());
        Delta {
            added: applied.added.iter().filter_map(held).collect(),
            updated: applied.updated.iter().filter_map(held).collect(),
            removed: applied.removed.clone(),
        }
    }
}

mod proto;
pub use proto::NoEvent;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::registry as pb;

    fn delta(added: &[&str], updated: &[Endpoint], removed: &[&str]) -> Update {
        Update::Delta(Delta {
            added: added.iter().map(|a| Endpoint::new(*a)).collect(),
            updated: updated.to_vec(),
            removed: removed.iter().map(|a| a.to_string()).collect(),
        })
    }

    #[test]
    fn a_reset_reports_only_real_changes() {
        let mut set = EndpointSet::new();
        assert!(!set.is_known());
        let first = set.apply(Update::Reset(vec![
            Endpoint::new("a:1"),
            Endpoint::new("b:1"),
        ]));
        assert_eq!(first.added, ["a:1", "b:1"]);
        let again = set.apply(Update::Reset(vec![
            Endpoint::new("a:1"),
            Endpoint::new("b:1").with_state(EndpointState::Draining),
            Endpoint::new("c:1"),
        ]));
        assert_eq!(again.added, ["c:1"]);
        assert_eq!(again.updated, ["b:1"]);
        assert!(again.removed.is_empty() && again.anomalies.is_empty());
        let shrink = set.apply(Update::Reset(vec![Endpoint::new("c:1")]));
        assert_eq!(shrink.removed, ["a:1", "b:1"]);
        assert_eq!(set.addresses().collect::<Vec<_>>(), ["c:1"]);
    }

    #[test]
    fn deltas_apply_and_misfits_are_noted() {
        let mut set = EndpointSet::new();
        let early = set.apply(delta(&["a:1"], &[], &[]));
        assert_eq!(early.anomalies, [Anomaly::DeltaBeforeReset]);
        set.apply(Update::Reset(vec![]));
        let applied = set.apply(delta(
            &["a:1"],
            &[Endpoint::new("b:1").with_metadata("weight", "3")],
            &["z:1"],
        ));
        assert_eq!(applied.added, ["a:1", "b:1"]);
        assert_eq!(
            applied.anomalies,
            [
                Anomaly::UpdatedAbsent("b:1".into()),
                Anomaly::RemovedAbsent("z:1".into())
            ]
        );
        assert_eq!(set.get("b:1").unwrap().weight(), Some(3));
        let same = set.apply(delta(&[], &[Endpoint::new("a:1")], &[]));
        assert!(same.is_empty(), "an unchanged endpoint counted: {same:?}");
        let empty = set.apply(delta(&[], &[], &[]));
        assert_eq!(empty.anomalies, [Anomaly::EmptyDelta]);
    }

    #[test]
    fn a_reset_keeps_its_order_and_deltas_insert_in_address_order() {
        let mut set = EndpointSet::new();
        set.apply(Update::Reset(vec![
            Endpoint::new("c:1"),
            Endpoint::new("a:1"),
        ]));
        assert_eq!(set.addresses().collect::<Vec<_>>(), ["c:1", "a:1"]);
        let mut built = EndpointSet::new();
        built.apply(Update::Reset(vec![]));
        built.apply(delta(&["z:1"], &[], &[]));
        built.apply(delta(&["b:1"], &[], &[]));
        built.apply(delta(&["m:1"], &[], &[]));
        assert_eq!(built.addresses().collect::<Vec<_>>(), ["b:1", "m:1", "z:1"]);
    }

    #[test]
    fn versions_must_grow_and_only_a_reset_changes_epoch() {
        let mut set = EndpointSet::new();
        let stamp = |epoch, version, update| Versioned {
            epoch,
            version,
            update,
        };
        assert!(set
            .apply_versioned(stamp(7, 3, Update::Reset(vec![])))
            .anomalies
            .is_empty());
        let stale = set.apply_versioned(stamp(7, 3, delta(&["a:1"], &[], &[])));
        assert_eq!(
            stale.anomalies,
            [Anomaly::VersionNotIncreasing {
                previous: 3,
                received: 3
            }]
        );
        let foreign = set.apply_versioned(stamp(8, 1, delta(&["b:1"], &[], &[])));
        assert_eq!(
            foreign.anomalies,
            [Anomaly::DeltaFromOtherEpoch {
                held: 7,
                received: 8
            }]
        );
        let restart = set.apply_versioned(stamp(8, 1, Update::Reset(vec![])));
        assert!(restart.anomalies.is_empty());
        assert_eq!((set.epoch(), set.version()), (Some(8), Some(1)));
    }

    #[test]
    fn final_states_report_only_real_changes_and_their_delta() {
        let mut set = EndpointSet::new();
        set.apply(Update::Reset(vec![
            Endpoint::new("a:1"),
            Endpoint::new("b:1"),
        ]));
        let before = set.clone();
        let draining = Endpoint::new("b:1").with_state(EndpointState::Draining);
        let applied = set.put_states([
            ("a:1".to_string(), Some(Endpoint::new("a:1"))),
            ("b:1".to_string(), Some(draining.clone())),
            ("c:1".to_string(), Some(Endpoint::new("c:1"))),
            ("d:1".to_string(), None),
        ]);
        assert_eq!(applied.added, vec!["c:1".to_string()]);
        assert_eq!(applied.updated, vec!["b:1".to_string()]);
        assert!(applied.removed.is_empty() && applied.anomalies.is_empty());
        let delta = set.delta_of(&applied);
        assert_eq!(delta.added, vec![Endpoint::new("c:1")]);
        assert_eq!(delta.updated, vec![draining]);
        // The delta takes a follower of the old set to the new one.
        let mut follower = before;
        assert!(follower.apply(Update::Delta(delta)).anomalies.is_empty());
        assert_eq!(follower.to_reset(), set.to_reset());
        let gone = set.put_states([("a:1".to_string(), None)]);
        assert_eq!(set.delta_of(&gone).removed, vec!["a:1".to_string()]);
    }

    #[test]
    fn wire_messages_round_trip() {
        let versioned = Versioned {
            epoch: 1,
            version: 2,
            update: Update::Delta(Delta {
                added: vec![Endpoint::new("a:1").with_metadata("zone", "x")],
                updated: vec![Endpoint::new("b:1").with_state(EndpointState::Draining)],
                removed: vec!["c:1".into()],
            }),
        };
        let wire = pb::WatchResponse::from(&versioned);
        assert_eq!(Versioned::try_from(wire).unwrap(), versioned);
        let empty = pb::WatchResponse::default();
        assert_eq!(Versioned::try_from(empty), Err(NoEvent));
    }
}
