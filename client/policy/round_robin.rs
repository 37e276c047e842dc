//! round_robin: connect to every serving endpoint and rotate RPCs over the
//! Ready ones. A connection that is lost is redialled at once; one that
//! fails waits out its backoff.
//!
//! Every event costs O(1) bookkeeping: the Ready set is kept incrementally
//! and the aggregate state comes from counters, so N endpoints starting up
//! cost O(N) work plus one picker per batch of events.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::client::policy::{
    Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, SubchannelId,
};
use crate::client::ready_set::ReadySet;
use crate::client::subchannel::ReadyConnection;
use crate::discovery::{Applied, EndpointSet};

/// The round_robin policy.
#[derive(Debug)]
pub struct RoundRobin {
    /// Every serving endpoint's subchannel and the Ready ones.
    subchannels: ReadySet,
    /// The rotation position, shared by every picker so a rebuilt picker
    /// does not restart the rotation.
    cursor: Arc<AtomicUsize>,
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self {
            subchannels: ReadySet::default(),
            cursor: Arc::new(AtomicUsize::new(rand::random::<u32>() as usize)),
        }
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) {
        self.subchannels.endpoints_changed(endpoints, changes, cx);
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        self.subchannels.subchannel_changed(id, cx);
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        if !self.subchannels.take_dirty() {
            return None;
        }
        Some(PolicyPicker {
            picker: Arc::new(RoundRobinPicker {
                connections: self
                    .subchannels
                    .ready()
                    .iter()
                    .map(|(_, c)| c.clone())
                    .collect(),
                cursor: self.cursor.clone(),
            }),
            connectivity: self.subchannels.connectivity(),
            last_error: self.subchannels.last_error().cloned(),
        })
    }
}

/// Rotates over a fixed list of Ready connections.
#[derive(Debug)]
pub struct RoundRobinPicker {
    connections: Vec<Arc<ReadyConnection>>,
    cursor: Arc<AtomicUsize>,
}

impl RoundRobinPicker {
    /// A picker rotating over `connections` from a random position.
    pub fn new(connections: Vec<Arc<ReadyConnection>>) -> Self {
        Self {
            connections,
            cursor: Arc::new(AtomicUsize::new(rand::random::<u32>() as usize)),
        }
    }
}

impl Picker for RoundRobinPicker {
    fn pick(&self, _info: &PickInfo<'_>) -> Pick {
        let len = self.connections.len();
        for _ in 0..len {
            let connection = &self.connections[self.cursor.fetch_add(1, Ordering::Relaxed) % len];
            // A connection may close before the balancer hears of it.
            if !connection.sender.is_closed() {
                return Pick::Connection {
                    connection: connection.clone(),
                    done: None,
                };
            }
        }
        Pick::Queue
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        &self.connections
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::policy::test_utils::{addresses, FakeController};
    use crate::client::subchannel::ConnectivityState;
    use crate::discovery::{Delta, Endpoint, EndpointState, Update};

    fn started(endpoints: &[&str]) -> FakeController<RoundRobin> {
        let mut fake = FakeController::new(RoundRobin::default());
        fake.reset(endpoints);
        fake
    }

    #[test]
    fn connects_to_every_endpoint_and_rotates_over_the_ready_ones() {
        let mut fake = started(&["a:1", "b:1", "c:1"]);
        assert_eq!(
            fake.take_actions(),
            [
                "create a:1",
                "create b:1",
                "create c:1",
                "connect a:1",
                "connect b:1",
                "connect c:1"
            ]
        );
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert!(matches!(fake.pick(), Pick::Queue));
        fake.ready("a:1");
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        assert_eq!(addresses(&fake.calls(2)), ["a:1", "a:1"]);
        fake.ready("c:1");
        let picks = fake.calls(6);
        let picks = addresses(&picks);
        // Strict alternation, whichever comes first.
        assert!(picks.windows(2).all(|w| w[0] != w[1]), "{picks:?}");
        assert_eq!(picks.iter().filter(|a| **a == "a:1").count(), 3);
        assert!(matches!(fake.pick(), Pick::Connection { done: None, .. }));
        assert!(fake.take_actions().is_empty());
    }

    #[test]
    fn redials_a_lost_connection_at_once_but_not_a_failed_attempt() {
        let mut fake = started(&["a:1", "b:1"]);
        fake.ready("a:1");
        fake.take_actions();
        fake.lost("a:1");
        assert_eq!(fake.take_actions(), ["connect a:1"]);
        fake.fail("b:1");
        assert!(fake.take_actions().is_empty());
    }

    #[test]
    fn is_ready_if_any_is_then_connecting_then_failing() {
        let mut fake = started(&["a:1", "b:1"]);
        // Idle subchannels about to connect count as Connecting.
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        fake.fail("a:1");
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        let last = fake.fail("b:1");
        assert_eq!(fake.connectivity(), ConnectivityState::TransientFailure);
        assert_eq!(fake.picker().last_error, Some(last));
        fake.connecting("a:1");
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        fake.ready("a:1");
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        assert_eq!(addresses(&fake.calls(2)), ["a:1", "a:1"]);
    }

    #[test]
    fn drops_removed_and_draining_endpoints() {
        let mut fake = started(&["a:1", "b:1"]);
        fake.ready("a:1");
        fake.ready("b:1");
        fake.take_actions();
        fake.update(Update::Delta(Delta {
            removed: vec!["a:1".into()],
            ..Delta::default()
        }));
        assert_eq!(fake.take_actions(), ["remove a:1"]);
        assert_eq!(addresses(&fake.calls(2)), ["b:1", "b:1"]);
        fake.update(Update::Delta(Delta {
            updated: vec![Endpoint::new("b:1").with_state(EndpointState::Draining)],
            ..Delta::default()
        }));
        assert_eq!(fake.take_actions(), ["remove b:1"]);
        assert!(matches!(fake.pick(), Pick::Queue));
        assert!(fake.picker().picker.connections().is_empty());
    }

    #[test]
    fn a_rebuilt_picker_carries_on_the_rotation() {
        let mut fake = started(&["a:1", "b:1", "c:1"]);
        fake.ready("a:1");
        fake.ready("b:1");
        let first = fake.call(tonic::Code::Ok).unwrap();
        let pickers = fake.pickers();
        // A state change that leaves the Ready list as it was.
        fake.connecting("c:1");
        assert_eq!(fake.pickers(), pickers + 1);
        let second = fake.call(tonic::Code::Ok).unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn skips_a_connection_that_closed_unreported() {
        let mut fake = started(&["a:1", "b:1"]);
        fake.ready("a:1");
        fake.ready("b:1");
        fake.close("a:1");
        assert_eq!(addresses(&fake.calls(3)), ["b:1", "b:1", "b:1"]);
        fake.close("b:1");
        assert!(matches!(fake.pick(), Pick::Queue));
    }

    #[test]
    fn publishes_no_picker_when_nothing_changed() {
        let mut fake = started(&["a:1"]);
        fake.connecting("a:1");
        let pickers = fake.pickers();
        fake.connecting("a:1");
        assert_eq!(fake.pickers(), pickers);
    }
}
