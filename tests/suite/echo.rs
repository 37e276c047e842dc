//! The echo backend against a real registry on 127.0.0.1: the `echo`
//! binary as a real process (registration, every RPC shape, health and
//! reflection, a SIGTERM drain during a long stream, registry restarts and
//! outages, a busy port), and the in-process [`EchoServerHandle`] that
//! other tests start backends with. Bad flags are in `tests/cli.rs`.

use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use switchboard::discovery::{EndpointSet, EndpointState, Versioned};
use switchboard::echo::{EchoServerHandle, LeaseState, ServerConfig};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::{EchoRequest, EchoResponse};
use switchboard::proto::registry::{RegisterRequest, WatchResponse};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long a process may take to start, or a condition with no promised
/// bound to come true, on a loaded machine.
const GENEROUS: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// The endpoint set of a service as one watcher sees it, built by the
/// library's own `EndpointSet::apply`.
#[derive(Default)]
struct WatchedSet {
    endpoints: EndpointSet,
}

impl WatchedSet {
    fn apply(&mut self, update: &WatchResponse) {
        // A message without an event only brings the service's config.
        let Ok(versioned) = Versioned::try_from(update.clone()) else {
            assert!(update.service_config.is_some(), "{update:?}");
            return;
        };
        let changes = self.endpoints.apply(versioned.update);
        assert!(changes.anomalies.is_empty(), "{:?}", changes.anomalies);
    }

    fn state(&self, address: &str) -> Option<EndpointState> {
        self.endpoints.get(address).map(|e| e.state)
    }

    /// Whether exactly `addresses` are listed, all serving.
    fn serving_exactly(&self, addresses: &[String]) -> bool {
        self.endpoints.len() == addresses.len()
            && addresses
                .iter()
                .all(|a| self.state(a) == Some(EndpointState::Serving))
    }
}

/// Reads `watch` into `set` until `done` holds, failing after `timeout`.
async fn watch_until(
    watch: &mut Streaming<WatchResponse>,
    set: &mut WatchedSet,
    what: &str,
    timeout: Duration,
    done: impl Fn(&WatchedSet) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(set) {
        match tokio::time::timeout_at(deadline, watch.message()).await {
            Ok(Ok(Some(update))) => set.apply(&update),
            Ok(other) => panic!("watch ended while waiting for {what}: {other:?}"),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; set: {:?}",
                set.endpoints.addresses().collect::<Vec<_>>()
            ),
        }
    }
}

/// An Echo client connected to `addr`, retrying until it serves.
async fn echo_client(addr: &str) -> EchoClient<Channel> {
    let uri = format!("http://{addr}");
    wait_for(&format!("echo at {addr}"), GENEROUS, || {
        let uri = uri.clone();
        async move { EchoClient::connect(uri).await.ok() }
    })
    .await
}

fn request(message: &str) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(EchoRequest {
        message: message.into(),
    });
    request.set_timeout(Duration::from_secs(10));
    request
}

/// A ServerStreamingEcho request for `count` replies `interval_ms` apart.
fn stream_request(message: &str, count: u64, interval_ms: u64) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(EchoRequest {
        message: message.into(),
    });
    let metadata = request.metadata_mut();
    metadata.insert("x-echo-count", count.to_string().parse().unwrap());
    metadata.insert(
        "x-echo-interval-ms",
        interval_ms.to_string().parse().unwrap(),
    );
    request
}

/// A plain tonic channel to `addr`.
async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

async fn health(addr: &str, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(connect(addr).await);
    let reply = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(reply.status).expect("known status")
}

/// Starts the echo binary with `args` (the registry and ports are up to the
/// caller) and waits until each of `serving` is announced.
async fn spawn_echo(args: &[&str], serving: &[String]) -> Proc {
    let proc = Proc::sub("echo", args);
    for address in serving {
        proc.wait_line(&format!("echo serving on {address}"), GENEROUS)
            .await;
    }
    proc
}

/// Every output line of `proc`, stdout and stderr.
fn lines(proc: &Proc) -> Vec<String> {
    proc.output()
}

// ---------------------------------------------------------------------------
// Registration and the RPCs
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_appear_in_a_registry_watch_with_their_addresses() {
    let registry_port = free_port().expect("free port");
    let _registry = start_registry(registry_port).await;
    let registry = local(registry_port);
    let mut client = registry_client(&registry, GENEROUS).await;
    let mut watch = watch(&mut client, SERVICE).await;
    let mut set = WatchedSet::default();

    let ports = [
        free_port().expect("free port"),
        free_port().expect("free port"),
    ];
    let addresses: Vec<String> = ports.iter().map(|p| local(*p)).collect();
    let (p0, p1) = (ports[0].to_string(), ports[1].to_string());
    // Ports as positional arguments, the classic example's shape; the
    // service name is the default.
    let echo = spawn_echo(
        &[
            "--registry",
            &registry,
            "--meta",
            "zone=a",
            "--meta",
            "version=1",
            &p0,
            &p1,
        ],
        &addresses,
    )
    .await;

    watch_until(
        &mut watch,
        &mut set,
        "both servers to be SERVING",
        GENEROUS,
        |set| set.serving_exactly(&addresses),
    )
    .await;
    for address in &addresses {
        let metadata = &set.endpoints.get(address).expect("listed").metadata;
        assert_eq!(metadata.get("zone").map(String::as_str), Some("a"));
        assert_eq!(metadata.get("version").map(String::as_str), Some("1"));
    }
    // One serving line per server, exactly as tests and demos parse it.
    let serving: Vec<String> = lines(&echo)
        .into_iter()
        .filter(|l| l.starts_with("echo serving on "))
        .collect();
    assert_eq!(
        serving,
        addresses
            .iter()
            .map(|a| format!("echo serving on {a}"))
            .collect::<Vec<_>>()
    );
    // Registration is logged too (stderr may trail the registry's view).
    echo.wait_line("registered", GENEROUS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_shape_answers_in_the_promised_format() {
    // No registry needed to serve; one is configured but absent.
    let port = free_port().expect("free port");
    let address = local(port);
    let _echo = spawn_echo(
        &[
            "--registry",
            &local(free_port().expect("free port")),
            "--listen",
            &address,
        ],
        std::slice::from_ref(&address),
    )
    .await;
    let mut client = echo_client(&address).await;
    let expect = |message: &str| format!("{message} (from {address})");

    let unary = client.unary_echo(request("hello")).await.unwrap();
    assert_eq!(unary.into_inner().message, expect("hello"));

    // ServerStreaming: ten replies by default, or as many as asked.
    let replies: Vec<EchoResponse> = client
        .server_streaming_echo(request("s"))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(replies.len(), 10);
    assert!(replies.iter().all(|r| r.message == expect("s")));
    let replies: Vec<_> = client
        .server_streaming_echo(stream_request("t", 3, 1))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(replies.len(), 3);
    let bad = client
        .server_streaming_echo(stream_request("t", 1, 10_000_000))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("x-echo-interval-ms"), "{bad:?}");

    // ClientStreaming: one reply for all.
    let outbound =
        futures_util::stream::iter(["a", "b", "c"].map(|m| EchoRequest { message: m.into() }));
    let summary = client.client_streaming_echo(outbound).await.unwrap();
    assert_eq!(summary.into_inner().message, expect("a, b, c"));

    // Bidi: one reply per message, in order, while the client still sends.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .bidirectional_streaming_echo(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for message in ["x", "y"] {
        tx.send(EchoRequest {
            message: message.into(),
        })
        .await
        .unwrap();
        let reply = replies.message().await.unwrap().expect("a reply");
        assert_eq!(reply.message, expect(message));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // Health and reflection ride along on every server.
    assert_eq!(health(&address, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&address, "grpc.examples.echo.Echo").await,
        ServingStatus::Serving
    );
    let services = reflected_services(&address).await;
    for expected in ["grpc.examples.echo.Echo", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == expected), "{services:?}");
    }
    assert!(
        !services.iter().any(|s| s.contains("registry")),
        "reflection lists a service this server does not serve: {services:?}"
    );
}

/// The services a server lists over gRPC reflection (v1).
async fn reflected_services(addr: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut client = ServerReflectionClient::new(connect(addr).await);
    let asked = futures_util::stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]);
    let mut replies = client
        .server_reflection_info(asked)
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a reply");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_stream_deregisters_first_and_finishes_the_stream() {
    let registry_port = free_port().expect("free port");
    let _registry = start_registry(registry_port).await;
    let registry = local(registry_port);
    let mut registry_client = registry_client(&registry, GENEROUS).await;
    let mut watch = watch(&mut registry_client, SERVICE).await;
    let mut set = WatchedSet::default();
    let address = local(free_port().expect("free port"));
    let mut echo = spawn_echo(
        &[
            "--registry",
            &registry,
            "--listen",
            &address,
            "--drain-grace-ms",
            "300",
            // Long enough that only the test's closing its side ends the
            // stream.
            "--shutdown-timeout-ms",
            "300000",
        ],
        std::slice::from_ref(&address),
    )
    .await;
    watch_until(
        &mut watch,
        &mut set,
        "the server to register",
        GENEROUS,
        |s| s.serving_exactly(std::slice::from_ref(&address)),
    )
    .await;

    // A bidi stream that lasts as long as the test keeps its side open: the
    // order below holds by construction, however slow the machine.
    let mut client = echo_client(&address).await;
    let (send, requests) = tokio::sync::mpsc::unbounded_channel();
    let mut replies = client
        .bidirectional_streaming_echo(tokio_stream::wrappers::UnboundedReceiverStream::new(
            requests,
        ))
        .await
        .unwrap()
        .into_inner();
    let expected = format!("long (from {address})");
    let exchange = async |replies: &mut tonic::Streaming<EchoResponse>| {
        send.send(EchoRequest {
            message: "long".into(),
        })
        .expect("the request stream is open");
        let reply = tokio::time::timeout(GENEROUS, replies.message())
            .await
            .expect("a reply in time")
            .expect("the stream serves")
            .expect("a reply");
        assert_eq!(reply.message, expected);
    };
    exchange(&mut replies).await;

    echo.signal(libc::SIGTERM);
    // The endpoint turns DRAINING, then leaves the set...
    let mut saw_draining = false;
    let deadline = Instant::now() + GENEROUS;
    while set.endpoints.contains(&address) {
        let update = tokio::time::timeout_at(deadline, watch.message())
            .await
            .expect("deregistration within the deadline")
            .unwrap()
            .expect("watch open");
        set.apply(&update);
        saw_draining |= set.state(&address) == Some(EndpointState::Draining);
    }
    assert!(
        saw_draining,
        "the endpoint was removed without being DRAINING"
    );
    // ...while the stream still serves: the process is still up.
    exchange(&mut replies).await;

    // The stream completes normally, and only then does the process exit 0.
    drop(send);
    let end = tokio::time::timeout(GENEROUS, replies.message())
        .await
        .expect("the stream finishes");
    assert!(matches!(end, Ok(None)), "the stream failed: {end:?}");
    assert_eq!(
        echo.wait_exit(GENEROUS).await,
        Some(0),
        "echo did not exit cleanly:\n{}",
        echo.dump()
    );
}

// ---------------------------------------------------------------------------
// Registry faults
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_registry_restart_the_endpoints_come_back_without_restarting_echo() {
    let registry_port = free_port().expect("free port");
    let mut registry_proc = start_registry(registry_port).await;
    let registry = local(registry_port);
    let addresses = vec![
        local(free_port().expect("free port")),
        local(free_port().expect("free port")),
    ];
    let echo = Proc::sub_env(
        "echo",
        &[
            "--registry",
            &registry,
            "--listen",
            &addresses[0],
            "--listen",
            &addresses[1],
        ],
        // The retries are debug events: counting them shows when the
        // backoff has grown to its cap.
        &[(
            "RUST_LOG",
            "info,switchboard::echo=debug,switchboard::registration=debug",
        )],
    );
    for address in &addresses {
        echo.wait_line(&format!("echo serving on {address}"), GENEROUS)
            .await;
    }
    wait_registered(&registry, SERVICE, &addresses, GENEROUS).await;
    // The registry lists a lease as soon as Register returns, but a keeper
    // counts itself registered only once its KeepAlive stream is answered;
    // a kill in between is an outage at startup, not a lost registration.
    wait_for("both keepers to hold their leases", GENEROUS, || {
        let held = count_lines(&echo, "lease_keeper: registered");
        async move { (held >= 2).then_some(()) }
    })
    .await;

    registry_proc.kill();
    // Both keepers noticed, and have retried long enough for their backoff
    // to reach its cap: the slowest case for coming back.
    wait_for("both keepers to notice the outage", GENEROUS, || {
        let lost = count_lines(&echo, "registration lost")
            + count_lines(&echo, "registry stream lost; resuming the lease");
        async move { (lost >= 2).then_some(()) }
    })
    .await;
    wait_for("the retry backoff to reach its cap", GENEROUS, || {
        let retries = count_lines(&echo, "registration attempt failed");
        async move { (retries >= 12).then_some(()) }
    })
    .await;

    // Each keeper comes back by itself, on its next retry (how soon is
    // measured in BENCHMARKS.md, not here).
    let _registry_proc = start_registry(registry_port).await;
    wait_registered(&registry, SERVICE, &addresses, GENEROUS).await;
    // The same process, still serving, announced each server only once.
    for address in &addresses {
        assert_eq!(count_lines(&echo, &format!("echo serving on {address}")), 1);
        let mut client = echo_client(address).await;
        client.unary_echo(request("still here")).await.unwrap();
    }
}

fn count_lines(proc: &Proc, needle: &str) -> usize {
    lines(proc).iter().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_registry_unreachable_echo_serves_and_registers_once_it_starts() {
    let registry_port = free_port().expect("free port");
    let registry = local(registry_port);
    let address = local(free_port().expect("free port"));
    let echo = spawn_echo(
        &["--registry", &registry, "--listen", &address],
        std::slice::from_ref(&address),
    )
    .await;
    echo.wait_line("registry unreachable", GENEROUS).await;
    let mut client = echo_client(&address).await;
    let reply = client.unary_echo(request("early")).await.unwrap();
    assert_eq!(
        reply.into_inner().message,
        format!("early (from {address})")
    );

    let _registry = start_registry(registry_port).await;
    wait_registered(&registry, SERVICE, std::slice::from_ref(&address), GENEROUS).await;
    assert_eq!(
        count_lines(&echo, "registry unreachable"),
        1,
        "warned more than once:\n{}",
        echo.dump()
    );
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_fails_in_one_line_naming_it_and_registers_nothing() {
    let registry_port = free_port().expect("free port");
    let _registry = start_registry(registry_port).await;
    let registry = local(registry_port);
    let mut client = registry_client(&registry, GENEROUS).await;
    let mut watch = watch(&mut client, SERVICE).await;

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    // The free port comes first: it binds, and must still not register.
    let free = local(free_port().expect("free port"));
    let mut echo = Proc::sub(
        "echo",
        &[
            "--registry",
            &registry,
            "--listen",
            &free,
            "--listen",
            &local(busy_port),
        ],
    );
    let code = echo.wait_exit(GENEROUS).await;
    assert_eq!(code, Some(1), "{}", echo.dump());
    let error = echo.wait_line("error:", GENEROUS).await;
    assert!(
        error.contains(&format!("port {busy_port}")) && error.contains("in use"),
        "{error}"
    );
    assert_eq!(lines(&echo), vec![error.clone()], "more than one line");

    // Nothing was ever registered: every change before a sentinel of ours
    // reaches the watch first, and there is none.
    let sentinel = "sentinel.invalid:1".to_string();
    client
        .register(RegisterRequest {
            service: SERVICE.into(),
            address: sentinel.clone(),
            metadata: Default::default(),
            ttl_ms: 0,
        })
        .await
        .unwrap();
    let mut set = WatchedSet::default();
    let mut ever_listed = Vec::new();
    let deadline = Instant::now() + GENEROUS;
    while !set.endpoints.contains(&sentinel) {
        let update = tokio::time::timeout_at(deadline, watch.message())
            .await
            .expect("the sentinel within the deadline")
            .unwrap()
            .expect("watch open");
        set.apply(&update);
        ever_listed.extend(set.endpoints.addresses().map(str::to_owned));
    }
    ever_listed.retain(|a| *a != sentinel);
    assert!(ever_listed.is_empty(), "registered: {ever_listed:?}");
    drop(busy);
}

// ---------------------------------------------------------------------------
// In-process servers
// ---------------------------------------------------------------------------

fn in_process(registry: Option<String>) -> ServerConfig {
    ServerConfig {
        registry,
        ..ServerConfig::default()
    }
}

async fn start_in_process(config: ServerConfig) -> EchoServerHandle {
    EchoServerHandle::bind_and_start(socket(0), config)
        .await
        .expect("echo starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_server_registers_drains_and_reports() {
    let registry_port = free_port().expect("free port");
    let _registry = start_registry(registry_port).await;
    let registry = local(registry_port);
    let server = start_in_process(ServerConfig {
        // Long enough for the checks below to run inside it, however slow.
        drain_grace: Duration::from_secs(10),
        ..in_process(Some(registry.clone()))
    })
    .await;
    let address = server.address().to_owned();
    assert_eq!(address, server.local_addr().to_string());
    let mut lease = server.lease_state();
    tokio::time::timeout(GENEROUS, lease.wait_for(LeaseState::is_registered))
        .await
        .expect("registered in time")
        .unwrap();
    wait_registered(&registry, SERVICE, std::slice::from_ref(&address), GENEROUS).await;

    let mut client = echo_client(&address).await;
    let mut stream = client
        .server_streaming_echo(stream_request("s", 30, 100))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("the first reply");

    let shutdown = tokio::spawn(server.shutdown());
    wait_registered(&registry, SERVICE, &[], GENEROUS).await;
    // During the grace the server still takes RPCs, but says it is leaving.
    assert_eq!(health(&address, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&address, "grpc.examples.echo.Echo").await,
        ServingStatus::NotServing
    );
    client.unary_echo(request("late")).await.unwrap();

    let mut received = 1;
    while let Some(reply) = stream.message().await.expect("the stream completes") {
        assert_eq!(reply.message, format!("s (from {address})"));
        received += 1;
    }
    assert_eq!(received, 30);
    let report = tokio::time::timeout(GENEROUS, shutdown)
        .await
        .expect("shutdown finishes")
        .unwrap();
    assert!(
        report.deregistered && report.in_flight_finished,
        "{report:?}"
    );
    assert_eq!(*lease.borrow(), LeaseState::Stopped);
    assert!(EchoClient::connect(format!("http://{address}"))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_outlive_the_shutdown_timeout_are_cut() {
    let server = start_in_process(ServerConfig {
        drain_grace: Duration::ZERO,
        shutdown_timeout: Duration::from_millis(300),
        ..in_process(None)
    })
    .await;
    assert_eq!(*server.lease_state().borrow(), LeaseState::NoRegistry);
    let address = server.address().to_owned();
    let mut client = echo_client(&address).await;
    let mut stream = client
        .server_streaming_echo(stream_request("forever", 1_000, 100))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("the first reply");

    // The stream would take 100 s; the 300 ms shutdown timeout cuts it.
    let report = tokio::time::timeout(GENEROUS, server.shutdown())
        .await
        .expect("shutdown is bounded");
    assert!(
        !report.in_flight_finished && !report.deregistered,
        "{report:?}"
    );
    let end = tokio::time::timeout(GENEROUS, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the cut stream ends");
    assert!(end.is_err(), "a cut stream must not look complete: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_server_is_a_crash_the_registry_notices_at_once() {
    let registry = StatusRegistry::start(&[]).await;
    // A lease that outlives the test: only the broken stream can end it.
    let server = start_in_process(ServerConfig {
        ttl: Duration::from_secs(300),
        ..in_process(Some(registry.address.clone()))
    })
    .await;
    let address = server.address().to_owned();
    // Registered: the lease is bound to the keepalive stream.
    tokio::time::timeout(
        GENEROUS,
        server.lease_state().wait_for(LeaseState::is_registered),
    )
    .await
    .expect("registered in time")
    .unwrap();
    wait_registered(
        &registry.address,
        SERVICE,
        std::slice::from_ref(&address),
        GENEROUS,
    )
    .await;

    server.abort();
    wait_registered(&registry.address, SERVICE, &[], GENEROUS).await;
    registry.assert_removed_by_stream_break(1).await;
    wait_for("the port to close", GENEROUS, || {
        let uri = format!("http://{address}");
        async move { EchoClient::connect(uri).await.is_err().then_some(()) }
    })
    .await;
}
