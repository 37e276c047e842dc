//! outlier_detection around real child policies, driven by the fake
//! balancer: outcomes go in through the picks' `OnDone`, sweeps happen when
//! the test fires the timer on its own clock.

use std::cell::Cell;

use super::*;
use crate::client::connectivity::ConnectivityState;
use crate::client::policy::least_request::{LeastRequest, LeastRequestConfig};
use crate::client::policy::round_robin::RoundRobin;
use crate::client::policy::test_utils::{addresses, FakeController};
use crate::discovery::{Delta, Endpoint, Update};

type Fake = FakeController<OutlierDetection>;

/// Sweeps every second; ejections of 10 s, at most 15 s; only the failure
/// percentage check, with its defaults (10 calls, above 85 %).
fn config() -> OutlierDetectionConfig {
    OutlierDetectionConfig {
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(10),
        max_ejection_time: Duration::from_secs(15),
        success_rate: None,
        ..OutlierDetectionConfig::default()
    }
}

/// round_robin under `config`, over `endpoints`, all Ready.
fn ready(config: OutlierDetectionConfig, endpoints: &[&str]) -> Fake {
    let policy = OutlierDetection::new(Box::new(RoundRobin::default()), config);
    let mut fake = FakeController::new(policy);
    fake.reset(endpoints);
    for address in endpoints {
        fake.ready(address);
    }
    fake.take_actions();
    fake
}

/// `n` calls, those to an address in `bad` failing with `code`.
fn calls(fake: &Fake, n: usize, bad: &[&str], code: tonic::Code) {
    for _ in 0..n {
        fake.call_with(|address| {
            let code = if bad.contains(&address) {
                code
            } else {
                tonic::Code::Ok
            };
            (code, Duration::from_millis(1))
        })
        .expect("a connection");
    }
}

fn is_ejected(fake: &Fake, address: &str) -> bool {
    matches!(
        fake.state(address),
        Some(SubchannelState::TransientFailure { error })
            if matches!(**error, ConnectError::Ejected { .. })
    )
}

/// Which of `addresses` are ejected.
fn ejected<'a>(fake: &Fake, addresses: &[&'a str]) -> Vec<&'a str> {
    addresses
        .iter()
        .copied()
        .filter(|a| is_ejected(fake, a))
        .collect()
}

/// Fires `n` sweeps with healthy traffic before each.
fn healthy_sweeps(fake: &mut Fake, n: usize) {
    for _ in 0..n {
        calls(fake, 10, &[], tonic::Code::Ok);
        assert!(fake.fire_timer());
    }
}

#[test]
fn ejects_a_backend_failing_its_calls_and_lets_it_back_after_the_ejection_time() {
    let mut fake = ready(config(), &["a:1", "b:1"]);
    assert_eq!(fake.timer(), Some(Duration::from_secs(1)));
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    assert!(fake.fire_timer());
    assert!(is_ejected(&fake, "a:1"));
    // The child stops picking it; its connection stays open for the return.
    assert!(fake.take_actions().is_empty());
    assert_eq!(fake.connectivity(), ConnectivityState::Ready);
    assert_eq!(addresses(&fake.calls(4)), ["b:1"; 4]);
    assert_eq!(fake.picker().picker.connections().len(), 1);
    assert_eq!(fake.timer(), Some(Duration::from_secs(1)));
    // Ejected at 1 s for 10 s: still out at 10 s, back at 11 s.
    healthy_sweeps(&mut fake, 9);
    assert!(is_ejected(&fake, "a:1"));
    healthy_sweeps(&mut fake, 1);
    assert!(matches!(fake.state("a:1"), Some(SubchannelState::Ready(_))));
    let picks = fake.calls(4);
    assert_eq!(addresses(&picks).iter().filter(|a| **a == "a:1").count(), 2);
}

#[test]
fn a_repeat_ejection_lasts_longer_up_to_the_cap_and_the_count_wears_off() {
    let mut fake = ready(config(), &["a:1", "b:1"]);
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    fake.fire_timer();
    healthy_sweeps(&mut fake, 10);
    assert!(!is_ejected(&fake, "a:1"));
    // Failing again at once: 2 × 10 s, capped at 15 s.
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    fake.fire_timer();
    assert!(is_ejected(&fake, "a:1"));
    healthy_sweeps(&mut fake, 14);
    assert!(is_ejected(&fake, "a:1"));
    healthy_sweeps(&mut fake, 1);
    assert!(!is_ejected(&fake, "a:1"));
    // Two intervals in service forget both ejections: 10 s again.
    healthy_sweeps(&mut fake, 2);
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    fake.fire_timer();
    assert!(is_ejected(&fake, "a:1"));
    healthy_sweeps(&mut fake, 9);
    assert!(is_ejected(&fake, "a:1"));
    healthy_sweeps(&mut fake, 1);
    assert!(!is_ejected(&fake, "a:1"));
}

#[test]
fn never_ejects_more_than_max_ejection_percent() {
    let all = ["a:1", "b:1", "c:1", "d:1"];
    let mut fake = ready(config(), &all);
    calls(&fake, 80, &all, tonic::Code::Unavailable);
    fake.fire_timer();
    // Half of four, in address order; the rest stay however bad.
    assert_eq!(ejected(&fake, &all), ["a:1", "b:1"]);
    calls(&fake, 80, &all, tonic::Code::Unavailable);
    fake.fire_timer();
    assert_eq!(ejected(&fake, &all), ["a:1", "b:1"]);

    // Not one of three more than half: one.
    let three = ["a:1", "b:1", "c:1"];
    let mut fake = ready(config(), &three);
    calls(&fake, 60, &three, tonic::Code::Unavailable);
    fake.fire_timer();
    assert_eq!(ejected(&fake, &three), ["a:1"]);
}

#[test]
fn never_ejects_the_only_backend() {
    let mut config = config();
    // Only the ejection limit stands in the way.
    config.failure_percentage = Some(FailurePercentageEjection {
        minimum_hosts: 1,
        ..FailurePercentageEjection::default()
    });
    let mut fake = ready(config, &["a:1"]);
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    fake.fire_timer();
    assert!(!is_ejected(&fake, "a:1"));
    assert_eq!(addresses(&fake.calls(1)), ["a:1"]);
}

#[test]
fn counts_only_what_speaks_of_the_backend_by_default() {
    let mut fake = ready(config(), &["a:1", "b:1"]);
    for code in [
        tonic::Code::NotFound,
        tonic::Code::InvalidArgument,
        tonic::Code::PermissionDenied,
        tonic::Code::Cancelled,
    ] {
        calls(&fake, 40, &["a:1"], code);
        fake.fire_timer();
        assert!(!is_ejected(&fake, "a:1"), "{code:?}");
    }
    // A50's rule counts them all.
    let mut fake = ready(
        OutlierDetectionConfig {
            is_failure: is_any_error,
            ..config()
        },
        &["a:1", "b:1"],
    );
    calls(&fake, 40, &["a:1"], tonic::Code::NotFound);
    fake.fire_timer();
    assert!(is_ejected(&fake, "a:1"));
}

#[test]
fn the_success_rate_check_ejects_the_outlier_among_its_peers() {
    let five = ["a:1", "b:1", "c:1", "d:1", "e:1"];
    let success_rate = OutlierDetectionConfig {
        success_rate: Some(SuccessRateEjection::default()),
        failure_percentage: None,
        ..config()
    };
    // Half of a's calls fail, none of the others': far below the mean.
    let mut fake = ready(success_rate, &five);
    let nth = Cell::new(0);
    for _ in 0..500 {
        fake.call_with(|address| {
            nth.set(nth.get() + 1);
            let fails = address == "a:1" && nth.get() % 2 == 0;
            let code = if fails {
                tonic::Code::Unavailable
            } else {
                tonic::Code::Ok
            };
            (code, Duration::from_millis(1))
        });
    }
    fake.fire_timer();
    assert_eq!(ejected(&fake, &five), ["a:1"]);
    // All equally bad: nobody is an outlier.
    let mut fake = ready(success_rate, &five);
    calls(&fake, 500, &five, tonic::Code::Unavailable);
    fake.fire_timer();
    assert!(ejected(&fake, &five).is_empty());
}

#[test]
fn an_ejected_backend_stays_failing_to_the_child_until_it_returns() {
    let mut fake = ready(config(), &["a:1", "b:1"]);
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    fake.fire_timer();
    // Its connection ends while it is out: the child is not told, so it
    // does not redial yet.
    fake.lost("a:1");
    assert!(is_ejected(&fake, "a:1"));
    assert!(fake.take_actions().is_empty());
    healthy_sweeps(&mut fake, 10);
    // Back as it really is, Idle: the child redials it.
    assert!(matches!(
        fake.state("a:1"),
        Some(SubchannelState::Idle { .. })
    ));
    assert_eq!(fake.take_actions(), ["connect a:1"]);
    fake.ready("a:1");
    let picks = fake.calls(4);
    assert_eq!(addresses(&picks).iter().filter(|a| **a == "a:1").count(), 2);
}

#[test]
fn a_removed_address_comes_back_unejected() {
    let mut fake = ready(config(), &["a:1", "b:1"]);
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    fake.fire_timer();
    fake.update(Update::Delta(Delta {
        removed: vec!["a:1".into()],
        ..Delta::default()
    }));
    assert_eq!(fake.take_actions(), ["remove a:1"]);
    fake.update(Update::Delta(Delta {
        added: vec![Endpoint::new("a:1")],
        ..Delta::default()
    }));
    assert_eq!(fake.take_actions(), ["create a:1", "connect a:1"]);
    fake.ready("a:1");
    assert!(!is_ejected(&fake, "a:1"));
    let picks = fake.calls(4);
    assert_eq!(addresses(&picks).iter().filter(|a| **a == "a:1").count(), 2);
}

#[test]
fn the_childs_outcome_callbacks_still_run() {
    let child = LeastRequest::new(LeastRequestConfig {
        peak_ewma: Some(Duration::from_secs(3600)),
    });
    let mut fake = FakeController::new(OutlierDetection::new(Box::new(child), config()));
    fake.reset(&["a:1", "b:1"]);
    fake.ready("a:1");
    fake.ready("b:1");
    // A slow call reaches least_request's estimate through the wrapper.
    let slow = |address: &str| {
        let millis = if address == "a:1" { 100 } else { 1 };
        (tonic::Code::Ok, Duration::from_millis(millis))
    };
    let reached = (0..1000).any(|_| fake.call_with(slow).as_deref() == Some("a:1"));
    assert!(reached, "a:1 never picked");
    assert_eq!(addresses(&fake.calls(20)), ["b:1"; 20]);
}

#[test]
fn without_checks_nothing_is_counted_and_no_sweep_runs() {
    let off = OutlierDetectionConfig {
        success_rate: None,
        failure_percentage: None,
        ..config()
    };
    let policy = OutlierDetection::new(Box::new(RoundRobin::default()), off);
    let mut fake = FakeController::new(policy);
    fake.reset(&["a:1", "b:1"]);
    assert_eq!(fake.timer(), None);
    assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
    fake.ready("a:1");
    assert!(matches!(fake.pick(), Pick::Connection { done: None, .. }));
    // The child's state and error pass through.
    fake.lost("a:1");
    fake.fail("a:1");
    let last = fake.fail("b:1");
    assert_eq!(fake.connectivity(), ConnectivityState::TransientFailure);
    assert_eq!(fake.picker().last_error, Some(last));
}

/// A child that asks for a timer 5 s after each endpoint change and counts
/// how often it fires.
struct Ticking(Arc<AtomicU64>);

impl Policy for Ticking {
    fn name(&self) -> &'static str {
        "ticking"
    }

    fn endpoints_changed(&mut self, _: &EndpointSet, _: &Applied, cx: &mut PolicyContext<'_>) {
        cx.schedule(Duration::from_secs(5));
    }

    fn subchannel_changed(&mut self, _: SubchannelId, _: &mut PolicyContext<'_>) {}

    fn timer_fired(&mut self, _: &mut PolicyContext<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        None
    }
}

#[test]
fn the_childs_timer_and_the_sweeps_keep_apart() {
    let fired = Arc::new(AtomicU64::new(0));
    let ticking = Box::new(Ticking(fired.clone()));
    let mut fake = FakeController::new(OutlierDetection::new(ticking, config()));
    fake.reset(&["a:1"]);
    // The sweep's second comes first; the child's 5 s is not forgotten.
    for second in 1..=4 {
        assert_eq!(fake.timer(), Some(Duration::from_secs(1)), "at {second} s");
        assert!(fake.fire_timer());
    }
    assert_eq!(fired.load(Ordering::Relaxed), 0);
    assert!(fake.fire_timer());
    assert_eq!(fired.load(Ordering::Relaxed), 1);
    assert!(fake.fire_timer());
    assert_eq!(fired.load(Ordering::Relaxed), 1);
}

#[test]
fn an_ejection_ends_by_the_clock_not_by_counting_sweeps() {
    let mut fake = ready(config(), &["a:1", "b:1"]);
    calls(&fake, 40, &["a:1"], tonic::Code::Unavailable);
    fake.fire_timer();
    assert!(is_ejected(&fake, "a:1"));
    // A balancer too busy to sweep on time: the next sweep is 20 s late.
    fake.advance(Duration::from_secs(20));
    assert_eq!(fake.timer(), Some(Duration::ZERO));
    assert!(fake.fire_timer());
    assert!(!is_ejected(&fake, "a:1"));
    assert_eq!(fake.timer(), Some(Duration::from_secs(1)));
}
