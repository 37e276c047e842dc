//! round_robin: connect to every serving endpoint and rotate RPCs over the
//! Ready ones. A connection that is lost is redialled at once; one that
//! fails waits out its backoff.
//!
//! Every event costs O(1) bookkeeping: the Ready set is kept incrementally
//! and the aggregate state comes from counters, so N endpoints starting up
//! cost O(N) work plus one picker per batch of events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::error::ConnectError;
use super::policy::{
    Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, StateCounts, SubchannelId,
};
use super::subchannel::{ReadyConnection, SubchannelState};
use crate::discovery::{Applied, EndpointSet};

/// The round_robin policy.
#[derive(Debug)]
pub struct RoundRobin {
    /// Subchannels by connectivity.
    counts: StateCounts,
    /// The Ready connections, unordered; `slots` finds each in O(1).
    ready: Vec<(SubchannelId, Arc<ReadyConnection>)>,
    slots: HashMap<SubchannelId, usize>,
    /// The rotation position, shared by every picker so a rebuilt picker
    /// does not restart the rotation.
    cursor: Arc<AtomicUsize>,
    last_error: Option<Arc<ConnectError>>,
    /// Whether the picker is out of date.
    dirty: bool,
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self {
            counts: StateCounts::default(),
            ready: Vec::new(),
            slots: HashMap::new(),
            cursor: Arc::new(AtomicUsize::new(rand::random::<u32>() as usize)),
            last_error: None,
            dirty: true,
        }
    }
}

impl RoundRobin {
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
        for address in &changes.removed {
            if let Some(id) = cx.subchannels().id_of(address) {
                self.forget(id, cx);
            }
        }
        for address in changes.added.iter().chain(&changes.updated) {
            let Some(endpoint) = endpoints.get(address) else {
                continue;
            };
            if endpoint.is_draining() {
                // Draining: no new RPCs; removal lets in-flight ones finish.
                if let Some(id) = cx.subchannels().id_of(address) {
                    self.forget(id, cx);
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
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        let Some(subchannel) = cx.subchannels().get(id) else {
            return;
        };
        let state = subchannel.state();
        if let Some(error) = subchannel.last_error() {
            self.last_error = Some(error.clone());
        }
        let previous = self.counts.get(id);
        self.counts.set(id, Some(state.connectivity()));
        match state {
            SubchannelState::Ready(connection) => self.set_ready(id, Some(connection.clone())),
            SubchannelState::Idle { .. } => {
                subchannel.connect();
                self.set_ready(id, None);
            }
            _ => self.set_ready(id, None),
        }
        if previous != Some(state.connectivity()) {
            self.dirty = true;
        }
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(PolicyPicker {
            picker: Arc::new(RoundRobinPicker {
                connections: self.ready.iter().map(|(_, c)| c.clone()).collect(),
                cursor: self.cursor.clone(),
            }),
            connectivity: self.counts.aggregate(),
            last_error: self.last_error.clone(),
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
