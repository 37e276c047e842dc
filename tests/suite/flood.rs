//! A flood from one client: 10,000 bogus registrations and 5,000 idle Watch
//! streams against the `registry` binary, while a legitimate backend
//! registers and deregisters on its own connection and a legitimate client
//! watches. Every change must reach the legitimate watcher within a second,
//! the registry's memory must stay bounded and be reused rather than grow,
//! the flood's streams must be given back when it leaves, and nothing may
//! panic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use futures_util::{stream, StreamExt};
use switchboard::discovery::{EndpointSet, Versioned};
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{
    DeregisterRequest, RegisterRequest, ResolveRequest, WatchRequest, WatchResponse,
};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The service the legitimate client watches (the flood writes into it too).
const LEGIT: &str = "legit.flood.test";
/// Addresses of the legitimate backend start with this; the flood's never do.
const LEGIT_PREFIX: &str = "192.0.2.";
const REGISTRATIONS: usize = 10_000;
const WATCH_STREAMS: usize = 5_000;
/// The registry's cap on Watch streams in all: room for the flood, the
/// legitimate watcher and a little more, so that a probe can tell whether
/// the flood's streams are still counted.
const MAX_WATCH_STREAMS: usize = WATCH_STREAMS + 100;
/// Legitimate changes that must reach the watcher, one after another,
/// while a flood is still running: a registry that queued them behind the
/// flood would deliver the first only once the flood ends.
const CHANGES_DURING_A_FLOOD: usize = 3;
/// What the registry may take in memory at any point of the test.
const RSS_BOUND_KIB: u64 = 512 * 1024;
/// Generous deadline for anything the issue sets no bound on.
const GENEROUS: Duration = Duration::from_secs(60);

/// VmRSS and VmHWM (peak) of `pid`, in KiB.
fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Whether `pid` still runs (a zombie does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A client on a connection of its own.
async fn connection(address: &str) -> RegistryClient<Channel> {
    registry_client(address, STARTUP).await
}

/// The flood's connection for idle watches. Its streams are never read after
/// their first message, so each gets a small HTTP/2 window (4 KiB) and the
/// connection a large one: an unread stream then stalls on its own, and the
/// registry stops sending to it, instead of the unread data using up the
/// connection's window and stalling the streams still being opened.
async fn idle_connection(address: &str) -> RegistryClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("uri")
        .initial_stream_window_size(4 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024)
        .connect()
        .await
        .expect("connect the idle-watch connection");
    RegistryClient::new(channel)
}

/// `call`, or DEADLINE_EXCEEDED after [`GENEROUS`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(GENEROUS, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "no answer within the test's deadline",
            ))
        })
}

/// What the legitimate watcher has seen: when each legitimate address came
/// and went, and any protocol violation.
#[derive(Default)]
struct Legit {
    /// The set as the library's own `EndpointSet::apply` builds it.
    set: EndpointSet,
    /// (arrival, address, present afterwards) for every change of a
    /// legitimate address.
    flips: Vec<(Instant, String, bool)>,
    messages: usize,
    version: Option<u64>,
    violations: Vec<String>,
    ended: Option<String>,
}

impl Legit {
    fn apply(&mut self, at: Instant, message: WatchResponse) {
        if message.event.is_none() && message.service_config.is_some() {
            return;
        }
        self.messages += 1;
        if self.version.is_some_and(|v| message.version <= v) {
            self.violations.push(format!(
                "version {} after {:?}",
                message.version, self.version
            ));
        }
        self.version = Some(message.version);
        let Ok(versioned) = Versioned::try_from(message) else {
            self.violations.push("a message without an event".into());
            return;
        };
        let changes = self.set.apply(versioned.update);
        self.violations
            .extend(changes.anomalies.iter().map(ToString::to_string));
        let legit = |address: &&String| address.starts_with(LEGIT_PREFIX);
        for gone in changes.removed.iter().filter(legit) {
            self.flips.push((at, gone.clone(), false));
        }
        for came in changes.added.iter().filter(legit) {
            self.flips.push((at, came.clone(), true));
        }
    }
}

/// Watches [`LEGIT`] on its own connection, recording into a [`Legit`].
async fn legit_watcher(address: &str) -> Arc<Mutex<Legit>> {
    let mut stream = connection(address)
        .await
        .watch(WatchRequest {
            service: LEGIT.into(),
            ..Default::default()
        })
        .await
        .expect("legitimate watch")
        .into_inner();
    let view = Arc::new(Mutex::new(Legit::default()));
    tokio::spawn({
        let view = view.clone();
        async move {
            loop {
                let next = stream.message().await;
                let at = Instant::now();
                let mut view = view.lock().unwrap();
                match next {
                    Ok(Some(message)) => view.apply(at, message),
                    other => {
                        view.ended = Some(format!("{other:?}"));
                        return;
                    }
                }
            }
        }
    });
    let seen = view.clone();
    wait_for("the legitimate watcher's first message", STARTUP, || {
        let got = seen.lock().unwrap().messages > 0;
        async move { got.then_some(()) }
    })
    .await;
    view
}

/// The legitimate backend: one address it registers and deregisters in turn.
struct Backend {
    client: RegistryClient<Channel>,
    address: String,
    lease: Option<String>,
}

impl Backend {
    /// Registers or deregisters, and returns how long the change took to
    /// reach the watcher (measured at the watcher's arrival time).
    async fn change(&mut self, watcher: &Arc<Mutex<Legit>>) -> Duration {
        let sent = Instant::now();
        let present = match self.lease.take() {
            Some(lease_id) => {
                self.client
                    .deregister(DeregisterRequest { lease_id })
                    .await
                    .expect("legitimate Deregister");
                false
            }
            None => {
                let reply = self
                    .client
                    .register(RegisterRequest {
                        service: LEGIT.into(),
                        address: self.address.clone(),
                        metadata: [("role".to_owned(), "legit".to_owned())].into(),
                        ttl_ms: 300_000,
                    })
                    .await
                    .expect("legitimate Register");
                self.lease = Some(reply.into_inner().lease_id);
                true
            }
        };
        let address = self.address.clone();
        let arrived = wait_for(
            &format!("the watcher to see {address} present={present}"),
            GENEROUS,
            || {
                let flip = watcher
                    .lock()
                    .unwrap()
                    .flips
                    .iter()
                    .find(|(at, a, p)| *at >= sent && *a == address && *p == present)
                    .map(|(at, _, _)| *at);
                async move { flip }
            },
        )
        .await;
        arrived - sent
    }
}

/// One bogus registration: mostly well-formed junk with 200 bytes of
/// metadata in one of 500 bogus services or (the first 200) in the
/// legitimate one, the rest malformed in assorted ways. The bounds keep the
/// registry's memory independent of how many registrations the rate cap
/// admits on a slow or fast machine: its watch streams each hold a copy of
/// their service's snapshot, and each service holds a ring of changes.
fn bogus(i: usize) -> RegisterRequest {
    let junk = |n: usize| -> String {
        (0..n)
            .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
            .collect()
    };
    let address = format!(
        "10.{}.{}.{}:{}",
        rand::random::<u8>(),
        rand::random::<u8>(),
        rand::random::<u8>(),
        1 + rand::random::<u16>() % 65535
    );
    let mut request = RegisterRequest {
        service: format!("bogus-{}.flood", rand::random::<u16>() % 500),
        address,
        metadata: [("junk".to_owned(), junk(200))].into(),
        ttl_ms: 300_000,
    };
    match i % 10 {
        0 | 1 if i < 1000 => request.service = LEGIT.into(),
        2 => request.address = format!("10.0.0.1:{}", ["0", "+80", "65536", ""][i / 10 % 4]),
        3 => request.service = ["", "bad service!", "a..b", "-x"][i / 10 % 4].into(),
        4 if i % 20 == 4 => {
            request.metadata = (0..65).map(|k| (format!("k{k}"), "v".into())).collect()
        }
        4 => request.ttl_ms = [5, 999, 300_001, u64::MAX][i / 20 % 4],
        5 if i % 100 == 5 => request.address = "x".repeat(100_000),
        _ => {}
    }
    request
}

/// What the flood got back, by status.
#[derive(Debug, Default)]
struct Counts {
    registrations: BTreeMap<String, usize>,
    watches: BTreeMap<String, usize>,
    /// Statuses other than OK and a documented refusal.
    unexpected: Vec<Status>,
}

fn code_name(outcome: &Result<(), Status>) -> String {
    match outcome {
        Ok(()) => "OK".into(),
        Err(status) => format!("{:?}", status.code()),
    }
}

/// Runs one flood on a runtime of its own (so the legitimate side is not
/// starved by the test's own load generation): the registrations on one
/// connection, the watches on another, all as fast as the registry takes
/// them. Reports when done, then holds every stream open until `release`.
fn flood(
    address: String,
    done: oneshot::Sender<(Counts, Duration)>,
    release: oneshot::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("flood runtime");
        runtime.block_on(async move {
            let registrar = connection(&address).await;
            let watcher = idle_connection(&address).await;
            let started = Instant::now();
            let registrations = stream::iter(0..REGISTRATIONS)
                .map(|i| {
                    let mut client = registrar.clone();
                    async move {
                        bounded(client.register(bogus(i)))
                            .await
                            .map(|reply| reply.into_inner().lease_id)
                    }
                })
                .buffer_unordered(256)
                .collect::<Vec<_>>();
            let watches = stream::iter(0..WATCH_STREAMS)
                .map(|i| {
                    let mut client = watcher.clone();
                    // Half on the legitimate service (every change there
                    // fans out to them), half on services of their own.
                    let service = if i % 2 == 0 {
                        LEGIT.to_owned()
                    } else {
                        format!("idle-{i}.flood")
                    };
                    bounded(async move {
                        let mut stream = client
                            .watch(WatchRequest {
                                service,
                                ..Default::default()
                            })
                            .await?
                            .into_inner();
                        // Read the reset, then never again.
                        match stream.message().await? {
                            Some(_) => Ok(stream),
                            None => Err(Status::unknown("watch ended at once")),
                        }
                    })
                })
                .buffer_unordered(256)
                .collect::<Vec<_>>();
            let (registrations, watches) = tokio::join!(registrations, watches);
            let took = started.elapsed();
            let mut counts = Counts::default();
            let mut leases = Vec::new();
            for outcome in registrations {
                *counts
                    .registrations
                    .entry(code_name(&outcome.as_ref().map(drop).map_err(Clone::clone)))
                    .or_default() += 1;
                match outcome {
                    Ok(lease_id) => leases.push(lease_id),
                    Err(status)
                        if matches!(
                            status.code(),
                            Code::InvalidArgument | Code::ResourceExhausted
                        ) => {}
                    Err(status) => counts.unexpected.push(status),
                }
            }
            let mut held = Vec::new();
            for outcome in watches {
                *counts
                    .watches
                    .entry(code_name(&outcome.as_ref().map(drop).map_err(Clone::clone)))
                    .or_default() += 1;
                match outcome {
                    Ok(stream) => held.push(stream),
                    Err(status) => counts.unexpected.push(status),
                }
            }
            let _ = done.send((counts, took));
            let _ = release.await;
            drop(held);
            // Leave nothing behind, so that the next round meets the same
            // registry.
            let deregistered: Vec<Result<(), Status>> = stream::iter(leases)
                .map(|lease_id| {
                    let mut client = registrar.clone();
                    async move {
                        bounded(client.deregister(DeregisterRequest { lease_id }))
                            .await
                            .map(drop)
                    }
                })
                .buffer_unordered(256)
                .collect()
                .await;
            let failed: Vec<_> = deregistered.into_iter().filter_map(Result::err).collect();
            assert!(
                failed.is_empty(),
                "the flood's Deregister failed: {failed:?}"
            );
        });
        // Dropping the runtime closes both connections.
    })
}

/// Opens up to `n` watches on a fresh connection; returns the streams that
/// opened and the refusals.
async fn probe_watches(
    address: &str,
    n: usize,
) -> (Vec<tonic::Streaming<WatchResponse>>, Vec<Status>) {
    let client = connection(address).await;
    let outcomes: Vec<Result<_, Status>> = stream::iter(0..n)
        .map(|i| {
            let mut client = client.clone();
            bounded(async move {
                let mut stream = client
                    .watch(WatchRequest {
                        service: format!("probe-{i}.flood"),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                stream.message().await?;
                Ok(stream)
            })
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(stream) => open.push(stream),
            Err(status) => refused.push(status),
        }
    }
    (open, refused)
}

/// One flood with changes of the legitimate backend during and after it.
/// Returns the delivery times and the registry's memory with the flood's
/// streams held.
async fn flood_round(
    round: usize,
    address: &str,
    pid: i32,
    backend: &mut Backend,
    watcher: &Arc<Mutex<Legit>>,
) -> (Vec<Duration>, u64) {
    let (done_tx, mut done) = oneshot::channel();
    let (release, released) = oneshot::channel();
    let flooder = flood(address.to_owned(), done_tx, released);
    // Changes while the flood runs.
    let mut during = Vec::new();
    let deadline = Instant::now() + 2 * GENEROUS;
    let (counts, took) = loop {
        if Instant::now() >= deadline {
            panic!("round {round}: the flood did not finish");
        }
        during.push(backend.change(watcher).await);
        tokio::select! {
            finished = &mut done => break finished.expect("the flood thread reports"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    // And while its streams sit idle.
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(backend.change(watcher).await);
    }
    let (rss_held, peak) = memory_kib(pid);
    eprintln!(
        "round {round}: flood took {took:?}; registrations {:?}; watches {:?}",
        counts.registrations, counts.watches
    );
    eprintln!(
        "round {round}: legitimate changes reached the watcher in (during the flood) {during:?}, \
         (with {WATCH_STREAMS} idle streams) {idle:?}"
    );
    eprintln!(
        "round {round}: registry RSS {} MiB with the flood's streams held, peak {} MiB",
        rss_held / 1024,
        peak / 1024
    );
    // Each change is made once the one before has arrived, so all but the
    // last arrived before the flood had finished.
    assert!(
        during.len() > CHANGES_DURING_A_FLOOD,
        "round {round}: only {} legitimate changes arrived while the flood ran: {during:?}",
        during.len().saturating_sub(1)
    );
    assert!(
        counts.unexpected.is_empty(),
        "statuses other than OK, INVALID_ARGUMENT and RESOURCE_EXHAUSTED: {:?}",
        &counts.unexpected[..counts.unexpected.len().min(10)]
    );
    assert_eq!(
        counts.watches.get("OK"),
        Some(&WATCH_STREAMS),
        "every flood watch opens"
    );
    assert!(
        during.len() >= 2,
        "the flood ended before the legitimate backend could act"
    );

    // The flood's streams are really open: the registry counts them against
    // its cap, so only the few slots left open.
    let (open, refused) = probe_watches(address, 2 * (MAX_WATCH_STREAMS - WATCH_STREAMS)).await;
    assert!(
        open.len() < MAX_WATCH_STREAMS - WATCH_STREAMS && !refused.is_empty(),
        "{} probes opened past a cap the flood should nearly fill",
        open.len()
    );
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("watch streams limit"),
            "{status:?}"
        );
    }
    drop(open);

    // The flood leaves: its slots come back.
    let _ = release.send(());
    flooder.join().expect("the flood thread");
    wait_for(
        "the flood's watch slots to be given back",
        GENEROUS,
        || async {
            let (open, refused) = probe_watches(address, WATCH_STREAMS / 5).await;
            (refused.is_empty() && open.len() == WATCH_STREAMS / 5).then_some(())
        },
    )
    .await;
    let mut times = during;
    times.extend(idle);
    (times, peak.max(rss_held))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_client_leaves_legitimate_watchers_served_and_memory_bounded() {
    let port = free_port().expect("free port");
    let address = local(port);
    let max_watch_streams = MAX_WATCH_STREAMS.to_string();
    let registry = Proc::sub(
        "registry",
        &[
            "--listen",
            &address,
            "--warmup-ms",
            "0",
            "--max-watch-streams",
            &max_watch_streams,
        ],
    );
    registry.wait_line("registry listening on", STARTUP).await;
    let pid = registry.pid();
    let watcher = legit_watcher(&address).await;
    let mut backend = Backend {
        client: connection(&address).await,
        address: format!("{LEGIT_PREFIX}1:443"),
        lease: None,
    };
    // A first change before any flood, as a reference.
    let quiet = backend.change(&watcher).await;
    let (rss_start, _) = memory_kib(pid);
    eprintln!(
        "quiet: a change reached the watcher in {quiet:?}; registry RSS {} MiB",
        rss_start / 1024
    );

    let started = Instant::now();
    let (first, peak_first) = flood_round(1, &address, pid, &mut backend, &watcher).await;
    let (second, peak_second) = flood_round(2, &address, pid, &mut backend, &watcher).await;
    let (rss_end, peak) = memory_kib(pid);
    eprintln!(
        "two floods in {:?}; registry RSS at start {} MiB, peak {} MiB after round 1, {} MiB \
         after round 2, {} MiB at the end",
        started.elapsed(),
        rss_start / 1024,
        peak_first / 1024,
        peak_second / 1024,
        rss_end / 1024
    );

    // How fast they arrived is the benchmark's business; here, that every
    // one arrived (each waited for) and in order (the violations below).
    let slowest = first.iter().chain(&second).max().expect("changes");
    eprintln!(
        "{} legitimate changes; the slowest reached the watcher in {slowest:?}",
        first.len() + second.len()
    );
    {
        let view = watcher.lock().unwrap();
        assert!(
            view.violations.is_empty() && view.ended.is_none(),
            "legitimate watcher: violations {:?}, ended {:?}",
            view.violations,
            view.ended
        );
    }

    // Memory stays bounded, and a second flood reuses what the first freed
    // instead of adding as much again.
    assert!(
        peak < RSS_BOUND_KIB,
        "registry peak RSS {} MiB over {} MiB",
        peak / 1024,
        RSS_BOUND_KIB / 1024
    );
    let first_growth = peak_first.saturating_sub(rss_start);
    let second_growth = peak_second.saturating_sub(peak_first);
    assert!(
        second_growth <= first_growth / 2 + 16 * 1024,
        "memory kept growing: +{} MiB in round 1, +{} MiB more in round 2",
        first_growth / 1024,
        second_growth / 1024
    );

    // Nothing panicked, and the registry still serves.
    assert!(alive(pid), "the registry died");
    let mut client = connection(&address).await;
    client
        .register(RegisterRequest {
            service: LEGIT.into(),
            address: format!("{LEGIT_PREFIX}2:443"),
            ..RegisterRequest::default()
        })
        .await
        .expect("a normal Register after the floods");
    let resolved = client
        .resolve(ResolveRequest {
            service: LEGIT.into(),
        })
        .await
        .expect("Resolve after the floods")
        .into_inner();
    assert!(resolved
        .endpoints
        .iter()
        .any(|e| e.address == format!("{LEGIT_PREFIX}2:443")));
    assert!(
        !registry.has_line("panicked"),
        "the registry panicked:\n{}",
        registry.dump()
    );
}
