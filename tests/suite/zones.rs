//! Zone-aware routing against real processes: two echo backends in zone a,
//! two in zone b, a client in zone a. Calls stay in a, move to b when both
//! of a's backends are SIGKILLed (with nothing lost but the calls in
//! flight, or nothing at all under a retry policy), and come back when a
//! does. A pushed `zonePreference` turns the preference off and on again
//! in a running client.

use std::time::Duration;

use crate::common::*;
use crate::policy::{cli_set, config_file};
use switchboard::client::{BalancedChannel, PolicyKind};

const RETRY: &str = r#"{"methodConfig": [{"name": [{}], "retryPolicy": {
  "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;

const WORKERS: usize = 4;

/// Starts one echo backend in `zone`; returns its address and process.
async fn backend(registry: &str, port: u16, zone: &str) -> (String, Proc) {
    let proc = start_echo(registry, SERVICE, &[port], &["--zone", zone]).await;
    (local(port), proc)
}

async fn zones_fail_over_and_back(config: Option<&str>) {
    let port = free_port().expect("free port");
    let _registry = start_registry(port).await;
    let registry = local(port);
    let ports: Vec<u16> = (0..4).map(|_| free_port().expect("free port")).collect();
    let mut a = vec![
        backend(&registry, ports[0], "a").await,
        backend(&registry, ports[1], "a").await,
    ];
    let b = vec![
        backend(&registry, ports[2], "b").await,
        backend(&registry, ports[3], "b").await,
    ];
    let zone_a: Vec<String> = a.iter().map(|(addr, _)| addr.clone()).collect();
    let zone_b: Vec<String> = b.iter().map(|(addr, _)| addr.clone()).collect();
    let mut all: Vec<String> = zone_a.iter().chain(&zone_b).cloned().collect();
    all.sort();
    let mut builder = BalancedChannel::builder(&registry_target(&registry))
        .unwrap()
        .policy(PolicyKind::RoundRobin)
        .zone("a");
    if let Some(config) = config {
        builder = builder.service_config_json(config).unwrap();
    }
    let channel = builder.build();
    wait_ready_set(&channel, &all, STARTUP).await;
    let load = Load::start(
        channel.clone(),
        WORKERS,
        Duration::from_millis(5),
        Duration::from_secs(5),
    );
    load.wait_more(200, STARTUP).await;
    let steady = load.shots();
    assert!(
        steady
            .iter()
            .all(|s| s.result.as_ref().is_ok_and(|b| zone_a.contains(b))),
        "every call in zone a while it is healthy"
    );

    // Zone a dies: its backends are SIGKILLed.
    let killed = load.count();
    for (_, proc) in &mut a {
        proc.kill();
    }
    let mut sorted_b = zone_b.clone();
    sorted_b.sort();
    wait_ready_set(&channel, &sorted_b, STARTUP).await;
    let moved = load.count();
    load.wait_more(200, STARTUP).await;
    let shots = load.shots();
    assert!(
        shots[moved..]
            .iter()
            .all(|s| s.result.as_ref().is_ok_and(|b| zone_b.contains(b))),
        "every call in zone b once a is gone"
    );
    let failed = failures(&shots[killed..]).len();
    match config {
        // Only what was in flight on the killed backends: at most one call
        // per worker per kill.
        None => assert!(failed <= 2 * WORKERS, "{failed} failed"),
        Some(_) => assert_eq!(failed, 0, "{:?}", failures(&shots[killed..])),
    }

    // Zone a is back: calls return to it.
    a = vec![
        backend(&registry, ports[0], "a").await,
        backend(&registry, ports[1], "a").await,
    ];
    wait_ready_set(&channel, &all, STARTUP).await;
    // Back in rotation, the zone takes every call again: wait for a run of
    // 100 calls all in zone a (picks made before the picker changed may
    // still go to b), then every call after it stays there.
    let back = wait_for("100 calls in a row back in zone a", STARTUP, || {
        let shots = load.shots();
        let zone_a = zone_a.clone();
        async move {
            let tail = shots.len().checked_sub(100)?;
            shots[tail..]
                .iter()
                .all(|s| s.result.as_ref().is_ok_and(|b| zone_a.contains(b)))
                .then_some(shots.len())
        }
    })
    .await;
    load.wait_more(200, STARTUP).await;
    let shots = load.stop().await;
    let strays: Vec<&Result<String, tonic::Status>> = shots[back..]
        .iter()
        .map(|s| &s.result)
        .filter(|r| !r.as_ref().is_ok_and(|b| zone_a.contains(b)))
        .collect();
    assert!(strays.is_empty(), "calls left zone a again: {strays:?}");
    assert!(failures(&shots[moved..]).is_empty());
    drop(a);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_in_zone_move_when_it_dies_and_come_back() {
    zones_fail_over_and_back(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_retry_policy_a_dead_zone_costs_no_call() {
    zones_fail_over_and_back(Some(RETRY)).await;
}

/// Waits for a run of 100 calls, after the first `from`, all answered by
/// backends `within`; returns where the run ends.
async fn run_of_100_within(load: &Load, from: usize, within: &[String], what: &str) -> usize {
    wait_for(what, STARTUP, || {
        let shots = load.shots();
        async move {
            let tail = shots.len().checked_sub(100)?.max(from);
            (shots.len() - tail >= 100
                && shots[tail..]
                    .iter()
                    .all(|s| s.result.as_ref().is_ok_and(|b| within.contains(b))))
            .then_some(shots.len())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_zone_preference_turns_zone_routing_off_and_on_in_a_running_client() {
    let port = free_port().expect("free port");
    let _registry = start_registry(port).await;
    let registry = local(port);
    let mut backends = Vec::new();
    for zone in ["a", "a", "b", "b"] {
        backends.push(backend(&registry, free_port().expect("free port"), zone).await);
    }
    let zone_a: Vec<String> = backends[..2].iter().map(|(a, _)| a.clone()).collect();
    let zone_b: Vec<String> = backends[2..].iter().map(|(a, _)| a.clone()).collect();
    let mut all: Vec<String> = backends.iter().map(|(a, _)| a.clone()).collect();
    all.sort();
    // The zone is the client's; the policy comes from the registry.
    let channel = BalancedChannel::builder(&registry_target(&registry))
        .unwrap()
        .zone("a")
        .build();
    let round_robin = r#"{"loadBalancingConfig": [{"round_robin": {}}]}"#;
    cli_set(
        &registry,
        config_file("rr.json", round_robin).to_str().unwrap(),
    )
    .await;
    wait_ready_set(&channel, &all, STARTUP).await;
    let load = Load::start(
        channel.clone(),
        WORKERS,
        Duration::from_millis(5),
        Duration::from_secs(5),
    );
    let on = run_of_100_within(&load, 0, &zone_a, "100 calls in a row in zone a").await;

    // Off: the same client spreads over both zones.
    let off = r#"{"loadBalancingConfig": [{"round_robin": {}}],
                  "zonePreference": {"enabled": false}}"#;
    cli_set(&registry, config_file("off.json", off).to_str().unwrap()).await;
    let reached_b = wait_for("a call in zone b", STARTUP, || {
        let shots = load.shots();
        let zone_b = zone_b.clone();
        async move {
            shots[on..]
                .iter()
                .position(|s| s.result.as_ref().is_ok_and(|b| zone_b.contains(b)))
                .map(|i| on + i)
        }
    })
    .await;
    load.wait_more(200, STARTUP).await;
    let shots = load.shots();
    for zone in [&zone_a, &zone_b] {
        assert!(
            shots[reached_b..]
                .iter()
                .any(|s| s.result.as_ref().is_ok_and(|b| zone.contains(b))),
            "round_robin over both zones reaches {zone:?}"
        );
    }

    // On again (the default factor): back in zone a for good.
    cli_set(
        &registry,
        config_file("on.json", round_robin).to_str().unwrap(),
    )
    .await;
    let back = run_of_100_within(&load, shots.len(), &zone_a, "back in zone a").await;
    load.wait_more(200, STARTUP).await;
    let shots = load.stop().await;
    assert!(
        shots[back..]
            .iter()
            .all(|s| s.result.as_ref().is_ok_and(|b| zone_a.contains(b))),
        "calls left zone a again"
    );
    assert!(failures(&shots).is_empty(), "{:?}", failures(&shots));
    drop(backends);
}
