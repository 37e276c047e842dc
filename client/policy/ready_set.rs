//! The bookkeeping every "use all backends" policy shares: connect to each
//! serving endpoint, redial lost connections, and keep the Ready ones in a
//! list a picker can copy. [`round_robin`](crate::client::round_robin),
//! [`least_request`](crate::client::least_request) and
//! [`weighted_round_robin`](crate::client::weighted_round_robin) all stand on it and
//! differ only in how their pickers choose.
//!
//! Every event costs O(1): the Ready list is kept incrementally and the
//! aggregate state comes from counters.

use std::collections::HashMap;
use std::sync::Arc;

use crate::client::error::ConnectError;
use crate::client::policy::{PolicyContext, StateCounts, SubchannelId};
use crate::client::subchannel::{ConnectivityState, ReadyConnection, SubchannelState};
use crate::discovery::{Applied, EndpointSet};

/// The subchannels of a policy that connects to every serving endpoint.
#[derive(Debug)]
pub struct ReadySet {
    /// Subchannels by connectivity.
    counts: StateCounts,
    /// The Ready connections, unordered; `slots` finds each in O(1).
    ready: Vec<(SubchannelId, Arc<ReadyConnection>)>,
    slots: HashMap<SubchannelId, usize>,
    /// The most recent connection error, for failing RPCs' status.
    last_error: Option<Arc<ConnectError>>,
    /// Whether what a picker would be built from changed.
    dirty: bool,
}

impl Default for ReadySet {
    fn default() -> Self {
        Self {
            counts: StateCounts::default(),
            ready: Vec::new(),
            slots: HashMap::new(),
            last_error: None,
            dirty: true,
        }
    }
}

impl ReadySet {
    /// Follows an endpoint change: new serving endpoints get a subchannel
    /// that connects at once; removed and draining ones are shut down
    /// (gracefully: in-flight RPCs finish). Returns the subchannels removed.
    pub fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) -> Vec<SubchannelId> {
        let mut removed = Vec::new();
        for address in &changes.removed {
            if let Some(id) = cx.subchannels().id_of(address) {
                self.forget(id, cx);
                removed.push(id);
            }
        }
        for address in changes.added.iter().chain(&changes.updated) {
            let Some(endpoint) = endpoints.get(address) else {
                continue;
            };
            if endpoint.is_draining() {
                if let Some(id) = cx.subchannels().id_of(address) {
                    self.forget(id, cx);
                    removed.push(id);
                }
                continue;
            }
            let id = cx.subchannels().get_or_create(address);
            if self.counts.get(id).is_none() {
                let subchannel = cx.subchannels().get(id).expect("just created");
                subchannel.connect();
                self.counts.set(id, Some(subchannel.state().connectivity()));
                self.dirty = true;
            }
        }
        removed
    }

    /// Follows subchannel `id`'s new state; an Idle one is redialled.
    pub fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        let Some(subchannel) = cx.subchannels().get(id) else {
            return;
        };
        // A subchannel this set does not own (another policy's, or one it
        // already forgot) is none of its business.
        let Some(previous) = self.counts.get(id) else {
            return;
        };
        let state = subchannel.state();
        if let Some(error) = subchannel.last_error() {
            self.last_error = Some(error.clone());
        }
        self.counts.set(id, Some(state.connectivity()));
        match state {
            SubchannelState::Ready(connection) => {
                let connection = connection.clone();
                self.set_ready(id, Some(connection));
            }
            SubchannelState::Idle { .. } => {
                subchannel.connect();
                self.set_ready(id, None);
            }
            _ => self.set_ready(id, None),
        }
        if previous != state.connectivity() {
            self.dirty = true;
        }
    }

    /// The Ready connections with their subchannel ids, in no set order.
    pub fn ready(&self) -> &[(SubchannelId, Arc<ReadyConnection>)] {
        &self.ready
    }

    /// The aggregate state (Ready if any subchannel is).
    pub fn connectivity(&self) -> ConnectivityState {
        self.counts.aggregate()
    }

    /// The most recent connection error.
    pub fn last_error(&self) -> Option<&Arc<ConnectError>> {
        self.last_error.as_ref()
    }

    /// Whether a new picker is due; clears the flag.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Asks for a new picker although the Ready list did not change (the
    /// policy's own inputs, such as weights, did).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    fn set_ready(&mut self, id: SubchannelId, connection: Option<Arc<ReadyConnection>>) {
        match (connection, self.slots.get(&id).copied()) {
            (Some(connection), Some(slot)) => self.ready[slot].1 = connection,
            (Some(connection), None) => {
                self.slots.insert(id, self.ready.len());
                self.ready.push((id, connection));
            }
            (None, Some(slot)) => {
                self.slots.remove(&id);
                self.ready.swap_remove(slot);
                if let Some((moved, _)) = self.ready.get(slot) {
                    self.slots.insert(*moved, slot);
                }
            }
            (None, None) => return,
        }
        self.dirty = true;
    }

    fn forget(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        cx.subchannels().remove(id);
        self.counts.set(id, None);
        self.set_ready(id, None);
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::policy::round_robin::RoundRobinPicker;
    use crate::client::policy::test_utils::FakeController;
    use crate::client::policy::{Policy, PolicyPicker};
    use crate::discovery::{Delta, Endpoint, EndpointState, Update};

    /// A policy that is only a ready set, remembering what it removed, and
    /// owning one subchannel of its own besides.
    #[derive(Default)]
    struct Only {
        set: ReadySet,
        removed: Vec<SubchannelId>,
        foreign: Option<&'static str>,
    }

    impl Policy for Only {
        fn name(&self) -> &'static str {
            "ready_set"
        }

        fn endpoints_changed(
            &mut self,
            endpoints: &EndpointSet,
            changes: &Applied,
            cx: &mut PolicyContext<'_>,
        ) {
            if let Some(address) = self.foreign {
                cx.subchannels().get_or_create(address);
            }
            let removed = self.set.endpoints_changed(endpoints, changes, cx);
            self.removed.extend(removed);
        }

        fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
            self.set.subchannel_changed(id, cx);
        }

        fn take_picker(&mut self) -> Option<PolicyPicker> {
            if !self.set.take_dirty() {
                return None;
            }
            let connections = self.set.ready().iter().map(|(_, c)| c.clone()).collect();
            Some(PolicyPicker {
                picker: Arc::new(RoundRobinPicker::new(connections)),
                connectivity: self.set.connectivity(),
                last_error: self.set.last_error().cloned(),
            })
        }
    }

    /// The Ready addresses, sorted.
    fn ready(fake: &FakeController<Only>) -> Vec<String> {
        let mut ready: Vec<String> = fake
            .policy
            .set
            .ready()
            .iter()
            .map(|(_, c)| c.address.to_string())
            .collect();
        ready.sort();
        ready
    }

    fn delta(added: &[&str], updated: Vec<Endpoint>, removed: &[&str]) -> Update {
        Update::Delta(Delta {
            added: added.iter().map(|a| Endpoint::new(*a)).collect(),
            updated,
            removed: removed.iter().map(|a| a.to_string()).collect(),
        })
    }

    #[test]
    fn keeps_the_ready_list_in_step_with_every_state_change() {
        let mut fake = FakeController::new(Only::default());
        fake.reset(&["a:1", "b:1", "c:1", "d:1"]);
        for address in ["a:1", "b:1", "c:1", "d:1"] {
            fake.ready(address);
        }
        assert_eq!(ready(&fake), ["a:1", "b:1", "c:1", "d:1"]);
        // Out of the middle and off the front: each slot moves correctly.
        fake.fail("b:1");
        fake.lost("a:1");
        assert_eq!(ready(&fake), ["c:1", "d:1"]);
        // A new connection for one already Ready replaces it in place.
        let fresh = fake.ready("d:1");
        assert_eq!(ready(&fake), ["c:1", "d:1"]);
        let (_, held) = fake
            .policy
            .set
            .ready()
            .iter()
            .find(|(_, c)| c.address.as_ref() == "d:1")
            .unwrap();
        assert!(Arc::ptr_eq(held, &fresh));
        fake.ready("a:1");
        fake.fail("c:1");
        assert_eq!(ready(&fake), ["a:1", "d:1"]);
        assert_eq!(fake.picker().picker.connections().len(), 2);
    }

    #[test]
    fn connects_new_serving_endpoints_and_reports_those_it_removed() {
        let mut fake = FakeController::new(Only::default());
        fake.reset(&["a:1", "b:1"]);
        assert_eq!(
            fake.take_actions(),
            ["create a:1", "create b:1", "connect a:1", "connect b:1"]
        );
        let a = fake.policy.removed.len();
        assert_eq!(a, 0);
        fake.ready("a:1");
        fake.update(delta(
            &["c:1"],
            vec![Endpoint::new("b:1").with_state(EndpointState::Draining)],
            &["a:1"],
        ));
        assert_eq!(
            fake.take_actions(),
            ["create c:1", "connect c:1", "remove a:1", "remove b:1"]
        );
        assert_eq!(fake.policy.removed, [1, 2]);
        assert!(ready(&fake).is_empty());
        // A metadata change neither recreates nor redials.
        fake.update(delta(
            &[],
            vec![Endpoint::new("c:1").with_metadata("zone", "z")],
            &[],
        ));
        assert!(fake.take_actions().is_empty());
        // Back after removal: a new subchannel.
        fake.update(delta(&["a:1"], vec![], &[]));
        assert_eq!(fake.take_actions(), ["create a:1", "connect a:1"]);
    }

    #[test]
    fn leaves_subchannels_it_does_not_own_alone() {
        let mut fake = FakeController::new(Only {
            foreign: Some("x:1"),
            ..Only::default()
        });
        fake.reset(&["a:1"]);
        assert_eq!(
            fake.take_actions(),
            ["create x:1", "create a:1", "connect a:1"]
        );
        fake.lost("x:1");
        fake.ready("x:1");
        assert!(ready(&fake).is_empty());
        assert!(fake.take_actions().is_empty());
    }

    #[test]
    fn wants_a_picker_only_when_something_changed() {
        let mut fake = FakeController::new(Only::default());
        assert!(fake.policy.set.take_dirty(), "the first picker is due");
        fake.reset(&["a:1"]);
        let pickers = fake.pickers();
        fake.set_state("a:1", SubchannelState::Idle { last_error: None });
        assert_eq!(fake.pickers(), pickers, "Idle again is no change");
        fake.connecting("a:1");
        assert_eq!(fake.pickers(), pickers + 1);
        fake.policy.set.mark_dirty();
        assert!(fake.policy.set.take_dirty());
        assert!(!fake.policy.set.take_dirty());
    }
}
