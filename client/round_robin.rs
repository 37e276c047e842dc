//! round_robin: connect to every address and rotate RPCs over the Ready
//! ones. A connection that is lost is redialled at once; one that fails
//! waits out its backoff.

use std::collections::HashSet;
use std::sync::Arc;

use super::policy::{Policy, Subchannels};
use super::subchannel::{ReadyConnection, SubchannelState};

/// The round_robin policy.
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Addresses in resolver order; rotation follows it.
    addresses: Vec<Arc<str>>,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn update(&mut self, addresses: &[Arc<str>], subchannels: &mut Subchannels) {
        let wanted: HashSet<&str> = addresses.iter().map(|a| &**a).collect();
        subchannels.retain(|address| wanted.contains(address));
        for address in addresses {
            let subchannel = subchannels.get_or_create(address);
            if matches!(subchannel.state(), SubchannelState::Idle { .. }) {
                subchannel.connect();
            }
        }
        self.addresses = addresses.to_vec();
    }

    fn subchannel_changed(&mut self, address: &Arc<str>, subchannels: &mut Subchannels) {
        if let Some(subchannel) = subchannels.get(address) {
            if matches!(subchannel.state(), SubchannelState::Idle { .. }) {
                subchannel.connect();
            }
        }
    }

    fn ready(&self, subchannels: &Subchannels) -> Vec<Arc<ReadyConnection>> {
        self.addresses
            .iter()
            .filter_map(|address| subchannels.get(address)?.ready().cloned())
            .collect()
    }
}
