//! Grey failures, injected and handled: echo's fault flags (failures,
//! latency, a health switch), client-side health checking against real echo
//! processes, and `dns:///` targets with their re-resolution.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use switchboard::client::{BackoffConfig, BalancedChannel, Builder, DnsResolver, PolicyKind};
use switchboard::echo::EchoService;
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::echo_server::EchoServer;
use tokio::time::Instant;
use tonic::Code;

/// A round_robin channel with test-friendly backoff and health checking of
/// the whole server (`""`).
fn health_checked(target: &str) -> BalancedChannel {
    BalancedChannel::builder(target)
        .expect("valid target")
        .policy(PolicyKind::RoundRobin)
        .backoff(BackoffConfig::fast())
        .health_check("")
        .build()
}

/// Starts an echo process on a free port with `extra` flags. Its registry
/// address has nothing behind it and its service is the test's own, so it
/// registers nowhere and can never appear in another test's registry.
async fn lone_echo(service: &str, extra: &[&str]) -> (String, Proc) {
    let port = free_port().expect("free port");
    let nowhere = local(free_port().expect("free port"));
    let proc = start_echo(&nowhere, service, &[port], extra).await;
    (local(port), proc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_backend_gets_no_rpc_until_it_serves_again() {
    let cluster = Cluster::start(2).await;
    let addresses = cluster.addresses();
    let victim = addresses[0].clone();
    let healthy = all_but(&addresses, &victim);
    let channel = health_checked(&registry_target(&cluster.registry));
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let load = Load::start(
        channel.clone(),
        4,
        Duration::from_millis(5),
        Duration::from_secs(5),
    );
    load.wait_more(50, STARTUP).await;

    // SIGUSR1 turns its health NOT_SERVING; the process keeps serving RPCs.
    cluster.backend(&victim).signal(libc::SIGUSR1);
    cluster
        .backend(&victim)
        .wait_line("echo health NOT_SERVING", STARTUP)
        .await;
    wait_ready_set(&channel, &healthy, STARTUP).await;
    let watch_seen = Instant::now();
    load.wait_more(200, STARTUP).await;
    let shots = load.shots();
    let late_to_victim: Vec<_> = shots
        .iter()
        .filter(|s| s.sent >= watch_seen && s.result.as_deref().ok() == Some(victim.as_str()))
        .collect();
    assert!(
        late_to_victim.is_empty(),
        "{} RPCs went to the NOT_SERVING backend after the Watch update",
        late_to_victim.len()
    );
    assert!(failures(&shots).is_empty(), "{:?}", failures(&shots));
    let state = channel.state();
    assert!(
        state.endpoints.iter().any(|e| e.address == victim),
        "the backend stays in the endpoint set, only unpicked: {state:?}"
    );

    // Flipped back: traffic returns over the same connection.
    let connections = channel.connection_stats().succeeded.load(Ordering::Relaxed);
    cluster.backend(&victim).signal(libc::SIGUSR1);
    cluster
        .backend(&victim)
        .wait_line("echo health SERVING", STARTUP)
        .await;
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let back = Instant::now();
    load.wait_more(50, STARTUP).await;
    let shots = load.stop().await;
    assert!(
        shots
            .iter()
            .any(|s| s.sent >= back && s.result.as_deref().ok() == Some(victim.as_str())),
        "no RPC reached the backend once it said SERVING again"
    );
    assert!(failures(&shots).is_empty(), "{:?}", failures(&shots));
    assert_eq!(
        channel.connection_stats().succeeded.load(Ordering::Relaxed),
        connections,
        "health changes must not cost a reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_from_the_start_and_unknown_services_are_never_picked() {
    let (address, _echo) = lone_echo("health.test.start", &["--not-serving-after", "0s"]).await;
    _echo.wait_line("echo health NOT_SERVING", STARTUP).await;
    let target = format!("static:///{address}");
    let channel = health_checked(&target);
    let mut state = channel.watch_state();
    let state = tokio::time::timeout(
        STARTUP,
        state.wait_for(|s| {
            s.last_error
                .as_ref()
                .is_some_and(|e| e.to_string().contains("NOT_SERVING"))
        }),
    )
    .await
    .expect("the channel reports the health")
    .expect("balancer alive")
    .clone();
    assert!(state.ready.is_empty(), "{state:?}");
    let mut client = EchoClient::new(channel.clone());
    let err = echo_once(&mut client, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("NOT_SERVING"), "{err}");

    // A service the backend does not know: NOT_FOUND, never picked.
    let (other, _echo2) = lone_echo("health.test.unknown", &[]).await;
    let channel = BalancedChannel::builder(&format!("static:///{other}"))
        .unwrap()
        .policy(PolicyKind::RoundRobin)
        .backoff(BackoffConfig::fast())
        .health_check("no.such.Service")
        .build();
    let mut state = channel.watch_state();
    let state = tokio::time::timeout(
        STARTUP,
        state.wait_for(|s| {
            s.last_error
                .as_ref()
                .is_some_and(|e| e.to_string().contains("health check failed"))
        }),
    )
    .await
    .expect("the channel reports the failed health check")
    .expect("balancer alive")
    .clone();
    assert!(state.ready.is_empty(), "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_health_service_stays_usable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new(address.as_str())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = health_checked(&format!("static:///{address}"));
    wait_ready_set(&channel, std::slice::from_ref(&address), STARTUP).await;
    let mut client = EchoClient::new(channel);
    for _ in 0..5 {
        let served = echo_once(&mut client, Duration::from_secs(5))
            .await
            .expect("rpc");
        assert_eq!(served, address);
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_rate_one_fails_every_call_with_the_code() {
    let (address, _echo) = lone_echo(
        "health.test.fail",
        &["--fail-rate", "1.0", "--fail-code", "INTERNAL"],
    )
    .await;
    let channel = channel(&format!("static:///{address}"), PolicyKind::RoundRobin);
    wait_ready_set(&channel, std::slice::from_ref(&address), STARTUP).await;
    let mut client = EchoClient::new(channel);
    for _ in 0..20 {
        let err = echo_once(&mut client, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err}");
        assert!(err.message().contains("injected"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_adds_latency_to_every_call() {
    let delay = Duration::from_millis(150);
    let (address, _echo) = lone_echo("health.test.delay", &["--delay", "150ms"]).await;
    let channel = channel(&format!("static:///{address}"), PolicyKind::RoundRobin);
    wait_ready_set(&channel, std::slice::from_ref(&address), STARTUP).await;
    let mut client = EchoClient::new(channel);
    for _ in 0..5 {
        let sent = Instant::now();
        let served = echo_once(&mut client, Duration::from_secs(10))
            .await
            .expect("a slow reply, not a failure");
        assert_eq!(served, address);
        assert!(sent.elapsed() >= delay, "took {:?}", sent.elapsed());
    }
}

#[tokio::test]
async fn bad_fault_flags_are_refused_in_one_line() {
    for (flags, expected) in [
        (&["--fail-rate", "2"][..], "--fail-rate"),
        (&["--fail-rate", "-1"], "--fail-rate"),
        (&["--fail-code", "OK"], "--fail-code"),
        (&["--fail-code", "NOPE"], "--fail-code"),
        (&["--delay", "soon"], "--delay"),
        (&["--not-serving-after", "5x"], "--not-serving-after"),
    ] {
        let args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        refused_at_startup("echo", &args, expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_target_resolves_localhost() {
    let (address, _echo) = lone_echo("health.test.dns", &[]).await;
    let port = address.rsplit_once(':').unwrap().1;
    let channel = channel(&format!("dns:///localhost:{port}"), PolicyKind::RoundRobin);
    // localhost may also resolve to ::1, where nothing listens: that
    // endpoint simply never becomes Ready.
    wait_ready_set(&channel, std::slice::from_ref(&address), STARTUP).await;
    let state = channel.state();
    for endpoint in state.endpoints.iter() {
        let ip: SocketAddr = endpoint.address.parse().expect("resolved to IP:port");
        assert!(ip.ip().is_loopback(), "{endpoint:?}");
    }
    let mut client = EchoClient::new(channel);
    for _ in 0..5 {
        let served = echo_once(&mut client, Duration::from_secs(5))
            .await
            .expect("rpc");
        assert_eq!(served, address);
    }
}

/// A name service the test controls: the answer, and how often it was asked.
#[derive(Clone, Default)]
struct FakeDns {
    answer: Arc<Mutex<Vec<SocketAddr>>>,
    lookups: Arc<AtomicUsize>,
}

impl FakeDns {
    fn set(&self, addresses: &[&String]) {
        *self.answer.lock().unwrap() = addresses.iter().map(|a| a.parse().unwrap()).collect();
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }

    fn resolver(&self) -> DnsResolver {
        let dns = self.clone();
        DnsResolver::new("backends.test:1").with_lookup(Arc::new(move |_name| {
            dns.lookups.fetch_add(1, Ordering::SeqCst);
            let answer = dns.answer.lock().unwrap().clone();
            Box::pin(async move { Ok(answer) })
        }))
    }
}

fn dns_channel(resolver: DnsResolver) -> BalancedChannel {
    Builder::with_resolver("backends.test:1", Box::new(resolver))
        .policy(PolicyKind::RoundRobin)
        .backoff(BackoffConfig::fast())
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_re_resolves_periodically_and_when_a_connection_fails() {
    let (a, mut echo_a) = lone_echo("health.test.redns", &[]).await;
    let (b, _echo_b) = lone_echo("health.test.redns", &[]).await;

    // Periodic: the answer grows, and the channel follows without failures.
    let periodic = FakeDns::default();
    periodic.set(&[&a]);
    let channel = dns_channel(periodic.resolver().with_refresh(Duration::from_millis(100)));
    wait_ready_set(&channel, std::slice::from_ref(&a), STARTUP).await;
    periodic.set(&[&a, &b]);
    wait_ready_set(&channel, &[a.clone(), b.clone()], STARTUP).await;

    // On failure: with an hour between refreshes, only the lost connection
    // can make the resolver look again and find the backend's new address.
    let nudged = FakeDns::default();
    nudged.set(&[&a]);
    let channel = dns_channel(
        nudged
            .resolver()
            .with_refresh(Duration::from_secs(3600))
            .with_min_interval(Duration::from_millis(50)),
    );
    wait_ready_set(&channel, std::slice::from_ref(&a), STARTUP).await;
    nudged.set(&[&b]);
    let before = nudged.lookups();
    echo_a.kill();
    wait_ready_set(&channel, std::slice::from_ref(&b), STARTUP).await;
    assert!(nudged.lookups() > before);
    let mut client = EchoClient::new(channel);
    let served: BTreeSet<String> = served_by(&mut client, 4).await;
    assert_eq!(served, BTreeSet::from([b]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cli_health_checks_a_dns_target() {
    let (address, _echo) = lone_echo("health.test.cli", &[]).await;
    let port = address.rsplit_once(':').unwrap().1;
    let target = format!("dns:///localhost:{port}");
    let mut client = Proc::sub(
        "client",
        &[
            "--target",
            &target,
            "--policy",
            "round_robin",
            "--health-check",
            "--count",
            "3",
        ],
    );
    assert_eq!(
        client.wait_exit(STARTUP).await,
        Some(0),
        "{}",
        client.dump()
    );
    let replies = client
        .output()
        .iter()
        .filter(|line| line.ends_with(&format!("(from {address})")))
        .count();
    assert_eq!(replies, 3, "{}", client.dump());

    let bad = ["--target".to_owned(), "dns://8.8.8.8/x:1".to_owned()];
    refused_at_startup("client", &bad, "dns:///<host:port>").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_first_moves_off_a_not_serving_backend() {
    let (a, echo_a) = lone_echo("health.test.pf", &[]).await;
    let (b, _echo_b) = lone_echo("health.test.pf", &[]).await;
    let channel = BalancedChannel::builder(&format!("static:///{a},{b}"))
        .unwrap()
        .policy(PolicyKind::PickFirst)
        .backoff(BackoffConfig::fast())
        .health_check("")
        .build();
    wait_ready_set(&channel, std::slice::from_ref(&a), STARTUP).await;
    echo_a.signal(libc::SIGUSR1);
    echo_a.wait_line("echo health NOT_SERVING", STARTUP).await;
    wait_ready_set(&channel, std::slice::from_ref(&b), STARTUP).await;
    let mut client = EchoClient::new(channel);
    let served = served_by(&mut client, 3).await;
    assert_eq!(served, BTreeSet::from([b]));
}
