//! The balancer task: applies resolver updates and subchannel state changes
//! to the policy, and publishes the result as a [`Picker`] for the RPC path
//! and a [`BalancerState`] for observers.
//!
//! All decisions happen here, off the RPC path; an RPC only loads the
//! current picker (lock-free) and takes the next connection from it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use super::policy::{Policy, Subchannels};
use super::resolver::{Endpoint, Resolution};
use super::subchannel::{ConnectConfig, ConnectivityState, ReadyConnection};

/// What the channel looks like now, for tests, the CLI and users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerState {
    /// The aggregate connectivity state.
    pub connectivity: ConnectivityState,
    /// The endpoint set last resolved (draining ones included).
    pub endpoints: Vec<Endpoint>,
    /// The addresses RPCs are being sent to.
    pub ready: Vec<String>,
    /// Why RPCs would fail now, if they would.
    pub last_error: Option<String>,
    /// Why the resolver cannot reach its source (e.g. the registry is
    /// down), while the last known endpoints stay in use.
    pub resolver_error: Option<String>,
}

impl Default for BalancerState {
    fn default() -> Self {
        Self {
            connectivity: ConnectivityState::Idle,
            endpoints: Vec::new(),
            ready: Vec::new(),
            last_error: None,
            resolver_error: None,
        }
    }
}

/// An immutable snapshot of the connections RPCs may use.
#[derive(Debug)]
pub struct Picker {
    /// Connections in rotation order.
    ready: Vec<Arc<ReadyConnection>>,
    /// The aggregate state when this picker was built.
    pub connectivity: ConnectivityState,
    /// Why no connection is ready, for the UNAVAILABLE status.
    pub error: Option<String>,
}

impl Picker {
    /// A picker with nothing to pick yet.
    pub fn empty() -> Self {
        Self {
            ready: Vec::new(),
            connectivity: ConnectivityState::Idle,
            error: None,
        }
    }

    /// The connections in rotation order.
    pub fn connections(&self) -> &[Arc<ReadyConnection>] {
        &self.ready
    }

    /// The next open connection in rotation, advancing `cursor`.
    pub fn pick(&self, cursor: &AtomicUsize) -> Option<&Arc<ReadyConnection>> {
        let len = self.ready.len();
        for _ in 0..len {
            let connection = &self.ready[cursor.fetch_add(1, Ordering::Relaxed) % len];
            // A connection may close before the balancer hears of it.
            if !connection.sender.is_closed() {
                return Some(connection);
            }
        }
        None
    }
}

/// Where the balancer publishes.
pub struct Outputs {
    /// The picker the RPC path loads.
    pub picker: Arc<ArcSwap<Picker>>,
    /// Wakes RPCs waiting for a new picker.
    pub picker_changed: watch::Sender<()>,
    /// The observable state.
    pub state: watch::Sender<BalancerState>,
}

/// Runs the balancer until the channel is dropped (the task is aborted).
pub async fn run(
    service: String,
    mut policy: Box<dyn Policy>,
    config: Arc<ConnectConfig>,
    mut resolution: watch::Receiver<Resolution>,
    outputs: Outputs,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut subchannels = Subchannels::new(config, events_tx);
    let mut resolved = Resolution::default();
    let mut resolver_alive = true;
    loop {
        tokio::select! {
            changed = resolution.changed(), if resolver_alive => {
                if changed.is_err() {
                    // The resolver finished; keep the last set.
                    resolver_alive = false;
                    continue;
                }
                let next = resolution.borrow_and_update().clone();
                let endpoints_changed = match (&next.endpoints, &resolved.endpoints) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                    (a, b) => a.is_some() != b.is_some(),
                };
                resolved = next;
                if endpoints_changed {
                    let addresses: Vec<Arc<str>> = resolved
                        .endpoints
                        .iter()
                        .flat_map(|set| set.iter())
                        .filter(|e| !e.draining)
                        .map(|e| Arc::from(e.address.as_str()))
                        .collect();
                    tracing::debug!(%service, policy = policy.name(), ?addresses, "endpoints changed");
                    policy.update(&addresses, &mut subchannels);
                }
            }
            Some(event) = events.recv() => {
                let Some(subchannel) = subchannels.by_id_mut(event.id) else { continue };
                subchannel.set_state(event.state);
                let address = subchannel.address().clone();
                policy.subchannel_changed(&address, &mut subchannels);
            }
        }
        publish(&service, &*policy, &subchannels, &resolved, &outputs);
    }
}

/// Builds and publishes the picker and the observable state.
fn publish(
    service: &str,
    policy: &dyn Policy,
    subchannels: &Subchannels,
    resolved: &Resolution,
    outputs: &Outputs,
) {
    let ready = policy.ready(subchannels);
    let (connectivity, error) = if !ready.is_empty() {
        (ConnectivityState::Ready, None)
    } else {
        match &resolved.endpoints {
            None => match &resolved.error {
                Some(error) => (ConnectivityState::TransientFailure, Some(error.clone())),
                None => (ConnectivityState::Connecting, None),
            },
            Some(set) if set.iter().all(|e| e.draining) => {
                let mut error = format!("no endpoints available for service {service}");
                if !set.is_empty() {
                    error.push_str(" (all draining)");
                }
                if let Some(resolver_error) = &resolved.error {
                    error.push_str(&format!("; resolver: {resolver_error}"));
                }
                (ConnectivityState::TransientFailure, Some(error))
            }
            Some(_) => {
                let connecting = subchannels.iter().any(|s| {
                    matches!(
                        s.state().connectivity(),
                        ConnectivityState::Connecting | ConnectivityState::Idle
                    )
                });
                let error = match subchannels.iter().find_map(|s| s.last_error()) {
                    Some(last) => {
                        format!("no ready endpoint for service {service}; last error: {last}")
                    }
                    None => format!("no ready endpoint for service {service}"),
                };
                let connectivity = if connecting {
                    ConnectivityState::Connecting
                } else {
                    ConnectivityState::TransientFailure
                };
                (connectivity, Some(error))
            }
        }
    };
    let state = BalancerState {
        connectivity,
        endpoints: resolved.endpoints.as_deref().cloned().unwrap_or_default(),
        ready: ready.iter().map(|c| c.address.to_string()).collect(),
        last_error: error.clone(),
        resolver_error: resolved.error.clone(),
    };
    outputs.picker.store(Arc::new(Picker {
        ready,
        connectivity,
        error,
    }));
    outputs.picker_changed.send_replace(());
    outputs.state.send_if_modified(|current| {
        let changed = *current != state;
        if changed {
            *current = state;
        }
        changed
    });
}
