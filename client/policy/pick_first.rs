//! pick_first: try serving endpoints in the resolver's order, stick to the
//! first that connects, and hold no other connection. When the chosen
//! backend dies, move on to the next address at once instead of waiting for
//! the resolver.

use std::sync::Arc;

use crate::client::error::ConnectError;
use crate::client::policy::{
    Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, SubchannelId,
};
use crate::client::subchannel::{ConnectivityState, ReadyConnection, SubchannelState};
use crate::discovery::{Applied, EndpointSet};

/// The pick_first policy.
#[derive(Debug, Default)]
pub struct PickFirst {
    /// Serving addresses in resolver order.
    addresses: Vec<Arc<str>>,
    /// Where pick_first stands.
    phase: Phase,
    last_error: Option<Arc<ConnectError>>,
    /// Whether the picker is out of date.
    dirty: bool,
}

/// pick_first's progress through its address list.
#[derive(Debug, Default, Clone)]
enum Phase {
    /// No addresses.
    #[default]
    Empty,
    /// Trying `addresses[index]`; `tried` addresses of this pass have failed.
    Trying { index: usize, tried: usize },
    /// Every address failed; the subchannels retry on their own backoff and
    /// the first to connect is chosen.
    AllFailed,
    /// Connected to subchannel `id` over `connection`.
    Connected {
        id: SubchannelId,
        connection: Arc<ReadyConnection>,
    },
}

impl PickFirst {
    /// Starts a pass over the addresses at `start`.
    fn start_pass(&mut self, start: usize, cx: &mut PolicyContext<'_>) {
        self.dirty = true;
        if self.addresses.is_empty() {
            self.phase = Phase::Empty;
            return;
        }
        self.phase = Phase::Trying {
            index: start % self.addresses.len(),
            tried: 0,
        };
        self.try_current(cx);
    }

    /// Asks the current address to connect, or adopts it if already Ready.
    fn try_current(&mut self, cx: &mut PolicyContext<'_>) {
        let Phase::Trying { index, .. } = self.phase else {
            return;
        };
        let id = cx.subchannels().get_or_create(&self.addresses[index]);
        let subchannel = cx.subchannels().get(id).expect("just created");
        match subchannel.state() {
            SubchannelState::Ready(connection) => {
                let connection = connection.clone();
                self.choose(id, connection, cx)
            }
            SubchannelState::Idle { .. } => subchannel.connect(),
            // Already trying, or in backoff and will try again by itself.
            SubchannelState::Connecting | SubchannelState::TransientFailure { .. } => {}
        }
    }

    /// Commits to subchannel `id` and closes every other connection.
    fn choose(
        &mut self,
        id: SubchannelId,
        connection: Arc<ReadyConnection>,
        cx: &mut PolicyContext<'_>,
    ) {
        cx.subchannels().retain(|s| s.id() == id);
        self.phase = Phase::Connected { id, connection };
        self.dirty = true;
    }

    fn position(&self, address: &str) -> Option<usize> {
        self.addresses.iter().position(|a| &**a == address)
    }
}

impl Policy for PickFirst {
    fn name(&self) -> &'static str {
        "pick_first"
    }

    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        _changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) {
        self.addresses = endpoints
            .iter()
            .filter(|e| !e.is_draining())
            .map(|e| Arc::from(e.address.as_str()))
            .collect();
        // Stay put if the connected address is still listed.
        if let Phase::Connected { id, .. } = self.phase {
            let listed = cx
                .subchannels()
                .get(id)
                .is_some_and(|s| self.position(s.address()).is_some());
            if listed {
                return;
            }
        }
        let keep = &self.addresses;
        cx.subchannels()
            .retain(|s| keep.iter().any(|k| **k == **s.address()));
        self.start_pass(0, cx);
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        let Some(subchannel) = cx.subchannels().get(id) else {
            return;
        };
        let state = subchannel.state().clone();
        let address = subchannel.address().clone();
        if let Some(error) = subchannel.last_error() {
            self.last_error = Some(error.clone());
        }
        self.dirty = true;
        match (&self.phase, state) {
            (Phase::Connected { id: chosen, .. }, state)
                if *chosen == id && !matches!(state, SubchannelState::Ready(_)) =>
            {
                // The chosen backend went away: try the next one now.
                let next = self.position(&address).map_or(0, |i| i + 1);
                self.start_pass(next, cx);
            }
            (Phase::Trying { .. } | Phase::AllFailed, SubchannelState::Ready(connection)) => {
                self.choose(id, connection, cx);
            }
            (Phase::Trying { index, tried }, SubchannelState::TransientFailure { .. })
                if self.addresses[*index] == address =>
            {
                let tried = tried + 1;
                if tried >= self.addresses.len() {
                    self.phase = Phase::AllFailed;
                } else {
                    self.phase = Phase::Trying {
                        index: (index + 1) % self.addresses.len(),
                        tried,
                    };
                    self.try_current(cx);
                }
            }
            (Phase::AllFailed, SubchannelState::Idle { .. }) => {
                if let Some(subchannel) = cx.subchannels().get(id) {
                    subchannel.connect();
                }
            }
            _ => {}
        }
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let (connection, connectivity) = match &self.phase {
            Phase::Connected { connection, .. } => {
                (Some(connection.clone()), ConnectivityState::Ready)
            }
            Phase::Empty | Phase::AllFailed => (None, ConnectivityState::TransientFailure),
            Phase::Trying { .. } => (None, ConnectivityState::Connecting),
        };
        Some(PolicyPicker {
            picker: Arc::new(PickFirstPicker { connection }),
            connectivity,
            last_error: self.last_error.clone(),
        })
    }
}

/// Always the one chosen connection.
#[derive(Debug)]
pub struct PickFirstPicker {
    connection: Option<Arc<ReadyConnection>>,
}

impl Picker for PickFirstPicker {
    fn pick(&self, _info: &PickInfo<'_>) -> Pick {
        match &self.connection {
            Some(connection) if !connection.sender.is_closed() => Pick::Connection {
                connection: connection.clone(),
                done: None,
            },
            _ => Pick::Queue,
        }
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        self.connection.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::policy::test_utils::{addresses, FakeController};
    use crate::discovery::{Endpoint, EndpointState, Update};

    fn started(endpoints: &[&str]) -> FakeController<PickFirst> {
        let mut fake = FakeController::new(PickFirst::default());
        fake.reset(endpoints);
        fake
    }

    #[test]
    fn tries_endpoints_in_order_and_sticks_to_the_first_that_connects() {
        let mut fake = started(&["a:1", "b:1", "c:1"]);
        // One address at a time, in the resolver's order.
        assert_eq!(fake.take_actions(), ["create a:1", "connect a:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert!(matches!(fake.pick(), Pick::Queue));
        fake.connecting("a:1");
        assert!(fake.take_actions().is_empty());
        let refused = fake.fail("a:1");
        assert_eq!(fake.take_actions(), ["create b:1", "connect b:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert_eq!(fake.picker().last_error, Some(refused));
        fake.ready("b:1");
        // No other connection is held.
        assert_eq!(fake.take_actions(), ["remove a:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        assert_eq!(addresses(&fake.calls(3)), ["b:1", "b:1", "b:1"]);
        assert!(matches!(fake.pick(), Pick::Connection { done: None, .. }));
    }

    #[test]
    fn moves_on_to_the_next_address_at_once_when_the_chosen_one_is_lost() {
        let mut fake = started(&["a:1", "b:1", "c:1"]);
        fake.ready("a:1");
        fake.take_actions();
        fake.lost("a:1");
        // The next address, not a redial of the lost one.
        assert_eq!(fake.take_actions(), ["create b:1", "connect b:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert!(matches!(fake.pick(), Pick::Queue));
        assert!(matches!(
            fake.picker().last_error.as_deref(),
            Some(ConnectError::Lost { .. })
        ));
        fake.ready("b:1");
        assert_eq!(fake.take_actions(), ["remove a:1"]);
        assert_eq!(addresses(&fake.calls(2)), ["b:1", "b:1"]);
    }

    #[test]
    fn wraps_around_from_the_last_address() {
        let mut fake = started(&["a:1", "b:1"]);
        fake.fail("a:1");
        fake.ready("b:1");
        fake.take_actions();
        fake.lost("b:1");
        assert_eq!(fake.take_actions(), ["create a:1", "connect a:1"]);
    }

    #[test]
    fn fails_when_every_address_failed_and_takes_whichever_recovers_first() {
        let mut fake = started(&["a:1", "b:1"]);
        fake.fail("a:1");
        let last = fake.fail("b:1");
        assert_eq!(fake.connectivity(), ConnectivityState::TransientFailure);
        assert_eq!(fake.picker().last_error, Some(last));
        assert!(matches!(fake.pick(), Pick::Queue));
        fake.take_actions();
        // Backoff over, a subchannel that went Idle is asked to connect.
        fake.set_state("a:1", SubchannelState::Idle { last_error: None });
        assert_eq!(fake.take_actions(), ["connect a:1"]);
        // Still retrying on their own: the first to connect wins.
        fake.ready("b:1");
        assert_eq!(fake.take_actions(), ["remove a:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        assert_eq!(addresses(&fake.calls(1)), ["b:1"]);
    }

    #[test]
    fn stays_on_its_connection_while_the_resolver_still_lists_it() {
        let mut fake = started(&["a:1", "b:1"]);
        fake.ready("a:1");
        fake.take_actions();
        let pickers = fake.pickers();
        fake.reset(&["b:1", "a:1", "c:1"]);
        assert!(fake.take_actions().is_empty());
        assert_eq!(fake.pickers(), pickers);
        assert_eq!(addresses(&fake.calls(1)), ["a:1"]);
        // Unlisted: start over from the top of the new list.
        fake.reset(&["c:1", "b:1"]);
        assert_eq!(
            fake.take_actions(),
            ["create c:1", "connect c:1", "remove a:1"]
        );
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert!(matches!(fake.pick(), Pick::Queue));
    }

    #[test]
    fn skips_draining_endpoints() {
        let mut fake = FakeController::new(PickFirst::default());
        fake.update(Update::Reset(vec![
            Endpoint::new("a:1").with_state(EndpointState::Draining),
            Endpoint::new("b:1"),
        ]));
        assert_eq!(fake.take_actions(), ["create b:1", "connect b:1"]);
    }

    #[test]
    fn takes_an_earlier_address_that_recovers_while_trying_a_later_one() {
        let mut fake = started(&["a:1", "b:1"]);
        fake.fail("a:1");
        fake.connecting("b:1");
        fake.take_actions();
        // a retried on its own backoff and made it first.
        fake.ready("a:1");
        assert_eq!(fake.take_actions(), ["remove b:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        assert_eq!(addresses(&fake.calls(1)), ["a:1"]);
    }

    #[test]
    fn with_no_endpoints_fails_and_closes_everything() {
        let mut fake = started(&["a:1"]);
        fake.ready("a:1");
        fake.take_actions();
        fake.reset(&[]);
        assert_eq!(fake.take_actions(), ["remove a:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::TransientFailure);
        assert!(matches!(fake.pick(), Pick::Queue));
    }

    #[test]
    fn queues_when_its_connection_closed_before_the_balancer_heard() {
        let mut fake = started(&["a:1"]);
        fake.ready("a:1");
        fake.close("a:1");
        assert!(matches!(fake.pick(), Pick::Queue));
        assert_eq!(fake.picker().picker.connections().len(), 1);
    }
}
