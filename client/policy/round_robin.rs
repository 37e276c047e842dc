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
