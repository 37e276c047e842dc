//! The client library against real echo processes and a real registry on
//! 127.0.0.1: balancing, failover on real kills, discovery without traffic,
//! registry outages, fail-fast and wait-for-ready.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use switchboard::client::{
    BackoffConfig, BalancedChannel, ConnectivityState, PolicyKind, WaitForReady,
};
use switchboard::proto::echo::{echo_client::EchoClient, EchoRequest};
use tokio::time::Instant;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly_over_three_backends() {
    let cluster = Cluster::start(3).await;
    let channel = channel(&registry_target(&cluster.registry), PolicyKind::RoundRobin);
    wait_ready_set(&channel, &cluster.addresses(), STARTUP).await;
    let mut client = EchoClient::new(channel);
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..300 {
        let backend = echo_once(&mut client, Duration::from_secs(5))
            .await
            .expect("rpc");
        *counts.entry(backend).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, count) in &counts {
        assert!(
            (count - 100).abs() <= 1,
            "{backend} got {count}: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_backend_gets_traffic_pushed_by_the_registry_without_rpcs() {
    let mut cluster = Cluster::start(2).await;
    let mut metrics = prometheus_client::registry::Registry::default();
    let target = registry_target(&cluster.registry);
    let channel = BalancedChannel::builder(&target)
        .expect("valid target")
        .policy(PolicyKind::RoundRobin)
        .backoff(BackoffConfig::fast())
        .metrics(&mut metrics)
        .build();
    wait_ready_set(&channel, &cluster.addresses(), STARTUP).await;

    // No RPC is in flight: the channel can learn of the newcomer only from
    // the registry's Watch, in one more update.
    let updates = format!("switchboard_client_resolver_updates_total{{grpc_target=\"{target}\"}}");
    let before = sample(&switchboard::metrics::render(&metrics), &updates);
    let newcomer = cluster.add_backend().await;
    wait_ready_set(&channel, &cluster.addresses(), STARTUP).await;
    let text = switchboard::metrics::render(&metrics);
    let after = sample(&text, &updates);
    assert!(
        after > before,
        "no resolver update: {before:?} -> {after:?}\n{text}"
    );
    let picked = text
        .lines()
        .filter(|l| l.starts_with("switchboard_client_picks_total{"))
        .any(|l| !l.ends_with(" 0"));
    assert!(
        !picked,
        "an RPC was picked before the newcomer joined:\n{text}"
    );

    let mut client = EchoClient::new(channel);
    let mut served = Vec::new();
    for _ in 0..3 {
        served.push(
            echo_once(&mut client, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    assert!(
        served.contains(&newcomer),
        "{newcomer} got none of {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_keeps_the_last_set_and_recovery_adds_new_backends() {
    let port = free_port().expect("free port");
    let mut registry_proc = start_registry(port).await;
    let registry = local(port);
    let first = free_port().expect("free port");
    let _first = start_echo(&registry, SERVICE, &[first], &[]).await;
    wait_registered(&registry, SERVICE, &[local(first)], STARTUP).await;
    let channel = channel(&registry_target(&registry), PolicyKind::RoundRobin);
    wait_ready_set(&channel, &[local(first)], STARTUP).await;

    registry_proc.kill();
    let mut client = EchoClient::new(channel.clone());
    // The resolver notices the outage; RPCs keep flowing to the known set.
    wait_for("the resolver to report the outage", STARTUP, || {
        let state = channel.state();
        async move { state.resolver_error.is_some().then_some(()) }
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            echo_once(&mut client, Duration::from_secs(5))
                .await
                .unwrap(),
            local(first)
        );
    }

    let _registry_proc = start_registry(port).await;
    let second = free_port().expect("free port");
    let _second = start_echo(&registry, SERVICE, &[second], &[]).await;
    wait_ready_set(&channel, &[local(first), local(second)], STARTUP).await;
    let served = served_by(&mut client, 4).await;
    assert_eq!(served.len(), 2, "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_gone_fails_fast_with_unavailable() {
    let mut cluster = Cluster::start(2).await;
    let channel = channel(&registry_target(&cluster.registry), PolicyKind::RoundRobin);
    wait_ready_set(&channel, &cluster.addresses(), STARTUP).await;
    for address in cluster.addresses() {
        cluster.kill(&address);
    }
    wait_registered(&cluster.registry, SERVICE, &[], Duration::from_secs(10)).await;
    wait_for(
        "the channel to see the empty set",
        Duration::from_secs(10),
        || {
            let state = channel.state();
            let empty = state.endpoints.is_empty()
                && state.connectivity == ConnectivityState::TransientFailure;
            async move { empty.then_some(()) }
        },
    )
    .await;
    let mut client = EchoClient::new(channel);
    // A call that waited for a backend would end DEADLINE_EXCEEDED; one that
    // fails fast ends UNAVAILABLE, naming why.
    let status = echo_once(&mut client, Duration::from_secs(120))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(SERVICE),
        "message does not name the service: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_target_needs_no_registry() {
    // A registry address nobody listens on: the echo servers keep retrying
    // it, which must not stop them serving.
    let nowhere = local(free_port().expect("free port"));
    let ports = [
        free_port().expect("free port"),
        free_port().expect("free port"),
    ];
    let _echo = start_echo(&nowhere, SERVICE, &ports, &[]).await;
    let target = format!("static:///{},{}", local(ports[0]), local(ports[1]));
    let channel = channel(&target, PolicyKind::RoundRobin);
    wait_ready_set(&channel, &[local(ports[0]), local(ports[1])], STARTUP).await;
    let mut client = EchoClient::new(channel);
    let served = served_by(&mut client, 4).await;
    assert_eq!(served.len(), 2, "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_static_backends_fail_fast_with_the_connection_error() {
    let dead = local(free_port().expect("free port"));
    let channel = channel(&format!("static:///{dead}"), PolicyKind::PickFirst);
    wait_for("TransientFailure", STARTUP, || {
        let state = channel.state();
        async move { (state.connectivity == ConnectivityState::TransientFailure).then_some(()) }
    })
    .await;
    let mut client = EchoClient::new(channel);
    let status = echo_once(&mut client, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&dead), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_waits_for_a_backend_until_the_deadline() {
    let port = free_port().expect("free port");
    let channel = channel(&format!("static:///{}", local(port)), PolicyKind::PickFirst);
    let mut client = EchoClient::new(channel.clone());

    // Nothing listens: a wait-for-ready RPC waits out its deadline.
    let mut request = tonic::Request::new(EchoRequest {
        message: "w".into(),
    });
    request.set_timeout(Duration::from_millis(300));
    request.extensions_mut().insert(WaitForReady);
    let status = client.unary_echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // A backend that starts while it waits serves it.
    let mut request = tonic::Request::new(EchoRequest {
        message: "w".into(),
    });
    request.set_timeout(Duration::from_secs(20));
    request.extensions_mut().insert(WaitForReady);
    let pending = tokio::spawn(async move { client.unary_echo(request).await });
    let _echo = start_echo(
        &local(free_port().expect("free port")),
        SERVICE,
        &[port],
        &[],
    )
    .await;
    let reply = pending
        .await
        .unwrap()
        .expect("served once the backend is up");
    assert_eq!(backend_of(&reply.into_inner().message), local(port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_with_rpcs_in_flight_leaves_the_ready_set_by_keepalive() {
    // A lease far longer than any wait here: the registry keeps listing the
    // hung backend, so only the client's own keepalive can take it out.
    let cluster = Cluster::start_with(2, &["--ttl-ms", "300000"]).await;
    let addresses = cluster.addresses();
    let channel = channel(&registry_target(&cluster.registry), PolicyKind::RoundRobin);
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let victim = addresses[0].clone();
    let proc = cluster.backend(&victim);
    proc.signal(libc::SIGSTOP);
    // Keepalive pings only connections with RPCs in flight (idle ones are
    // left alone, as stock servers demand). Where round_robin sends each
    // call is its own business: keep calling until one waits on the hung
    // backend.
    let mut calls = Vec::new();
    wait_for("an RPC in flight on the hung backend", STARTUP, || {
        let mut client = EchoClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            echo_once(&mut client, Duration::from_secs(120)).await
        }));
        let stuck = channel
            .in_flight()
            .iter()
            .any(|(address, n)| *address == victim && *n > 0);
        async move { stuck.then_some(()) }
    })
    .await;
    let survivors = all_but(&addresses, &victim);
    wait_ready_set(&channel, &survivors, STARTUP).await;
    // It left because a ping went unanswered, while its lease lived on.
    let stats = channel.connection_stats();
    assert_eq!(
        stats.keepalive_timeouts.load(Ordering::Relaxed),
        1,
        "{stats:?}"
    );
    let mut registry = registry_client(&cluster.registry, STARTUP).await;
    let listed = resolve(&mut registry, SERVICE).await.unwrap_or_default();
    assert!(
        listed.contains(&victim),
        "the registry dropped it: {listed:?}"
    );
    proc.signal(libc::SIGCONT);
    for call in calls {
        call.abort();
    }
    wait_ready_set(&channel, &addresses, STARTUP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_are_refused_with_a_clear_error() {
    for bad in [
        "",
        "dns://8.8.8.8/x:1",
        "registry://127.0.0.1:50050",
        "static:///",
    ] {
        let err = BalancedChannel::builder(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(err.to_string().contains("expected registry://"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_resolver_drives_the_balancer() {
    use switchboard::client::resolver::BoxFuture;
    use switchboard::client::{Endpoint, Resolver, ResolverSink};
    use tokio::sync::mpsc;

    /// Publishes whatever address lists the test sends.
    struct Pushed(mpsc::UnboundedReceiver<Vec<String>>);
    impl Resolver for Pushed {
        fn resolve(self: Box<Self>, sink: ResolverSink) -> BoxFuture {
            let mut sets = self.0;
            Box::pin(async move {
                while let Some(set) = sets.recv().await {
                    sink.reset(set.into_iter().map(Endpoint::new).collect());
                }
            })
        }
    }

    let nowhere = local(free_port().expect("free port"));
    let ports = [
        free_port().expect("free port"),
        free_port().expect("free port"),
    ];
    let _echo = start_echo(&nowhere, SERVICE, &ports, &[]).await;
    let (a, b) = (local(ports[0]), local(ports[1]));
    let (push, sets) = mpsc::unbounded_channel();
    let channel = switchboard::client::Builder::with_resolver("pushed", Box::new(Pushed(sets)))
        .policy(PolicyKind::RoundRobin)
        .build();
    push.send(vec![a.clone()]).unwrap();
    wait_ready_set(&channel, std::slice::from_ref(&a), STARTUP).await;
    let mut client = EchoClient::new(channel.clone());
    assert_eq!(
        served_by(&mut client, 3)
            .await
            .into_iter()
            .collect::<Vec<_>>(),
        vec![a]
    );
    push.send(vec![b.clone()]).unwrap();
    wait_ready_set(&channel, std::slice::from_ref(&b), STARTUP).await;
    assert_eq!(
        served_by(&mut client, 3)
            .await
            .into_iter()
            .collect::<Vec<_>>(),
        vec![b]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_backend_finishes_in_flight_streams_and_gets_no_new_rpcs() {
    use futures_util::StreamExt;

    let mut cluster = Cluster::start(2).await;
    let addresses = cluster.addresses();
    let channel = channel(&registry_target(&cluster.registry), PolicyKind::RoundRobin);
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let mut client = EchoClient::new(channel.clone());

    // A 2-second stream: 20 replies, 100 ms apart.
    let mut request = tonic::Request::new(EchoRequest {
        message: "long".into(),
    });
    request
        .metadata_mut()
        .insert("x-echo-count", "20".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-echo-interval-ms", "100".parse().unwrap());
    let mut stream = client
        .server_streaming_echo(request)
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let draining = backend_of(&first.message);

    let index = cluster
        .backends
        .iter()
        .position(|(a, _)| *a == draining)
        .unwrap();
    let (_, mut proc) = cluster.backends.remove(index);
    proc.signal(libc::SIGTERM);
    let others = all_but(&addresses, &draining);
    wait_ready_set(&channel, &others, Duration::from_secs(10)).await;
    let served = served_by(&mut client, 4).await;
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        others,
        "a new RPC went to the draining backend"
    );

    let mut replies = 1;
    while let Some(reply) = stream.next().await {
        let reply = reply.expect("the in-flight stream completes normally");
        assert_eq!(backend_of(&reply.message), draining);
        replies += 1;
    }
    assert_eq!(replies, 20);
    assert_eq!(proc.wait_exit(STARTUP).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_timeout_bounds_an_rpc_to_a_hung_backend() {
    let nowhere = local(free_port().expect("free port"));
    let port = free_port().expect("free port");
    let echo = start_echo(&nowhere, SERVICE, &[port], &[]).await;
    // Keepalive slower than the test, so only the deadline can end the RPC.
    let channel = BalancedChannel::builder(&format!("static:///{}", local(port)))
        .unwrap()
        .keepalive(Duration::from_secs(60), Duration::from_secs(60))
        .timeout(Duration::from_millis(300))
        .build();
    wait_ready_set(&channel, &[local(port)], STARTUP).await;
    echo.signal(libc::SIGSTOP);
    let mut client = EchoClient::new(channel);
    // The stopped server cannot answer and keepalive waits a minute: only
    // the client's own deadline can end the call, as DEADLINE_EXCEEDED.
    let status = tokio::time::timeout(
        STARTUP,
        client.unary_echo(EchoRequest {
            message: "x".into(),
        }),
    )
    .await
    .expect("the default timeout ended the call")
    .unwrap_err();
    echo.signal(libc::SIGCONT);
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

/// How a listener that never speaks HTTP/2 treats each connection it takes.
#[derive(Debug, Clone, Copy)]
enum Mute {
    /// Accepts, then closes (FIN) without sending a byte.
    Close,
    /// Accepts, then resets (RST, linger 0) without sending a byte.
    Reset,
}

/// Accepts connections on 127.0.0.1 and drops each as `how` says, noting
/// when each arrived. This is a dying process whose listening socket
/// outlives the rest of it.
async fn mute_listener(
    how: Mute,
) -> (
    String,
    Arc<Mutex<Vec<Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let log = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            log.lock().unwrap().push(Instant::now());
            if let Mute::Reset = how {
                // Deprecated for blocking in close with a non-zero linger;
                // zero makes close send RST at once, never block.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
            }
            drop(stream);
        }
    });
    (address, accepted, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_hangs_up_before_settings_is_never_ready_and_backs_off() {
    let echo_port = free_port().expect("free port");
    let nowhere = local(free_port().expect("free port"));
    let echo = start_echo(&nowhere, SERVICE, &[echo_port], &[]).await;
    let real = local(echo_port);
    for how in [Mute::Close, Mute::Reset] {
        let (mute, accepted, listener) = mute_listener(how).await;
        // Short delays so 100 attempts take about two seconds; the cap keeps
        // the later ones from growing without end.
        let backoff = BackoffConfig {
            initial: Duration::from_millis(2),
            multiplier: 1.6,
            jitter: 0.2,
            max: Duration::from_millis(20),
            min_connect_timeout: Duration::from_secs(5),
        };
        let channel = BalancedChannel::builder(&format!("static:///{mute},{real}"))
            .unwrap()
            .policy(PolicyKind::RoundRobin)
            .backoff(backoff)
            .build();
        // Every state the channel publishes, as it publishes it.
        let mut states = channel.watch_state();
        let seen_ready = tokio::spawn({
            let mute = mute.clone();
            async move {
                let mut bad = Vec::new();
                while states.changed().await.is_ok() {
                    let ready = states.borrow_and_update().ready.clone();
                    if ready.iter().any(|a| **a == *mute) {
                        bad.push(ready);
                    }
                }
                bad
            }
        });
        wait_ready_set(&channel, std::slice::from_ref(&real), STARTUP).await;
        wait_for(
            &format!("100 attempts at the {how:?} listener"),
            STARTUP,
            || {
                let n = accepted.lock().unwrap().len();
                async move { (n >= 101).then_some(()) }
            },
        )
        .await;
        let stats = channel.connection_stats();
        let succeeded = stats.succeeded.load(Ordering::Relaxed);
        let failed = stats.failed.load(Ordering::Relaxed);
        drop(channel);
        listener.abort();
        let bad = seen_ready.await.unwrap();
        assert!(
            bad.is_empty(),
            "{how:?}: the mute backend was published ready: {bad:?}"
        );
        // The echo server's connection is the only one that ever was Ready.
        assert_eq!(
            succeeded, 1,
            "{how:?}: {succeeded} connections counted Ready"
        );
        assert!(
            failed >= 100,
            "{how:?}: only {failed} failed attempts counted"
        );
        // Each retry waits at least the backoff's lower bound for its place
        // in the run: the run is never reset by a false Ready.
        let at = accepted.lock().unwrap().clone();
        let mut expected = backoff.initial.as_secs_f64();
        for (attempt, pair) in at.windows(2).take(100).enumerate() {
            let gap = pair[1].duration_since(pair[0]).as_secs_f64();
            let floor = expected * (1.0 - backoff.jitter) - 0.000_5;
            assert!(
                gap >= floor,
                "{how:?}: retry {} came after {:.2} ms, backoff says at least {:.2} ms",
                attempt + 1,
                gap * 1e3,
                floor * 1e3
            );
            expected = (expected * backoff.multiplier).min(backoff.max.as_secs_f64());
        }
    }
    drop(echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_policy_plugs_in_and_hears_every_call_outcome() {
    use switchboard::client::policy::OnDone;
    use switchboard::client::round_robin::RoundRobin;
    use switchboard::client::{
        CallOutcome, Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker,
    };
    use switchboard::discovery::{Applied, EndpointSet};

    type Outcomes = Arc<Mutex<Vec<(String, CallOutcome)>>>;

    /// round_robin, with every pick reporting its outcome.
    struct Recording {
        inner: RoundRobin,
        outcomes: Outcomes,
    }
    struct RecordingPicker {
        inner: Arc<dyn Picker>,
        outcomes: Outcomes,
    }
    impl Picker for RecordingPicker {
        fn pick(&self, info: &PickInfo<'_>) -> Pick {
            match self.inner.pick(info) {
                Pick::Connection { connection, .. } => {
                    let outcomes = self.outcomes.clone();
                    let method = info.method.to_owned();
                    let done: OnDone = Box::new(move |outcome: &CallOutcome| {
                        outcomes.lock().unwrap().push((method, *outcome));
                    });
                    Pick::Connection {
                        connection,
                        done: Some(done),
                    }
                }
                other => other,
            }
        }
        fn connections(&self) -> &[Arc<switchboard::client::subchannel::ReadyConnection>] {
            self.inner.connections()
        }
    }
    impl Policy for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        fn endpoints_changed(
            &mut self,
            endpoints: &EndpointSet,
            changes: &Applied,
            cx: &mut PolicyContext<'_>,
        ) {
            self.inner.endpoints_changed(endpoints, changes, cx)
        }
        fn subchannel_changed(&mut self, id: u64, cx: &mut PolicyContext<'_>) {
            self.inner.subchannel_changed(id, cx)
        }
        fn take_picker(&mut self) -> Option<PolicyPicker> {
            let mut published = self.inner.take_picker()?;
            published.picker = Arc::new(RecordingPicker {
                inner: published.picker,
                outcomes: self.outcomes.clone(),
            });
            Some(published)
        }
    }

    let nowhere = local(free_port().expect("free port"));
    let port = free_port().expect("free port");
    let _echo = start_echo(&nowhere, SERVICE, &[port], &[]).await;
    let outcomes = Outcomes::default();
    let channel = BalancedChannel::builder(&format!("static:///{}", local(port)))
        .unwrap()
        .custom_policy(Recording {
            inner: RoundRobin::default(),
            outcomes: outcomes.clone(),
        })
        .build();
    assert_eq!(channel.policy(), "recording");
    wait_ready_set(&channel, &[local(port)], STARTUP).await;
    let mut echo = EchoClient::new(channel.clone());
    echo_once(&mut echo, Duration::from_secs(10))
        .await
        .expect("echo answers");
    // Echo does not serve the registry API: a call the server refuses.
    let mut registry =
        switchboard::proto::registry::registry_client::RegistryClient::new(channel.clone());
    let refused = registry
        .list_services(switchboard::proto::registry::ListServicesRequest {})
        .await
        .expect_err("echo is no registry");
    assert_eq!(refused.code(), Code::Unimplemented);
    let seen = outcomes.lock().unwrap().clone();
    let codes: Vec<(&str, Code)> = seen.iter().map(|(m, o)| (m.as_str(), o.code)).collect();
    assert_eq!(
        codes,
        [
            ("/grpc.examples.echo.Echo/UnaryEcho", Code::Ok),
            (
                "/switchboard.registry.v1.Registry/ListServices",
                Code::Unimplemented
            )
        ]
    );
    assert!(seen.iter().all(|(_, o)| o.latency > Duration::ZERO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_fast_status_carries_its_typed_cause() {
    use std::error::Error as _;
    use switchboard::client::resolver::BoxFuture;
    use switchboard::client::{ConnectError, Endpoint, EndpointState, Error, Resolver};
    use switchboard::client::{ResolverError, ResolverSink};

    /// The cause a status carries, as the client library typed it.
    fn cause(status: &tonic::Status) -> &Error {
        status
            .source()
            .and_then(|e| e.downcast_ref::<Error>())
            .unwrap_or_else(|| panic!("no typed cause: {status:?}"))
    }

    // Nothing listens: the last connection error says the dial was refused.
    let dead = local(free_port().expect("free port"));
    let channel = channel(&format!("static:///{dead}"), PolicyKind::PickFirst);
    wait_for("TransientFailure", STARTUP, || {
        let state = channel.state();
        async move { (state.connectivity == ConnectivityState::TransientFailure).then_some(()) }
    })
    .await;
    let status = echo_once(&mut EchoClient::new(channel), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    match cause(&status) {
        Error::NoReadyEndpoint {
            service,
            last: Some(last),
        } => {
            assert_eq!(service, &dead);
            assert!(
                matches!(&**last, ConnectError::Dial { .. }) && last.is_refused(),
                "{last:?}"
            );
            assert_eq!(last.address(), dead);
        }
        other => panic!("unexpected cause {other:?}"),
    }
    assert_eq!(status.message(), cause(&status).to_string());

    /// Lists one draining endpoint, then loses its source.
    struct Draining(String);
    impl Resolver for Draining {
        fn resolve(self: Box<Self>, sink: ResolverSink) -> BoxFuture {
            Box::pin(async move {
                sink.reset(vec![
                    Endpoint::new(self.0).with_state(EndpointState::Draining)
                ]);
                sink.error("source gone");
                sink.closed().await;
            })
        }
    }
    let channel =
        switchboard::client::Builder::with_resolver("drained", Box::new(Draining(local(1))))
            .build();
    wait_for("TransientFailure", STARTUP, || {
        let state = channel.state();
        async move {
            (state.connectivity == ConnectivityState::TransientFailure
                && state.resolver_error.is_some())
            .then_some(())
        }
    })
    .await;
    let status = echo_once(&mut EchoClient::new(channel), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        cause(&status),
        &Error::NoEndpoints {
            service: "drained".into(),
            all_draining: true,
            resolver: Some(ResolverError::Other("source gone".into())),
        }
    );
    assert_eq!(
        status.message(),
        "no endpoints available for service drained (all draining); resolver: source gone"
    );
}
