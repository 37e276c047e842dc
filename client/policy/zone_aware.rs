//! Zone-aware routing: calls stay in the caller's zone while it has enough
//! healthy capacity, and spill to other zones as it loses capacity.
//!
//! A wrapper around round_robin, weighted_round_robin or least_request,
//! following Envoy's priority load with its overprovisioning factor (and
//! gRPC's priority failover, A27, in spirit): backends say their zone in
//! the `zone` metadata, the client says its own
//! ([`Builder::zone`](crate::client::Builder::zone)). The local zone's
//! health is `min(1, factor × ready / serving)` over its endpoints; that
//! share of the calls goes to the local zone, the rest to the others. With
//! the default factor 1.4, a zone with at least 5 of 7 endpoints Ready
//! keeps every call; with 2 of 4, 70 % stay and 30 % spill; with none
//! Ready, every call goes elsewhere, and comes back as the zone does.
//!
//! The child connects to every endpoint, so the other zones' connections
//! are warm when a zone fails; the picker only chooses among the child's
//! picks: it asks the child again (at most once per Ready connection)
//! until the pick is in the zone it drew. Without a local zone, or with no
//! endpoint in it, nothing changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::client::policy::{
    Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, SubchannelId,
};
use crate::client::subchannel::{ReadyConnection, SubchannelState};
use crate::client::wrapped::{with_state_of, Wrapped};
use crate::discovery::{Applied, EndpointSet};

/// The endpoint metadata key that names an endpoint's zone.
pub const ZONE_KEY: &str = "zone";

/// Envoy's overprovisioning factor: a zone counts as fully healthy while
/// at least 1/1.4 (71 %) of its endpoints are Ready.
pub const DEFAULT_OVERPROVISIONING: f64 = 1.4;

/// Wraps a policy in zone preference.
pub struct ZoneAware {
    child: Wrapped,
    zone: String,
    factor: f64,
    /// Serving endpoints of the local zone.
    local: HashSet<Arc<str>>,
    /// Of those, the Ready ones.
    ready: HashSet<Arc<str>>,
    /// Serving endpoints of other zones.
    remote: HashSet<Arc<str>>,
    dirty: bool,
}

impl ZoneAware {
    /// `child`, preferring endpoints whose `zone` is `zone`.
    pub fn new(child: Box<dyn Policy>, zone: impl Into<String>) -> Self {
        Self {
            child: Wrapped::new(child),
            zone: zone.into(),
            factor: DEFAULT_OVERPROVISIONING,
            local: HashSet::new(),
            ready: HashSet::new(),
            remote: HashSet::new(),
            dirty: false,
        }
    }

    /// The same, with overprovisioning factor `factor` (at least 1)
    /// instead of [`DEFAULT_OVERPROVISIONING`].
    pub fn with_factor(mut self, factor: f64) -> Self {
        self.factor = factor.max(1.0);
        self
    }

    /// The share of calls the local zone takes now.
    pub fn local_share(&self) -> f64 {
        local_share(self.factor, self.ready.len(), self.local.len())
    }
}

/// `min(1, factor × ready / serving)`; 1 with no local endpoint known
/// at all is not a preference, so the caller checks that first.
fn local_share(factor: f64, ready: usize, serving: usize) -> f64 {
    if serving == 0 {
        return 0.0;
    }
    (factor * ready as f64 / serving as f64).min(1.0)
}

impl Policy for ZoneAware {
    fn name(&self) -> &'static str {
        self.child.name()
    }

    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) {
        for address in &changes.removed {
            let address: &str = address;
            self.local.remove(address);
            self.ready.remove(address);
            self.remote.remove(address);
        }
        for address in changes.added.iter().chain(&changes.updated) {
            let key: Arc<str> = Arc::from(address.as_str());
            self.local.remove(&key);
            self.remote.remove(&key);
            let Some(endpoint) = endpoints.get(address) else {
                continue;
            };
            if endpoint.is_draining() {
                self.ready.remove(&key);
                continue;
            }
            match endpoint.metadata.get(ZONE_KEY) == Some(&self.zone) {
                true => self.local.insert(key),
                false => {
                    self.ready.remove(&key);
                    self.remote.insert(key)
                }
            };
        }
        self.dirty = true;
        self.child.with(cx, |child, cx| {
            child.endpoints_changed(endpoints, changes, cx)
        });
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        if let Some(subchannel) = cx.subchannels().get(id) {
            let address = subchannel.address().clone();
            if self.local.contains(&address) {
                let changed = match subchannel.state() {
                    SubchannelState::Ready(_) => self.ready.insert(address),
                    _ => self.ready.remove(&address),
                };
                self.dirty |= changed;
            }
        }
        self.child
            .with(cx, |child, cx| child.subchannel_changed(id, cx));
    }

    fn timer_fired(&mut self, cx: &mut PolicyContext<'_>) {
        self.child.fire_if_due(cx);
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        self.dirty |= self.child.refresh_picker();
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let child = self.child.picker()?;
        // No local endpoint: no preference to apply.
        if self.local.is_empty() {
            return Some(with_state_of(child, child.picker.clone()));
        }
        let local: HashMap<Arc<str>, ()> = self.local.iter().map(|a| (a.clone(), ())).collect();
        let picker = Arc::new(ZonePicker {
            child: child.picker.clone(),
            local,
            local_share: self.local_share(),
        });
        Some(with_state_of(child, picker))
    }
}

/// The child's picker, steering each pick to the zone its draw names.
pub struct ZonePicker {
    child: Arc<dyn Picker>,
    local: HashMap<Arc<str>, ()>,
    local_share: f64,
}

impl Picker for ZonePicker {
    fn pick(&self, info: &PickInfo<'_>) -> Pick {
        let want_local = self.local_share >= 1.0 || rand::random::<f64>() < self.local_share;
        let tries = self.child.connections().len();
        let mut pick = self.child.pick(info);
        for _ in 0..tries {
            let Pick::Connection { connection, .. } = &pick else {
                return pick;
            };
            if self.local.contains_key(&*connection.address) == want_local {
                return pick;
            }
            // Dropped unreported: this pick carries no call.
            pick = self.child.pick(info);
        }
        // The zone drawn has nothing Ready: any pick serves.
        pick
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        self.child.connections()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::policy::test_utils::{addresses, FakeController};
    use crate::client::round_robin::RoundRobin;
    use crate::discovery::{Endpoint, Update};

    fn zoned(fake: &mut FakeController<ZoneAware>, endpoints: &[(&str, &str)]) {
        fake.update(Update::Reset(
            endpoints
                .iter()
                .map(|(address, zone)| Endpoint::new(*address).with_metadata(ZONE_KEY, *zone))
                .collect(),
        ));
    }

    #[test]
    fn the_local_share_follows_envoys_overprovisioning() {
        assert_eq!(local_share(1.4, 5, 7), 1.0);
        assert!((local_share(1.4, 2, 4) - 0.7).abs() < 1e-9);
        assert_eq!(local_share(1.4, 0, 4), 0.0);
    }

    #[test]
    fn calls_stay_in_zone_spill_as_it_fails_and_come_back() {
        let policy = ZoneAware::new(Box::new(RoundRobin::default()), "a");
        let mut fake = FakeController::new(policy);
        zoned(
            &mut fake,
            &[("a1:1", "a"), ("a2:1", "a"), ("b1:1", "b"), ("b2:1", "b")],
        );
        for address in ["a1:1", "a2:1", "b1:1", "b2:1"] {
            fake.ready(address);
        }
        let picks = fake.calls(400);
        assert!(
            addresses(&picks).iter().all(|a| a.starts_with('a')),
            "{picks:?}"
        );
        // Half the zone gone: 70 % stay, 30 % spill.
        fake.fail("a1:1");
        let picks = fake.calls(2000);
        let local = addresses(&picks)
            .iter()
            .filter(|a| a.starts_with('a'))
            .count();
        assert!((1250..=1550).contains(&local), "{local} of 2000 stayed");
        // All of it gone: every call elsewhere, none failed.
        fake.fail("a2:1");
        let picks = fake.calls(200);
        assert!(
            addresses(&picks).iter().all(|a| a.starts_with('b')),
            "{picks:?}"
        );
        // Back.
        fake.ready("a1:1");
        fake.ready("a2:1");
        let picks = fake.calls(200);
        assert!(
            addresses(&picks).iter().all(|a| a.starts_with('a')),
            "{picks:?}"
        );
    }

    #[test]
    fn without_local_endpoints_nothing_changes() {
        let policy = ZoneAware::new(Box::new(RoundRobin::default()), "c");
        let mut fake = FakeController::new(policy);
        zoned(&mut fake, &[("a1:1", "a"), ("b1:1", "b")]);
        fake.ready("a1:1");
        fake.ready("b1:1");
        let picks = fake.calls(100);
        let a = addresses(&picks)
            .iter()
            .filter(|a| a.starts_with('a'))
            .count();
        assert_eq!(a, 50, "plain round_robin");
    }
}
