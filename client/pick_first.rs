//! pick_first: try addresses in order, stick to the first that connects,
//! and hold no other connection. When the chosen backend dies, move on to
//! the next address at once instead of waiting for the resolver.

use std::sync::Arc;

use super::policy::{Policy, Subchannels};
use super::subchannel::{ReadyConnection, SubchannelState};

/// The pick_first policy.
#[derive(Debug, Default)]
pub struct PickFirst {
    /// Addresses in resolver order.
    addresses: Vec<Arc<str>>,
    /// Where pick_first stands.
    phase: Phase,
}

/// pick_first's progress through its address list.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Phase {
    /// No addresses.
    #[default]
    Empty,
    /// Trying `addresses[index]`; `tried` addresses of this pass have failed.
    Trying { index: usize, tried: usize },
    /// Every address failed; the subchannels retry on their own backoff and
    /// the first to connect is chosen.
    AllFailed,
    /// Connected to `address`.
    Connected { address: Arc<str> },
}

impl PickFirst {
    /// Starts a pass over the addresses at `start`.
    fn start_pass(&mut self, start: usize, subchannels: &mut Subchannels) {
        if self.addresses.is_empty() {
            self.phase = Phase::Empty;
            return;
        }
        self.phase = Phase::Trying {
            index: start % self.addresses.len(),
            tried: 0,
        };
        self.try_current(subchannels);
    }

    /// Asks the current address to connect, or adopts it if already Ready.
    fn try_current(&mut self, subchannels: &mut Subchannels) {
        let Phase::Trying { index, .. } = self.phase else {
            return;
        };
        let address = self.addresses[index].clone();
        let subchannel = subchannels.get_or_create(&address);
        match subchannel.state() {
            SubchannelState::Ready(_) => self.choose(address, subchannels),
            SubchannelState::Idle { .. } => subchannel.connect(),
            // Already trying, or in backoff and will try again by itself.
            SubchannelState::Connecting | SubchannelState::TransientFailure { .. } => {}
        }
    }

    /// Commits to `address` and closes every other connection.
    fn choose(&mut self, address: Arc<str>, subchannels: &mut Subchannels) {
        subchannels.retain(|a| a == &*address);
        self.phase = Phase::Connected { address };
    }

    fn position(&self, address: &str) -> Option<usize> {
        self.addresses.iter().position(|a| &**a == address)
    }
}

impl Policy for PickFirst {
    fn name(&self) -> &'static str {
        "pick_first"
    }

    fn update(&mut self, addresses: &[Arc<str>], subchannels: &mut Subchannels) {
        self.addresses = addresses.to_vec();
        // Stay put if the connected address is still listed.
        if let Phase::Connected { address } = &self.phase {
            if self.position(address).is_some() {
                return;
            }
        }
        let keep: Vec<Arc<str>> = self.addresses.clone();
        subchannels.retain(|a| keep.iter().any(|k| &**k == a));
        self.start_pass(0, subchannels);
    }

    fn subchannel_changed(&mut self, address: &Arc<str>, subchannels: &mut Subchannels) {
        let Some(state) = subchannels.get(address).map(|s| s.state().clone()) else {
            return;
        };
        match (&self.phase, state) {
            (Phase::Connected { address: chosen }, state)
                if chosen == address && !matches!(state, SubchannelState::Ready(_)) =>
            {
                // The chosen backend went away: try the next one now.
                let next = self.position(address).map_or(0, |i| i + 1);
                self.start_pass(next, subchannels);
            }
            (Phase::Trying { .. } | Phase::AllFailed, SubchannelState::Ready(_)) => {
                self.choose(address.clone(), subchannels);
            }
            (Phase::Trying { index, tried }, SubchannelState::TransientFailure { .. })
                if &self.addresses[*index] == address =>
            {
                let tried = tried + 1;
                if tried >= self.addresses.len() {
                    self.phase = Phase::AllFailed;
                } else {
                    self.phase = Phase::Trying {
                        index: (index + 1) % self.addresses.len(),
                        tried,
                    };
                    self.try_current(subchannels);
                }
            }
            (Phase::AllFailed, SubchannelState::Idle { .. }) => {
                if let Some(subchannel) = subchannels.get(address) {
                    subchannel.connect();
                }
            }
            _ => {}
        }
    }

    fn ready(&self, subchannels: &Subchannels) -> Vec<Arc<ReadyConnection>> {
        match &self.phase {
            Phase::Connected { address } => subchannels
                .get(address)
                .and_then(|s| s.ready().cloned())
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }
}
