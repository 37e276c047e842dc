//! Wire compatibility with stock gRPC (Python grpcio, pinned), in both
//! directions:
//!
//! - grpcio clients against echo processes: every RPC shape; one address and
//!   a multi-address `ipv4:` target (whose `:authority` h2 alone would
//!   refuse, see `authority_repair`), with pick_first and round_robin;
//! - switchboard's client against grpcio echo servers written here: classic
//!   and live runs with both policies, one server SIGKILLed, and an idle
//!   channel that stock keepalive enforcement must not punish.
//!
//! When grpcio is missing the tests install it (pinned) under the target
//! directory, so nothing outside the checkout changes.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::python::python_with_grpcio;
use crate::common::*;
use switchboard::client::{BalancedChannel, PolicyKind};
use switchboard::proto::echo::echo_client::EchoClient;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_every_rpc_shape() {
    let Some(python_path) = python_with_grpcio() else {
        eprintln!("python3 not found: skipping the grpcio interop test");
        return;
    };
    let port = free_port().expect("free port");
    let _echo = start_echo(
        &local(free_port().expect("free port")),
        SERVICE,
        &[port],
        &[],
    )
    .await;
    let address = local(port);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/echo_client.py");
    let output = tokio::process::Command::new("python3")
        .args([script, &address])
        .env("PYTHONPATH", &python_path)
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let from = format!("(from {address})");
    let expected = [
        format!("unary: py {from}"),
        format!("server-streaming: py {from}"),
        format!("server-streaming: py {from}"),
        format!("server-streaming: py {from}"),
        format!("client-streaming: a, b, c {from}"),
        format!("bidi: x {from}"),
        format!("bidi: y {from}"),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expected, "python client output:\n{stdout}");
}

/// Path of a Python script under `tests/interop/`.
fn script(name: &str) -> String {
    format!("{}/tests/interop/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `lb_client.py`: `count` unary echoes through one grpcio channel to
/// `target` with `policy` (and `grpc.default_authority` if given); returns
/// the backend of each reply, failing the test on any failed RPC.
async fn grpcio_client(
    python_path: &Path,
    target: &str,
    policy: &str,
    count: usize,
    authority: Option<&str>,
) -> Vec<String> {
    let count = count.to_string();
    let mut args = vec![script("lb_client.py"), target.into(), policy.into(), count];
    args.extend(authority.map(str::to_owned));
    let output = tokio::time::timeout(
        STARTUP,
        tokio::process::Command::new("python3")
            .args(&args)
            .env("PYTHONPATH", python_path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python client finishes")
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "grpcio client {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(backend_of).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_with_one_address_and_either_policy() {
    let Some(python_path) = python_with_grpcio() else {
        eprintln!("python3 not found: skipping");
        return;
    };
    let port = free_port().expect("free port");
    let _echo = start_echo(
        &local(free_port().expect("free port")),
        SERVICE,
        &[port],
        &[],
    )
    .await;
    for policy in ["pick_first", "round_robin"] {
        let served = grpcio_client(&python_path, &local(port), policy, 10, None).await;
        assert_eq!(served, vec![local(port); 10], "{policy}");
    }
}

/// grpcio sends the whole `ipv4:A,B` list as `:authority`, which h2 alone
/// refuses on every RPC; `authority_repair` lets it in, with no client-side
/// workaround.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_with_a_multi_address_target_and_either_policy() {
    let Some(python_path) = python_with_grpcio() else {
        eprintln!("python3 not found: skipping");
        return;
    };
    let ports = [
        free_port().expect("free port"),
        free_port().expect("free port"),
    ];
    let _echo = start_echo(
        &local(free_port().expect("free port")),
        SERVICE,
        &ports,
        &[],
    )
    .await;
    let both: BTreeSet<String> = ports.iter().map(|p| local(*p)).collect();
    let target = format!("ipv4:{},{}", local(ports[0]), local(ports[1]));

    let served = grpcio_client(&python_path, &target, "pick_first", 20, None).await;
    assert_eq!(served, vec![local(ports[0]); 20], "pick_first");

    let served = grpcio_client(&python_path, &target, "round_robin", 40, None).await;
    assert_eq!(served.len(), 40);
    let seen: BTreeSet<String> = served.into_iter().collect();
    assert_eq!(seen, both, "round_robin");

    // The workaround documented for servers without the repair (and for
    // TLS) works as well.
    let served = grpcio_client(&python_path, &target, "round_robin", 40, Some("echo.local")).await;
    let seen: BTreeSet<String> = served.into_iter().collect();
    assert_eq!(seen, both, "round_robin with grpc.default_authority");
}

/// A stock grpcio echo server (`tests/interop/echo_server.py`, default
/// options) in its own process; returns it and its address.
async fn start_grpcio_server(python_path: &Path) -> (Proc, String) {
    let path = python_path.to_string_lossy();
    let proc = Proc::spawn_env(
        "python3",
        &[&script("echo_server.py")],
        &[
            ("PYTHONPATH", &path),
            // Makes grpcio say so if it punishes the client's pings.
            ("GRPC_VERBOSITY", "INFO"),
            ("GRPC_TRACE", "http_keepalive"),
        ],
    );
    let line = proc.wait_line("echo_server serving on ", STARTUP).await;
    let address = line
        .rsplit_once("serving on ")
        .map(|(_, a)| a.trim().to_owned())
        .expect("address");
    (proc, address)
}

/// A channel to `addresses` as a user would configure one.
fn static_channel(addresses: &[String], policy: PolicyKind) -> BalancedChannel {
    channel(&format!("static:///{}", addresses.join(",")), policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_client_against_grpcio_servers_classic_and_live() {
    let Some(python_path) = python_with_grpcio() else {
        eprintln!("python3 not found: skipping");
        return;
    };
    let (_a, a) = start_grpcio_server(&python_path).await;
    let (_b, b) = start_grpcio_server(&python_path).await;
    let addresses = vec![a.clone(), b.clone()];
    let both: BTreeSet<String> = addresses.iter().cloned().collect();

    for policy in [PolicyKind::PickFirst, PolicyKind::RoundRobin] {
        let channel = static_channel(&addresses, policy);
        let expected = match policy {
            PolicyKind::PickFirst => BTreeSet::from([a.clone()]),
            _ => both.clone(),
        };
        // The calls below judge the policy, so every backend it uses is
        // connected first.
        let ready: Vec<String> = expected.iter().cloned().collect();
        wait_ready_set(&channel, &ready, STARTUP).await;
        let mut client = EchoClient::new(channel.clone());
        // Classic: one RPC after another.
        let served = served_by(&mut client, 20).await;
        assert_eq!(served, expected, "{policy:?} classic");

        // Live: a steady RPC loop from several workers.
        let load = Load::start(channel, 4, Duration::from_millis(5), Duration::from_secs(5));
        load.wait_more(300, STARTUP).await;
        let shots = load.stop().await;
        assert!(
            failures(&shots).is_empty(),
            "{policy:?} live: {:?}",
            failures(&shots)
        );
        let served: BTreeSet<String> = shots.into_iter().filter_map(|s| s.result.ok()).collect();
        assert_eq!(served, expected, "{policy:?} live");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_client_fails_over_when_a_grpcio_server_is_killed() {
    const WORKERS: usize = 4;
    let Some(python_path) = python_with_grpcio() else {
        eprintln!("python3 not found: skipping");
        return;
    };
    for policy in [PolicyKind::PickFirst, PolicyKind::RoundRobin] {
        let (mut first, a) = start_grpcio_server(&python_path).await;
        let (_second, b) = start_grpcio_server(&python_path).await;
        let addresses = vec![a.clone(), b.clone()];
        let channel = static_channel(&addresses, policy);
        let ready = match policy {
            PolicyKind::PickFirst => vec![a.clone()],
            _ => addresses.clone(),
        };
        wait_ready_set(&channel, &ready, STARTUP).await;
        let load = Load::start(
            channel.clone(),
            WORKERS,
            Duration::from_millis(5),
            Duration::from_secs(5),
        );
        load.wait_more(200, STARTUP).await;
        let before: BTreeSet<String> = load
            .shots()
            .into_iter()
            .filter_map(|s| s.result.ok())
            .collect();
        assert!(before.contains(&a), "{policy:?} used {a} before the kill");

        let killed_at = Instant::now();
        first.kill();
        wait_ready_set(&channel, std::slice::from_ref(&b), STARTUP).await;
        let settled = Instant::now();
        load.wait_more(200, STARTUP).await;
        let shots = load.stop().await;

        let failed = failures(&shots);
        eprintln!(
            "{policy:?}: {} failed, settled {:?} after the kill",
            failed.len(),
            settled - killed_at
        );
        assert!(
            failed.len() <= WORKERS,
            "{policy:?}: {} RPCs failed, but at most {WORKERS} were in flight: {failed:?}",
            failed.len()
        );
        for shot in &failed {
            assert!(
                shot.sent <= settled,
                "{policy:?}: an RPC sent after the client settled failed: {shot:?}"
            );
        }
        let after: Vec<&Shot> = shots.iter().filter(|s| s.sent > settled).collect();
        assert!(after.len() >= 150, "{policy:?}: {} RPCs after", after.len());
        for shot in after {
            assert_eq!(shot.result.as_ref().ok(), Some(&b), "{policy:?}: {shot:?}");
        }
    }
}

/// Issue 10, part 2: stock servers allow no pings on a connection without
/// RPCs (grpcio answers them with GOAWAY `too_many_pings`). An idle
/// channel whose keepalive interval is short must still keep its one
/// connection and fail no RPC afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_channel_is_not_punished_by_a_default_grpcio_server() {
    const INTERVAL: Duration = Duration::from_secs(1);
    let Some(python_path) = python_with_grpcio() else {
        eprintln!("python3 not found: skipping");
        return;
    };
    let (server, address) = start_grpcio_server(&python_path).await;
    let channel = BalancedChannel::builder(&format!("static:///{address}"))
        .expect("valid target")
        .keepalive(INTERVAL, INTERVAL)
        .build();
    let mut client = EchoClient::new(channel.clone());
    assert_eq!(
        served_by(&mut client, 3).await,
        BTreeSet::from([address.clone()])
    );

    // Idle for several ping intervals: grpcio strikes out a client after
    // three pings without RPCs.
    let idle_until = Instant::now() + 6 * INTERVAL;
    let mut ready = channel.watch_state();
    // Wakes early only if the channel's state changes, which is itself the
    // failure this test looks for.
    while let Ok(changed) = tokio::time::timeout_at(idle_until, ready.changed()).await {
        changed.expect("the channel is alive");
        let state = ready.borrow_and_update().clone();
        assert!(
            state.ready.len() == 1 && state.is_ready(&address),
            "while idle: {state:#?}"
        );
    }
    let mut failed = Vec::new();
    for _ in 0..20 {
        if let Err(status) = echo_once(&mut client, Duration::from_secs(5)).await {
            failed.push(status);
        }
    }
    assert!(
        failed.is_empty(),
        "RPCs after the idle spell failed: {failed:?}"
    );
    let stats = channel.connection_stats();
    assert_eq!(
        stats.attempts.load(Ordering::Relaxed),
        1,
        "reconnected: {stats:?}"
    );
    assert_eq!(stats.too_many_pings.load(Ordering::Relaxed), 0, "{stats:?}");
    let output = server.dump().to_lowercase();
    assert!(
        !output.contains("too_many_pings") && !output.contains("too many pings"),
        "grpcio punished the client's pings:\n{output}"
    );
}
