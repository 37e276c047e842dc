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
