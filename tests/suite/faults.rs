//! The fault suite: the failover scenario under continuous client load,
//! with real registry and echo processes and real signals. Each test
//! asserts how many RPCs failed.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use switchboard::client::PolicyKind;
use switchboard::proto::echo::echo_client::EchoClient;
use tokio::time::Instant;

/// Workers of the client load; each sends one RPC every 10 ms, so a few
/// hundred RPC/s in all.
const CONCURRENCY: usize = 4;
const PACE: Duration = Duration::from_millis(10);
/// Long enough that a slow RPC on a loaded machine is no failure; an RPC on
/// a hung backend fails sooner, when keepalive drops its connection.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// The backends' lease TTL where a test needs the registry's view to lag
/// the client's.
const TTL: Duration = Duration::from_secs(15);

fn assert_only_on(shots: &[Shot], after: Instant, allowed: &[String]) -> usize {
    let later: Vec<&Shot> = shots.iter().filter(|s| s.sent >= after).collect();
    for shot in &later {
        match &shot.result {
            Ok(backend) => assert!(
                allowed.contains(backend),
                "RPC went to {backend}, expected one of {allowed:?}"
            ),
            Err(status) => panic!("RPC failed after the set settled: {status:?}"),
        }
    }
    later.len()
}

/// Fault 1: a backend SIGKILLed under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_fails_at_most_the_rpcs_in_flight_and_its_broken_stream_removes_it() {
    let Loaded {
        mut cluster,
        addresses,
        channel,
        load,
    } = Loaded::start(3, CONCURRENCY, PACE, RPC_TIMEOUT, 150).await;

    let victim = addresses[1].clone();
    let survivors = all_but(&addresses, &victim);
    cluster.kill(&victim);
    wait_registered(&cluster.registry, SERVICE, &survivors, STARTUP).await;
    // Its connection closed with the process: the registry removed it for
    // that, not at the end of its TTL.
    assert_removals(&cluster.metrics, 1, 0).await;
    wait_ready_set(&channel, &survivors, STARTUP).await;
    let settled = Instant::now();
    load.wait_more(200, STARTUP).await;
    let shots = load.stop().await;

    let failed = failures(&shots);
    eprintln!("SIGKILL: {} failed", failed.len());
    assert!(
        failed.len() <= CONCURRENCY,
        "{} RPCs failed, but at most {CONCURRENCY} were in flight: {failed:?}",
        failed.len()
    );
    assert!(assert_only_on(&shots, settled, &survivors) >= 150);
}

/// Fault 2: a backend SIGSTOPped (hung with its connections open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_is_caught_by_keepalive_then_the_ttl_and_sigcont_brings_it_back() {
    // A 15 s TTL leaves the client's keepalive (500 ms + 2 s) far ahead of
    // the registry, however loaded the machine.
    let Loaded {
        cluster,
        addresses,
        channel,
        load,
    } = Loaded::start_with(
        3,
        &["--ttl-ms", &TTL.as_millis().to_string()],
        CONCURRENCY,
        PACE,
        RPC_TIMEOUT,
        150,
    )
    .await;

    let victim = addresses[0].clone();
    let survivors = all_but(&addresses, &victim);
    let stopped_at = Instant::now();
    cluster.backend(&victim).signal(libc::SIGSTOP);
    wait_ready_set(&channel, &survivors, STARTUP).await;
    let settled = Instant::now();
    // The client dropped it on its own: a keepalive ping went unanswered
    // on a connection with RPCs in flight.
    let stats = channel.connection_stats();
    assert_eq!(
        stats
            .keepalive_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "{stats:?}"
    );
    wait_registered(&cluster.registry, SERVICE, &survivors, STARTUP).await;
    let left_registry = stopped_at.elapsed();
    // Its connection stayed open: the registry ended it at its TTL.
    assert_removals(&cluster.metrics, 0, 1).await;
    load.wait_more(100, STARTUP).await;

    cluster.backend(&victim).signal(libc::SIGCONT);
    wait_registered(&cluster.registry, SERVICE, &addresses, STARTUP).await;
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let back = Instant::now();
    load.wait_more(150, STARTUP).await;
    let shots = load.stop().await;

    let failed = failures(&shots);
    eprintln!(
        "SIGSTOP: registry dropped it after {left_registry:?}, {} failed",
        failed.len()
    );
    // The TTL counts from the last heartbeat before the stop (heartbeats go
    // every TTL/3): not removed before two thirds of it.
    assert!(
        left_registry >= TTL * 2 / 3,
        "registry removed it before the TTL: {left_registry:?}"
    );
    // Only RPCs sent to the victim before the client dropped it may fail.
    for shot in &failed {
        assert!(
            shot.sent < settled,
            "an RPC sent after the client dropped the hung backend failed: {shot:?}"
        );
    }
    let served_by_victim_again = shots
        .iter()
        .filter(|s| s.sent >= back && s.result.as_ref().ok() == Some(&victim))
        .count();
    assert!(
        served_by_victim_again > 0,
        "the resumed backend got no traffic"
    );
}

/// Fault 3: a rolling restart, every backend in turn SIGTERMed and started
/// again, costs no RPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_sigterm_fails_no_rpc() {
    let Loaded {
        mut cluster,
        addresses,
        channel,
        load,
    } = Loaded::start(3, CONCURRENCY, PACE, RPC_TIMEOUT, 100).await;

    for address in &addresses {
        let index = cluster
            .backends
            .iter()
            .position(|(a, _)| a == address)
            .unwrap();
        let (_, mut proc) = cluster.backends.remove(index);
        proc.signal(libc::SIGTERM);
        assert_eq!(
            proc.wait_exit(STARTUP).await,
            Some(0),
            "echo did not exit cleanly:\n{}",
            proc.dump()
        );
        let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
        let restarted = start_echo(&cluster.registry, SERVICE, &[port], &[]).await;
        cluster.backends.push((address.clone(), restarted));
        wait_ready_set(&channel, &addresses, STARTUP).await;
        load.wait_more(100, STARTUP).await;
    }
    let shots = load.stop().await;
    let failed = failures(&shots);
    eprintln!(
        "rolling restart: {} RPCs, {} failed",
        shots.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} RPCs failed during the rolling restart: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// Fault 4: the registry SIGKILLed and restarted costs no RPC; backends
/// come back by themselves, and one started during the outage joins after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_restart_fails_no_rpc_and_backends_return_by_themselves() {
    let Loaded {
        mut cluster,
        channel,
        load,
        ..
    } = Loaded::start(2, CONCURRENCY, PACE, RPC_TIMEOUT, 100).await;

    cluster.registry_proc.kill();
    wait_for("the client to notice the outage", STARTUP, || {
        let noticed = channel.state().resolver_error.is_some();
        async move { noticed.then_some(()) }
    })
    .await;
    // A backend started while the registry is down.
    let late = cluster.add_backend().await;
    load.wait_more(100, STARTUP).await;

    let port: u16 = cluster
        .registry
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    cluster.registry_proc = start_registry(port).await;
    let all = cluster.addresses();
    wait_registered(&cluster.registry, SERVICE, &all, STARTUP).await;
    wait_ready_set(&channel, &all, STARTUP).await;
    load.wait_more(150, STARTUP).await;
    let shots = load.stop().await;

    let failed = failures(&shots);
    eprintln!(
        "registry restart: {} failed of {}",
        failed.len(),
        shots.len()
    );
    assert!(
        failed.is_empty(),
        "{} RPCs failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        shots.iter().any(|s| s.result.as_ref().ok() == Some(&late)),
        "the late backend got no traffic"
    );
}

/// Established TCP connections from this process to `port`.
fn connections_to(port: u16) -> usize {
    let mut count = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|r| r.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 01 is ESTABLISHED. Both ends of a loopback connection
            // appear; the remote side is the one whose remote port is ours.
            if remote_port == Some(port) && fields.get(3) == Some(&"01") {
                count += 1;
            }
        }
    }
    count
}

/// Fault 5: a flapping backend; the client converges every time and leaks
/// neither connections nor tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_backend_converges_each_time_without_leaks() {
    let Loaded {
        mut cluster,
        addresses,
        channel,
        load,
    } = Loaded::start(2, CONCURRENCY, PACE, RPC_TIMEOUT, 100).await;
    let flapper = addresses[0].clone();
    let steady = vec![addresses[1].clone()];
    let port: u16 = flapper.rsplit(':').next().unwrap().parse().unwrap();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    for round in 0..5 {
        cluster.kill(&flapper);
        wait_ready_set(&channel, &steady, Duration::from_secs(10)).await;
        wait_registered(&cluster.registry, SERVICE, &steady, Duration::from_secs(10)).await;
        let restarted = start_echo(&cluster.registry, SERVICE, &[port], &[]).await;
        cluster.backends.push((flapper.clone(), restarted));
        wait_ready_set(&channel, &addresses, STARTUP).await;
        load.wait_more(50, STARTUP).await;
        let connections = connections_to(port);
        assert_eq!(
            connections, 1,
            "round {round}: {connections} connections to the flapping backend"
        );
    }
    // Tasks of the killed connections wind down asynchronously: a leak is
    // a count that never comes back down.
    let tasks_after = wait_for("tasks to settle", Duration::from_secs(20), || {
        let alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        async move { (alive <= tasks_before + 2).then_some(alive) }
    })
    .await;
    let shots = load.stop().await;
    let failed = failures(&shots);
    eprintln!(
        "flapping: {} failed of {}, tasks {tasks_before} -> {tasks_after}",
        failed.len(),
        shots.len()
    );
    assert!(
        failed.len() <= 5 * CONCURRENCY,
        "{} failed over 5 kills",
        failed.len()
    );
    let served: BTreeSet<String> = shots
        .iter()
        .rev()
        .take(50)
        .filter_map(|s| s.result.clone().ok())
        .collect();
    assert_eq!(
        served.len(),
        2,
        "after flapping traffic is not on both backends: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Fault 6 (and the client issue): pick_first moves on when its backend dies.
async fn pick_first_sticks_to_the_first_and_fails_over_to_the_next() {
    let mut cluster = Cluster::start(3).await;
    let addresses = cluster.addresses();
    let channel = channel(&registry_target(&cluster.registry), PolicyKind::PickFirst);
    wait_ready_set(&channel, &addresses[..1], STARTUP).await;
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..20 {
        assert_eq!(
            echo_once(&mut client, Duration::from_secs(5))
                .await
                .unwrap(),
            addresses[0]
        );
    }

    let concurrency = 4;
    let load = Load::start(
        channel.clone(),
        concurrency,
        Duration::from_millis(5),
        RPC_TIMEOUT,
    );
    load.wait_more(50, STARTUP).await;
    let killed_at = Instant::now();
    cluster.kill(&addresses[0]);
    wait_ready_set(&channel, &addresses[1..2], STARTUP).await;
    let settled = Instant::now();
    load.wait_more(100, STARTUP).await;
    let shots = load.stop().await;

    let failed = failures(&shots);
    assert!(
        failed.len() <= concurrency,
        "{} failed, more than the {concurrency} in flight: {failed:?}",
        failed.len()
    );
    for shot in shots.iter().filter(|s| s.sent >= settled) {
        assert_eq!(
            shot.result.as_ref().ok(),
            Some(&addresses[1]),
            "after failover: {shot:?}"
        );
    }
    for shot in shots.iter().filter(|s| s.done < killed_at) {
        assert_eq!(
            shot.result.as_ref().ok(),
            Some(&addresses[0]),
            "before the kill: {shot:?}"
        );
    }
}
