//! Grey failures: backends that are up but not well. least_request moves
//! traffic off a hung backend, weighted_round_robin splits by weight, and
//! outlier detection ejects a backend that fails its calls, around any
//! policy. Real echo processes where the echo binary can play the fault
//! (SIGSTOP; `--fail-rate`), an in-process echo with switchable faults
//! where a test must turn a fault on and off.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::faulty::FaultyEcho;
use crate::common::*;
use switchboard::client::outlier_detection::FailurePercentageEjection;
use switchboard::client::{
    BackoffConfig, BalancedChannel, LeastRequestConfig, OutlierDetectionConfig, PolicyKind,
};
use switchboard::proto::echo::echo_client::EchoClient;
use tokio::time::Instant;

/// Each load RPC's deadline: a hung backend's RPCs fail after this.
const RPC_TIMEOUT: Duration = Duration::from_secs(1);
/// The deadline where no backend hangs: a slow RPC on a loaded machine is
/// no failure.
const HEALTHY_RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel on `target` with `policy`, fast reconnects and the default
/// keepalive (10 s / 5 s), so a hung backend stays connected for the whole
/// test and only the policy can route around it.
fn builder(target: &str, policy: PolicyKind) -> switchboard::client::Builder {
    BalancedChannel::builder(target)
        .expect("valid target")
        .policy(policy)
        .backoff(BackoffConfig::fast())
}

fn least_request() -> PolicyKind {
    PolicyKind::LeastRequest(LeastRequestConfig::default())
}

fn static_target(addresses: &[String]) -> String {
    format!("static:///{}", addresses.join(","))
}

/// Served RPCs per backend among `shots`.
fn split(shots: &[Shot]) -> BTreeMap<String, usize> {
    let mut served = BTreeMap::new();
    for shot in shots {
        if let Ok(backend) = &shot.result {
            *served.entry(backend.clone()).or_default() += 1;
        }
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_moves_traffic_off_a_hung_backend() {
    let cluster = Cluster::start(3).await;
    let addresses = cluster.addresses();
    // Keepalive that never gives up here: only the policy can move traffic.
    let channel = builder(&registry_target(&cluster.registry), least_request())
        .keepalive(Duration::from_secs(600), Duration::from_secs(600))
        .build();
    assert_eq!(channel.policy(), "least_request");
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let load = Load::start(channel.clone(), 8, Duration::from_millis(2), RPC_TIMEOUT);
    load.wait_more(300, STARTUP).await;
    let before = split(&load.shots());
    assert_eq!(before.len(), 3, "every backend serves before: {before:?}");

    let victim = addresses[1].clone();
    cluster.backend(&victim).signal(libc::SIGSTOP);
    let stopped = Instant::now();
    load.wait_more(2_000, STARTUP * 2).await;
    // Still connected: the policy, not the connection's death, moved the
    // traffic.
    assert!(channel.state().is_ready(&victim), "{:?}", channel.state());
    assert_eq!(
        channel
            .connection_stats()
            .disconnections
            .load(Ordering::Relaxed),
        0
    );
    let shots = load.stop().await;
    cluster.backend(&victim).signal(libc::SIGCONT);

    let after: Vec<Shot> = shots.into_iter().filter(|s| s.sent >= stopped).collect();
    let failed = failures(&after).len();
    let served = split(&after);
    // round_robin fails about a third of these (every RPC sent to the
    // victim); least_request only the few the victim holds at a time.
    assert!(
        failed * 100 <= after.len() * 3,
        "{failed} of {} RPCs failed after SIGSTOP; served: {served:?}",
        after.len()
    );
    for address in all_but(&addresses, &victim) {
        assert!(
            served.get(&address).copied().unwrap_or(0) * 4 >= after.len(),
            "{address} took too little of the moved traffic: {served:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_splits_by_weight_without_bursts() {
    let port = free_port().expect("free port");
    let _registry = start_registry(port).await;
    let registry = local(port);
    let mut backends = Vec::new();
    for weight in [1, 2, 3] {
        let port = free_port().expect("free port");
        let meta = format!("weight={weight}");
        let proc = start_echo(&registry, SERVICE, &[port], &["--meta", &meta]).await;
        backends.push((local(port), weight, proc));
    }
    let addresses: Vec<String> = backends.iter().map(|(a, _, _)| a.clone()).collect();
    let channel = builder(&registry_target(&registry), PolicyKind::WeightedRoundRobin).build();
    wait_ready_set(&channel, &addresses, STARTUP).await;
    // The weights arrive with the endpoints; wait until every endpoint the
    // channel knows carries one.
    wait_for("weights to arrive", STARTUP, || {
        let known = channel
            .state()
            .endpoints
            .iter()
            .filter(|e| e.weight().is_some())
            .count();
        async move { (known == 3).then_some(()) }
    })
    .await;

    let mut client = EchoClient::new(channel.clone());
    const CALLS: usize = 3_000;
    let mut order = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        order.push(
            echo_once(&mut client, Duration::from_secs(5))
                .await
                .expect("rpc"),
        );
    }
    let total_weight = 6.0;
    for (address, weight, _) in &backends {
        let got = order.iter().filter(|b| *b == address).count() as f64 / CALLS as f64;
        let want = f64::from(*weight) / total_weight;
        assert!(
            (got - want).abs() <= 0.02,
            "{address} (weight {weight}) got {:.1} % of calls, want {:.1} % ± 2",
            got * 100.0,
            want * 100.0
        );
    }
    // Smooth: the heaviest backend (half the calls) never gets more than
    // two in a row, where a bursty rotation would give it three.
    let longest = order
        .chunk_by(|a, b| a == b)
        .map(|run| run.len())
        .max()
        .unwrap_or(0);
    assert!(longest <= 2, "a run of {longest} calls to one backend");
}

/// Three in-process backends behind a round_robin channel with outlier
/// detection ejecting for `base_ejection_time`, all Ready, under load.
async fn ejecting(
    base_ejection_time: Duration,
) -> ([FaultyEcho; 3], Vec<String>, BalancedChannel, Load) {
    let backends = [
        FaultyEcho::start().await,
        FaultyEcho::start().await,
        FaultyEcho::start().await,
    ];
    let addresses: Vec<String> = backends.iter().map(|b| b.address.clone()).collect();
    let config = OutlierDetectionConfig {
        base_ejection_time,
        ..OutlierDetectionConfig::default()
    };
    let channel = builder(&static_target(&addresses), PolicyKind::RoundRobin)
        .outlier_detection(config)
        .build();
    assert_eq!(channel.policy(), "outlier_detection");
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let load = Load::start(
        channel.clone(),
        4,
        Duration::from_millis(2),
        HEALTHY_RPC_TIMEOUT,
    );
    (backends, addresses, channel, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_backend_that_fails_every_call_then_nothing_fails() {
    // Longer than the test: the failing backend stays out while the calls
    // after its ejection are counted.
    let (backends, addresses, channel, load) = ejecting(Duration::from_secs(300)).await;
    load.wait_more(200, STARTUP).await;

    let victim = &backends[0];
    victim.faults.set_fail(true);
    wait_ready_set(&channel, &addresses[1..], STARTUP).await;
    let ejected = Instant::now();
    let calls_at_ejection = victim.faults.calls();
    load.wait_more(1_000, STARTUP).await;
    let shots = load.stop().await;
    let after: Vec<&Shot> = shots.iter().filter(|s| s.sent >= ejected).collect();
    let failed: Vec<&&Shot> = after.iter().filter(|s| s.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} RPCs failed after the ejection: {:?}",
        failed.len(),
        after.len(),
        failed.first().map(|s| &s.result)
    );
    // Only calls already picked when the ejection happened reached it.
    assert!(victim.faults.calls() <= calls_at_ejection + 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_lets_a_healed_backend_back_after_its_ejection() {
    // Short, so the test sees it come back.
    let (backends, addresses, channel, load) = ejecting(Duration::from_secs(1)).await;
    let victim = &backends[0];
    victim.faults.set_fail(true);
    wait_ready_set(&channel, &addresses[1..], STARTUP).await;

    // Healthy again: let back after the ejection time, and served.
    victim.faults.set_fail(false);
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let healed = Instant::now();
    load.wait_more(300, STARTUP).await;
    let shots = load.stop().await;
    let back: Vec<Shot> = shots.into_iter().filter(|s| s.sent >= healed).collect();
    assert!(
        split(&back).contains_key(&victim.address),
        "never served again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_never_ejects_past_its_limit() {
    // Two backends that both fail everything: at 50 % only one may go.
    let backends = [FaultyEcho::start().await, FaultyEcho::start().await];
    let addresses: Vec<String> = backends.iter().map(|b| b.address.clone()).collect();
    for backend in &backends {
        backend.faults.set_fail(true);
    }
    let channel = builder(&static_target(&addresses), PolicyKind::RoundRobin)
        .outlier_detection(OutlierDetectionConfig::default())
        .build();
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let mut states = channel.watch_state();
    let watcher = tokio::spawn(async move {
        let mut fewest = usize::MAX;
        while states.changed().await.is_ok() {
            fewest = fewest.min(states.borrow_and_update().ready.len());
        }
        fewest
    });
    let load = Load::start(channel.clone(), 4, Duration::from_millis(2), RPC_TIMEOUT);
    // One is ejected...
    wait_for("one ejection", STARTUP, || {
        let ready = channel.state().ready.len();
        async move { (ready == 1).then_some(()) }
    })
    .await;
    // ...and the other stays through several more sweeps.
    let sweeps = channel.balancer_stats().batches.load(Ordering::Relaxed);
    load.wait_more(1_500, STARTUP).await;
    assert!(channel.balancer_stats().batches.load(Ordering::Relaxed) > sweeps);
    load.stop().await;
    assert_eq!(channel.state().ready.len(), 1);
    drop(channel);
    assert_eq!(watcher.await.unwrap(), 1, "both backends were ejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_wraps_least_request_too() {
    let backends = [
        FaultyEcho::start().await,
        FaultyEcho::start().await,
        FaultyEcho::start().await,
    ];
    let addresses: Vec<String> = backends.iter().map(|b| b.address.clone()).collect();
    backends[2].faults.set_fail(true);
    let config = OutlierDetectionConfig {
        success_rate: None,
        failure_percentage: Some(FailurePercentageEjection::default()),
        ..OutlierDetectionConfig::default()
    };
    let channel = builder(&static_target(&addresses), least_request())
        .outlier_detection(config)
        .build();
    let load = Load::start(
        channel.clone(),
        4,
        Duration::from_millis(2),
        HEALTHY_RPC_TIMEOUT,
    );
    // It was picked (so it had been ready), then ejected.
    wait_for("the failing backend to be called", STARTUP, || {
        let called = backends[2].faults.calls() > 0;
        async move { called.then_some(()) }
    })
    .await;
    wait_ready_set(&channel, &addresses[..2], STARTUP).await;
    let ejected = Instant::now();
    load.wait_more(500, STARTUP).await;
    let shots = load.stop().await;
    let after: Vec<Shot> = shots.into_iter().filter(|s| s.sent >= ejected).collect();
    assert!(failures(&after).is_empty(), "failures after the ejection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_backend_that_plain_least_request_would_use() {
    // One call at a time: every backend has nothing in flight at each pick,
    // so plain least_request draws at random (a third to the slow one);
    // only the latency estimate can tell the slow backend apart.
    let backends = [
        FaultyEcho::start().await,
        FaultyEcho::start().await,
        FaultyEcho::start().await,
    ];
    let addresses: Vec<String> = backends.iter().map(|b| b.address.clone()).collect();
    let slow = &backends[0];
    slow.faults.set_delay(Duration::from_millis(200));
    let channel = builder(
        &static_target(&addresses),
        PolicyKind::LeastRequest(LeastRequestConfig::peak_ewma()),
    )
    .build();
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let mut client = EchoClient::new(channel.clone());
    const CALLS: usize = 500;
    let mut to_slow = 0;
    for _ in 0..CALLS {
        let backend = echo_once(&mut client, Duration::from_secs(5))
            .await
            .expect("rpc");
        if backend == slow.address {
            to_slow += 1;
        }
    }
    // The first call or two may go there before its latency is known.
    assert!(
        to_slow * 100 <= CALLS * 2,
        "the slow backend got {to_slow} of {CALLS} calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_failing_every_call_is_ejected_with_real_processes() {
    let cluster = Cluster::start(2).await;
    let port = free_port().expect("free port");
    let bad = local(port);
    let _bad = start_echo(&cluster.registry, SERVICE, &[port], &["--fail-rate", "1"]).await;
    let mut addresses = cluster.addresses();
    addresses.push(bad.clone());
    let channel = builder(&registry_target(&cluster.registry), PolicyKind::RoundRobin)
        .outlier_detection(OutlierDetectionConfig::default())
        .build();
    let load = Load::start(
        channel.clone(),
        4,
        Duration::from_millis(2),
        HEALTHY_RPC_TIMEOUT,
    );
    wait_for("the failing backend to be used", STARTUP, || {
        let failed = !failures(&load.shots()).is_empty();
        async move { failed.then_some(()) }
    })
    .await;
    wait_ready_set(&channel, &cluster.addresses(), STARTUP).await;
    let ejected = Instant::now();
    load.wait_more(1_000, STARTUP).await;
    let shots = load.stop().await;
    let after: Vec<Shot> = shots.into_iter().filter(|s| s.sent >= ejected).collect();
    assert!(failures(&after).is_empty(), "failures after the ejection");
    assert!(!split(&after).contains_key(&bad));
}

#[tokio::test]
async fn client_refuses_unknown_policies_and_misplaced_options() {
    let target = "static:///127.0.0.1:1".to_owned();
    refused_at_startup(
        "client",
        &[
            "--target".into(),
            target.clone(),
            "--policy".into(),
            "fastest".into(),
        ],
        "least_request, weighted_round_robin",
    )
    .await;
    refused_at_startup(
        "client",
        &[
            "--target".into(),
            target,
            "--policy".into(),
            "round_robin".into(),
            "--peak-ewma".into(),
        ],
        "--peak-ewma needs --policy least_request",
    )
    .await;
}
