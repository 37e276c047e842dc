//! Slow start (Envoy's `slow_start_config`): a backend that joins a service
//! that is already serving gets a share of the calls that ramps up over a
//! window instead of its full share at once, so a cold cache or JIT is not
//! hit with full load in its first second.
//!
//! A wrapper around any policy that uses every backend (round_robin,
//! weighted_round_robin, least_request). Over the window an endpoint's
//! weight is `max(min_weight, (t / window) ^ (1 / aggression))`, `t` the
//! time since it became Ready. The picker applies it by sampling: a pick of
//! a warming endpoint stands with that probability, else the child picks
//! again (at most [`REPICKS`] times), which for the rotating and
//! two-choice pickers gives the endpoint about that fraction of its share.
//! With nothing warming the child's picker is published unchanged, so a
//! steady service pays nothing per call.
//!
//! As in Envoy, the endpoints of the first update (a starting client, or
//! one whose whole set is new) are not slowed: there is nothing warm to
//! protect them with. An endpoint that leaves and returns (a restarted
//! backend) warms up again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::policy::{
    Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, SubchannelId,
};
use crate::client::subchannel::{ReadyConnection, SubchannelState};
use crate::client::wrapped::{with_state_of, Wrapped};
use crate::discovery::{Applied, EndpointSet};

pub use crate::service_config::SlowStartConfig;

/// Extra picks a warming endpoint's rejection may cost a call.
pub const REPICKS: usize = 3;

/// Wraps a policy in slow start.
pub struct SlowStart {
    child: Wrapped,
    config: SlowStartConfig,
    /// Whether the first endpoint update has been seen.
    started: bool,
    /// Endpoints added after it, not Ready yet: they warm up once Ready.
    joining: HashSet<Arc<str>>,
    /// Warming endpoints and when they became Ready.
    warming: HashMap<Arc<str>, Instant>,
    dirty: bool,
}

impl SlowStart {
    /// `child` with its newly joined endpoints ramped as `config` says.
    pub fn new(child: Box<dyn Policy>, config: SlowStartConfig) -> Self {
        Self {
            child: Wrapped::new(child),
            config,
            started: false,
            joining: HashSet::new(),
            warming: HashMap::new(),
            dirty: false,
        }
    }

    /// Ends the warm-up of endpoints whose window passed, and asks for a
    /// timer to rebuild the picker while any still warms.
    fn sweep(&mut self, cx: &mut PolicyContext<'_>) {
        let now = cx.now();
        let window = self.config.window;
        let before = self.warming.len();
        self.warming
            .retain(|_, since| now.duration_since(*since) < window);
        if self.warming.len() != before {
            self.dirty = true;
        }
        if let Some(first) = self.warming.values().min() {
            cx.schedule_at(*first + window);
        }
    }
}

impl Policy for SlowStart {
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
            self.joining.remove(address);
            if self.warming.remove(address).is_some() {
                self.dirty = true;
            }
        }
        if self.started {
            for address in &changes.added {
                self.joining.insert(Arc::from(address.as_str()));
            }
        }
        self.started |= endpoints.is_known();
        self.child.with(cx, |child, cx| {
            child.endpoints_changed(endpoints, changes, cx)
        });
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        if let Some(subchannel) = cx.subchannels().get(id) {
            let address = subchannel.address().clone();
            if matches!(subchannel.state(), SubchannelState::Ready(_))
                && self.joining.remove(&address)
            {
                self.warming.insert(address, cx.now());
                self.dirty = true;
                self.sweep(cx);
            }
        }
        self.child
            .with(cx, |child, cx| child.subchannel_changed(id, cx));
    }

    fn timer_fired(&mut self, cx: &mut PolicyContext<'_>) {
        self.child.fire_if_due(cx);
        self.sweep(cx);
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        self.dirty |= self.child.refresh_picker();
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let child = self.child.picker()?;
        if self.warming.is_empty() {
            return Some(with_state_of(child, child.picker.clone()));
        }
        let picker = Arc::new(SlowStartPicker {
            child: child.picker.clone(),
            warming: self.warming.clone(),
            config: self.config,
        });
        Some(with_state_of(child, picker))
    }
}

/// The child's picker, thinning the picks of warming endpoints.
pub struct SlowStartPicker {
    child: Arc<dyn Picker>,
    warming: HashMap<Arc<str>, Instant>,
    config: SlowStartConfig,
}

impl SlowStartPicker {
    /// The weight of an endpoint `elapsed` into its window.
    fn weight(&self, elapsed: Duration) -> f64 {
        weight(&self.config, elapsed)
    }
}

/// `max(min_weight, (elapsed / window) ^ (1 / aggression))`, 1 past the
/// window: Envoy's curve.
pub fn weight(config: &SlowStartConfig, elapsed: Duration) -> f64 {
    if elapsed >= config.window || config.window.is_zero() {
        return 1.0;
    }
    let progress = elapsed.as_secs_f64() / config.window.as_secs_f64();
    progress
        .powf(1.0 / config.aggression)
        .max(config.min_weight_percent / 100.0)
}

impl Picker for SlowStartPicker {
    fn pick(&self, info: &PickInfo<'_>) -> Pick {
        let now = Instant::now();
        let mut pick = self.child.pick(info);
        for _ in 0..REPICKS {
            let Pick::Connection { connection, .. } = &pick else {
                return pick;
            };
            let Some(since) = self.warming.get(&*connection.address) else {
                return pick;
            };
            if rand::random::<f64>() < self.weight(now.duration_since(*since)) {
                return pick;
            }
            // Dropped unreported: this pick carries no call.
            pick = self.child.pick(info);
        }
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
    use crate::discovery::{Delta, Endpoint, Update};

    fn share(picks: &[Option<String>], address: &str) -> f64 {
        let picks = addresses(picks);
        picks.iter().filter(|a| **a == address).count() as f64 / picks.len() as f64
    }

    #[test]
    fn a_joining_endpoint_ramps_up_and_the_first_ones_do_not() {
        let config = config(10, 1.0, 10.0);
        let mut fake = FakeController::new(SlowStart::new(Box::new(RoundRobin::default()), config));
        fake.reset(&["a:1"]);
        fake.ready("a:1");
        assert_eq!(fake.timer(), None, "the first set is not slowed");
        fake.update(Update::Delta(Delta {
            added: vec![Endpoint::new("b:1")],
            ..Delta::default()
        }));
        fake.ready("b:1");
        // Just joined: about its 10 % floor of an equal share, not half.
        let early = share(&fake.calls(2000), "b:1");
        assert!(early < 0.2, "b:1 took {early} of the calls");
        assert!(early > 0.0, "but not none");
        assert_eq!(fake.timer(), Some(Duration::from_secs(10)));
        // Past the window: plain round_robin again.
        assert!(fake.fire_timer());
        let later = share(&fake.calls(1000), "b:1");
        assert!((later - 0.5).abs() < 0.01, "b:1 took {later}");
        assert_eq!(fake.timer(), None);
    }

    fn config(window: u64, aggression: f64, min: f64) -> SlowStartConfig {
        SlowStartConfig {
            window: Duration::from_secs(window),
            aggression,
            min_weight_percent: min,
        }
    }

    #[test]
    fn the_weight_follows_envoys_curve() {
        let linear = config(10, 1.0, 10.0);
        assert_eq!(weight(&linear, Duration::ZERO), 0.1, "the floor");
        assert!((weight(&linear, Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(weight(&linear, Duration::from_secs(10)), 1.0);
        // More aggression: faster at first.
        let steep = config(10, 2.0, 0.0);
        assert!((weight(&steep, Duration::from_millis(2500)) - 0.5).abs() < 1e-9);
    }
}
