//! Section 8, HA on etcd (feature `etcd`): registry replicas
//! (`registry --store etcd`) sharing one throwaway etcd, each part next to
//! its anchor or baseline.
//!
//! - `ha-fanout`: N watchers through 3 replicas (one etcd watch per
//!   replica), against the same N watchers watching etcd directly (one
//!   etcd watch each, as etcd's naming resolver does); register → watcher
//!   latency and etcd's own watch count.
//! - `ha-removal`: a backend SIGKILLed → its removal at every replica's
//!   watcher, etcd store next to the in-memory store.
//! - `ha-leases`: N heartbeating leases through 3 replicas → etcd requests
//!   per second and etcd CPU, next to the in-memory store's CPU.
//! - `ha-replicas`: replicas SIGKILLed under open-loop RPC load → failed
//!   RPCs (target 0) and endpoint removals seen by a watcher (target 0).
//!
//! Each part starts its own etcd, so etcd's counters are the part's alone.
//! Everything runs on this machine's cores with the harness itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use switchboard::client::resolver::ResolverEvent;
use switchboard::client::{BalancedChannel, PolicyKind, RegistryResolver, Resolver, ResolverSink};
use switchboard::discovery::{EndpointSet, Versioned};
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::registry::etcd::local::{etcd_binary, LocalEtcd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::churn::{self, Beats, PER_SERVICE};
use crate::failover::{self, Load, RPC_TIMEOUT};
use crate::fanout::{self, connect, watcher, Seen, SERVICE};
use crate::procs::{proc_cpu, Proc};
use crate::stats::{ms, Samples, Table};
use crate::BoxError;

/// Sizes of every part.
pub struct Config {
    /// Fan-out: watchers, on each side.
    pub watchers: usize,
    /// Fan-out: HTTP/2 connections per replica, and etcd clients for the
    /// direct watchers (as many in all).
    pub connections_per_replica: usize,
    /// Fan-out: registrations timed.
    pub changes: usize,
    /// Removal: backends killed per store.
    pub kills: usize,
    /// Leases: heartbeating leases.
    pub leases: usize,
    /// Leases: KeepAlive streams per replica.
    pub streams_per_replica: usize,
    /// Leases: time from the last registration to the window (a TTL and
    /// more reaches the steady state, where every lease had its first
    /// etcd refresh).
    pub settle: Duration,
    /// Leases: the measured window.
    pub window: Duration,
    /// Replica kill: RPCs per second, open-loop.
    pub rate: f64,
    /// Replica kill: load before each fault, and after it.
    pub before: Duration,
    pub after: Duration,
    /// Replica kill: load after every replica restarted; longer than an
    /// etcd lease (4×TTL) in a full run, so a lease nobody carried over
    /// would show as a removal.
    pub after_restart: Duration,
}

/// Registry replicas.
const REPLICAS: usize = 3;
/// The registry's default lease TTL (what `echo` and the benches ask for).
const TTL: Duration = Duration::from_secs(5);

/// Runs the chosen parts; skips them all, saying why, without an etcd.
pub async fn run(sections: &[&str], config: &Config) -> Result<(), BoxError> {
    println!("## 8. HA on etcd\n");
    if etcd_binary().is_none() {
        println!("_Skipped: no `etcd` on PATH (apt-get install etcd-server)._\n");
        return Ok(());
    }
    for section in sections {
        match *section {
            "ha-fanout" => fanout(config).await?,
            "ha-removal" => removal(config).await?,
            "ha-leases" => leases(config).await?,
            "ha-replicas" => replicas(config).await?,
            _ => {}
        }
    }
    Ok(())
}

/// One etcd and its registry replicas, all killed when dropped.
struct Cluster {
    etcd: LocalEtcd,
    /// Each replica's process (`None` while killed) and its address.
    replicas: Vec<(Option<Proc>, String)>,
}

impl Cluster {
    /// A fresh etcd and `n` replicas on free ports.
    async fn start(n: usize) -> Result<Self, BoxError> {
        let etcd = LocalEtcd::start().await?;
        let mut cluster = Self {
            etcd,
            replicas: Vec::new(),
        };
        for _ in 0..n {
            let (proc, address) = cluster.replica("127.0.0.1:0");
            cluster.replicas.push((Some(proc), address));
        }
        Ok(cluster)
    }

    /// Starts a replica listening on `listen`.
    fn replica(&self, listen: &str) -> (Proc, String) {
        let url = self.etcd.url();
        Proc::registry_with(&[
            "--listen",
            listen,
            "--store",
            "etcd",
            "--etcd-endpoints",
            &url,
        ])
    }

    /// Every replica's address, as `--registry` and targets take them.
    fn addresses(&self) -> String {
        let all: Vec<&str> = self.replicas.iter().map(|(_, a)| a.as_str()).collect();
        all.join(",")
    }

    /// SIGKILLs replica `i`.
    fn kill(&mut self, i: usize) {
        if let Some(mut proc) = self.replicas[i].0.take() {
            proc.kill();
        }
    }

    /// Starts replica `i` again on its address.
    fn restart(&mut self, i: usize) {
        let (proc, _) = self.replica(&self.replicas[i].1.clone());
        self.replicas[i].0 = Some(proc);
    }

    /// etcd's counters now.
    async fn metrics(&self) -> Result<Metrics, BoxError> {
        Metrics::scrape(&self.etcd.metrics_url()).await
    }

    /// etcd's CPU time so far.
    fn etcd_cpu(&self) -> Duration {
        self.etcd
            .pid()
            .map_or(Duration::ZERO, |pid| proc_cpu(pid as i32))
    }
}

/// etcd's Prometheus text, one `(series, value)` per sample line.
struct Metrics(Vec<(String, f64)>);

impl Metrics {
    /// Reads `url` (HTTP/1.0, so the body is neither chunked nor kept open).
    async fn scrape(url: &str) -> Result<Self, BoxError> {
        let rest = url.strip_prefix("http://").ok_or("metrics URL not http")?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        stream
            .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        let (_, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
        Ok(Self(
            body.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_owned(), value.parse().ok()?))
                })
                .collect(),
        ))
    }

    /// The sum of metric `name`'s series whose labels contain `label`.
    fn sum(&self, name: &str, label: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                    && series.contains(label)
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Metric `name` summed per value of label `key`.
    fn by_label(&self, name: &str, key: &str) -> BTreeMap<String, f64> {
        let mut sums = BTreeMap::new();
        let needle = format!("{key}=\"");
        for (series, value) in &self.0 {
            if !series.starts_with(&format!("{name}{{")) {
                continue;
            }
            if let Some(rest) = series.split_once(&needle).map(|(_, r)| r) {
                let label = rest.split('"').next().unwrap_or_default().to_owned();
                *sums.entry(label).or_insert(0.0) += value;
            }
        }
        sums
    }
}

/// CPU time over wall time, as a percentage of one core.
fn percent(cpu: Duration, elapsed: Duration) -> f64 {
    cpu.as_secs_f64() * 100.0 / elapsed.as_secs_f64()
}

// ---------------------------------------------------------------------------
// 8.1 Fan-out

/// One etcd watch on the service's prefix, reporting as [`watcher`] does.
async fn etcd_watcher(
    mut client: etcd_client::Client,
    prefix: String,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let options = WatchOptions::new().with_prefix();
    let Ok(mut stream) = client.watch(prefix.clone(), Some(options)).await else {
        return;
    };
    while let Ok(Some(reply)) = stream.message().await {
        let now = Instant::now();
        if reply.created() {
            let _ = seen.send(Seen::Snapshot);
        }
        for event in reply.events() {
            if event.event_type() != EventType::Put {
                continue;
            }
            let Some(address) = event
                .kv()
                .and_then(|kv| kv.key_str().ok())
                .and_then(|key| key.strip_prefix(prefix.as_str()))
            else {
                continue;
            };
            let _ = seen.send(Seen::Added(address.to_owned(), now));
        }
    }
}

/// What one fan-out side measured.
struct Delivery {
    opened: Duration,
    /// From `Register` being sent to each watcher holding the endpoint.
    latency: Samples,
    /// Deliveries that came before `Register` returned.
    early: usize,
    missed: usize,
}

/// Waits for `n` watches to open, then registers `changes` endpoints at
/// `registrar` and times their arrival at every watcher.
async fn deliveries(
    n: usize,
    changes: usize,
    first_address: usize,
    registrar: &mut RegistryClient<tonic::transport::Channel>,
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    opening: Instant,
) -> Result<Delivery, BoxError> {
    fanout::wait_opened(rx, n, "watches", Duration::from_secs(120)).await?;
    let opened = opening.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut delivery = Delivery {
        opened,
        latency: Samples::default(),
        early: 0,
        missed: 0,
    };
    for change in 0..changes {
        let address = churn::address(first_address + change);
        let arrivals =
            fanout::register_and_collect(registrar, rx, address, n, Duration::from_secs(20))
                .await?;
        for &at in &arrivals.seen {
            delivery
                .latency
                .push(at.saturating_duration_since(arrivals.called));
            delivery.early += usize::from(at < arrivals.returned);
        }
        delivery.missed += n - arrivals.seen.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(delivery)
}

async fn fanout(config: &Config) -> Result<(), BoxError> {
    let n = config.watchers;
    println!("### 8.1 Fan-out: {n} watchers through {REPLICAS} replicas, and straight on etcd\n");
    let mut table = Table::new(&[
        "watchers on",
        "watchers",
        "connections",
        "all open after",
        "deliveries",
        "missed",
        "p50",
        "p99",
        "max",
        "seen before Register returned",
        "etcd watchers",
        "etcd watch streams",
        "etcd CPU over the changes",
    ]);
    let connections = config.connections_per_replica * REPLICAS;
    let mut p50s = Vec::new();

    // Through the replicas: each keeps one etcd watch for the service.
    {
        let cluster = Cluster::start(REPLICAS).await?;
        let mut registrar = RegistryClient::new(connect(&cluster.replicas[0].1).await?);
        let mut channels = Vec::new();
        for (_, replica) in &cluster.replicas {
            for _ in 0..config.connections_per_replica {
                channels.push(connect(replica).await?);
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watchers = JoinSet::new();
        let opening = Instant::now();
        for i in 0..n {
            let client = RegistryClient::new(channels[i % channels.len()].clone());
            watchers.spawn(watcher(client, tx.clone()));
        }
        drop(tx);
        let cpu0 = cluster.etcd_cpu();
        let mut d = deliveries(n, config.changes, 0, &mut registrar, &mut rx, opening).await?;
        let cpu = cluster.etcd_cpu() - cpu0;
        let metrics = cluster.metrics().await?;
        watchers.abort_all();
        p50s.push(d.latency.quantile(0.5));
        table.row(fanout_row(
            &format!("{REPLICAS} replicas"),
            n,
            connections,
            &mut d,
            &metrics,
            cpu,
        ));
    }

    // The anchor: every watcher its own etcd watch, as etcd's naming
    // resolver (one per client process) would open.
    {
        let cluster = Cluster::start(1).await?;
        let mut registrar = RegistryClient::new(connect(&cluster.replicas[0].1).await?);
        let prefix = format!("/switchboard/services/{SERVICE}/");
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(etcd_client::Client::connect([cluster.etcd.url()], None).await?);
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watchers = JoinSet::new();
        let opening = Instant::now();
        for i in 0..n {
            watchers.spawn(etcd_watcher(
                clients[i % clients.len()].clone(),
                prefix.clone(),
                tx.clone(),
            ));
        }
        drop(tx);
        let cpu0 = cluster.etcd_cpu();
        let mut d = deliveries(n, config.changes, 1000, &mut registrar, &mut rx, opening).await?;
        let cpu = cluster.etcd_cpu() - cpu0;
        let metrics = cluster.metrics().await?;
        watchers.abort_all();
        p50s.push(d.latency.quantile(0.5));
        table.row(fanout_row(
            "etcd directly (anchor)",
            n,
            connections,
            &mut d,
            &metrics,
            cpu,
        ));
    }
    println!(
        "One service; {} registrations timed per row, each through replica 1's `Register` \
         (latency: from `Register` being sent to a watcher holding the new endpoint; most \
         arrive before `Register` has returned, as etcd's watch fires on the write itself). Replica watchers spread over {} HTTP/2 connections per replica; \
         direct watchers spread over {connections} etcd clients, one etcd watch stream each. \
         etcd watchers and streams are etcd's `etcd_debugging_mvcc_watcher_total` and \
         `etcd_debugging_mvcc_watch_stream_total` with every watch open.\n",
        config.changes, config.connections_per_replica
    );
    table.print();
    if let [replicas, anchor] = p50s[..] {
        println!(
            "p50 through the replicas / p50 straight on etcd: **{:.2}×**.\n",
            replicas.as_secs_f64() / anchor.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

fn fanout_row(
    side: &str,
    n: usize,
    connections: usize,
    d: &mut Delivery,
    metrics: &Metrics,
    etcd_cpu: Duration,
) -> Vec<String> {
    vec![
        side.to_owned(),
        n.to_string(),
        connections.to_string(),
        ms(d.opened),
        d.latency.len().to_string(),
        d.missed.to_string(),
        ms(d.latency.quantile(0.5)),
        ms(d.latency.quantile(0.99)),
        ms(d.latency.max()),
        d.early.to_string(),
        format!(
            "{:.0}",
            metrics.sum("etcd_debugging_mvcc_watcher_total", "")
        ),
        format!(
            "{:.0}",
            metrics.sum("etcd_debugging_mvcc_watch_stream_total", "")
        ),
        format!("{:.2} s", etcd_cpu.as_secs_f64()),
    ]
}

// ---------------------------------------------------------------------------
// 8.2 Backend kill → removal

/// What a set watcher tells the harness: its index, and an address added
/// or removed.
enum Change {
    Added(usize, String),
    Removed(usize, String, Instant),
}

/// Watches `service` at `registry` and reports every addition and removal.
async fn set_watcher(
    index: usize,
    registry: String,
    service: &'static str,
    changes: mpsc::UnboundedSender<Change>,
) {
    let Ok(channel) = connect(&registry).await else {
        return;
    };
    let Ok(mut stream) = fanout::open_watch(&mut RegistryClient::new(channel), service).await
    else {
        return;
    };
    let mut set = EndpointSet::new();
    while let Ok(Some(message)) = stream.message().await {
        let now = Instant::now();
        let Ok(versioned) = Versioned::try_from(message) else {
            continue;
        };
        let applied = set.apply(versioned.update);
        for address in applied.added {
            let _ = changes.send(Change::Added(index, address));
        }
        for address in applied.removed {
            let _ = changes.send(Change::Removed(index, address, now));
        }
    }
}

const KILL_SERVICE: &str = "bench.ha-kill";
/// From every watcher holding a backend to its SIGKILL.
const BIND_GRACE: Duration = Duration::from_millis(500);

/// `kills` backends, each registered at `registries` and SIGKILLed once
/// every watcher holds it; the removal times at watcher 0 (on the
/// backend's own replica) and at the others.
async fn kill_backends(
    registries: &str,
    watched: &[String],
    kills: usize,
) -> Result<(Samples, Samples), BoxError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watchers = JoinSet::new();
    for (i, registry) in watched.iter().enumerate() {
        watchers.spawn(set_watcher(i, registry.clone(), KILL_SERVICE, tx.clone()));
    }
    drop(tx);
    let (mut own, mut others) = (Samples::default(), Samples::default());
    for _ in 0..kills {
        let (mut backend, address) = Proc::echo(registries, KILL_SERVICE, &[]);
        let mut holding = vec![false; watched.len()];
        let deadline = Instant::now() + Duration::from_secs(20);
        while holding.contains(&false) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Change::Added(i, a))) if a == address => holding[i] = true,
                Ok(Some(_)) => {}
                _ => return Err(format!("{address} never reached every watcher").into()),
            }
        }
        // The backend binds its lease to its KeepAlive stream just after
        // `Register` returns; a kill before that would time the TTL.
        tokio::time::sleep(BIND_GRACE).await;
        backend.signal(libc::SIGKILL);
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(20);
        while holding.contains(&true) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Change::Removed(i, a, at))) if a == address => {
                    holding[i] = false;
                    let took = at.saturating_duration_since(killed);
                    if i == 0 {
                        own.push(took);
                    } else {
                        others.push(took);
                    }
                }
                Ok(Some(_)) => {}
                _ => return Err(format!("{address} was never removed from every watcher").into()),
            }
        }
        backend.kill();
    }
    watchers.abort_all();
    Ok((own, others))
}

async fn removal(config: &Config) -> Result<(), BoxError> {
    println!("### 8.2 Backend SIGKILL → removal at the watchers\n");
    let mut table = Table::new(&[
        "store",
        "kills",
        "watchers",
        "p50",
        "p99",
        "max",
        "p50 at the backend's replica",
        "p50 at the other replicas",
    ]);
    let mut row = |store: &str, watchers: usize, (mut own, mut others): (Samples, Samples)| {
        let mut all = Samples::default();
        let own_p50 = own.quantile(0.5);
        let others_p50 = others.quantile(0.5);
        let kills = own.len();
        all.extend(own);
        all.extend(others);
        table.row(vec![
            store.to_owned(),
            kills.to_string(),
            watchers.to_string(),
            ms(all.quantile(0.5)),
            ms(all.quantile(0.99)),
            ms(all.max()),
            ms(own_p50),
            if others_p50.is_zero() {
                "-".to_owned()
            } else {
                ms(others_p50)
            },
        ]);
    };
    {
        let (_registry, address) = Proc::registry();
        let watched = vec![address.clone(); REPLICAS];
        row(
            "memory (1 registry)",
            REPLICAS,
            kill_backends(&address, &watched, config.kills).await?,
        );
    }
    {
        let cluster = Cluster::start(REPLICAS).await?;
        let watched: Vec<String> = cluster.replicas.iter().map(|(_, a)| a.clone()).collect();
        row(
            "etcd (3 replicas)",
            REPLICAS,
            kill_backends(&cluster.addresses(), &watched, config.kills).await?,
        );
    }
    println!(
        "An echo backend registered (with `--registry` naming every replica, so it \
         heartbeats on the first), SIGKILLed {BIND_GRACE:?} after {REPLICAS} watchers hold it (one \
         per replica; all on the one registry in memory mode); time from the signal to each watcher's \
         removal. The backend's replica sees its KeepAlive stream break and revokes the etcd \
         lease; the other replicas learn it from their etcd watch.\n"
    );
    table.print();
    Ok(())
}

// ---------------------------------------------------------------------------
// 8.3 Heartbeating leases → etcd load

/// One store's steady state with `config.leases` heartbeating leases.
struct LeaseLoad {
    registered_in: Duration,
    register_errors: usize,
    /// Heartbeats acked per second, and the registries' CPU (% of one
    /// core); `None` for the anchor, which has no registry.
    registries: Option<(f64, f64)>,
    stream_errors: u64,
    etcd: Option<EtcdLoad>,
}

/// What etcd did in the window.
struct EtcdLoad {
    cpu: f64,
    handled_per_sec: f64,
    received_per_sec: f64,
    /// Messages received per second by gRPC method.
    methods: BTreeMap<String, f64>,
}

/// Registers `leases` over `registries` (lease n at replica n % r, kept
/// alive on a stream of that replica, as a backend does), lets them reach
/// their steady state, and measures a window.
async fn heartbeating(
    config: &Config,
    registries: &[String],
    cluster: Option<&Cluster>,
    registry_procs: &[&Proc],
) -> Result<LeaseLoad, BoxError> {
    let beats = Arc::new(Beats::default());
    let mut tasks = JoinSet::new();
    // streams[replica][k]
    let mut streams = Vec::new();
    let mut channels = Vec::new();
    for registry in registries {
        let mut own = Vec::new();
        for _ in 0..config.streams_per_replica {
            own.push(
                churn::opened_stream(connect(registry).await?, beats.clone(), &mut tasks).await?,
            );
        }
        streams.push(own);
        channels.push(connect(registry).await?);
    }
    tasks.spawn(churn::heartbeat(
        streams
            .iter()
            .flatten()
            .map(|s| (s.send.clone(), s.leases.clone()))
            .collect(),
    ));

    let registering = Instant::now();
    let register_errors = churn::register_leases(
        config.leases,
        "bench.ha-scale",
        |n| channels[n % channels.len()].clone(),
        |n, lease_id| {
            let replica = &streams[n % registries.len()];
            let k = n / registries.len() % replica.len();
            replica[k].leases.lock().unwrap().push(lease_id);
        },
    )
    .await;
    let registered_in = registering.elapsed();

    tokio::time::sleep(config.settle).await;

    let registries_cpu = || registry_procs.iter().map(|p| p.cpu()).sum::<Duration>();
    let acks0 = beats.acks.load(Ordering::Relaxed);
    let metrics0 = match cluster {
        Some(c) => Some((c.metrics().await?, c.etcd_cpu())),
        None => None,
    };
    let (cpu0, start) = (registries_cpu(), Instant::now());
    tokio::time::sleep(config.window).await;
    let (cpu, elapsed) = (registries_cpu() - cpu0, start.elapsed());
    let acks = beats.acks.load(Ordering::Relaxed) - acks0;
    let etcd = match (cluster, metrics0) {
        (Some(c), Some((m0, etcd_cpu0))) => {
            let etcd_cpu = c.etcd_cpu() - etcd_cpu0;
            Some(etcd_load(&m0, &c.metrics().await?, etcd_cpu, elapsed))
        }
        _ => None,
    };
    tasks.abort_all();
    Ok(LeaseLoad {
        registered_in,
        register_errors,
        registries: Some((acks as f64 / elapsed.as_secs_f64(), percent(cpu, elapsed))),
        stream_errors: beats.errors.load(Ordering::Relaxed),
        etcd,
    })
}

/// The anchor: `leases` etcd leases kept alive straight from etcd's own
/// client, each on a LeaseKeepAlive stream kept open, one keepalive per
/// lease per TTL: the least etcd work per endpoint our scheme (one refresh
/// per TTL) could come to.
async fn direct_leases(config: &Config) -> Result<(Duration, EtcdLoad), BoxError> {
    let etcd = Cluster::start(0).await?;
    let client = etcd_client::Client::connect([etcd.etcd.url()], None).await?;
    let mut tasks = JoinSet::new();
    let registering = Instant::now();
    let mut opening = JoinSet::new();
    let (mut next, mut opened) = (0, 0);
    while next < config.leases || !opening.is_empty() {
        while next < config.leases && opening.len() < 32 {
            let mut client = client.clone();
            opening.spawn(async move {
                let lease = client.lease_grant(4 * TTL.as_secs() as i64, None).await?;
                client.lease_keep_alive(lease.id()).await
            });
            next += 1;
        }
        if let Some(Ok(Ok((mut keeper, mut replies)))) = opening.join_next().await {
            // Spread the keepalives evenly over the TTL.
            let offset = TTL.mul_f64(opened as f64 / config.leases as f64);
            opened += 1;
            tasks.spawn(async move {
                let mut tick = tokio::time::interval_at(Instant::now() + offset, TTL);
                loop {
                    tick.tick().await;
                    if keeper.keep_alive().await.is_err() || replies.message().await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    let registered_in = registering.elapsed();
    tokio::time::sleep(config.settle).await;
    let (m0, cpu0, start) = (etcd.metrics().await?, etcd.etcd_cpu(), Instant::now());
    tokio::time::sleep(config.window).await;
    let (m1, cpu, elapsed) = (
        etcd.metrics().await?,
        etcd.etcd_cpu() - cpu0,
        start.elapsed(),
    );
    tasks.abort_all();
    if opened < config.leases {
        return Err(format!("only {opened} of {} etcd leases kept alive", config.leases).into());
    }
    Ok((registered_in, etcd_load(&m0, &m1, cpu, elapsed)))
}

/// What etcd did between two scrapes `elapsed` apart, using `cpu`.
fn etcd_load(m0: &Metrics, m1: &Metrics, cpu: Duration, elapsed: Duration) -> EtcdLoad {
    let rate = |name: &str| (m1.sum(name, "") - m0.sum(name, "")) / elapsed.as_secs_f64();
    let before = m0.by_label("grpc_server_msg_received_total", "grpc_method");
    let methods = m1
        .by_label("grpc_server_msg_received_total", "grpc_method")
        .into_iter()
        .map(|(method, v)| {
            let delta = v - before.get(&method).copied().unwrap_or(0.0);
            (method, delta / elapsed.as_secs_f64())
        })
        .filter(|(_, r)| *r > 0.0)
        .collect();
    EtcdLoad {
        cpu: percent(cpu, elapsed),
        handled_per_sec: rate("grpc_server_handled_total"),
        received_per_sec: rate("grpc_server_msg_received_total"),
        methods,
    }
}

async fn leases(config: &Config) -> Result<(), BoxError> {
    let n = config.leases;
    println!("### 8.3 {n} heartbeating leases → etcd load\n");
    let mut table = Table::new(&[
        "store",
        "registered in",
        "heartbeats/s acked",
        "registries CPU (% of one core)",
        "etcd requests/s (RPCs handled)",
        "etcd messages received/s",
        "per endpoint per TTL",
        "etcd CPU (% of one core)",
        "errors",
    ]);
    let row = |table: &mut Table, store: &str, load: &LeaseLoad| {
        let etcd = load.etcd.as_ref();
        table.row(vec![
            store.to_owned(),
            format!(
                "{:.1} s ({:.0}/s)",
                load.registered_in.as_secs_f64(),
                n as f64 / load.registered_in.as_secs_f64()
            ),
            load.registries
                .map_or("-".into(), |(acks, _)| format!("{acks:.0}")),
            load.registries
                .map_or("-".into(), |(_, cpu)| format!("{cpu:.1}")),
            etcd.map_or("-".into(), |e| format!("{:.0}", e.handled_per_sec)),
            etcd.map_or("-".into(), |e| format!("{:.0}", e.received_per_sec)),
            etcd.map_or("-".into(), |e| {
                format!("{:.2}", e.received_per_sec * TTL.as_secs_f64() / n as f64)
            }),
            etcd.map_or("-".into(), |e| format!("{:.1}", e.cpu)),
            (load.register_errors as u64 + load.stream_errors).to_string(),
        ]);
    };
    let memory = {
        let (proc, address) = Proc::registry();
        heartbeating(config, &[address], None, &[&proc]).await?
    };
    row(&mut table, "memory (1 registry)", &memory);
    let cluster = Cluster::start(REPLICAS).await?;
    let addresses: Vec<String> = cluster.replicas.iter().map(|(_, a)| a.clone()).collect();
    let procs: Vec<&Proc> = cluster
        .replicas
        .iter()
        .filter_map(|(p, _)| p.as_ref())
        .collect();
    let etcd_mode = heartbeating(config, &addresses, Some(&cluster), &procs).await?;
    row(&mut table, "etcd (3 replicas)", &etcd_mode);
    drop(procs);
    drop(cluster);
    let (registered_in, direct) = direct_leases(config).await?;
    let anchor = LeaseLoad {
        registered_in,
        register_errors: 0,
        registries: None,
        stream_errors: 0,
        etcd: Some(direct),
    };
    row(
        &mut table,
        "anchor: etcd client, 1 keepalive per lease per TTL on open streams",
        &anchor,
    );

    println!(
        "{n} leases in services of {PER_SERVICE}, TTL {TTL:?}, each heartbeating every 1.6 s \
         on a KeepAlive stream of the replica it registered at ({} streams per replica); \
         leases spread evenly over the replicas. Measured over {:?}, {:?} after the last \
         registration. etcd's requests are deltas of its `grpc_server_handled_total` (RPCs that \
         ended) and `grpc_server_msg_received_total` (every request message, stream messages \
         included); \"per endpoint per TTL\" is the latter per lease per {TTL:?}. The anchor \
         grants the same number of etcd leases straight from `etcd-client` (no registry) and \
         keeps each alive on its own open LeaseKeepAlive stream, one keepalive per TTL: what \
         one refresh per endpoint per TTL costs etcd at least.\n",
        config.streams_per_replica, config.window, config.settle
    );
    table.print();
    if let (Some(etcd), Some(direct)) = (&etcd_mode.etcd, &anchor.etcd) {
        println!(
            "etcd CPU through the replicas / the anchor's: **{:.2}×**; etcd messages: **{:.2}×**.\n",
            etcd.cpu / direct.cpu.max(1e-9),
            etcd.received_per_sec / direct.received_per_sec.max(1e-9)
        );
        let methods: Vec<String> = etcd
            .methods
            .iter()
            .map(|(m, r)| format!("{m} {r:.0}/s"))
            .collect();
        println!("etcd messages by method: {}.\n", methods.join(", "));
        let per_core = n as f64 * 100.0 / etcd.cpu.max(1e-9);
        println!(
            "At the default TTL one etcd core carries **≈{:.0} endpoints** (this run's etcd \
             CPU per endpoint, extrapolated linearly to 100% of one core); every endpoint costs \
             etcd {:.3} requests/s, where one etcd request per heartbeat would cost {:.3}/s.\n",
            per_core,
            etcd.received_per_sec / n as f64,
            1.0 / churn::HEARTBEAT.as_secs_f64(),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 8.4 Replica kill under load

const LOAD_SERVICE: &str = "bench.ha-load";

/// Counts what a resolver watching every replica sees: the client's view.
struct Deltas {
    added: AtomicU64,
    removed: AtomicU64,
}

/// Watches `service` through `registries` with the client's own resolver
/// (it moves between replicas and resumes), counting additions and
/// removals after the first set.
fn count_deltas(registries: &str, service: &str, tasks: &mut JoinSet<()>) -> Arc<Deltas> {
    let deltas = Arc::new(Deltas {
        added: AtomicU64::new(0),
        removed: AtomicU64::new(0),
    });
    let (sink, mut events) = ResolverSink::new();
    let resolving = Box::new(RegistryResolver::new(registries, service)).resolve(sink);
    let counted = deltas.clone();
    tasks.spawn(async move {
        let apply = async move {
            let mut set = EndpointSet::new();
            while let Some(event) = events.recv().await {
                if let ResolverEvent::Update(update) = event {
                    let first = !set.is_known();
                    let applied = set.apply(update);
                    if !first {
                        counted
                            .added
                            .fetch_add(applied.added.len() as u64, Ordering::Relaxed);
                        counted
                            .removed
                            .fetch_add(applied.removed.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        };
        tokio::select! {
            _ = resolving => {}
            _ = apply => {}
        }
    });
    deltas
}

async fn replicas(config: &Config) -> Result<(), BoxError> {
    println!("### 8.4 Replica SIGKILL under {:.0} RPC/s\n", config.rate);
    let mut cluster = Cluster::start(REPLICAS).await?;
    let registries = cluster.addresses();
    let backends: Vec<(Proc, String)> = (0..3)
        .map(|_| Proc::echo(&registries, LOAD_SERVICE, &[]))
        .collect();
    let channel = BalancedChannel::builder(&format!("registry://{registries}/{LOAD_SERVICE}"))?
        .policy(PolicyKind::RoundRobin)
        .build();
    failover::wait_all_ready(&channel, 3).await?;
    let mut tasks = JoinSet::new();
    let deltas = count_deltas(&registries, LOAD_SERVICE, &mut tasks);
    let min_ready = Arc::new(AtomicUsize::new(usize::MAX));
    tasks.spawn({
        let (channel, min_ready) = (channel.clone(), min_ready.clone());
        async move {
            let mut state = channel.watch_state();
            loop {
                let ready = state.borrow_and_update().ready.len();
                min_ready.fetch_min(ready, Ordering::Relaxed);
                if state.changed().await.is_err() {
                    return;
                }
            }
        }
    });

    let mut table = Table::new(&[
        "fault",
        "RPCs",
        "RPC/s",
        "failed RPCs",
        "endpoints removed / added at a watcher",
        "client ready set at least",
        "every replica answers again after",
    ]);
    for fault in [
        "SIGKILL replica 1 (every backend's and the client's)",
        "SIGKILL all 3, restart them",
    ] {
        deltas.added.store(0, Ordering::Relaxed);
        deltas.removed.store(0, Ordering::Relaxed);
        min_ready.store(channel.state().ready.len(), Ordering::Relaxed);
        let load = Load::start(&channel, config.rate);
        tokio::time::sleep(config.before).await;
        let mut back = "-".to_owned();
        if fault.starts_with("SIGKILL replica 1") {
            cluster.kill(0);
        } else {
            for i in 0..REPLICAS {
                cluster.kill(i);
            }
            let since = Instant::now();
            for i in 0..REPLICAS {
                cluster.restart(i);
            }
            back = ms(since.elapsed());
        }
        tokio::time::sleep(if back == "-" {
            config.after
        } else {
            config.after_restart
        })
        .await;
        let shots = load.stop().await;
        table.row(vec![
            fault.to_owned(),
            shots.len().to_string(),
            failover::rate(&shots),
            failover::failures(&shots),
            format!(
                "{} / {}",
                deltas.removed.load(Ordering::Relaxed),
                deltas.added.load(Ordering::Relaxed)
            ),
            min_ready.load(Ordering::Relaxed).to_string(),
            back,
        ]);
    }
    tasks.abort_all();
    drop(backends);
    println!(
        "{:.0} RPC/s open-loop, round_robin over 3 echo processes registered with `--registry` \
         naming all {REPLICAS} replicas, client on `registry://r1,r2,r3/...`, RPC deadline \
         {RPC_TIMEOUT:?}; {:?} of load before each fault, {:?} after the first and {:?} after \
         the restart. The watcher is the \
         client library's resolver on all replicas (it moves and resumes), counting the \
         endpoints removed and added after its first set.\n",
        config.rate, config.before, config.after, config.after_restart
    );
    table.print();
    Ok(())
}
