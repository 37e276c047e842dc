//! Section 1, the data path: unary echo at a fixed number of RPCs in flight
//! through four channels, run in interleaved rounds so the machine's noise
//! falls on every contender alike.
//!
//! - (a) a plain tonic `Channel` to one backend: the ceiling;
//! - (b) tonic's `Channel::balance_list` over both backends;
//! - (c) switchboard round_robin over both (a `static:///` target, so the
//!   registry is not in the data path);
//! - (d) switchboard pick_first over both;
//! - (e) a plain tonic `Channel` over TLS to one TLS backend, and (f)
//!   switchboard round_robin over TLS to two: what TLS costs each.
//!
//! The backends are echo child processes, so the CPU this process uses
//! (getrusage) is the client's alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard::client::{BalancedChannel, ConnectivityState, PolicyKind};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use switchboard::tls::ClientTls;
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::pki;
use crate::procs::{self, Proc};
use crate::stats::{ms, Samples, Table};
use crate::BoxError;

/// How long and how often to measure.
pub struct Config {
    /// RPCs in flight, one table block each.
    pub concurrency: Vec<usize>,
    /// Rounds per contender and concurrency.
    pub rounds: usize,
    /// Length of one round.
    pub round: Duration,
    /// Unmeasured load per contender before the first round.
    pub warmup: Duration,
}

/// One contender's client; the enum keeps the load loop free of tonic's
/// generic bounds.
#[derive(Clone)]
pub(crate) enum Client {
    Tonic(EchoClient<Channel>),
    Switchboard(EchoClient<BalancedChannel>),
    /// A switchboard client whose every call carries a key in the
    /// [`KEY_HEADER`] header, one of [`KEYS`] at random: what ring_hash
    /// hashes (section 10), sent by its round_robin baseline too so both
    /// pay for the header.
    Keyed(EchoClient<BalancedChannel>),
}

/// The header a [`Client::Keyed`] call carries its key in.
pub(crate) const KEY_HEADER: &str = "x-key";
/// How many keys a [`Client::Keyed`] draws from.
const KEYS: u32 = 1024;

impl Client {
    async fn echo(&mut self) -> Result<(), tonic::Status> {
        let request = EchoRequest {
            message: "bench".into(),
        };
        match self {
            Client::Tonic(c) => c.unary_echo(request).await.map(drop),
            Client::Switchboard(c) => c.unary_echo(request).await.map(drop),
            Client::Keyed(c) => {
                let mut request = tonic::Request::new(request);
                let key = format!("user-{}", rand::random_range(0..KEYS));
                request
                    .metadata_mut()
                    .insert(KEY_HEADER, key.parse().expect("an ASCII key"));
                c.unary_echo(request).await.map(drop)
            }
        }
    }
}

/// What one contender did over all its rounds at one concurrency.
#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) rpcs: u64,
    pub(crate) errors: u64,
    elapsed: Duration,
    pub(crate) client_cpu: Duration,
    server_cpu: Duration,
    pub(crate) latency: Samples,
    /// RPC/s of each round, in round order, for per-round ratios.
    per_round: Vec<f64>,
}

impl Totals {
    pub(crate) fn rate(&self) -> f64 {
        self.rpcs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn cpu_per_rpc(cpu: Duration, rpcs: u64) -> f64 {
        cpu.as_secs_f64() * 1e6 / rpcs.max(1) as f64
    }
}

/// The `x/y per round (min-max)` cell: the range of x's RPC/s over y's in
/// the same round index.
pub(crate) fn per_round(x: &Totals, y: &Totals) -> String {
    let r: Vec<f64> = x
        .per_round
        .iter()
        .zip(&y.per_round)
        .map(|(x, y)| x / y)
        .collect();
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(0.0, f64::max);
    format!("{min:.2}-{max:.2}")
}

/// Runs `concurrency` closed-loop workers on `client` for `duration`.
pub(crate) async fn round(
    client: &Client,
    concurrency: usize,
    duration: Duration,
    servers: &[Proc],
    totals: &mut Totals,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let server_cpu = |servers: &[Proc]| servers.iter().map(Proc::cpu).sum::<Duration>();
    let (cpu0, server0, start) = (procs::self_cpu(), server_cpu(servers), Instant::now());
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut samples, mut errors) = (Samples::default(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match client.echo().await {
                        Ok(()) => samples.push(sent.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut rpcs = 0;
    for worker in workers {
        let (samples, errors) = worker.await.expect("load worker");
        rpcs += samples.len() as u64;
        totals.errors += errors;
        totals.latency.extend(samples);
    }
    let elapsed = start.elapsed();
    totals.rpcs += rpcs;
    totals.elapsed += elapsed;
    totals.client_cpu += procs::self_cpu() - cpu0;
    totals.server_cpu += server_cpu(servers).saturating_sub(server0);
    totals.per_round.push(rpcs as f64 / elapsed.as_secs_f64());
}

/// Builds the six contenders against plaintext backends `a` and `b` and
/// TLS backends `tls` (whose CA is in `pki_dir`).
async fn contenders(
    a: &str,
    b: &str,
    tls: [&str; 2],
    pki_dir: &std::path::Path,
) -> Result<Vec<(&'static str, Client)>, BoxError> {
    let endpoint = |addr: &str| Endpoint::from_shared(format!("http://{addr}"));
    let plain = endpoint(a)?.connect().await?;
    let balanced = Channel::balance_list([endpoint(a)?, endpoint(b)?].into_iter());
    let mut list = vec![
        (
            "(a) tonic Channel, 1 backend",
            Client::Tonic(EchoClient::new(plain)),
        ),
        (
            "(b) tonic balance_list, 2 backends",
            Client::Tonic(EchoClient::new(balanced)),
        ),
    ];
    for (name, policy) in [
        ("(c) switchboard round_robin", PolicyKind::RoundRobin),
        ("(d) switchboard pick_first", PolicyKind::PickFirst),
    ] {
        let channel = BalancedChannel::builder(&format!("static:///{a},{b}"))?
            .policy(policy)
            .build();
        if channel.wait_ready(Duration::from_secs(20)).await != ConnectivityState::Ready {
            return Err(format!("{name} never became ready: {:?}", channel.state()).into());
        }
        list.push((name, Client::Switchboard(EchoClient::new(channel))));
    }
    let ca = std::fs::read(pki_dir.join("ca.crt"))?;
    let tonic_tls = Endpoint::from_shared(format!("https://{}", tls[0]))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?
        .connect()
        .await?;
    list.push((
        "(e) tonic Channel over TLS, 1 backend",
        Client::Tonic(EchoClient::new(tonic_tls)),
    ));
    let name = "(f) switchboard round_robin over TLS";
    let channel = BalancedChannel::builder(&format!("static:///{},{}", tls[0], tls[1]))?
        .tls(ClientTls::from_files(&pki_dir.join("ca.crt"), None)?)
        .build();
    if channel.wait_ready(Duration::from_secs(20)).await != ConnectivityState::Ready {
        return Err(format!("{name} never became ready: {:?}", channel.state()).into());
    }
    list.push((name, Client::Switchboard(EchoClient::new(channel))));
    Ok(list)
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 1. Data path: unary echo at fixed concurrency\n");
    let (_registry, registry) = Proc::registry();
    let (server_a, a) = Proc::echo(&registry, "bench.datapath", &[]);
    let (server_b, b) = Proc::echo(&registry, "bench.datapath", &[]);
    let pki_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-pki-{}", std::process::id()));
    std::fs::create_dir_all(&pki_dir)?;
    pki::write_files(&pki_dir);
    let cert = pki_dir.join("server.crt").to_string_lossy().into_owned();
    let key = pki_dir.join("server.key").to_string_lossy().into_owned();
    let tls_flags = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let (server_c, c) = Proc::echo(&registry, "bench.datapath.tls", &tls_flags);
    let (server_d, d) = Proc::echo(&registry, "bench.datapath.tls", &tls_flags);
    let servers = [server_a, server_b, server_c, server_d];
    let contenders = contenders(&a, &b, [&c, &d], &pki_dir).await;
    let _ = std::fs::remove_dir_all(&pki_dir);
    let contenders = contenders?;
    for (_, client) in &contenders {
        let mut ignored = Totals::default();
        let max = config.concurrency.iter().copied().max().unwrap_or(1);
        round(client, max, config.warmup, &servers, &mut ignored).await;
    }

    let mut table = Table::new(&[
        "in flight",
        "contender",
        "RPC/s",
        "p50",
        "p99",
        "p99.9",
        "client CPU µs/RPC",
        "servers' CPU µs/RPC",
        "errors",
    ]);
    let mut ratios = Table::new(&[
        "in flight",
        "c/a RPC/s",
        "c/a per round (min-max)",
        "c/b RPC/s",
        "c/b per round (min-max)",
        "c/a client CPU per RPC",
        "d/a RPC/s",
        "e/a RPC/s (TLS cost, tonic)",
        "f/c RPC/s (TLS cost, switchboard)",
        "f/e RPC/s",
        "targets (c/a ≥ 0.95, c/b ≥ 1.0)",
    ]);
    for &concurrency in &config.concurrency {
        let mut totals: Vec<Totals> = contenders.iter().map(|_| Totals::default()).collect();
        for r in 0..config.rounds {
            // Rotate the order each round so no contender always goes first.
            for k in 0..contenders.len() {
                let i = (k + r) % contenders.len();
                round(
                    &contenders[i].1,
                    concurrency,
                    config.round,
                    &servers,
                    &mut totals[i],
                )
                .await;
            }
        }
        for ((name, _), t) in contenders.iter().zip(totals.iter_mut()) {
            table.row(vec![
                concurrency.to_string(),
                name.to_string(),
                format!("{:.0}", t.rate()),
                ms(t.latency.quantile(0.5)),
                ms(t.latency.quantile(0.99)),
                ms(t.latency.quantile(0.999)),
                format!("{:.1}", Totals::cpu_per_rpc(t.client_cpu, t.rpcs)),
                format!("{:.1}", Totals::cpu_per_rpc(t.server_cpu, t.rpcs)),
                t.errors.to_string(),
            ]);
        }
        let (ta, tb, tc, td) = (&totals[0], &totals[1], &totals[2], &totals[3]);
        let (te, tf) = (&totals[4], &totals[5]);
        let (ca, cb) = (tc.rate() / ta.rate(), tc.rate() / tb.rate());
        let verdict = if concurrency == 64 {
            format!(
                "c/a {}, c/b {}",
                if ca >= 0.95 { "met" } else { "missed" },
                if cb >= 1.0 { "met" } else { "missed" }
            )
        } else {
            "(targets are for 64)".to_owned()
        };
        ratios.row(vec![
            concurrency.to_string(),
            format!("{ca:.3}"),
            per_round(tc, ta),
            format!("{cb:.3}"),
            per_round(tc, tb),
            format!(
                "{:.2}",
                Totals::cpu_per_rpc(tc.client_cpu, tc.rpcs)
                    / Totals::cpu_per_rpc(ta.client_cpu, ta.rpcs)
            ),
            format!("{:.3}", td.rate() / ta.rate()),
            format!("{:.3}", te.rate() / ta.rate()),
            format!("{:.3}", tf.rate() / tc.rate()),
            format!("{:.3}", tf.rate() / te.rate()),
            verdict,
        ]);
    }
    println!(
        "{} rounds of {:?} per contender and concurrency, interleaved (order rotated each round).\n",
        config.rounds, config.round
    );
    table.print();
    println!("Ratios (aggregate over all rounds; per round: the same round index of each):\n");
    ratios.print();
    Ok(())
}
