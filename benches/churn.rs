//! Section 4, registry churn and scale: N leases registered and heartbeating
//! at the default interval (TTL 5 s, a heartbeat every 1.6 s) over a few
//! KeepAlive streams, then the same plus a steady rate of registrations and
//! deregistrations. Reports the registry child's CPU (from /proc) and its
//! resident memory per endpoint.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{
    DeregisterRequest, KeepAliveRequest, RegisterRequest, ResolveRequest,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::procs::Proc;
use crate::stats::Table;
use crate::BoxError;

pub struct Config {
    /// Heartbeating leases.
    pub leases: usize,
    /// KeepAlive streams carrying them (one connection each).
    pub streams: usize,
    /// Registrations (and as many deregistrations) per second in the churn
    /// phase.
    pub churn_per_sec: u64,
    /// Length of each measured phase.
    pub window: Duration,
}

/// Endpoints per service: the registry caps a service at 10,000.
pub(crate) const PER_SERVICE: usize = 1000;
/// Heartbeat pacing: every tick, one slot's share of each stream's leases.
const TICK: Duration = Duration::from_millis(100);
/// Ticks per heartbeat round: 16 × 100 ms = 1.6 s, a little under TTL/3.
const SLOTS: usize = 16;
/// Each lease's heartbeat interval: `SLOTS × TICK`.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(100 * SLOTS as u64);

/// The n-th distinct endpoint address.
pub(crate) fn address(n: usize) -> String {
    format!("10.{}.{}.{}:7000", n / 62_500, (n / 250) % 250, n % 250 + 1)
}

/// Counters of the heartbeat streams.
#[derive(Default)]
pub(crate) struct Beats {
    pub(crate) acks: AtomicU64,
    pub(crate) errors: AtomicU64,
}

/// One KeepAlive stream and the leases it carries.
pub(crate) struct Stream {
    pub(crate) send: mpsc::Sender<KeepAliveRequest>,
    pub(crate) leases: Arc<Mutex<Vec<String>>>,
}

pub(crate) async fn opened_stream(
    channel: Channel,
    beats: Arc<Beats>,
    tasks: &mut JoinSet<()>,
) -> Result<Stream, BoxError> {
    let (send, requests) = mpsc::channel(16 * 1024);
    let mut replies = RegistryClient::new(channel)
        .keep_alive(ReceiverStream::new(requests))
        .await?
        .into_inner();
    tasks.spawn(async move {
        loop {
            match replies.message().await {
                Ok(Some(_)) => beats.acks.fetch_add(1, Ordering::Relaxed),
                Ok(None) => break,
                Err(status) => {
                    eprintln!("keepalive stream ended: {status}");
                    beats.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
        }
    });
    Ok(Stream {
        send,
        leases: Arc::new(Mutex::new(Vec::new())),
    })
}

/// Where a stream's heartbeats go, and the lease ids they name.
pub(crate) type Rotation = (mpsc::Sender<KeepAliveRequest>, Arc<Mutex<Vec<String>>>);

/// Sends each stream's leases a heartbeat every `SLOTS × TICK`, spread
/// evenly over the ticks.
pub(crate) async fn heartbeat(streams: Vec<Rotation>) {
    let mut tick = tokio::time::interval(TICK);
    for slot in (0..SLOTS).cycle() {
        tick.tick().await;
        for (send, leases) in &streams {
            let due: Vec<String> = leases
                .lock()
                .unwrap()
                .iter()
                .skip(slot)
                .step_by(SLOTS)
                .cloned()
                .collect();
            for lease_id in due {
                if send.send(KeepAliveRequest { lease_id }).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn connect(registry: &str) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(format!("http://{registry}"))?
        .connect()
        .await?)
}

/// Registers and deregisters `per_sec` endpoints per second in its own
/// service, keeping half a second's worth registered; returns the ops
/// done and the errors.
async fn churn(mut client: RegistryClient<Channel>, per_sec: u64, window: Duration) -> (u64, u64) {
    let mut live = VecDeque::new();
    let (mut ops, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut registered = 0u64;
    while start.elapsed() < window {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * per_sec as f64) as u64;
        while registered < due {
            let reply = client
                .register(RegisterRequest {
                    service: "bench.churn".into(),
                    address: address(registered as usize),
                    metadata: Default::default(),
                    ttl_ms: 0,
                })
                .await;
            registered += 1;
            ops += 1;
            match reply {
                Ok(reply) => live.push_back(reply.into_inner().lease_id),
                Err(_) => errors += 1,
            }
            if live.len() as u64 > per_sec / 2 {
                let lease_id = live.pop_front().expect("not empty");
                ops += 1;
                if client
                    .deregister(DeregisterRequest { lease_id })
                    .await
                    .is_err()
                {
                    errors += 1;
                }
            }
        }
    }
    (ops, errors)
}

/// Registers leases `0..count` with TTL 0, 32 at a time, lease `n` as
/// [`address`]`(n)` of `{service_prefix}-{n / PER_SERVICE}` through the
/// channel `channel(n)`; hands each lease to `registered` as soon as it
/// exists (so it joins a heartbeat rotation at once). Returns how many
/// registrations failed.
pub(crate) async fn register_leases(
    count: usize,
    service_prefix: &str,
    channel: impl Fn(usize) -> Channel,
    mut registered: impl FnMut(usize, String),
) -> usize {
    let mut next = 0;
    let mut errors = 0;
    let mut in_progress = JoinSet::new();
    while next < count || !in_progress.is_empty() {
        while next < count && in_progress.len() < 32 {
            let mut client = RegistryClient::new(channel(next));
            let n = next;
            let service = format!("{service_prefix}-{}", n / PER_SERVICE);
            in_progress.spawn(async move {
                let reply = client
                    .register(RegisterRequest {
                        service,
                        address: address(n),
                        metadata: Default::default(),
                        ttl_ms: 0,
                    })
                    .await;
                (n, reply.map(|r| r.into_inner().lease_id))
            });
            next += 1;
        }
        match in_progress.join_next().await {
            Some(Ok((n, Ok(lease_id)))) => registered(n, lease_id),
            _ => errors += 1,
        }
    }
    errors
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 4. Registry churn and scale\n");
    let (registry_proc, registry) = Proc::registry();
    let channel = connect(&registry).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = registry_proc.rss_kib();

    let beats = Arc::new(Beats::default());
    let mut tasks = JoinSet::new();
    let mut streams = Vec::new();
    for _ in 0..config.streams {
        streams.push(opened_stream(connect(&registry).await?, beats.clone(), &mut tasks).await?);
    }
    tasks.spawn(heartbeat(
        streams
            .iter()
            .map(|s| (s.send.clone(), s.leases.clone()))
            .collect(),
    ));

    // Register every lease, 32 at a time; each joins a stream's heartbeat
    // rotation as soon as it exists.
    let registering = Instant::now();
    let register_errors = register_leases(
        config.leases,
        "bench.scale",
        |_| channel.clone(),
        |n, lease_id| {
            streams[n % streams.len()]
                .leases
                .lock()
                .unwrap()
                .push(lease_id)
        },
    )
    .await;
    let registered_in = registering.elapsed();

    // A full heartbeat round (and a bit) so every lease is bound to its
    // stream and the registry is in its steady state.
    tokio::time::sleep(HEARTBEAT + Duration::from_secs(1)).await;
    let rss_loaded = registry_proc.rss_kib();

    let mut table = Table::new(&[
        "phase",
        "registry CPU (% of one core)",
        "heartbeats/s acked",
        "register+deregister/s",
        "errors",
    ]);
    let acks0 = beats.acks.load(Ordering::Relaxed);
    let (cpu0, start) = (registry_proc.cpu(), Instant::now());
    tokio::time::sleep(config.window).await;
    let (cpu, elapsed) = (registry_proc.cpu() - cpu0, start.elapsed());
    let acks = beats.acks.load(Ordering::Relaxed) - acks0;
    let percent = |cpu: Duration, elapsed: Duration| {
        format!("{:.1}", cpu.as_secs_f64() * 100.0 / elapsed.as_secs_f64())
    };
    table.row(vec![
        format!("{} leases heartbeating", config.leases),
        percent(cpu, elapsed),
        format!("{:.0}", acks as f64 / elapsed.as_secs_f64()),
        "0".to_owned(),
        beats.errors.load(Ordering::Relaxed).to_string(),
    ]);

    let acks0 = beats.acks.load(Ordering::Relaxed);
    let (cpu0, start) = (registry_proc.cpu(), Instant::now());
    let churner = RegistryClient::new(connect(&registry).await?);
    let (ops, churn_errors) = churn(churner, config.churn_per_sec, config.window).await;
    let (cpu, elapsed) = (registry_proc.cpu() - cpu0, start.elapsed());
    let acks = beats.acks.load(Ordering::Relaxed) - acks0;
    table.row(vec![
        format!(
            "the same + {}/s registrations and deregistrations",
            config.churn_per_sec
        ),
        percent(cpu, elapsed),
        format!("{:.0}", acks as f64 / elapsed.as_secs_f64()),
        format!("{:.0}", ops as f64 / elapsed.as_secs_f64()),
        (churn_errors + beats.errors.load(Ordering::Relaxed)).to_string(),
    ]);

    // Every heartbeated lease must still be there.
    let mut resolver = RegistryClient::new(channel.clone());
    let mut live = 0;
    for service in 0..config.leases.div_ceil(PER_SERVICE) {
        live += resolver
            .resolve(ResolveRequest {
                service: format!("bench.scale-{service}"),
            })
            .await?
            .into_inner()
            .endpoints
            .len();
    }
    tasks.abort_all();

    let per_endpoint = rss_loaded.saturating_sub(rss_idle) as f64 / config.leases as f64;
    println!(
        "{} leases over {} KeepAlive streams in {} services, registered in {:.2} s \
         ({:.0}/s, 32 in flight, {register_errors} errors); {live} of them still registered \
         at the end. Registry RSS {:.1} MiB idle, {:.1} MiB with the leases: \
         **{per_endpoint:.2} KiB per endpoint** (target ≤ 2 KiB: {}).\n",
        config.leases,
        config.streams,
        config.leases.div_ceil(PER_SERVICE),
        registered_in.as_secs_f64(),
        config.leases as f64 / registered_in.as_secs_f64(),
        rss_idle as f64 / 1024.0,
        rss_loaded as f64 / 1024.0,
        if per_endpoint <= 2.0 { "met" } else { "missed" },
    );
    table.print();
    Ok(())
}
