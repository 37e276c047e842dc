//! The etcd store against a real etcd, real registry replicas, real echo
//! backends and real clients, all separate processes on 127.0.0.1: a
//! replica killed under load, every replica restarted, a backend killed,
//! etcd itself stopped for 10 s, compaction under a watcher, a watch
//! resumed from a position, a stalled replica, and the operator commands.
//!
//! Each test starts its own throwaway etcd ([`LocalEtcd`]) and keeps its
//! state under its own `--etcd-prefix`. Without `etcd` on PATH (or
//! `$SWITCHBOARD_ETCD`) every test prints `skipped: no etcd on PATH` and
//! passes; CI installs etcd, so there they always run. Run them with
//! `cargo test --release --features etcd --test etcd` (the feature needs
//! `protoc`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use switchboard::client::resolver::ResolverEvent;
use switchboard::client::{BackoffConfig, RegistryResolver, Resolver, ResolverSink};
use switchboard::discovery::{EndpointSet, Update};
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::watch_response::Event;
use switchboard::proto::registry::{
    DeregisterRequest, DrainRequest, EndpointState, RegisterRequest, Snapshot, WatchRequest,
    WatchResponse,
};
use switchboard::registry::etcd::local::{etcd_binary, LocalEtcd};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The registry service's name in grpc.health.v1.
const REGISTRY_HEALTH: &str = "switchboard.registry.v1.Registry";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A fresh etcd for `test`, or `None` (after saying so) when there is no
/// etcd to run.
async fn etcd_or_skip(test: &str) -> Option<LocalEtcd> {
    if etcd_binary().is_none() {
        eprintln!("{test}: skipped: no etcd on PATH (apt-get install etcd-server)");
        return None;
    }
    Some(
        LocalEtcd::start()
            .await
            .unwrap_or_else(|e| panic!("{test}: cannot start etcd: {e}")),
    )
}

/// One registry replica on the etcd store, on a port it keeps across
/// restarts.
struct Replica {
    /// The process while it runs.
    proc: Option<Proc>,
    /// Its gRPC port, the same after a restart.
    port: u16,
    /// `--etcd-endpoints`.
    etcd: String,
    /// `--etcd-prefix`.
    prefix: String,
}

impl Replica {
    /// Starts a replica on a free port and waits until it answers.
    async fn start(etcd: &str, prefix: &str) -> Self {
        Self::start_with(etcd, prefix, &[]).await
    }

    /// [`start`](Self::start) with `extra` flags.
    async fn start_with(etcd: &str, prefix: &str, extra: &[&str]) -> Self {
        let mut replica = Self {
            proc: None,
            port: free_port().expect("free port"),
            etcd: etcd.to_owned(),
            prefix: prefix.to_owned(),
        };
        replica.restart(extra).await;
        replica
    }

    /// Starts the replica (again) on its port with `extra` flags, and waits
    /// until it answers a Resolve, which reads etcd.
    async fn restart(&mut self, extra: &[&str]) {
        assert!(self.proc.is_none(), "replica {} still runs", self.address());
        let listen = self.address();
        let mut args = vec![
            "--listen",
            &listen,
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.etcd,
            "--etcd-prefix",
            &self.prefix,
        ];
        args.extend_from_slice(extra);
        let proc = Proc::sub("registry", &args);
        proc.wait_line("registry listening on", STARTUP).await;
        self.proc = Some(proc);
        let address = self.address();
        wait_for(&format!("replica {address} to answer"), STARTUP, || {
            let address = address.clone();
            async move {
                let mut client = RegistryClient::connect(format!("http://{address}"))
                    .await
                    .ok()?;
                resolve(&mut client, SERVICE).await
            }
        })
        .await;
    }

    /// `127.0.0.1:<port>`.
    fn address(&self) -> String {
        local(self.port)
    }

    /// The running process.
    fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("the replica runs")
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// A registry client of this replica.
    async fn client(&self) -> RegistryClient<Channel> {
        registry_client(&self.address(), STARTUP).await
    }
}

/// A fresh etcd for `test` and `n` replicas on it under `prefix`, with
/// their addresses as one `--registry` list (first to last); `None` (after
/// saying so) when there is no etcd to run.
async fn etcd_with_replicas(
    test: &str,
    prefix: &str,
    n: usize,
) -> Option<(LocalEtcd, Vec<Replica>, String)> {
    let etcd = etcd_or_skip(test).await?;
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(Replica::start(&etcd.url(), prefix).await);
    }
    let list = replicas
        .iter()
        .map(|r| r.address())
        .collect::<Vec<_>>()
        .join(",");
    Some((etcd, replicas, list))
}

/// A raw watcher of [`SERVICE`] at each of `replicas`, once each sees
/// exactly `expected`.
async fn watch_each(replicas: &[Replica], expected: &[String]) -> Vec<Watcher> {
    let mut watchers = Vec::new();
    for replica in replicas {
        let mut watcher = Watcher::start(&replica.client().await, SERVICE).await;
        watcher.wait_for_set(expected, STARTUP).await;
        watchers.push(watcher);
    }
    watchers
}

/// One more backend registered through `registry`, once it serves.
async fn one_more_backend(registry: &str) -> (String, Proc) {
    let port = free_port().expect("free port");
    let proc = start_echo(registry, SERVICE, &[port], &[]).await;
    (local(port), proc)
}

/// `addresses` plus `more`, sorted.
fn with(addresses: &[String], more: &str) -> Vec<String> {
    let mut all = addresses.to_vec();
    all.push(more.to_owned());
    all.sort();
    all
}

/// Asserts that every backend registered once and only ever resumed its
/// lease afterwards: a second fresh registration would be a removal and a
/// re-add. (A broken stream alone proves nothing: the keeper resumes its
/// lease at the next replica.)
fn assert_registrations_kept(backends: &[(String, Proc)]) {
    for (address, proc) in backends {
        let fresh = proc
            .output()
            .iter()
            .filter(|l| l.contains(" registered ") && l.contains("resumed=false"))
            .count();
        assert_eq!(
            fresh,
            1,
            "backend {address} registered afresh {fresh} times:\n{}",
            proc.dump()
        );
        assert!(
            !proc.has_line("refused the registration"),
            "backend {address} was refused:\n{}",
            proc.dump()
        );
    }
}

/// What a [`Follower`] has passed on to its balancer so far.
#[derive(Default)]
struct Followed {
    /// The set as the updates built it.
    set: EndpointSet,
    /// Updates received.
    updates: usize,
    /// How many of them were resets.
    resets: usize,
    /// Resets that emptied a non-empty set.
    empty_resets: usize,
    /// Times each address entered the set.
    added: BTreeMap<String, usize>,
    /// Times each address left the set.
    removed: BTreeMap<String, usize>,
    /// Errors the resolver reported (a broken stream, an unreachable
    /// replica): each is a move to the next replica.
    errors: Vec<String>,
    /// Service configs the resolver passed on, in order.
    configs: Vec<Option<std::sync::Arc<switchboard::service_config::ServiceConfig>>>,
}

impl Followed {
    fn addresses(&self) -> Vec<String> {
        let mut addresses: Vec<String> = self.set.addresses().map(str::to_owned).collect();
        addresses.sort();
        addresses
    }

    fn summary(&self) -> String {
        format!(
            "set {:?}, {} updates ({} resets, {} empty), added {:?}, removed {:?}, errors {:?}",
            self.addresses(),
            self.updates,
            self.resets,
            self.empty_resets,
            self.added,
            self.removed,
            self.errors
        )
    }

    /// No endpoint left the set and none entered it twice.
    fn assert_no_churn(&self, who: &str) {
        assert!(
            self.removed.is_empty()
                && self.added.values().all(|&n| n == 1)
                && self.empty_resets == 0,
            "{who}: endpoints removed or re-added: {}",
            self.summary()
        );
    }
}

/// A watch the way the client library keeps one: the library's
/// [`RegistryResolver`] over a replica list, which moves to the next
/// replica when its stream breaks and resumes from the position it holds.
/// Every update it publishes is applied and counted.
struct Follower {
    view: watch::Receiver<Followed>,
    task: JoinHandle<()>,
}

impl Follower {
    /// Follows [`SERVICE`] through `registry` (a replica list, first one
    /// first).
    fn start(registry: &str) -> Self {
        let (sink, mut events) = ResolverSink::new();
        let resolver = RegistryResolver::new(registry, SERVICE).with_backoff(BackoffConfig::fast());
        let (publish, view) = watch::channel(Followed::default());
        let task = tokio::spawn(async move {
            // The resolver runs as long as its sink's receiver lives.
            let resolving = tokio::spawn(Box::new(resolver).resolve(sink));
            while let Some(event) = events.recv().await {
                publish.send_modify(|followed| match event {
                    ResolverEvent::Update(update) => {
                        followed.updates += 1;
                        if let Update::Reset(endpoints) = &update {
                            followed.resets += 1;
                            if endpoints.is_empty() && !followed.set.is_empty() {
                                followed.empty_resets += 1;
                            }
                        }
                        let applied = followed.set.apply(update);
                        for address in applied.added {
                            *followed.added.entry(address).or_default() += 1;
                        }
                        for address in applied.removed {
                            *followed.removed.entry(address).or_default() += 1;
                        }
                    }
                    ResolverEvent::Error(error) => followed.errors.push(error.to_string()),
                    ResolverEvent::ServiceConfig(config) => followed.configs.push(config),
                });
            }
            resolving.abort();
        });
        Self { view, task }
    }

    /// Waits until the followed set is exactly `expected`.
    async fn wait_for_set(&mut self, expected: &[String], timeout: Duration) {
        let reached = matches!(
            tokio::time::timeout(timeout, self.view.wait_for(|f| f.addresses() == expected)).await,
            Ok(Ok(_))
        );
        if !reached {
            panic!(
                "follower: no set {expected:?} within {timeout:?}: {}",
                self.view.borrow().summary()
            );
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The grpc.health.v1 status `address` gives `service` ("" is the whole
/// server), or `None` when it does not answer.
async fn health(address: &str, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.into(),
    });
    request.set_timeout(Duration::from_secs(2));
    let reply = HealthClient::new(channel).check(request).await.ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

/// Waits until the replica at `address` reports `status` for the whole
/// server and for the registry service.
async fn wait_health(address: &str, status: ServingStatus, timeout: Duration) {
    wait_for(
        &format!("{address} to report {status:?}"),
        timeout,
        || async move {
            let whole = health(address, "").await?;
            let registry = health(address, REGISTRY_HEALTH).await?;
            (whole == status && registry == status).then_some(())
        },
    )
    .await
}

/// A Register request for `address` with the longest TTL, for tests that
/// change the set by hand (no KeepAlive; the lease outlives the test).
fn register_request(address: &str) -> RegisterRequest {
    RegisterRequest {
        service: SERVICE.into(),
        address: address.into(),
        ttl_ms: 300_000,
        ..Default::default()
    }
}

/// Registers `address` through `client`; returns its lease id.
async fn register(client: &mut RegistryClient<Channel>, address: &str) -> String {
    client
        .register(register_request(address))
        .await
        .unwrap_or_else(|s| panic!("register {address}: {s:?}"))
        .into_inner()
        .lease_id
}

/// Opens a Watch of [`SERVICE`] resuming from `(epoch, version)`.
async fn resume_watch(
    client: &mut RegistryClient<Channel>,
    epoch: u64,
    version: u64,
) -> tonic::Streaming<WatchResponse> {
    client
        .watch(WatchRequest {
            service: SERVICE.into(),
            epoch: Some(epoch),
            version: Some(version),
        })
        .await
        .expect("resumed watch")
        .into_inner()
}

/// Reads `stream` into `view` until its set is `expected` with `draining`
/// DRAINING, failing after `timeout`; returns the messages read.
async fn read_until(
    stream: &mut tonic::Streaming<WatchResponse>,
    view: &mut View,
    expected: &[String],
    draining: &str,
    timeout: Duration,
) -> Vec<WatchResponse> {
    let deadline = Instant::now() + timeout;
    let mut read = Vec::new();
    while view.addresses() != expected || view.state_of(draining) != Some(EndpointState::Draining) {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no set {expected:?} within {timeout:?}; read {read:#?}, view {}",
                    view.summary()
                )
            })
            .expect("the stream stays open")
            .expect("a message");
        view.apply(Instant::now(), message.clone());
        read.push(message);
    }
    read
}

/// A TCP relay between one replica and etcd that the test cuts and
/// restores: while cut, the replica's etcd connections are closed and new
/// ones are closed at once, so the replica falls behind while etcd moves on.
struct Relay {
    /// `127.0.0.1:<port>`, what the replica dials.
    address: String,
    /// Whether it is cut, and the live connections' tasks; one lock, so no
    /// connection slips past a cut.
    state: Arc<Mutex<(bool, Vec<JoinHandle<()>>)>>,
    /// The accept loop.
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays a free port to `target` (`host:port`).
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let address = listener.local_addr().expect("relay address").to_string();
        let state: Arc<Mutex<(bool, Vec<JoinHandle<()>>)>> = Arc::default();
        let accepting = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = accepting.lock().unwrap();
                if state.0 {
                    continue;
                }
                let target = target.clone();
                state.1.push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Self {
            address,
            state,
            task,
        }
    }

    /// Closes every relayed connection and refuses new ones.
    fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.0 = true;
        for connection in state.1.drain(..) {
            connection.abort();
        }
    }

    /// Relays again.
    fn restore(&self) {
        self.state.lock().unwrap().0 = false;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// The body of `GET path` from the HTTP/1.1 server at `address`, if it
/// answers 200.
async fn http_get(address: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Prints how long a test took, for the record.
fn took(test: &str, started: Instant) {
    eprintln!("{test}: {:.1?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_removes_nothing_and_fails_no_rpc() {
    let test = "replica kill";
    let started = Instant::now();
    // Everyone starts at r[0], the replica that dies: the backends' leases
    // are bound to its streams, and the client watches through it.
    let Some((_etcd, mut r, all)) = etcd_with_replicas(test, "/replica-kill/", 3).await else {
        return;
    };
    let backends = start_backends(&all, 2, &[]).await;
    let expected = addresses_of(&backends);
    let mut survivors = watch_each(&r[1..], &expected).await;
    let mut follower = Follower::start(&all);
    follower.wait_for_set(&expected, STARTUP).await;
    let (channel, load) = load_through(&all, &expected).await;

    r[0].kill();
    // Each backend moves to another replica and keeps its lease.
    for (_, proc) in &backends {
        proc.wait_line("resumed=true", STARTUP).await;
    }
    // A change after the kill reaches every watcher, the follower that
    // had to move included: its watch resumed elsewhere.
    let late = one_more_backend(&all).await;
    let expected_after = with(&expected, &late.0);
    for (i, watcher) in survivors.iter_mut().enumerate() {
        watcher.wait_for_set(&expected_after, STARTUP).await;
        watcher
            .view
            .borrow()
            .assert_untouched(&format!("watcher of replica {}", i + 1), &expected_after);
    }
    follower.wait_for_set(&expected_after, STARTUP).await;
    wait_ready_set(&channel, &expected_after, STARTUP).await;
    load.wait_more(200, STARTUP).await;
    let rpcs = assert_no_failed_rpc(load, test).await;

    let followed = follower.view.borrow();
    followed.assert_no_churn("follower through the killed replica");
    assert!(
        !followed.errors.is_empty(),
        "the follower's stream never broke, so it did not move: {}",
        followed.summary()
    );
    assert_eq!(
        followed.resets,
        1,
        "the resumed watch was reset: {}",
        followed.summary()
    );
    assert_registrations_kept(&backends);
    eprintln!("{test}: {rpcs} RPCs, 0 failed");
    took(test, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_killed_and_restarted_keeps_every_endpoint() {
    let test = "restart all";
    let started = Instant::now();
    let Some((_etcd, mut r, all)) = etcd_with_replicas(test, "/restart-all/", 3).await else {
        return;
    };
    let backends = start_backends(&all, 2, &[]).await;
    let expected = addresses_of(&backends);
    let mut follower = Follower::start(&all);
    follower.wait_for_set(&expected, STARTUP).await;
    let (channel, load) = load_through(&all, &expected).await;

    for replica in &mut r {
        replica.kill();
    }
    // A warm-up would hold back every first snapshot for ten minutes: the
    // state is in etcd, so a restarted replica needs none and must not
    // take one.
    for replica in &mut r {
        replica.restart(&["--warmup-ms", "600000"]).await;
    }
    for (i, replica) in r.iter().enumerate() {
        let mut fresh = replica.client().await;
        let mut stream = watch(&mut fresh, SERVICE).await;
        let first = tokio::time::timeout(STARTUP, stream.message())
            .await
            .expect("a first snapshot without warm-up")
            .expect("the watch stays open")
            .expect("a message");
        let mut view = View::default();
        view.apply(Instant::now(), first);
        assert_eq!(
            view.addresses(),
            expected,
            "the first snapshot of restarted replica {i}: {}",
            view.summary()
        );
    }
    for (_, proc) in &backends {
        proc.wait_line("resumed=true", STARTUP).await;
    }
    let late = one_more_backend(&all).await;
    let expected_after = with(&expected, &late.0);
    follower.wait_for_set(&expected_after, STARTUP).await;
    wait_ready_set(&channel, &expected_after, STARTUP).await;
    load.wait_more(200, STARTUP).await;
    let rpcs = assert_no_failed_rpc(load, test).await;
    follower.view.borrow().assert_no_churn("follower");
    assert_registrations_kept(&backends);
    eprintln!("{test}: {rpcs} RPCs, 0 failed");
    took(test, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_leaves_the_watchers_of_every_replica_for_its_broken_stream() {
    let test = "backend kill";
    let started = Instant::now();
    let Some((_etcd, r, all)) = etcd_with_replicas(test, "/backend-kill/", 3).await else {
        return;
    };
    // Leases that outlive the test: only the broken stream can end one.
    let mut backends = start_backends(&all, 2, &["--ttl-ms", "300000"]).await;
    let expected = addresses_of(&backends);
    let mut watchers = watch_each(&r, &expected).await;

    let (victim, mut victim_proc) = backends.remove(0);
    victim_proc.kill();
    let survivors = addresses_of(&backends);
    for (i, watcher) in watchers.iter_mut().enumerate() {
        watcher.wait_for_set(&survivors, STARTUP).await;
        let view = watcher.view.borrow();
        view.assert_clean(&format!("watcher of replica {i}"));
        assert_eq!(view.removed_at.len(), 1, "{}", view.summary());
    }
    // The replica that held its stream removed it, for that reason. Its
    // log line may reach us after the watchers saw the removal (etcd tells
    // them as soon as the key goes), so wait for it.
    let removed_by = |r: &[Replica]| -> Vec<usize> {
        (0..r.len())
            .filter(|&i| {
                r[i].proc().output().iter().any(|l| {
                    l.contains("keepalive stream ended; endpoint removed") && l.contains(&victim)
                })
            })
            .collect()
    };
    wait_for("a replica logs the removal", STARTUP, || {
        let found = !removed_by(&r).is_empty();
        async move { found.then_some(()) }
    })
    .await;
    let removed_by = removed_by(&r);
    assert_eq!(
        removed_by.len(),
        1,
        "replicas that removed it: {removed_by:?}"
    );
    took(test, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_ten_seconds_loses_no_live_endpoint() {
    let test = "etcd down";
    let started = Instant::now();
    const DOWN: Duration = Duration::from_secs(10);
    // Short leases: etcd's copy (a few TTLs) is shorter than the outage, so
    // the replicas must keep them alive across it.
    const TTL_MS: &str = "2000";
    let Some(mut etcd) = etcd_or_skip(test).await else {
        return;
    };
    // The first replica also serves its status page: /healthz and the
    // etcd reachability gauge must follow etcd too.
    let page = local(free_port().expect("free port"));
    let r = vec![
        Replica::start_with(&etcd.url(), "/etcd-down/", &["--metrics-listen", &page]).await,
        Replica::start(&etcd.url(), "/etcd-down/").await,
    ];
    let both = format!("{},{}", r[0].address(), r[1].address());
    let backends = start_backends(&both, 2, &["--ttl-ms", TTL_MS]).await;
    assert_etcd_seen(&page, true).await;
    let expected = addresses_of(&backends);
    let watchers = watch_each(&r, &expected).await;
    let (_channel, load) = load_through(&both, &expected).await;
    for replica in &r {
        wait_health(&replica.address(), ServingStatus::Serving, STARTUP).await;
    }

    etcd.kill();
    let stopped = Instant::now();
    // While etcd is down: every replica says so, and refuses writes.
    for replica in &r {
        wait_health(&replica.address(), ServingStatus::NotServing, STARTUP).await;
    }
    eprintln!("{test}: NOT_SERVING after {:?}", stopped.elapsed());
    assert_etcd_seen(&page, false).await;
    let mut client = r[0].client().await;
    let mut request = tonic::Request::new(register_request("127.0.0.1:1"));
    request.set_timeout(Duration::from_secs(8));
    let status = client
        .register(request)
        .await
        .expect_err("a Register while etcd is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("etcd unreachable"), "{status:?}");
    // The outage's length is the input of the test, not a wait for a
    // result: at least DOWN, longer if the checks above took longer.
    tokio::time::sleep(DOWN.saturating_sub(stopped.elapsed())).await;
    etcd.resume().await.expect("etcd starts again");
    let resumed = Instant::now();
    for replica in &r {
        wait_health(&replica.address(), ServingStatus::Serving, STARTUP).await;
    }
    eprintln!("{test}: SERVING again {:?} after etcd", resumed.elapsed());
    assert_etcd_seen(&page, true).await;
    // A lease etcd did not see refreshed would end within its etcd TTL (a
    // few switchboard TTLs) after etcd came back: keep the load going past
    // five TTLs.
    let watch_until = resumed + Duration::from_secs(10);
    while Instant::now() < watch_until {
        load.wait_more(10, STARTUP).await;
    }
    let rpcs = assert_no_failed_rpc(load, test).await;
    for (i, watcher) in watchers.iter().enumerate() {
        watcher
            .view
            .borrow()
            .assert_untouched(&format!("watcher of replica {i}"), &expected);
    }
    assert_registrations_kept(&backends);
    let mut client = r[1].client().await;
    assert_eq!(resolve(&mut client, SERVICE).await, Some(expected));
    eprintln!("{test}: {rpcs} RPCs, 0 failed");
    took(test, started);
}

/// Asserts what the status page at `status` says of etcd, as gRPC health
/// already does: `/healthz` 200 or 503, the reachability gauge 1 or 0.
async fn assert_etcd_seen(status: &str, reachable: bool) {
    let (code, body) = get(status, "/healthz").await;
    assert_eq!(code, if reachable { 200 } else { 503 }, "/healthz: {body}");
    let (_, metrics) = get(status, "/metrics").await;
    assert_eq!(
        sample(&metrics, "switchboard_registry_etcd_reachable"),
        Some(if reachable { 1.0 } else { 0.0 }),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_a_lagging_watcher_sends_the_difference() {
    let test = "compaction";
    let started = Instant::now();
    let Some(etcd) = etcd_or_skip(test).await else {
        return;
    };
    let prefix = "/compaction/";
    // r0 reaches etcd through a relay the test cuts; r1 directly.
    let relay = Relay::start(etcd.url().trim_start_matches("http://").to_owned()).await;
    let status = local(free_port().expect("free port"));
    let lagging = Replica::start_with(
        &format!("http://{}", relay.address),
        prefix,
        &["--metrics-listen", &status],
    )
    .await;
    let direct = Replica::start(&etcd.url(), prefix).await;
    let mut writer = direct.client().await;
    let (a, b, c, d) = (
        "127.0.0.1:1001",
        "127.0.0.1:1002",
        "127.0.0.1:1003",
        "127.0.0.1:1004",
    );
    let lease_a = register(&mut writer, a).await;
    let lease_b = register(&mut writer, b).await;
    let mut behind = Watcher::start(&lagging.client().await, SERVICE).await;
    behind.wait_for_set(&[a.into(), b.into()], STARTUP).await;
    let (held, epoch, held_message) = {
        let view = behind.view.borrow();
        let held = view.version.expect("a version");
        let epoch = view.epoch.expect("an epoch");
        // What the watcher holds at that version, as one message.
        let message = WatchResponse {
            epoch,
            version: held,
            event: Some(Event::Reset(Snapshot {
                endpoints: view.endpoints.values().cloned().collect(),
            })),
            service_config: None,
        };
        (held, epoch, message)
    };
    let mut live = Watcher::start(&writer, SERVICE).await;
    live.wait_for_set(&[a.into(), b.into()], STARTUP).await;

    relay.cut();
    register(&mut writer, c).await;
    writer
        .deregister(DeregisterRequest { lease_id: lease_a })
        .await
        .expect("deregister a");
    writer
        .drain(DrainRequest { lease_id: lease_b })
        .await
        .expect("drain b");
    let mut etcd_client = etcd_client::Client::connect([etcd.url()], None)
        .await
        .expect("etcd client");
    let revision = etcd_client
        .status()
        .await
        .expect("etcd status")
        .header()
        .expect("a header")
        .revision();
    etcd_client.compact(revision, None).await.expect("compact");
    // A watcher at the current revision is not disturbed by compaction.
    let now: Vec<String> = vec![b.into(), c.into()];
    live.wait_for_set(&now, STARTUP).await;

    relay.restore();
    behind.wait_for_set(&now, STARTUP).await;
    // The lagging replica really lost its etcd watch and caught up by a
    // re-list, not by a watch that never broke.
    wait_for("the lagging replica to count a resync", STARTUP, || {
        let status = status.clone();
        async move {
            let metrics = http_get(&status, "/metrics").await?;
            let resyncs: f64 = metrics.lines().find_map(|l| {
                l.strip_prefix("switchboard_registry_etcd_watch_resyncs_total ")?
                    .trim()
                    .parse()
                    .ok()
            })?;
            (resyncs >= 1.0).then_some(())
        }
    })
    .await;
    register(&mut writer, d).await;
    let last: Vec<String> = vec![b.into(), c.into(), d.into()];
    for (who, watcher) in [
        ("lagging watcher", &mut behind),
        ("live watcher", &mut live),
    ] {
        watcher.wait_for_set(&last, STARTUP).await;
        let view = watcher.view.borrow();
        view.assert_clean(who);
        assert_eq!(view.resets, 1, "{who}: reset again: {}", view.summary());
        assert!(view.ended.is_none(), "{who}: {}", view.summary());
        assert_eq!(
            view.removed_at.keys().collect::<Vec<_>>(),
            vec![a],
            "{who}: {}",
            view.summary()
        );
        assert_eq!(
            view.state_of(b),
            Some(EndpointState::Draining),
            "{who}: {}",
            view.summary()
        );
    }
    // A watch resuming from before the compaction, at either replica, ends
    // at the current set: through the deltas a replica still holds, or a
    // reset, never an empty one.
    for (who, replica) in [("lagging replica", &lagging), ("direct replica", &direct)] {
        let mut reader = replica.client().await;
        let mut stale = resume_watch(&mut reader, epoch, held).await;
        let mut view = View::default();
        view.apply(Instant::now(), held_message.clone());
        let read = read_until(&mut stale, &mut view, &last, b, STARTUP).await;
        view.assert_clean(who);
        assert!(
            read.iter()
                .all(|m| !matches!(&m.event, Some(Event::Reset(s)) if s.endpoints.is_empty())),
            "{who}: an empty reset: {read:#?}"
        );
        assert_eq!(view.state_of(b), Some(EndpointState::Draining), "{who}");
    }
    took(test, started);
}

/// A watch of `r[0]` is dropped, four changes are made, and a watch
/// resumes from the position it held at `r[0]` itself or at `r[1]` (which
/// never had a watcher of the service): only the missed deltas come, no
/// reset; and resumed from the position it then holds, the next message is
/// the next change.
async fn resumed_watch(test: &str, at_other_replica: bool) {
    let started = Instant::now();
    let prefix = format!("/resume-{}/", at_other_replica as u8);
    let Some((_etcd, r, _)) = etcd_with_replicas(test, &prefix, 2).await else {
        return;
    };
    let mut writer = r[0].client().await;
    let (a, b, c, d) = (
        "127.0.0.1:1001",
        "127.0.0.1:1002",
        "127.0.0.1:1003",
        "127.0.0.1:1004",
    );
    let lease_a = register(&mut writer, a).await;
    let mut first = watch(&mut writer, SERVICE).await;
    let held = first.message().await.unwrap().unwrap();
    drop(first);

    // Missed: b and c added, a removed, b draining.
    let lease_b = register(&mut writer, b).await;
    register(&mut writer, c).await;
    writer
        .deregister(DeregisterRequest { lease_id: lease_a })
        .await
        .unwrap();
    writer
        .drain(DrainRequest { lease_id: lease_b })
        .await
        .unwrap();
    let now: Vec<String> = vec![b.into(), c.into()];
    wait_registered(&r[0].address(), SERVICE, &now, STARTUP).await;

    let who = format!("{test}: resumed at replica {}", at_other_replica as u8);
    let replica = &r[at_other_replica as usize];
    let mut client = replica.client().await;
    let mut stream = resume_watch(&mut client, held.epoch, held.version).await;
    let mut view = View::default();
    view.apply(Instant::now(), held.clone());
    let read = read_until(&mut stream, &mut view, &now, b, STARTUP).await;
    assert!(
        read.iter()
            .all(|m| matches!(m.event, Some(Event::Delta(_)))),
        "{who}: not only deltas from version {}: {read:#?}",
        held.version
    );
    view.assert_clean(&who);

    // Resumed from where it is now, nothing is missed: the next message is
    // the next change.
    let at = view.version.expect("a version");
    let mut current = resume_watch(&mut client, held.epoch, at).await;
    // It opens with the service's config alone (none here), at `at`.
    let opening = tokio::time::timeout(STARTUP, current.message())
        .await
        .expect("the opening config")
        .expect("the stream stays open")
        .expect("a message");
    assert_eq!((opening.event, opening.version), (None, at), "{who}");
    assert_eq!(opening.service_config, Some(Default::default()), "{who}");
    register(&mut writer, d).await;
    let next = tokio::time::timeout(STARTUP, current.message())
        .await
        .expect("the next change")
        .expect("the stream stays open")
        .expect("a message");
    assert!(next.version > at, "{who}: {next:?} is not after {at}");
    match next.event {
        Some(Event::Delta(delta)) => {
            let added: Vec<&str> = delta.added.iter().map(|e| e.address.as_str()).collect();
            assert_eq!(added, vec![d], "{who}: {delta:?}");
            assert!(
                delta.removed.is_empty() && delta.updated.is_empty(),
                "{who}: {delta:?}"
            );
        }
        other => panic!("{who}: expected a delta, got {other:?}"),
    }
    took(test, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_at_the_same_replica_gets_only_the_missed_deltas() {
    resumed_watch("resume, same replica", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_at_another_replica_gets_only_the_missed_deltas() {
    resumed_watch("resume, another replica", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_expires_no_lease() {
    let test = "stall";
    let started = Instant::now();
    const TTL: Duration = Duration::from_secs(1);
    const STALL: Duration = Duration::from_secs(2);
    let Some((_etcd, r, both)) = etcd_with_replicas(test, "/stall/", 2).await else {
        return;
    };
    // The backends' leases are bound to r[0], the replica that stalls.
    let backends = start_backends(&r[0].address(), 2, &["--ttl-ms", "1000"]).await;
    let expected = addresses_of(&backends);
    let watchers = watch_each(&r, &expected).await;
    let (_channel, load) = load_through(&both, &expected).await;

    r[0].proc().signal(libc::SIGSTOP);
    // The stall's length is the input of the test, not a wait for a result.
    tokio::time::sleep(STALL).await;
    r[0].proc().signal(libc::SIGCONT);
    let resumed = Instant::now();
    r[0].proc()
        .wait_line("registry stalled; extending every lease", STARTUP)
        .await;
    // An expiry caused by the stall would come within the extension (the
    // stall plus a grace) after the resume; watch well past it.
    let watch_until = resumed + STALL + TTL * 3;
    while Instant::now() < watch_until {
        load.wait_more(10, STARTUP).await;
    }
    let rpcs = assert_no_failed_rpc(load, test).await;
    for (i, watcher) in watchers.iter().enumerate() {
        watcher
            .view
            .borrow()
            .assert_untouched(&format!("watcher of replica {i}"), &expected);
    }
    assert_registrations_kept(&backends);
    eprintln!("{test}: {rpcs} RPCs, 0 failed");
    took(test, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_through_one_replica_reach_the_watchers_of_another() {
    let test = "operator";
    let started = Instant::now();
    let Some((_etcd, r, both)) = etcd_with_replicas(test, "/operator/", 2).await else {
        return;
    };
    let backends = start_backends(&both, 2, &["--ttl-ms", "2000"]).await;
    let expected = addresses_of(&backends);
    let (drained, removed) = (&backends[0], &backends[1]);
    // The commands go to r[1]; the leases are bound to r[0]'s streams, and
    // its watcher must see the changes.
    let mut other = Watcher::start(&r[0].client().await, SERVICE).await;
    other.wait_for_set(&expected, STARTUP).await;

    // endpoints: lease age and TTL, through either replica (the leases are
    // bound to r[0]'s streams).
    for replica in &r {
        let json: Value = serde_json::from_str(
            &run_ok(&[
                "endpoints",
                SERVICE,
                "--registry",
                &replica.address(),
                "-o",
                "json",
            ])
            .await[0],
        )
        .unwrap();
        let endpoints = json["endpoints"].as_array().expect("endpoints");
        assert_eq!(endpoints.len(), 2, "{json}");
        for endpoint in endpoints {
            assert_eq!(endpoint["ttl_ms"], 2000, "{json}");
            let age = endpoint["lease_age_ms"].as_u64().expect("a lease age");
            assert!(
                age > 0 && age <= started.elapsed().as_millis() as u64,
                "lease age {age} ms, the test began {:?} ago: {json}",
                started.elapsed()
            );
        }
        let table = run_ok(&["endpoints", SERVICE, "--registry", &replica.address()]).await;
        assert!(
            table[0].contains("LEASE AGE") && table[0].contains("TTL"),
            "{table:?}"
        );
        assert!(
            table
                .iter()
                .any(|l| l.starts_with(&expected[0]) && l.contains("2.0s")),
            "{table:?}"
        );
    }

    let lines = run_ok(&["drain", SERVICE, &drained.0, "--registry", &r[1].address()]).await;
    assert!(lines[0].contains("drained"), "{lines:?}");
    other
        .wait_until("the drained endpoint DRAINING", STARTUP, |view| {
            view.state_of(&drained.0) == Some(EndpointState::Draining)
        })
        .await;

    run_ok(&[
        "deregister",
        SERVICE,
        &removed.0,
        "--registry",
        &r[1].address(),
    ])
    .await;
    other
        .wait_for_set(std::slice::from_ref(&drained.0), STARTUP)
        .await;
    removed
        .1
        .wait_line("an operator removed this endpoint", STARTUP)
        .await;
    // Its keeper has stopped: the endpoint stays out.
    let mut client = r[0].client().await;
    assert_eq!(
        resolve(&mut client, SERVICE).await,
        Some(vec![drained.0.clone()])
    );
    let view = other.view.borrow();
    view.assert_clean("watcher of the other replica");
    assert_eq!(view.resets, 1, "{}", view.summary());
    // It entered the set once (in the first reset, or in a delta when it
    // registered after the watch began), and never again.
    let entries = view
        .log
        .iter()
        .filter(|(_, m)| match &m.event {
            Some(Event::Reset(snapshot)) => {
                snapshot.endpoints.iter().any(|e| e.address == removed.0)
            }
            Some(Event::Delta(delta)) => delta.added.iter().any(|e| e.address == removed.0),
            None => false,
        })
        .count();
    assert_eq!(
        entries, 1,
        "the removed endpoint was registered again: {:#?}",
        view.log
    );
    assert!(!drained.1.has_line("an operator removed this endpoint"));
    took(test, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_config_set_at_one_replica_is_read_at_every_replica_and_survives_them_all() {
    use switchboard::proto::registry::{GetServiceConfigRequest, SetServiceConfigRequest};
    let test = "a_service_config_set_at_one_replica_is_read_at_every_replica_and_survives_them_all";
    let Some((_etcd, mut replicas, _)) = etcd_with_replicas(test, "/sb-config/", 2).await else {
        return;
    };
    let json = r#"{"loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{}], "timeout": "2s"}]}"#;
    let expected = switchboard::service_config::ServiceConfig::from_json(json).unwrap();
    // A client watching through the other replica hears the config as it
    // is set, and its removal: pushed through etcd's watch, not polled.
    let mut follower = Follower::start(&replicas[1].address());
    follower.wait_for_set(&[], STARTUP).await;
    let configs = |f: &Followed| f.configs.len();
    let before = configs(&follower.view.borrow());
    let version = replicas[0]
        .client()
        .await
        .set_service_config(SetServiceConfigRequest {
            service: SERVICE.into(),
            json: json.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    let heard = follower.view.wait_for(|f| {
        f.configs[before..]
            .iter()
            .any(|c| c.as_deref() == Some(&expected))
    });
    tokio::time::timeout(STARTUP, heard)
        .await
        .expect("the config reaches the client at the other replica")
        .unwrap();
    let get = || GetServiceConfigRequest {
        service: SERVICE.into(),
    };
    // Every replica reads the same config at the same version, before and
    // after all of them were killed and restarted.
    for round in ["live", "restarted"] {
        for replica in &replicas {
            let stored = replica
                .client()
                .await
                .get_service_config(get())
                .await
                .unwrap_or_else(|s| panic!("{round}: {}: {s:?}", replica.address()))
                .into_inner();
            assert_eq!(stored.version, version, "{round}");
            assert_eq!(
                switchboard::service_config::ServiceConfig::from_json(&stored.json).unwrap(),
                expected,
                "{round}"
            );
        }
        for replica in &mut replicas {
            replica.kill();
        }
        for replica in &mut replicas {
            replica.restart(&[]).await;
        }
    }
    let mut follower = Follower::start(&replicas[1].address());
    let heard = follower.view.wait_for(|f| {
        f.configs
            .last()
            .is_some_and(|c| c.as_deref() == Some(&expected))
    });
    tokio::time::timeout(STARTUP, heard)
        .await
        .expect("a restarted replica sends the config first")
        .unwrap();
    replicas[0]
        .client()
        .await
        .delete_service_config(switchboard::proto::registry::DeleteServiceConfigRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap();
    let heard = follower
        .view
        .wait_for(|f| f.configs.last().is_some_and(Option::is_none));
    tokio::time::timeout(STARTUP, heard)
        .await
        .expect("the removal reaches the client at the other replica")
        .unwrap();
}
