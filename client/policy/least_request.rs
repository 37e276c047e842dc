//! least_request: power of two choices over the RPCs outstanding on each
//! Ready subchannel, as Envoy's least-request balancer and linkerd's p2c
//! do. Each pick draws two distinct Ready connections at random and takes
//! the one with fewer RPCs in flight.
//!
//! Why this catches grey failures: a backend that hangs (SIGSTOP, a
//! deadlock, a full GC) keeps its TCP connection and its HTTP/2 session, so
//! round_robin keeps feeding it until keepalive gives up. Its RPCs never
//! finish, so its in-flight count climbs past the others' within a few
//! picks, and it loses every draw from then on.
//!
//! With [`LeastRequestConfig::peak_ewma`], each connection's cost is its
//! in-flight count (plus one) times a peak-sensitive moving average of its
//! latency, as linkerd's balancer does: a backend that got slow is avoided
//! at once (the average jumps to any higher sample), and forgiven gradually
//! (lower samples, and time without samples, pull it down with the decay).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::client::policy::{
    CallOutcome, OnDone, Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, SubchannelId,
};
use crate::client::ready_set::ReadySet;
use crate::client::subchannel::ReadyConnection;
use crate::discovery::{Applied, EndpointSet};

/// How least_request weighs its two choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LeastRequestConfig {
    /// Weigh in-flight counts by a peak-EWMA of latency that decays with
    /// this time constant; `None` compares in-flight counts alone (grpc's
    /// least_request).
    pub peak_ewma: Option<Duration>,
}

impl LeastRequestConfig {
    /// linkerd's decay: a latency spike is mostly forgotten after about
    /// ten seconds without worse samples.
    pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

    /// Compares in-flight counts weighted by peak-EWMA latency with the
    /// default decay.
    pub fn peak_ewma() -> Self {
        Self {
            peak_ewma: Some(Self::DEFAULT_DECAY),
        }
    }
}

/// The latency estimate a connection starts with: low enough that a new
/// backend gets traffic at once, so its real latency is learnt quickly.
const INITIAL_ESTIMATE: Duration = Duration::from_millis(1);

/// The least_request policy.
#[derive(Debug, Default)]
pub struct LeastRequest {
    config: LeastRequestConfig,
    /// The subchannels and their Ready connections.
    subchannels: ReadySet,
    /// Each subchannel's latency estimate (with `peak_ewma`), kept across
    /// pickers and reconnections so a bad backend is not forgiven by a new
    /// picker.
    estimates: HashMap<SubchannelId, Arc<PeakEwma>>,
}

impl LeastRequest {
    /// A least_request policy configured by `config`.
    pub fn new(config: LeastRequestConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }
}

impl Policy for LeastRequest {
    fn name(&self) -> &'static str {
        "least_request"
    }

    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) {
        for id in self.subchannels.endpoints_changed(endpoints, changes, cx) {
            self.estimates.remove(&id);
        }
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        self.subchannels.subchannel_changed(id, cx);
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        if !self.subchannels.take_dirty() {
            return None;
        }
        let ready = self.subchannels.ready();
        let estimates = self.config.peak_ewma.map(|decay| {
            ready
                .iter()
                .map(|(id, _)| {
                    self.estimates
                        .entry(*id)
                        .or_insert_with(|| Arc::new(PeakEwma::new(decay)))
                        .clone()
                })
                .collect()
        });
        Some(PolicyPicker {
            picker: Arc::new(LeastRequestPicker {
                connections: ready.iter().map(|(_, c)| c.clone()).collect(),
                estimates,
            }),
            connectivity: self.subchannels.connectivity(),
            last_error: self.subchannels.last_error().cloned(),
        })
    }
}

/// Picks the less loaded of two random Ready connections.
pub struct LeastRequestPicker {
    connections: Vec<Arc<ReadyConnection>>,
    /// With peak-EWMA: each connection's latency estimate, by index.
    estimates: Option<Vec<Arc<PeakEwma>>>,
}

impl LeastRequestPicker {
    /// What sending one more RPC on connection `index` would cost, compared
    /// only with other connections' costs.
    fn cost(&self, index: usize, now: Instant) -> f64 {
        let outstanding = self.connections[index].in_flight.count() as f64 + 1.0;
        match &self.estimates {
            Some(estimates) => outstanding * estimates[index].estimate(now),
            None => outstanding,
        }
    }

    fn chosen(&self, index: usize) -> Pick {
        let done = self.estimates.as_ref().map(|estimates| {
            let estimate = estimates[index].clone();
            Box::new(move |outcome: &CallOutcome| estimate.observe(outcome)) as OnDone
        });
        Pick::Connection {
            connection: self.connections[index].clone(),
            done,
        }
    }
}

impl Picker for LeastRequestPicker {
    fn pick(&self, _info: &PickInfo<'_>) -> Pick {
        let len = self.connections.len();
        // A connection may close before the balancer hears of it.
        let open = |i: usize| !self.connections[i].sender.is_closed();
        match len {
            0 => return Pick::Queue,
            1 => return if open(0) { self.chosen(0) } else { Pick::Queue },
            _ => {}
        }
        let first = rand::random_range(0..len);
        let mut second = rand::random_range(0..len - 1);
        if second >= first {
            second += 1;
        }
        let now = Instant::now();
        let best = match (open(first), open(second)) {
            (true, true) => {
                if self.cost(second, now) < self.cost(first, now) {
                    second
                } else {
                    first
                }
            }
            (true, false) => first,
            (false, true) => second,
            // Both closed: any open one will do until the next picker.
            (false, false) => match (0..len).find(|&i| open(i)) {
                Some(i) => i,
                None => return Pick::Queue,
            },
        };
        self.chosen(best)
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        &self.connections
    }
}

/// A peak-sensitive exponentially weighted moving average of one
/// connection's latency, in nanoseconds.
///
/// A std mutex rather than atomics: the state is two fields updated
/// together, the critical section is a few float operations and never
/// awaits, and contention is at most the RPCs finishing on one connection.
#[derive(Debug)]
pub struct PeakEwma {
    /// The decay's time constant, in nanoseconds.
    decay_nanos: f64,
    state: Mutex<EwmaState>,
}

#[derive(Debug, Clone, Copy)]
struct EwmaState {
    /// The estimate as of `at`, in nanoseconds.
    estimate: f64,
    /// When the estimate was last updated.
    at: Instant,
}

impl PeakEwma {
    /// An estimate that starts at [`INITIAL_ESTIMATE`] and decays with
    /// time constant `decay`.
    pub fn new(decay: Duration) -> Self {
        Self {
            decay_nanos: (decay.as_nanos() as f64).max(1.0),
            state: Mutex::new(EwmaState {
                estimate: INITIAL_ESTIMATE.as_nanos() as f64,
                at: Instant::now(),
            }),
        }
    }

    /// The estimate at `now`: time without samples pulls it toward zero,
    /// so a backend avoided for being slow is tried again eventually.
    pub fn estimate(&self, now: Instant) -> f64 {
        let state = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Never exactly zero: costs would tie regardless of load.
        (state.estimate * self.weight(state.at, now)).max(1.0)
    }

    /// Feeds one call's latency. A higher sample replaces the estimate (the
    /// peak); a lower one is averaged in. A failed call never lowers it, so
    /// a backend that fails fast does not look fast and attract traffic.
    pub fn observe(&self, outcome: &CallOutcome) {
        let sample = outcome.latency.as_nanos() as f64;
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let weight = self.weight(state.at, now);
        let decayed = state.estimate * weight;
        state.estimate = if sample > decayed {
            sample
        } else if outcome.code != tonic::Code::Ok {
            decayed
        } else {
            decayed + sample * (1.0 - weight)
        };
        state.at = now;
    }

    /// How much of an estimate made at `then` is left at `now`.
    fn weight(&self, then: Instant, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(then).as_nanos() as f64;
        (-elapsed / self.decay_nanos).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::policy::test_utils::{addresses, FakeController};
    use crate::client::subchannel::ConnectivityState;
    use crate::discovery::{Delta, Endpoint, Update};

    /// Two Ready backends, a and b.
    fn two(config: LeastRequestConfig) -> FakeController<LeastRequest> {
        let mut fake = FakeController::new(LeastRequest::new(config));
        fake.reset(&["a:1", "b:1"]);
        fake.ready("a:1");
        fake.ready("b:1");
        fake
    }

    /// How many of `n` calls went to `address`.
    fn count(fake: &FakeController<LeastRequest>, n: usize, address: &str) -> usize {
        fake.calls(n)
            .iter()
            .filter(|a| a.as_deref() == Some(address))
            .count()
    }

    /// Slow by an hour: no estimate decays during a test.
    fn ewma() -> LeastRequestConfig {
        LeastRequestConfig {
            peak_ewma: Some(Duration::from_secs(3600)),
        }
    }

    /// Calls, each taking 1 ms, until one reaches a:1 and takes 100 ms
    /// there: equal costs draw at random.
    fn slow_a(fake: &FakeController<LeastRequest>) {
        for _ in 0..1000 {
            let called = fake.call_with(|address| {
                let millis = if address == "a:1" { 100 } else { 1 };
                (tonic::Code::Ok, Duration::from_millis(millis))
            });
            if called.as_deref() == Some("a:1") {
                return;
            }
        }
        panic!("a:1 never picked");
    }

    #[test]
    fn picks_the_connection_with_fewer_rpcs_in_flight() {
        let fake = two(LeastRequestConfig::default());
        let a = fake.picker().picker.connections()[0].clone();
        let busy_a: Vec<_> = (0..3).map(|_| a.in_flight.start()).collect();
        assert_eq!(count(&fake, 50, "b:1"), 50);
        // Without peak-EWMA nothing listens for outcomes.
        assert!(matches!(fake.pick(), Pick::Connection { done: None, .. }));
        drop(busy_a);
        let b = fake.picker().picker.connections()[1].clone();
        let _busy_b = b.in_flight.start();
        assert_eq!(count(&fake, 50, "a:1"), 50);
    }

    #[test]
    fn with_one_connection_takes_it_and_with_none_queues() {
        let mut fake = FakeController::new(LeastRequest::default());
        fake.reset(&["a:1", "b:1"]);
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert!(matches!(fake.pick(), Pick::Queue));
        fake.ready("a:1");
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        assert_eq!(addresses(&fake.calls(3)), ["a:1", "a:1", "a:1"]);
        fake.close("a:1");
        assert!(matches!(fake.pick(), Pick::Queue));
        fake.fail("b:1");
        fake.lost("a:1");
        assert_eq!(
            fake.take_actions().last().map(String::as_str),
            Some("connect a:1")
        );
        fake.fail("a:1");
        assert_eq!(fake.connectivity(), ConnectivityState::TransientFailure);
    }

    #[test]
    fn skips_a_connection_that_closed_unreported() {
        let mut fake = two(LeastRequestConfig::default());
        let b = fake.picker().picker.connections()[1].clone();
        let _busy_b: Vec<_> = (0..5).map(|_| b.in_flight.start()).collect();
        fake.close("a:1");
        assert_eq!(count(&fake, 20, "b:1"), 20);
        fake.close("b:1");
        assert!(matches!(fake.pick(), Pick::Queue));
    }

    #[test]
    fn peak_ewma_avoids_a_slow_backend_until_the_other_is_loaded_enough() {
        let fake = two(ewma());
        assert!(matches!(
            fake.pick(),
            Pick::Connection { done: Some(_), .. }
        ));
        slow_a(&fake);
        assert_eq!(count(&fake, 50, "b:1"), 50);
        let a = fake.picker().picker.connections()[0].clone();
        let _busy: Vec<_> = (0..2).map(|_| a.in_flight.start()).collect();
        let b = fake.picker().picker.connections()[1].clone();
        // 100 ms × 3 against 1 ms × (n + 1): b wins until n + 1 > 300.
        let busy_b: Vec<_> = (0..250).map(|_| b.in_flight.start()).collect();
        assert_eq!(count(&fake, 20, "b:1"), 20);
        drop(busy_b);
        let _busy_b: Vec<_> = (0..350).map(|_| b.in_flight.start()).collect();
        assert_eq!(count(&fake, 20, "a:1"), 20);
    }

    #[test]
    fn peak_ewma_remembers_across_pickers_and_reconnections_but_not_removals() {
        let mut fake = two(ewma());
        slow_a(&fake);
        fake.lost("a:1");
        fake.ready("a:1");
        assert_eq!(count(&fake, 50, "b:1"), 50, "forgiven by a reconnection");
        fake.update(Update::Delta(Delta {
            removed: vec!["a:1".into()],
            ..Delta::default()
        }));
        fake.update(Update::Delta(Delta {
            added: vec![Endpoint::new("a:1")],
            ..Delta::default()
        }));
        fake.ready("a:1");
        // A fresh start: equal costs again, so a gets its share.
        assert!(count(&fake, 200, "a:1") > 0);
    }

    fn outcome(code: tonic::Code, millis: u64) -> CallOutcome {
        CallOutcome {
            code,
            latency: Duration::from_millis(millis),
        }
    }

    #[test]
    fn peak_ewma_jumps_to_peaks_and_ignores_fast_failures() {
        let ewma = PeakEwma::new(Duration::from_secs(3600));
        ewma.observe(&outcome(tonic::Code::Ok, 50));
        let peak = ewma.estimate(Instant::now());
        assert!((peak - 50e6).abs() < 1e5, "{peak}");
        // A fast failure does not make the backend look fast.
        ewma.observe(&outcome(tonic::Code::Unavailable, 0));
        assert!(ewma.estimate(Instant::now()) > 49e6);
        // Time without samples forgives.
        let later = Instant::now() + Duration::from_secs(3600 * 5);
        assert!(ewma.estimate(later) < 1e6);
    }
}
