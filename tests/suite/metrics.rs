//! Metrics that move when their events happen, with real processes: the
//! client library's (in-process, and through `switchboard client
//! --metrics-listen`) as backends die and the registry changes or goes
//! away; echo's RPC codes and registration state; the registry's streams,
//! counted with their final status when they end.
//!
//! No test here leaves a listening socket open in this process (every
//! server is a child process on port 0), so the library test can check
//! that the channel opened none.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;
use prometheus_client::registry::Registry;
use switchboard::client::{BackoffConfig, BalancedChannel, PolicyKind};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use switchboard::proto::registry::registry_client::RegistryClient;

/// A registry on `listen` (`127.0.0.1:0` for any port): the process and
/// its address.
async fn registry_on(listen: &str) -> (Proc, String) {
    start_with_address(
        "registry",
        &["--listen", listen, "--warmup-ms", "0"],
        "registry listening on ",
    )
    .await
}

/// One echo server on a free port, registered at `registry`, with `extra`
/// flags: the process and the address it serves on.
async fn echo_on(registry: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "--registry",
        registry,
        "--service",
        SERVICE,
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    start_with_address("echo", &args, "echo serving on ").await
}

/// The sample `name` scraped from `address` now, 0 while absent.
async fn read_sample(address: &str, name: &str) -> f64 {
    sample(&get(address, "/metrics").await.1, name).unwrap_or(0.0)
}

/// `name{grpc_target="target",endpoint="endpoint"}`.
fn per_endpoint(name: &str, target: &str, endpoint: &str) -> String {
    format!("{name}{{grpc_target=\"{target}\",endpoint=\"{endpoint}\"}}")
}

/// `name{grpc_target="target"}`.
fn per_target(name: &str, target: &str) -> String {
    format!("{name}{{grpc_target=\"{target}\"}}")
}

/// The inodes of the TCP sockets in LISTEN state that this process holds.
fn listening_sockets_of_this_process() -> Vec<String> {
    let mut listening = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Field 3 is the state (0A: LISTEN), field 9 the inode.
            if fields.get(3) == Some(&"0A") {
                if let Some(inode) = fields.get(9) {
                    listening.insert((*inode).to_owned());
                }
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            let inode = link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned();
            listening.contains(&inode).then_some(inode)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_metrics_count_into_the_applications_registry_and_open_no_port() {
    // Other tests in this binary listen in process; the socket check below
    // must see this test's sockets only.
    if !in_a_process_of_its_own(
        "metrics::builder_metrics_count_into_the_applications_registry_and_open_no_port",
    ) {
        return;
    }
    let (_registry, reg) = registry_on("127.0.0.1:0").await;
    let (_a, a) = echo_on(&reg, &[]).await;
    let (_b, b) = echo_on(&reg, &[]).await;
    // The check below sees a listener when there is one.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    assert_eq!(listening_sockets_of_this_process().len(), 1);
    drop(probe);
    let target = format!("static:///{a},{b}");
    let mut registry = Registry::default();
    let channel = BalancedChannel::builder(&target)
        .expect("valid target")
        .policy(PolicyKind::RoundRobin)
        .backoff(BackoffConfig::fast())
        .metrics(&mut registry)
        .build();
    wait_ready_set(&channel, &[a.clone(), b.clone()], STARTUP).await;
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..10 {
        echo_once(&mut client, Duration::from_secs(5))
            .await
            .expect("rpc");
    }
    let text = switchboard::metrics::render(&registry);
    let mut picks = 0.0;
    let mut ok = 0.0;
    for endpoint in [&a, &b] {
        for (name, at_least) in [
            ("grpc_subchannel_connection_attempts_succeeded_total", 1.0),
            ("grpc_subchannel_open_connections", 1.0),
            ("switchboard_client_picks_total", 1.0),
        ] {
            let value = sample(&text, &per_endpoint(name, &target, endpoint));
            assert!(
                value.is_some_and(|v| v >= at_least),
                "{name} of {endpoint}: {value:?} in\n{text}"
            );
        }
        picks += sample(
            &text,
            &per_endpoint("switchboard_client_picks_total", &target, endpoint),
        )
        .unwrap_or(0.0);
        ok += sample(
            &text,
            &format!(
                "switchboard_client_rpcs_total{{grpc_target=\"{target}\",endpoint=\"{endpoint}\",code=\"OK\"}}"
            ),
        )
        .unwrap_or(0.0);
    }
    assert_eq!((picks, ok), (10.0, 10.0), "{text}");
    assert_eq!(
        sample(
            &text,
            &per_target("switchboard_client_endpoints_ready", &target)
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &per_target("switchboard_client_resolver_updates_total", &target)
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        listening_sockets_of_this_process(),
        Vec::<String>::new(),
        "the channel opened a listening socket"
    );
    // The channel's gauges do not outlive it (its tasks stop soon after).
    drop(client);
    drop(channel);
    let ready = per_target("switchboard_client_endpoints_ready", &target);
    wait_for("the ready gauge to drop to 0", STARTUP, || {
        let text = switchboard::metrics::render(&registry);
        std::future::ready((sample(&text, &ready) == Some(0.0)).then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_metrics_move_when_a_backend_is_killed() {
    let (_registry, reg) = registry_on("127.0.0.1:0").await;
    let (mut victim, a) = echo_on(&reg, &[]).await;
    let (_b, b) = echo_on(&reg, &[]).await;
    let target = format!("static:///{a},{b}");
    let client = Proc::sub(
        "client",
        &[
            "--target",
            &target,
            "--policy",
            "round_robin",
            "--rate",
            "50",
            "--timeout",
            "2s",
            "--backoff-initial",
            "100ms",
            "--backoff-max",
            "300ms",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = metrics_address(&client).await;
    let ready = per_target("switchboard_client_endpoints_ready", &target);
    wait_sample(&metrics, &ready, |v| v == 2.0).await;
    for endpoint in [&a, &b] {
        wait_sample(
            &metrics,
            &per_endpoint("switchboard_client_picks_total", &target, endpoint),
            |v| v >= 1.0,
        )
        .await;
        wait_sample(
            &metrics,
            &format!(
                "switchboard_client_rpcs_total{{grpc_target=\"{target}\",endpoint=\"{endpoint}\",code=\"OK\"}}"
            ),
            |v| v >= 1.0,
        )
        .await;
        wait_sample(
            &metrics,
            &per_endpoint("grpc_subchannel_open_connections", &target, endpoint),
            |v| v == 1.0,
        )
        .await;
        wait_sample(
            &metrics,
            &per_endpoint(
                "grpc_subchannel_connection_attempts_succeeded_total",
                &target,
                endpoint,
            ),
            |v| v >= 1.0,
        )
        .await;
    }
    let disconnections = per_endpoint("grpc_subchannel_disconnections_total", &target, &a);
    let failed = per_endpoint(
        "grpc_subchannel_connection_attempts_failed_total",
        &target,
        &a,
    );
    assert_eq!(read_sample(&metrics, &disconnections).await, 0.0);
    assert_eq!(read_sample(&metrics, &failed).await, 0.0);

    victim.kill();
    wait_sample(&metrics, &disconnections, |v| v >= 1.0).await;
    // Reconnecting to a dead process fails, again and again.
    wait_sample(&metrics, &failed, |v| v >= 2.0).await;
    wait_sample(
        &metrics,
        &per_endpoint("grpc_subchannel_open_connections", &target, &a),
        |v| v == 0.0,
    )
    .await;
    wait_sample(&metrics, &ready, |v| v == 1.0).await;
    // The survivor takes every pick from now on.
    let picks_a = per_endpoint("switchboard_client_picks_total", &target, &a);
    let picks_b = per_endpoint("switchboard_client_picks_total", &target, &b);
    let a_before = read_sample(&metrics, &picks_a).await;
    let b_before = read_sample(&metrics, &picks_b).await;
    wait_sample(&metrics, &picks_b, |v| v >= b_before + 20.0).await;
    assert_eq!(read_sample(&metrics, &picks_a).await, a_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_metrics_move_with_registry_changes_and_outages() {
    let (mut registry, reg) = registry_on("127.0.0.1:0").await;
    let (_a, a) = echo_on(&reg, &[]).await;
    wait_registered(&reg, SERVICE, std::slice::from_ref(&a), STARTUP).await;
    let target = registry_target(&reg);
    let client = Proc::sub(
        "client",
        &[
            "--target",
            &target,
            "--rate",
            "20",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = metrics_address(&client).await;
    let ready = per_target("switchboard_client_endpoints_ready", &target);
    let updates = per_target("switchboard_client_resolver_updates_total", &target);
    let errors = per_target("switchboard_client_resolver_errors_total", &target);
    wait_sample(&metrics, &ready, |v| v == 1.0).await;
    let before = wait_sample(&metrics, &updates, |v| v >= 1.0).await;
    assert_eq!(read_sample(&metrics, &errors).await, 0.0);

    // A backend joins: an update.
    let (_b, b) = echo_on(&reg, &[]).await;
    wait_sample(&metrics, &updates, |v| v > before).await;
    wait_sample(&metrics, &ready, |v| v == 2.0).await;
    wait_sample(
        &metrics,
        &per_target("switchboard_client_endpoints", &target),
        |v| v == 2.0,
    )
    .await;
    wait_sample(
        &metrics,
        &per_endpoint("switchboard_client_picks_total", &target, &b),
        |v| v >= 1.0,
    )
    .await;

    // The registry goes away: errors, while the known backends stay in use.
    registry.kill();
    wait_sample(&metrics, &errors, |v| v >= 2.0).await;
    assert_eq!(read_sample(&metrics, &ready).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_counts_rpcs_by_code_and_follows_its_registration() {
    let (mut registry, reg) = registry_on("127.0.0.1:0").await;
    let (echo, address) = echo_on(
        &reg,
        &[
            "--fail-rate",
            "1",
            "--fail-code",
            "ALREADY_EXISTS",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let metrics = metrics_address(&echo).await;
    let registered =
        format!("switchboard_echo_registered{{service=\"{SERVICE}\",address=\"{address}\"}}");
    wait_sample(&metrics, &registered, |v| v == 1.0).await;

    let mut client = EchoClient::connect(format!("http://{address}"))
        .await
        .expect("connect to echo");
    for _ in 0..3 {
        let status = client
            .unary_echo(EchoRequest {
                message: "hi".into(),
            })
            .await
            .expect_err("every call fails");
        assert_eq!(status.code(), tonic::Code::AlreadyExists);
    }
    wait_sample(
        &metrics,
        "switchboard_echo_rpcs_total{method=\"UnaryEcho\",code=\"ALREADY_EXISTS\"}",
        |v| v == 3.0,
    )
    .await;
    wait_sample(
        &metrics,
        "switchboard_echo_rpc_duration_seconds_count{method=\"UnaryEcho\"}",
        |v| v == 3.0,
    )
    .await;

    // The registry goes away and comes back on the same address.
    registry.kill();
    wait_sample(&metrics, &registered, |v| v == 0.0).await;
    let (_registry, _) = registry_on(&reg).await;
    wait_sample(&metrics, &registered, |v| v == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_streams_are_counted_with_their_final_status_when_they_end() {
    let registry = StatusRegistry::start(&[]).await;
    let (reg, metrics) = (registry.address.clone(), registry.status.clone());
    let (mut echo, address) = echo_on(&reg, &["--metrics-listen", "127.0.0.1:0"]).await;
    let echo_metrics = metrics_address(&echo).await;
    wait_registered(&reg, SERVICE, std::slice::from_ref(&address), STARTUP).await;
    // The registry lists an endpoint as soon as Register returns, before its
    // keeper has opened the KeepAlive stream; the keeper says registered
    // once that stream has answered, so there is a stream to end.
    wait_sample(
        &echo_metrics,
        &format!("switchboard_echo_registered{{service=\"{SERVICE}\",address=\"{address}\"}}"),
        |v| v == 1.0,
    )
    .await;
    let mut client = RegistryClient::connect(format!("http://{reg}"))
        .await
        .expect("connect to the registry");
    let watch = open_watch(&mut client).await.expect("watch opens");
    wait_sample(
        &metrics,
        "switchboard_registry_rpcs_total{method=\"Register\",code=\"OK\"}",
        |v| v == 1.0,
    )
    .await;
    let text = get(&metrics, "/metrics").await.1;
    for method in ["Watch", "KeepAlive"] {
        assert!(
            !text.contains(&format!("{{method=\"{method}\"")),
            "{method} counted while open:\n{text}"
        );
    }

    // The watcher hangs up, and the backend dies: each stream is counted
    // once, with how it ended.
    drop(watch);
    wait_sample(
        &metrics,
        "switchboard_registry_rpcs_total{method=\"Watch\",code=\"CANCELLED\"}",
        |v| v == 1.0,
    )
    .await;
    echo.kill();
    wait_sample(
        &metrics,
        "switchboard_registry_rpcs_total{method=\"KeepAlive\",code=\"CANCELLED\"}",
        |v| v == 1.0,
    )
    .await;
    wait_sample(
        &metrics,
        "switchboard_registry_rpc_duration_seconds_count{method=\"Watch\"}",
        |v| v == 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_that_reach_no_endpoint_are_counted_by_code() {
    // Nothing listens there: the one subchannel fails to connect, and
    // fail-fast RPCs end UNAVAILABLE without a pick.
    let nowhere = local(free_port().expect("free port"));
    let target = format!("static:///{nowhere}");
    let mut registry = Registry::default();
    let channel = BalancedChannel::builder(&target)
        .expect("valid target")
        .backoff(BackoffConfig::fast())
        .metrics(&mut registry)
        .build();
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..3 {
        let status = echo_once(&mut client, Duration::from_secs(5))
            .await
            .expect_err("no backend listens");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let text = switchboard::metrics::render(&registry);
    let unpicked = format!(
        "switchboard_client_unpicked_rpcs_total{{grpc_target=\"{target}\",code=\"UNAVAILABLE\"}}"
    );
    assert_eq!(sample(&text, &unpicked), Some(3.0), "{text}");
    let picks = per_endpoint("switchboard_client_picks_total", &target, &nowhere);
    assert_eq!(sample(&text, &picks).unwrap_or(0.0), 0.0, "{text}");
}
