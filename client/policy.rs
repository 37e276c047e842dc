//! What a balancing policy decides, and the subchannels it decides over.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::subchannel::{ConnectConfig, ReadyConnection, Subchannel, SubchannelEvent};

/// A load-balancing policy: which addresses get connections, and which
/// connections RPCs may be sent on. Policies are driven by the balancer
/// task, never from the RPC path.
pub trait Policy: Send + 'static {
    /// The policy's name as grpc-go spells it.
    fn name(&self) -> &'static str;

    /// The set of addresses that may take new RPCs changed (draining and
    /// removed endpoints are already left out). Order is the resolver's.
    fn update(&mut self, addresses: &[Arc<str>], subchannels: &mut Subchannels);

    /// The subchannel for `address` changed state.
    fn subchannel_changed(&mut self, address: &Arc<str>, subchannels: &mut Subchannels);

    /// The connections RPCs may be sent on, in rotation order.
    fn ready(&self, subchannels: &Subchannels) -> Vec<Arc<ReadyConnection>>;
}

/// The subchannels of one balancer, by address. Removing one shuts it down
/// gracefully: in-flight RPCs finish before its connection closes.
pub struct Subchannels {
    by_address: HashMap<Arc<str>, Subchannel>,
    next_id: u64,
    config: Arc<ConnectConfig>,
    events: mpsc::UnboundedSender<SubchannelEvent>,
}

impl Subchannels {
    /// An empty set whose subchannels report to `events`.
    pub fn new(config: Arc<ConnectConfig>, events: mpsc::UnboundedSender<SubchannelEvent>) -> Self {
        Self {
            by_address: HashMap::new(),
            next_id: 0,
            config,
            events,
        }
    }

    /// The subchannel for `address`, created Idle if missing.
    pub fn get_or_create(&mut self, address: &Arc<str>) -> &mut Subchannel {
        let Self {
            by_address,
            next_id,
            config,
            events,
        } = self;
        by_address.entry(address.clone()).or_insert_with(|| {
            *next_id += 1;
            Subchannel::spawn(*next_id, address.clone(), config.clone(), events.clone())
        })
    }

    /// The subchannel for `address`, if any.
    pub fn get(&self, address: &str) -> Option<&Subchannel> {
        self.by_address.get(address)
    }

    /// The subchannel with `id`, if it still exists.
    pub fn by_id_mut(&mut self, id: u64) -> Option<&mut Subchannel> {
        self.by_address.values_mut().find(|s| s.id() == id)
    }

    /// Shuts down every subchannel whose address `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.by_address.retain(|address, _| keep(address));
    }

    /// Every subchannel.
    pub fn iter(&self) -> impl Iterator<Item = &Subchannel> {
        self.by_address.values()
    }
}
