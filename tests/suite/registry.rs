//! The registry over real gRPC on 127.0.0.1: registrations and watches, the
//! ways a lease ends (stream break, TTL, drain, deregister, takeover),
//! versions and epochs, fan-out to many and to slow watchers, health and
//! reflection, and every refused input.
//!
//! Most tests serve a registry in-process on the test runtime so they can
//! choose its limits; the restart test runs the real binary. Nothing is
//! mocked: every call crosses a real HTTP/2 connection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::cases::{self, case, expect_status, Case};
use crate::common::*;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::watch_response::Event;
use switchboard::proto::registry::{
    DeregisterRequest, DrainRequest, EndpointState, KeepAliveRequest, KeepAliveResponse,
    ListServicesRequest, ListServicesResponse, RegisterRequest, RegisterResponse, ResolveRequest,
    ResolveResponse, ServiceSummary, WatchRequest, WatchResponse,
};
use switchboard::registry::{RegistryConfig, RegistryMetrics};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A TTL long enough that no lease expires during a test unless it means to.
const LONG_TTL_MS: u64 = 300_000;
/// How long to wait for anything the issue sets no bound on.
const GENEROUS: Duration = Duration::from_secs(30);
// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// The registry's defaults without the warm-up, so a Watch answers at once
/// (the warm-up has its own test).
fn config() -> RegistryConfig {
    RegistryConfig {
        warmup: Duration::ZERO,
        ..RegistryConfig::default()
    }
}

/// [`config`], and the registry's counters, read in process to learn why
/// each endpoint left.
fn counted() -> (RegistryConfig, RegistryMetrics) {
    let metrics = RegistryMetrics::default();
    let config = RegistryConfig {
        metrics: metrics.clone(),
        ..config()
    };
    (config, metrics)
}

/// Asserts how many endpoints left because their KeepAlive stream broke
/// and how many because their lease ran out its TTL.
fn assert_removed_by(metrics: &RegistryMetrics, stream_breaks: u64, expiries: u64) {
    assert_eq!(
        (metrics.stream_breaks.get(), metrics.expiries.get()),
        (stream_breaks, expiries),
        "(stream-break removals, TTL expiries)"
    );
}

/// Starts the registry binary on `port` with `args` and waits until it
/// listens.
async fn start_registry_with(port: u16, args: &[&str]) -> Proc {
    let listen = local(port);
    let mut all = vec!["--listen", listen.as_str()];
    all.extend_from_slice(args);
    let proc = Proc::sub("registry", &all);
    proc.wait_line("registry listening on", STARTUP).await;
    proc
}

/// A registry served on the test runtime; stopped when dropped.
struct Registry {
    /// `127.0.0.1:<port>` it listens on.
    addr: String,
    /// The serving task.
    task: JoinHandle<()>,
    /// Ends the serve future gracefully.
    stop: Option<oneshot::Sender<()>>,
}

impl Registry {
    async fn start(config: RegistryConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr").to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            switchboard::registry::serve(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("registry serves");
        });
        Self {
            addr,
            task,
            stop: Some(stop),
        }
    }

    async fn client(&self) -> RegistryClient<Channel> {
        registry_client(&self.addr, STARTUP).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// Address number `i`, distinct for every `i` below 45 000.
fn addr(i: usize) -> String {
    format!("10.0.0.1:{}", 20_000 + i)
}

/// A plain channel to `addr`, for clients of other services.
async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A valid registration of `address` in `service` with a long TTL.
fn request(service: &str, address: &str) -> RegisterRequest {
    RegisterRequest {
        service: service.into(),
        address: address.into(),
        metadata: HashMap::new(),
        ttl_ms: LONG_TTL_MS,
    }
}

async fn register(client: &mut RegistryClient<Channel>, req: RegisterRequest) -> RegisterResponse {
    let what = format!("register {} in {}", req.address, req.service);
    client
        .register(req)
        .await
        .unwrap_or_else(|status| panic!("{what}: {status:?}"))
        .into_inner()
}

async fn drain(client: &mut RegistryClient<Channel>, lease: &str) -> Result<(), Status> {
    client
        .drain(DrainRequest {
            lease_id: lease.into(),
        })
        .await
        .map(drop)
}

async fn deregister(client: &mut RegistryClient<Channel>, lease: &str) -> Result<(), Status> {
    client
        .deregister(DeregisterRequest {
            lease_id: lease.into(),
        })
        .await
        .map(drop)
}

async fn resolve_full(client: &mut RegistryClient<Channel>, service: &str) -> ResolveResponse {
    client
        .resolve(ResolveRequest {
            service: service.into(),
        })
        .await
        .expect("resolve")
        .into_inner()
}

async fn list_services(client: &mut RegistryClient<Channel>) -> Vec<ServiceSummary> {
    client
        .list_services(ListServicesRequest {})
        .await
        .expect("list services")
        .into_inner()
        .services
}

/// A well-formed lease id that the registry never granted.
fn random_lease_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// One KeepAlive stream held open by the test, as a backend holds it.
struct KeepAlive {
    /// Heartbeats to send; dropping it ends the request stream.
    requests: mpsc::Sender<KeepAliveRequest>,
    /// The registry's answers.
    replies: tonic::Streaming<KeepAliveResponse>,
}

impl KeepAlive {
    async fn open(client: &RegistryClient<Channel>) -> Self {
        let (requests, outbound) = mpsc::channel(16);
        let replies = client
            .clone()
            .keep_alive(ReceiverStream::new(outbound))
            .await
            .expect("keepalive stream opens")
            .into_inner();
        Self { requests, replies }
    }

    /// Sends one heartbeat for `lease` and waits for its answer.
    async fn beat(&mut self, lease: &str) -> Result<KeepAliveResponse, Status> {
        self.requests
            .send(KeepAliveRequest {
                lease_id: lease.into(),
            })
            .await
            .map_err(|_| Status::unavailable("keepalive request stream closed"))?;
        match tokio::time::timeout(GENEROUS, self.replies.message()).await {
            Ok(Ok(Some(reply))) => Ok(reply),
            Ok(Ok(None)) => Err(Status::unavailable("keepalive stream ended")),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no heartbeat answer within {GENEROUS:?}"),
        }
    }
}

/// Opens a KeepAlive stream and sends one heartbeat for `lease`.
async fn keep_alive_once(
    client: &RegistryClient<Channel>,
    lease: &str,
) -> Result<KeepAliveResponse, Status> {
    KeepAlive::open(client).await.beat(lease).await
}

/// The sorted addresses of a resolve answer.
fn addresses_of(resolved: &ResolveResponse) -> Vec<String> {
    let mut addresses: Vec<String> = resolved
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect();
    addresses.sort();
    addresses
}

/// A TCP relay in front of the registry whose connections can all be cut at
/// once. To the registry that is the backend's host dying: the socket just
/// closes, with no HTTP/2 GOAWAY, RST_STREAM or end of stream first.
struct Relay {
    /// `127.0.0.1:<port>` to dial instead of the registry.
    addr: String,
    /// The accept loop.
    accept: JoinHandle<()>,
    /// One copying task per relayed connection.
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr").to_string();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let target = target.to_owned();
        let accept = tokio::spawn({
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let target = target.clone();
                    let relay = tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    connections.lock().unwrap().push(relay.abort_handle());
                }
            }
        });
        Self {
            addr,
            accept,
            connections,
        }
    }

    /// Closes every relayed connection on both sides and stops accepting.
    fn cut(&self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

// ---------------------------------------------------------------------------
// Registration, watch, drain, deregister
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_gets_an_empty_reset_then_sees_register_and_deregister() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher
        .wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    {
        let view = watcher.view.borrow();
        let (_, first) = &view.log[0];
        assert_eq!(
            first.event,
            Some(Event::Reset(Default::default())),
            "an unknown service must start with an explicit empty reset, got {first:?}"
        );
    }

    let mut metadata = HashMap::new();
    metadata.insert("zone".to_owned(), "a".to_owned());
    let lease = register(
        &mut client,
        RegisterRequest {
            metadata: metadata.clone(),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    assert_eq!(lease.lease_id.len(), 32, "lease id {:?}", lease.lease_id);
    assert!(lease.lease_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(lease.ttl_ms, LONG_TTL_MS);

    watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    {
        let view = watcher.view.borrow();
        let (_, second) = &view.log[1];
        let Some(Event::Delta(delta)) = &second.event else {
            panic!("registration arrived as {second:?}, not a delta");
        };
        assert_eq!(delta.added.len(), 1, "{delta:?}");
        assert!(
            delta.updated.is_empty() && delta.removed.is_empty(),
            "{delta:?}"
        );
        assert_eq!(delta.added[0].metadata, metadata);
        assert_eq!(delta.added[0].state(), EndpointState::Serving);
    }

    // A watcher that arrives later gets the endpoint in its first reset.
    let mut late = Watcher::start(&client, SERVICE).await;
    late.wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    {
        let view = late.view.borrow();
        let Some(Event::Reset(snapshot)) = &view.log[0].1.event else {
            panic!("first message {:?} is not a reset", view.log[0].1);
        };
        assert_eq!(snapshot.endpoints.len(), 1, "{snapshot:?}");
        assert_eq!(snapshot.endpoints[0].address, addr(1));
        assert_eq!(snapshot.endpoints[0].metadata, metadata);
    }

    deregister(&mut client, &lease.lease_id)
        .await
        .expect("deregister");
    watcher.wait_for_set(&[], GENEROUS).await;
    late.wait_for_set(&[], GENEROUS).await;
    {
        let view = watcher.view.borrow();
        let (_, last) = view.log.last().unwrap();
        let Some(Event::Delta(delta)) = &last.event else {
            panic!("deregistration arrived as {last:?}, not a delta");
        };
        assert_eq!(delta.removed, vec![addr(1)], "{delta:?}");
        assert!(delta.added.is_empty() && delta.updated.is_empty());
    }
    let status = deregister(&mut client, &lease.lease_id)
        .await
        .expect_err("a deregistered lease is gone");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(resolve(&mut client, SERVICE).await, Some(vec![]));
    watcher.view.borrow().assert_clean("watcher");
    late.view.borrow().assert_clean("late watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_after_watch_returns_arrives_as_a_delta() {
    // Once Watch has answered, its snapshot is taken: a registration made
    // right after it must come as a delta, never folded into the first
    // reset. Many rounds at once keep the registry busy, which is when a
    // lazily taken snapshot would slip past the registration.
    const ROUNDS: usize = 200;
    let registry = Registry::start(config()).await;
    let client = registry.client().await;
    let mut rounds = tokio::task::JoinSet::new();
    for round in 0..ROUNDS {
        let mut client = client.clone();
        rounds.spawn(async move {
            let service = format!("round-{round}.example");
            let mut stream = client
                .watch(WatchRequest {
                    service: service.clone(),
                    ..Default::default()
                })
                .await
                .expect("watch")
                .into_inner();
            register(&mut client, request(&service, &addr(1))).await;
            let first = tokio::time::timeout(GENEROUS, stream.message())
                .await
                .expect("first message in time")
                .expect("watch stream")
                .expect("a first message");
            match first.event {
                Some(Event::Reset(snapshot)) if snapshot.endpoints.is_empty() => None,
                other => Some((round, other)),
            }
        });
    }
    let mut folded = Vec::new();
    while let Some(round) = rounds.join_next().await {
        folded.extend(round.expect("round task"));
    }
    assert!(
        folded.is_empty(),
        "{} of {ROUNDS} watches folded a later registration into their first reset, e.g. {:?}",
        folded.len(),
        folded.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_an_updated_delta_with_state_draining() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let mut metadata = HashMap::new();
    metadata.insert("weight".to_owned(), "3".to_owned());
    let lease = register(
        &mut client,
        RegisterRequest {
            metadata: metadata.clone(),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    let other = register(&mut client, request(SERVICE, &addr(2))).await;
    watcher.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;

    drain(&mut client, &lease.lease_id).await.expect("drain");
    watcher
        .wait_until("DRAINING", GENEROUS, |v| {
            v.state_of(&addr(1)) == Some(EndpointState::Draining)
        })
        .await;
    {
        let view = watcher.view.borrow();
        let (_, last) = view.log.last().unwrap();
        let Some(Event::Delta(delta)) = &last.event else {
            panic!("drain arrived as {last:?}, not a delta");
        };
        assert!(
            delta.added.is_empty() && delta.removed.is_empty(),
            "{delta:?}"
        );
        assert_eq!(delta.updated.len(), 1, "{delta:?}");
        let updated = &delta.updated[0];
        assert_eq!(updated.address, addr(1));
        assert_eq!(updated.state(), EndpointState::Draining);
        assert_eq!(updated.metadata, metadata, "drain must keep the metadata");
        assert_eq!(
            view.state_of(&addr(2)),
            Some(EndpointState::Serving),
            "draining one endpoint touched another"
        );
    }
    // A draining endpoint stays listed.
    let resolved = resolve_full(&mut client, SERVICE).await;
    let states: BTreeMap<String, EndpointState> = resolved
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.state()))
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([
            (addr(1), EndpointState::Draining),
            (addr(2), EndpointState::Serving)
        ])
    );

    // Draining twice is accepted and changes nothing.
    let messages = watcher.view.borrow().messages;
    drain(&mut client, &lease.lease_id)
        .await
        .expect("second drain");
    assert_eq!(resolve_full(&mut client, SERVICE).await, resolved);

    // The lease still works: deregistering removes the draining endpoint.
    deregister(&mut client, &lease.lease_id)
        .await
        .expect("deregister a draining endpoint");
    watcher.wait_for_set(&[addr(2)], GENEROUS).await;
    let view = watcher.view.borrow();
    assert_eq!(
        view.messages,
        messages + 1,
        "the second drain must not send a delta: {}",
        view.summary()
    );
    view.assert_clean("watcher");
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_services_lists_only_services_with_endpoints() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    assert_eq!(list_services(&mut client).await, vec![]);

    // A service that is only watched has no endpoints and is not listed.
    let mut watched = Watcher::start(&client, "c.watched.only").await;
    watched
        .wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    let b = register(&mut client, request("b.example", &addr(1))).await;
    register(&mut client, request("a.example", &addr(1))).await;
    register(&mut client, request("a.example", &addr(2))).await;
    let summary = |service: &str, endpoints: u32| ServiceSummary {
        service: service.into(),
        endpoints,
    };
    assert_eq!(
        list_services(&mut client).await,
        vec![summary("a.example", 2), summary("b.example", 1)],
        "sorted by name, with endpoint counts"
    );

    deregister(&mut client, &b.lease_id)
        .await
        .expect("deregister");
    assert_eq!(
        list_services(&mut client).await,
        vec![summary("a.example", 2)],
        "a service whose last endpoint left is no longer listed"
    );
}

// ---------------------------------------------------------------------------
// Lease ends
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_keepalive_connection_removes_the_endpoint_from_every_watcher() {
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let admin = registry.client().await;
    let mut watchers = Vec::new();
    for _ in 0..3 {
        // Each watcher on its own connection.
        let client = registry.client().await;
        watchers.push(Watcher::start(&client, SERVICE).await);
    }

    // The backend reaches the registry through a relay the test can cut.
    let relay = Relay::start(&registry.addr).await;
    let mut backend = registry_client(&relay.addr, STARTUP).await;
    // The TTL is the longest allowed, so only the stream break can remove it.
    let lease = register(&mut backend, request(SERVICE, &addr(1))).await;
    let survivor = register(&mut registry.client().await, request(SERVICE, &addr(2))).await;
    let mut keepalive = KeepAlive::open(&backend).await;
    keepalive
        .beat(&lease.lease_id)
        .await
        .expect("first heartbeat");
    for watcher in &mut watchers {
        watcher.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;
    }

    relay.cut();
    for (i, watcher) in watchers.iter_mut().enumerate() {
        watcher
            .wait_until("removal after the cut", GENEROUS, |v| {
                !v.endpoints.contains_key(&addr(1))
            })
            .await;
        let view = watcher.view.borrow();
        assert_eq!(view.addresses(), vec![addr(2)], "watcher {i}");
        view.assert_clean(&format!("watcher {i}"));
    }
    assert_removed_by(&metrics, 1, 0);
    // The lease went with the stream.
    let mut admin = admin;
    let status = drain(&mut admin, &lease.lease_id)
        .await
        .expect_err("the lease ended with its stream");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    drop((keepalive, survivor));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_task_that_dies_takes_its_endpoint_out_with_its_stream() {
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let admin = registry.client().await;
    let mut watchers = Vec::new();
    for _ in 0..2 {
        let client = registry.client().await;
        watchers.push(Watcher::start(&client, SERVICE).await);
    }

    // The backend owns its channel, its lease and its KeepAlive stream; the
    // test aborts it, dropping all of them at once.
    let registry_addr = registry.addr.clone();
    let (ready, is_ready) = oneshot::channel();
    let backend = tokio::spawn(async move {
        let mut client = registry_client(&registry_addr, STARTUP).await;
        let lease = register(&mut client, request(SERVICE, &addr(1))).await;
        let mut keepalive = KeepAlive::open(&client).await;
        keepalive.beat(&lease.lease_id).await.expect("heartbeat");
        let _ = ready.send(());
        let _held = (client, keepalive);
        std::future::pending::<()>().await;
    });
    tokio::time::timeout(STARTUP, is_ready)
        .await
        .expect("backend registers in time")
        .expect("backend registers");
    for watcher in &mut watchers {
        watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    }

    backend.abort();
    for (i, watcher) in watchers.iter_mut().enumerate() {
        watcher.wait_for_set(&[], GENEROUS).await;
        watcher.view.borrow().assert_clean(&format!("watcher {i}"));
    }
    assert_removed_by(&metrics, 1, 0);
    assert_eq!(list_services(&mut admin.clone()).await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_moved_to_a_new_stream_survives_the_old_stream_closing() {
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    // A second lease stays on the old stream: its removal shows when the
    // registry has processed the old stream's end.
    let witness = register(&mut client, request(SERVICE, &addr(3))).await;
    let mut old = KeepAlive::open(&client).await;
    old.beat(&lease.lease_id).await.expect("heartbeat on old");
    old.beat(&witness.lease_id)
        .await
        .expect("witness heartbeat");
    // A reconnecting backend heartbeats on a new stream, then the old one
    // goes away: the lease now belongs to the new stream.
    let mut new = KeepAlive::open(&client).await;
    new.beat(&lease.lease_id).await.expect("heartbeat on new");
    drop(old);
    watcher
        .wait_until("the old stream's end", GENEROUS, |v| {
            v.removed_at.contains_key(&addr(3))
        })
        .await;
    // One more change, so a removal published by the same stream end would
    // have arrived before it.
    register(&mut client, request(SERVICE, &addr(2))).await;
    watcher.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;
    new.beat(&lease.lease_id)
        .await
        .expect("the lease is still alive after the old stream closed");
    assert!(
        !watcher.view.borrow().removed_at.contains_key(&addr(1)),
        "closing a stream the lease had left removed it: {}",
        watcher.view.borrow().summary()
    );

    // Closing the stream it is bound to does end it.
    drop(new);
    watcher.wait_for_set(&[addr(2)], GENEROUS).await;
    watcher.view.borrow().assert_clean("watcher");
    // The witness and then the lease, each with its stream.
    assert_removed_by(&metrics, 2, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_heartbeats_end_the_lease_at_its_ttl_not_before() {
    const TTL: Duration = Duration::from_secs(2);
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let registered = Instant::now();
    let lease = register(
        &mut client,
        RegisterRequest {
            ttl_ms: TTL.as_millis() as u64,
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    assert_eq!(lease.ttl_ms, TTL.as_millis() as u64);
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;

    // Heartbeat for a while (longer than the TTL in total), then stop while
    // keeping the stream, and its connection, open.
    let mut keepalive = KeepAlive::open(&client).await;
    let mut last_beat = registered;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        last_beat = Instant::now();
        let reply = keepalive.beat(&lease.lease_id).await.expect("heartbeat");
        assert_eq!(reply.lease_id, lease.lease_id);
        assert_eq!(reply.ttl_ms, TTL.as_millis() as u64);
    }

    watcher
        .wait_until("expiry", TTL + GENEROUS, |v| {
            v.removed_at.contains_key(&addr(1))
        })
        .await;
    let removed = watcher.view.borrow().removed_at[&addr(1)];
    let after_last_beat = removed.saturating_duration_since(last_beat);
    let after_register = removed.saturating_duration_since(registered);
    eprintln!(
        "TTL {TTL:?}: removed {after_last_beat:?} after the last heartbeat was sent \
         (error {:+} ms), {after_register:?} after registering",
        after_last_beat.as_millis() as i128 - TTL.as_millis() as i128
    );
    assert!(
        after_last_beat >= TTL - Duration::from_millis(100),
        "removed {after_last_beat:?} after the last heartbeat, before the {TTL:?} TTL"
    );
    // Ended by its TTL, with its stream still open.
    assert_removed_by(&metrics, 0, 1);
    assert!(
        after_register > TTL + Duration::from_secs(1),
        "heartbeats did not extend the lease: removed {after_register:?} after registering"
    );
    // The stream is still open, but the lease is gone.
    let status = keepalive
        .beat(&lease.lease_id)
        .await
        .expect_err("an expired lease cannot be refreshed");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    watcher.view.borrow().assert_clean("watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_heartbeated_ends_at_its_ttl() {
    const TTL: Duration = Duration::from_secs(1);
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let sent = Instant::now();
    register(
        &mut client,
        RegisterRequest {
            ttl_ms: TTL.as_millis() as u64,
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    watcher
        .wait_until("expiry", TTL + GENEROUS, |v| {
            v.removed_at.contains_key(&addr(1))
        })
        .await;
    let lived = watcher.view.borrow().removed_at[&addr(1)].saturating_duration_since(sent);
    eprintln!("TTL {TTL:?} without heartbeats: removed {lived:?} after registering");
    assert!(
        lived >= TTL - Duration::from_millis(100),
        "removed after {lived:?}"
    );
    assert_removed_by(&metrics, 0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_can_act() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    let before = resolve_full(&mut client, SERVICE).await;

    // A second client, on its own connection, guesses: random ids, and the
    // real id with one hex digit changed (a leaked prefix does not help).
    let mut guesser = registry.client().await;
    let near_misses = (0..lease.lease_id.len()).map(|at| {
        let mut id = lease.lease_id.clone().into_bytes();
        id[at] = if id[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(id).expect("hex")
    });
    let guesses: Vec<String> = (0..200)
        .map(|_| random_lease_id())
        .chain(near_misses)
        .filter(|id| *id != lease.lease_id)
        .collect();
    for (i, stranger) in guesses.iter().enumerate() {
        let drained = drain(&mut guesser, stranger).await;
        let deregistered = deregister(&mut guesser, stranger).await;
        let mut attempts = vec![("Drain", drained), ("Deregister", deregistered)];
        if i % 8 == 0 {
            // A KeepAlive stream per guess is slower; a sample suffices.
            attempts.push((
                "KeepAlive",
                keep_alive_once(&guesser, stranger).await.map(drop),
            ));
        }
        for (rpc, result) in attempts {
            let status = result.expect_err(&format!("{rpc} with a guessed lease id succeeded"));
            assert_eq!(status.code(), Code::NotFound, "{rpc}: {status:?}");
            assert!(
                status.message().contains(stranger.as_str()),
                "{rpc}: the message should name the lease: {status:?}"
            );
        }
    }
    assert_eq!(
        resolve_full(&mut client, SERVICE).await,
        before,
        "a guesser changed the endpoint"
    );
    // The holder still can.
    drain(&mut client, &lease.lease_id)
        .await
        .expect("holder drains");
    watcher
        .wait_until("DRAINING", GENEROUS, |v| {
            v.state_of(&addr(1)) == Some(EndpointState::Draining)
        })
        .await;
    let view = watcher.view.borrow();
    assert_eq!(
        view.messages,
        3,
        "reset, added, drained: {}",
        view.summary()
    );
    view.assert_clean("watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registering_an_address_takes_it_over_and_the_old_lease_is_gone() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let meta = |version: &str| HashMap::from([("version".to_owned(), version.to_owned())]);
    let old = register(
        &mut client,
        RegisterRequest {
            metadata: meta("1"),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    // A second lease on the old stream shows when the stream has ended.
    let witness = register(&mut client, request(SERVICE, &addr(5))).await;
    let mut old_stream = KeepAlive::open(&client).await;
    old_stream
        .beat(&old.lease_id)
        .await
        .expect("old lease heartbeat");
    old_stream
        .beat(&witness.lease_id)
        .await
        .expect("witness heartbeat");
    drain(&mut client, &old.lease_id).await.expect("drain old");
    watcher
        .wait_until("DRAINING", GENEROUS, |v| {
            v.state_of(&addr(1)) == Some(EndpointState::Draining)
        })
        .await;

    // A restarted backend registers the same address again.
    let new = register(
        &mut client,
        RegisterRequest {
            metadata: meta("2"),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    assert_ne!(new.lease_id, old.lease_id);
    watcher
        .wait_until("the new registration", GENEROUS, |v| {
            v.endpoints
                .get(&addr(1))
                .is_some_and(|e| e.metadata == meta("2"))
        })
        .await;
    {
        let view = watcher.view.borrow();
        let (_, last) = view.log.last().unwrap();
        let Some(Event::Delta(delta)) = &last.event else {
            panic!("takeover arrived as {last:?}");
        };
        assert!(
            delta.added.is_empty() && delta.removed.is_empty() && delta.updated.len() == 1,
            "a takeover is one update, not a removal and an addition: {delta:?}"
        );
        assert_eq!(
            delta.updated[0].state(),
            EndpointState::Serving,
            "the new registration serves"
        );
    }

    // The old lease id is dead for every RPC, and using it changes nothing.
    let status = old_stream
        .beat(&old.lease_id)
        .await
        .expect_err("old lease refreshed");
    assert_eq!(status.code(), Code::NotFound, "KeepAlive: {status:?}");
    let status = drain(&mut client, &old.lease_id)
        .await
        .expect_err("old lease drained");
    assert_eq!(status.code(), Code::NotFound, "Drain: {status:?}");
    let status = deregister(&mut client, &old.lease_id)
        .await
        .expect_err("old lease deregistered");
    assert_eq!(status.code(), Code::NotFound, "Deregister: {status:?}");
    // The old stream has ended with that error, ending the leases it still
    // carried (the witness); its end must not take the address from the new
    // lease.
    drop(old_stream);
    watcher
        .wait_until("the old stream's end", GENEROUS, |v| {
            v.removed_at.contains_key(&addr(5))
        })
        .await;
    let resolved = resolve_full(&mut client, SERVICE).await;
    assert_eq!(resolved.endpoints.len(), 1, "{resolved:?}");
    assert_eq!(resolved.endpoints[0].metadata, meta("2"));
    assert_eq!(resolved.endpoints[0].state(), EndpointState::Serving);

    // The new lease holds it: its deregistration is the only removal.
    let deregistered = Instant::now();
    deregister(&mut client, &new.lease_id)
        .await
        .expect("new lease deregisters");
    watcher.wait_for_set(&[], GENEROUS).await;
    let view = watcher.view.borrow();
    let removals = view
        .log
        .iter()
        .filter(|(_, m)| matches!(&m.event, Some(Event::Delta(d)) if d.removed.contains(&addr(1))))
        .collect::<Vec<_>>();
    assert_eq!(removals.len(), 1, "{}", view.summary());
    assert!(
        removals[0].0 >= deregistered,
        "removed before the new lease deregistered"
    );
    view.assert_clean("watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_service_still_accepts_a_takeover() {
    let config = RegistryConfig {
        max_endpoints_per_service: 3,
        ..config()
    };
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    for i in 0..3 {
        register(&mut client, request(SERVICE, &addr(i))).await;
    }
    let taken = register(&mut client, request(SERVICE, &addr(0))).await;
    assert_eq!(
        resolve(&mut client, SERVICE).await,
        Some(vec![addr(0), addr(1), addr(2)])
    );
    deregister(&mut client, &taken.lease_id)
        .await
        .expect("deregister");
    // Room again for a new address.
    register(&mut client, request(SERVICE, &addr(3))).await;
}

// ---------------------------------------------------------------------------
// Versions and epochs
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_increase_with_every_message_and_the_epoch_is_one_per_instance() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut early = Watcher::start(&client, SERVICE).await;
    let mut other_service = Watcher::start(&client, "other.example").await;
    let mut leases = Vec::new();
    for i in 0..10 {
        leases.push(register(&mut client, request(SERVICE, &addr(i))).await);
    }
    // A change elsewhere must not disturb this service's sequence.
    register(&mut client, request("other.example", &addr(0))).await;
    let mut late = Watcher::start(&client, SERVICE).await;
    for lease in &leases[..3] {
        drain(&mut client, &lease.lease_id).await.expect("drain");
    }
    for lease in &leases[3..7] {
        deregister(&mut client, &lease.lease_id)
            .await
            .expect("deregister");
    }
    for i in [0, 1] {
        let mut req = request(SERVICE, &addr(i));
        req.metadata.insert("generation".into(), "2".into());
        register(&mut client, req).await;
    }
    let changes = 10 + 3 + 4 + 2;

    let resolved = resolve_full(&mut client, SERVICE).await;
    let expected = addresses_of(&resolved);
    assert_eq!(expected.len(), 6);
    for (who, watcher) in [("early", &mut early), ("late", &mut late)] {
        watcher
            .wait_until("the resolved version", GENEROUS, |v| {
                v.version == Some(resolved.version)
            })
            .await;
        let view = watcher.view.borrow();
        view.assert_clean(who);
        assert_eq!(view.addresses(), expected, "{who}");
        assert_eq!(view.epoch, Some(resolved.epoch), "{who}");
        assert_eq!(view.resets, 1, "{who}: {}", view.summary());
    }
    {
        let early = early.view.borrow();
        assert_eq!(
            early.messages,
            1 + changes,
            "one reset and one delta per change: {}",
            early.summary()
        );
        // Both watchers see the same versioned deltas after the late one's
        // reset.
        let late = late.view.borrow();
        let late_reset = late.log[0].1.version;
        let tail = |view: &View| -> Vec<WatchResponse> {
            view.log
                .iter()
                .map(|(_, m)| m.clone())
                .filter(|m| m.version > late_reset && matches!(m.event, Some(Event::Delta(_))))
                .collect()
        };
        assert_eq!(tail(&early), tail(&late));
        assert_eq!(late.messages, 1 + tail(&late).len());
    }
    // One epoch everywhere in this instance.
    other_service
        .wait_until("the other service's registration", GENEROUS, |v| {
            v.endpoints.len() == 1
        })
        .await;
    assert_eq!(other_service.view.borrow().epoch, Some(resolved.epoch));
    assert_eq!(leases[0].epoch, resolved.epoch);
    assert_ne!(resolved.epoch, 0);
    let other = resolve_full(&mut client, "other.example").await;
    assert_eq!(other.epoch, resolved.epoch);
    other_service.view.borrow().assert_clean("other watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_registry_holds_back_first_snapshots_until_its_warm_up_ends() {
    const WARMUP: Duration = Duration::from_millis(1500);
    let started = Instant::now();
    let registry = Registry::start(RegistryConfig {
        warmup: WARMUP,
        ..config()
    })
    .await;
    let mut client = registry.client().await;
    let mut early = Watcher::start(&client, SERVICE).await;
    // Backends re-register during the warm-up; Register and Resolve are
    // not held back.
    register(&mut client, request(SERVICE, &addr(1))).await;
    register(&mut client, request(SERVICE, &addr(2))).await;
    assert_eq!(
        resolve(&mut client, SERVICE).await,
        Some(vec![addr(1), addr(2)])
    );
    early
        .wait_until("first message", GENEROUS, |v| v.messages >= 1)
        .await;
    {
        let view = early.view.borrow();
        let (first_at, first) = &view.log[0];
        let held = first_at.saturating_duration_since(started);
        eprintln!("warm-up {WARMUP:?}: first snapshot sent {held:?} after the start");
        assert!(
            held >= WARMUP - Duration::from_millis(50),
            "the first snapshot came {held:?} after the start, inside the {WARMUP:?} warm-up"
        );
        let Some(Event::Reset(snapshot)) = &first.event else {
            panic!("first message {first:?} is not a reset");
        };
        let addresses: Vec<&str> = snapshot
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(
            addresses,
            vec![addr(1), addr(2)],
            "the held-back snapshot holds what registered meanwhile"
        );
    }
    // Once warm, a Watch is answered at once and changes flow as deltas.
    let asked = Instant::now();
    let mut late = Watcher::start(&client, SERVICE).await;
    late.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;
    eprintln!(
        "after the warm-up a new watcher got its snapshot in {:?}",
        late.view.borrow().log[0].0.saturating_duration_since(asked)
    );
    register(&mut client, request(SERVICE, &addr(3))).await;
    early
        .wait_for_set(&[addr(1), addr(2), addr(3)], GENEROUS)
        .await;
    let view = early.view.borrow();
    assert_eq!(view.resets, 1, "{}", view.summary());
    view.assert_clean("early watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_registry_reports_a_new_epoch() {
    let port = free_port();
    let target = local(port);
    let mut first = start_registry(port).await;
    let mut client = registry_client(&target, STARTUP).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    let before = resolve_full(&mut client, SERVICE).await;
    assert_eq!(lease.epoch, before.epoch);
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    assert_eq!(watcher.view.borrow().epoch, Some(before.epoch));

    first.kill();
    watcher
        .wait_until("end of the stream", GENEROUS, |v| v.ended.is_some())
        .await;

    let _second = start_registry(port).await;
    let mut client = registry_client(&target, STARTUP).await;
    let after = resolve_full(&mut client, SERVICE).await;
    assert_ne!(
        after.epoch, before.epoch,
        "a restarted registry kept its epoch"
    );
    assert!(
        after.endpoints.is_empty(),
        "registrations survived: {after:?}"
    );
    let status = drain(&mut client, &lease.lease_id)
        .await
        .expect_err("a lease from the old instance worked");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher
        .wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    assert_eq!(watcher.view.borrow().epoch, Some(after.epoch));
}

// ---------------------------------------------------------------------------
// Fan-out
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_watchers_converge_after_a_burst_of_registrations_and_removals() {
    const CHANNELS: usize = 4;
    const WATCHERS: usize = 200;
    const REGISTRATIONS: usize = 500;
    let registry = Registry::start(config()).await;
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        clients.push(registry.client().await);
    }
    let mut watchers = Vec::new();
    for i in 0..WATCHERS {
        watchers.push(Watcher::start(&clients[i % CHANNELS], SERVICE).await);
    }
    for watcher in &mut watchers {
        watcher
            .wait_until("first message", GENEROUS, |v| v.messages >= 1)
            .await;
    }

    // 500 concurrent registrations; two in five are deregistered as soon as
    // they are granted, concurrently with the rest.
    let removed = |i: usize| i % 5 < 2;
    let started = Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..REGISTRATIONS {
        let mut client = clients[i % CHANNELS].clone();
        burst.spawn(async move {
            let lease = register(&mut client, request(SERVICE, &addr(i))).await;
            if removed(i) {
                deregister(&mut client, &lease.lease_id)
                    .await
                    .expect("deregister");
            }
        });
    }
    while let Some(done) = burst.join_next().await {
        done.expect("burst task");
    }
    let burst_took = started.elapsed();

    let resolved = resolve_full(&mut clients[0], SERVICE).await;
    let mut expected: Vec<String> = (0..REGISTRATIONS)
        .filter(|&i| !removed(i))
        .map(addr)
        .collect();
    expected.sort();
    assert_eq!(addresses_of(&resolved), expected, "resolve after the burst");

    for (i, watcher) in watchers.iter_mut().enumerate() {
        watcher
            .wait_until(
                &format!("watcher {i} to converge"),
                Duration::from_secs(60),
                |v| v.version == Some(resolved.version),
            )
            .await;
        let view = watcher.view.borrow();
        view.assert_clean(&format!("watcher {i}"));
        assert_eq!(view.addresses(), expected, "watcher {i}");
        assert_eq!(
            view.endpoints.values().cloned().collect::<Vec<_>>(),
            {
                let mut endpoints = resolved.endpoints.clone();
                endpoints.sort_by(|a, b| a.address.cmp(&b.address));
                endpoints
            },
            "watcher {i} endpoints differ from Resolve"
        );
    }
    let converged = started.elapsed();
    let resets: usize = watchers.iter().map(|w| w.view.borrow().resets).sum();
    eprintln!(
        "{WATCHERS} watchers: burst of {REGISTRATIONS} registrations + {} removals took \
         {burst_took:?}; all watchers converged {converged:?} after the burst started \
         ({} resets in all)",
        (0..REGISTRATIONS).filter(|&i| removed(i)).count(),
        resets
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_blocks_nobody_and_then_gets_a_current_reset() {
    const REGISTRATIONS: usize = 200;
    let config = RegistryConfig {
        watch_buffer: 4,
        ..config()
    };
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;

    // The slow watcher's connection offers a tiny HTTP/2 window, so the
    // registry cannot park its backlog in socket and HTTP/2 buffers: what it
    // does not read piles up in the registry.
    let slow_channel = tonic::transport::Endpoint::from_shared(format!("http://{}", registry.addr))
        .expect("uri")
        .initial_stream_window_size(1024)
        .connect()
        .await
        .expect("slow watcher connects");
    let mut slow = RegistryClient::new(slow_channel)
        .watch(WatchRequest {
            service: SERVICE.into(),
            ..Default::default()
        })
        .await
        .expect("slow watch")
        .into_inner();
    let mut fast = Watcher::start(&client, SERVICE).await;

    let started = Instant::now();
    let mut leases = Vec::new();
    for i in 0..REGISTRATIONS {
        let mut req = request(SERVICE, &addr(i));
        req.metadata.insert("padding".into(), "x".repeat(64));
        leases.push(register(&mut client, req).await);
    }
    for lease in leases.iter().step_by(4) {
        deregister(&mut client, &lease.lease_id)
            .await
            .expect("deregister");
    }
    let resolved = resolve_full(&mut client, SERVICE).await;
    let expected = addresses_of(&resolved);
    fast.wait_until("the final version", GENEROUS, |v| {
        v.version == Some(resolved.version)
    })
    .await;
    let fast_took = started.elapsed();
    assert_eq!(fast.view.borrow().addresses(), expected);
    fast.view.borrow().assert_clean("fast watcher");
    // With a buffer of 4 even this watcher may lag on a loaded machine; it
    // then converges through a reset, as checked above.
    let fast_resets = fast.view.borrow().resets;

    // Now the slow watcher reads: a few stale messages that were already in
    // flight, then a reset with the current set, and nothing is lost.
    let mut view = View::default();
    let deadline = Instant::now() + GENEROUS;
    while view.version != Some(resolved.version) {
        let message = tokio::time::timeout_at(deadline, slow.message())
            .await
            .unwrap_or_else(|_| panic!("slow watcher stuck: {}", view.summary()))
            .expect("slow watch stream")
            .expect("slow watch stream ended");
        view.apply(Instant::now(), message);
    }
    view.assert_clean("slow watcher");
    assert!(
        view.resets >= 2,
        "the slow watcher never got a fresh reset: {}",
        view.summary()
    );
    let (_, last) = view.log.last().unwrap();
    let Some(Event::Reset(snapshot)) = &last.event else {
        panic!(
            "the slow watcher caught up through deltas, not a reset: {}",
            view.summary()
        );
    };
    let mut current = snapshot.endpoints.clone();
    current.sort_by(|a, b| a.address.cmp(&b.address));
    let mut resolved_endpoints = resolved.endpoints.clone();
    resolved_endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    assert_eq!(current, resolved_endpoints, "the reset is the current set");
    assert_eq!(view.addresses(), expected);
    let changes = REGISTRATIONS + REGISTRATIONS.div_ceil(4);
    assert!(
        view.messages < changes / 4,
        "the slow watcher got {} messages for {changes} changes: its backlog was not dropped",
        view.messages
    );
    eprintln!(
        "slow watcher: fast watcher converged in {fast_took:?} ({fast_resets} resets) with the \
         slow one unread; the slow one then read {} messages ({} resets) for {changes} changes",
        view.messages, view.resets
    );
}

// ---------------------------------------------------------------------------
// Health and reflection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let registry = Registry::start(config()).await;
    let mut health = HealthClient::new(connect(&registry.addr).await);
    for service in ["", "switchboard.registry.v1.Registry"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("check {service:?}: {s:?}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_registry_and_health_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let registry = Registry::start(config()).await;
    let mut reflection = ServerReflectionClient::new(connect(&registry.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies
        .message()
        .await
        .expect("reflection reply")
        .expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["switchboard.registry.v1.Registry", "grpc.health.v1.Health"] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Refused input: the code, a message naming the field, and no state change
// ---------------------------------------------------------------------------

/// What a refused request must leave exactly as it was.
#[derive(Debug, PartialEq)]
struct Observed {
    resolved: ResolveResponse,
    services: ListServicesResponse,
}

async fn observe(client: &mut RegistryClient<Channel>) -> Observed {
    Observed {
        resolved: resolve_full(client, SERVICE).await,
        services: ListServicesResponse {
            services: list_services(client).await,
        },
    }
}

/// A valid registration of a fresh address, to spoil one field of.
fn good() -> RegisterRequest {
    request(SERVICE, "10.9.9.9:9000")
}

/// Lease ids that are not 32 hex digits.
const MALFORMED_LEASES: [&str; 4] = ["", "not-a-lease", "abc", "0123456789abcdef0123456789abcdeg"];

/// The registry a refused call is sent to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Holding {
    /// The default limits, one endpoint of [`SERVICE`] registered.
    OneEndpoint,
    /// At most 3 endpoints per service, and [`SERVICE`] has 3.
    AFullService,
}

/// One call of the registry API that must be refused.
#[derive(Debug, Clone)]
enum Call {
    Register(RegisterRequest),
    /// One heartbeat for this lease id, on a new KeepAlive stream.
    KeepAlive(String),
    Drain(String),
    Deregister(String),
    Watch(String),
    Resolve(String),
}

impl Call {
    /// Sends the call; an accepted one answers with its reply, as text.
    async fn send(self, mut client: RegistryClient<Channel>) -> Result<String, Status> {
        let reply = match self {
            Call::Register(req) => format!("{:?}", client.register(req).await?.into_inner()),
            Call::KeepAlive(lease) => format!("{:?}", keep_alive_once(&client, &lease).await?),
            Call::Drain(lease) => format!("{:?}", drain(&mut client, &lease).await?),
            Call::Deregister(lease) => format!("{:?}", deregister(&mut client, &lease).await?),
            Call::Watch(service) => {
                client
                    .watch(WatchRequest {
                        service,
                        ..Default::default()
                    })
                    .await?;
                "a watch stream".into()
            }
            Call::Resolve(service) => {
                format!("{:?}", client.resolve(ResolveRequest { service }).await?)
            }
        };
        Ok(reply)
    }
}

/// A refusal: the registry and the call, then the code and a fragment of
/// the message (which names the field or cap at fault).
type Refusal = Case<(Holding, Call), (Code, String)>;

/// A Register of [`good`] with one field spoiled, refused as `invalid
/// <field>`.
fn bad_register(name: &str, req: RegisterRequest, field: &str) -> Refusal {
    case(
        name,
        (Holding::OneEndpoint, Call::Register(req)),
        (Code::InvalidArgument, format!("invalid {field}")),
    )
}

/// Every refused input of the registry API, against one registry per
/// [`Holding`]: each answer has its code and a message naming the field or
/// cap, and Resolve and ListServices are the same after the call as before.
fn refusals() -> Vec<Refusal> {
    let with = |edit: fn(&mut RegisterRequest)| {
        let mut req = good();
        edit(&mut req);
        req
    };
    let mut cases = vec![
        bad_register("empty service", with(|r| r.service.clear()), "service"),
        bad_register(
            "254-byte service",
            // Four valid labels, 63 + 63 + 63 + 62 bytes and three dots.
            with(|r| r.service = [63, 63, 63, 62].map(|n| "a".repeat(n)).join(".")),
            "service",
        ),
        bad_register(
            "service with a space and a bang",
            with(|r| r.service = "bad service!".into()),
            "service",
        ),
        bad_register(
            "service with a slash",
            with(|r| r.service = "lb/example".into()),
            "service",
        ),
        bad_register(
            "service with a double dot",
            with(|r| r.service = "lb..example".into()),
            "service",
        ),
        bad_register(
            "address without port",
            with(|r| r.address = "10.9.9.9".into()),
            "address",
        ),
        bad_register(
            "port 0",
            with(|r| r.address = "10.9.9.9:0".into()),
            "address",
        ),
        bad_register(
            "port 70000",
            with(|r| r.address = "10.9.9.9:70000".into()),
            "address",
        ),
        bad_register(
            "signed port",
            with(|r| r.address = "10.9.9.9:+80".into()),
            "address",
        ),
        bad_register(
            "zero-padded port",
            with(|r| r.address = "10.9.9.9:080".into()),
            "address",
        ),
        bad_register(
            "IPv6 without brackets",
            with(|r| r.address = "fe80::1:8080".into()),
            "address",
        ),
        bad_register(
            "65 metadata entries",
            with(|r| r.metadata = (0..65).map(|i| (format!("k{i}"), "v".into())).collect()),
            "metadata",
        ),
        bad_register(
            "4100 bytes of metadata",
            with(|r| {
                r.metadata.insert("blob".into(), "x".repeat(4096));
            }),
            "metadata",
        ),
        bad_register(
            "empty metadata key",
            with(|r| {
                r.metadata.insert(String::new(), "v".into());
            }),
            "metadata",
        ),
        bad_register("TTL 500 ms", with(|r| r.ttl_ms = 500), "ttl_ms"),
        bad_register("TTL 301 s", with(|r| r.ttl_ms = 301_000), "ttl_ms"),
        case(
            "fourth endpoint with a cap of 3",
            (Holding::AFullService, Call::Register(good())),
            (Code::ResourceExhausted, "endpoints per service".into()),
        ),
    ];
    for lease in MALFORMED_LEASES {
        let invalid = || (Code::InvalidArgument, "invalid lease_id".to_owned());
        let call = |rpc: fn(String) -> Call| (Holding::OneEndpoint, rpc(lease.into()));
        cases.extend([
            case(
                format!("KeepAlive {lease:?}"),
                call(Call::KeepAlive),
                invalid(),
            ),
            case(format!("Drain {lease:?}"), call(Call::Drain), invalid()),
            case(
                format!("Deregister {lease:?}"),
                call(Call::Deregister),
                invalid(),
            ),
        ]);
    }
    for (rpc, call) in [
        ("KeepAlive", Call::KeepAlive as fn(String) -> Call),
        ("Drain", Call::Drain),
        ("Deregister", Call::Deregister),
    ] {
        let lease = random_lease_id();
        cases.push(case(
            format!("{rpc} unknown lease"),
            (Holding::OneEndpoint, call(lease.clone())),
            (Code::NotFound, format!("lease {lease}")),
        ));
    }
    for service in ["", "bad service!"] {
        let invalid = || (Code::InvalidArgument, "invalid service".to_owned());
        cases.extend([
            case(
                format!("Watch {service:?}"),
                (Holding::OneEndpoint, Call::Watch(service.into())),
                invalid(),
            ),
            case(
                format!("Resolve {service:?}"),
                (Holding::OneEndpoint, Call::Resolve(service.into())),
                invalid(),
            ),
        ]);
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_get_their_code_and_a_message_naming_the_field_and_change_nothing() {
    let one = Registry::start(config()).await;
    let full = Registry::start(RegistryConfig {
        max_endpoints_per_service: 3,
        ..config()
    })
    .await;
    let mut one_client = one.client().await;
    register(&mut one_client, request(SERVICE, &addr(0))).await;
    let mut full_client = full.client().await;
    for i in 0..3 {
        register(&mut full_client, request(SERVICE, &addr(i))).await;
    }
    cases::in_turn(refusals(), |refusal| {
        let mut client = match refusal.input.0 {
            Holding::OneEndpoint => one_client.clone(),
            Holding::AFullService => full_client.clone(),
        };
        async move {
            let (code, names) = refusal.expected;
            let before = observe(&mut client).await;
            let status = expect_status(refusal.input.1.send(client.clone()).await, code, &names);
            eprintln!(
                "refused {}: {:?} {:?}",
                refusal.name,
                status.code(),
                status.message()
            );
            assert_eq!(observe(&mut client).await, before, "state changed");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_registry_even_with_open_watch_and_keepalive_streams() {
    let port = free_port();
    let mut registry = start_registry(port).await;
    let mut client = registry_client(&local(port), STARTUP).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    let mut keepalive = KeepAlive::open(&client).await;
    keepalive.beat(&lease.lease_id).await.expect("heartbeat");
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;

    registry.signal(libc::SIGTERM);
    let code = registry.wait_exit(STARTUP).await;
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    // The registry ended the streams itself; it did not wait out its grace.
    assert!(
        !registry.has_line("connections still open after the grace period"),
        "the streams were not ended, the grace period ran out:\n{}",
        registry.dump()
    );
    watcher
        .wait_until("end of the watch stream", GENEROUS, |v| v.ended.is_some())
        .await;
    let ended = watcher
        .view
        .borrow()
        .ended
        .as_ref()
        .map(|end| end.as_ref().map(drop).map_err(|status| status.code()));
    assert_eq!(
        ended,
        Some(Err(Code::Unavailable)),
        "the watch must end with UNAVAILABLE"
    );
    let status = keepalive
        .beat(&lease.lease_id)
        .await
        .expect_err("keepalive stream outlived the registry");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_registry_even_when_a_watcher_never_reads() {
    let port = free_port();
    // No warm-up: the watcher must be subscribed before the changes.
    let mut registry = start_registry_with(port, &["--warmup-ms", "0"]).await;
    let mut client = registry_client(&local(port), STARTUP).await;
    // A watcher with a tiny window that never reads: its stream cannot
    // finish, since the end of a stream queues behind its unsent data.
    let stuck = tonic::transport::Endpoint::from_shared(format!("http://{}", local(port)))
        .expect("uri")
        .initial_stream_window_size(1024)
        .connect()
        .await
        .expect("connect");
    let _unread = RegistryClient::new(stuck)
        .watch(WatchRequest {
            service: SERVICE.into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    for i in 0..100 {
        let mut req = request(SERVICE, &addr(i));
        req.metadata.insert("padding".into(), "x".repeat(64));
        register(&mut client, req).await;
    }
    let signalled = Instant::now();
    registry.signal(libc::SIGTERM);
    let code = registry.wait_exit(Duration::from_secs(20)).await;
    eprintln!(
        "registry exited {:?} after SIGTERM with a stuck watcher",
        signalled.elapsed()
    );
    assert_eq!(code, Some(0), "exit code after SIGTERM");
}
