//! Section 3, registry fan-out: N watchers of one service on a few HTTP/2
//! connections; for each of a few registrations, the time from `Register`
//! returning to each watcher holding the `added` delta; and the registry
//! child's resident memory with 0 and N watchers.
//!
//! The watchers run in this process, on the same two cores as the
//! registry, so the latencies include this process's own scheduling of N
//! streams: they are an upper bound on the registry's part.

use std::time::Duration;

use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::watch_response::Event;
use switchboard::proto::registry::{RegisterRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::procs::Proc;
use crate::stats::{ms, Samples, Table};
use crate::BoxError;

pub struct Config {
    /// Watcher counts, one registry each.
    pub watchers: Vec<usize>,
    /// HTTP/2 connections the watchers share.
    pub connections: usize,
    /// Registrations timed per watcher count.
    pub changes: usize,
}

pub(crate) const SERVICE: &str = "bench.fanout";

/// What a watcher tells the harness.
pub(crate) enum Seen {
    /// Its first message (the snapshot) arrived.
    Snapshot,
    /// A delta added this address.
    Added(String, Instant),
}

/// Opens a watch and reports what it sees until aborted.
pub(crate) async fn watcher(
    mut client: RegistryClient<Channel>,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let Ok(mut stream) = open_watch(&mut client, SERVICE).await else {
        return;
    };
    while let Ok(Some(message)) = stream.message().await {
        let now = Instant::now();
        match message.event {
            Some(Event::Reset(_)) => {
                let _ = seen.send(Seen::Snapshot);
            }
            Some(Event::Delta(delta)) => {
                for endpoint in delta.added {
                    let _ = seen.send(Seen::Added(endpoint.address, now));
                }
            }
            None => {}
        }
    }
}

/// Opens a Watch of `service` (from no position: a snapshot first).
pub(crate) async fn open_watch(
    client: &mut RegistryClient<Channel>,
    service: &str,
) -> Result<tonic::Streaming<WatchResponse>, tonic::Status> {
    Ok(client
        .watch(WatchRequest {
            service: service.into(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// Waits until `n` watchers (`what`: watches, subscriptions) have sent
/// their first snapshot, failing after `timeout`.
pub(crate) async fn wait_opened(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    n: usize,
    what: &str,
    timeout: Duration,
) -> Result<(), BoxError> {
    let mut snapshots = 0;
    let deadline = Instant::now() + timeout;
    while snapshots < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Seen::Snapshot)) => snapshots += 1,
            Ok(Some(Seen::Added(..))) => {}
            _ => return Err(format!("only {snapshots} of {n} {what} opened").into()),
        }
    }
    Ok(())
}

/// When one registration reached the watchers.
pub(crate) struct Arrivals {
    /// When `Register` was sent.
    pub(crate) called: Instant,
    /// When it returned.
    pub(crate) returned: Instant,
    /// When each watcher that saw the endpoint in time saw it added.
    pub(crate) seen: Vec<Instant>,
}

/// Registers `address` (TTL 0) at `registrar`, then collects when each of
/// `n` watchers sees it added, for up to `timeout` after `Register`
/// returned; a watcher that has not seen it by then missed it.
pub(crate) async fn register_and_collect(
    registrar: &mut RegistryClient<Channel>,
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    address: String,
    n: usize,
    timeout: Duration,
) -> Result<Arrivals, BoxError> {
    let called = Instant::now();
    registrar
        .register(RegisterRequest {
            service: SERVICE.into(),
            address: address.clone(),
            metadata: Default::default(),
            ttl_ms: 0,
        })
        .await?;
    let returned = Instant::now();
    let mut seen = Vec::new();
    let deadline = returned + timeout;
    while seen.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Seen::Added(added, at))) if added == address => seen.push(at),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    Ok(Arrivals {
        called,
        returned,
        seen,
    })
}

pub(crate) async fn connect(registry: &str) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(format!("http://{registry}"))?
        .connect()
        .await?)
}

/// One watcher count against a fresh registry; adds a row to `table`.
async fn measure(config: &Config, n: usize, table: &mut Table) -> Result<(), BoxError> {
    let (registry_proc, registry) = Proc::registry();
    let mut registrar = RegistryClient::new(connect(&registry).await?);
    // Let the registry settle before the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = registry_proc.rss_kib();

    let mut channels = Vec::new();
    for _ in 0..config.connections {
        channels.push(connect(&registry).await?);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watchers = JoinSet::new();
    let opening = Instant::now();
    for i in 0..n {
        let client = RegistryClient::new(channels[i % channels.len()].clone());
        watchers.spawn(watcher(client, tx.clone()));
    }
    drop(tx);
    wait_opened(&mut rx, n, "watches", Duration::from_secs(60)).await?;
    let opened = opening.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_watched = registry_proc.rss_kib();

    let mut latency = Samples::default();
    let mut from_call = Samples::default();
    let mut early = 0;
    let mut missed = 0;
    for change in 0..config.changes {
        let address = format!("10.0.{}.{}:8080", change / 250, change % 250 + 1);
        let arrivals =
            register_and_collect(&mut registrar, &mut rx, address, n, Duration::from_secs(10))
                .await?;
        for &at in &arrivals.seen {
            early += usize::from(at < arrivals.returned);
            latency.push(at.saturating_duration_since(arrivals.returned));
            from_call.push(at.saturating_duration_since(arrivals.called));
        }
        missed += n - arrivals.seen.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watchers.abort_all();
    let rss_delta = rss_watched.saturating_sub(rss_idle);
    table.row(vec![
        n.to_string(),
        config.connections.to_string(),
        ms(opened),
        latency.len().to_string(),
        missed.to_string(),
        ms(latency.quantile(0.5)),
        ms(latency.quantile(0.99)),
        ms(latency.max()),
        format!("{early}"),
        ms(from_call.quantile(0.99)),
        format!("{:.1} MiB", rss_idle as f64 / 1024.0),
        format!("{:.1} MiB", rss_watched as f64 / 1024.0),
        format!("{:.1}", rss_delta as f64 / n as f64),
    ]);
    Ok(())
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 3. Registry fan-out\n");
    let mut table = Table::new(&[
        "watchers",
        "connections",
        "all watches open after",
        "deliveries",
        "missed",
        "p50",
        "p99",
        "max",
        "seen before Register returned",
        "p99 from Register sent",
        "registry RSS, 0 watchers",
        "with N watchers",
        "KiB per watcher",
    ]);
    for &n in &config.watchers {
        measure(config, n, &mut table).await?;
    }
    println!(
        "One service, watchers spread over {} HTTP/2 connections; {} registrations timed per row \
         (latency: from `Register` returning to a watcher holding the `added` delta, 0 when the \
         delta came first; also from `Register` being sent).\n",
        config.connections, config.changes
    );
    table.print();
    Ok(())
}
