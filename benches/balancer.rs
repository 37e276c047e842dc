//! Section 5, the balancer: what a client pays when many endpoints appear at
//! once, and what the number of Ready endpoints adds to each RPC.
//!
//! - (a) ramp: a resolver publishes N addresses in one go (round_robin);
//!   the time from `build()` until every one is Ready, and the client's CPU
//!   meanwhile, for growing N. A balancer that costs O(changed) per event
//!   costs the same per endpoint at every N; one that rebuilds its whole
//!   state per event costs N times more per endpoint at 10 N than at N.
//! - (b) per RPC: sequential unary echoes over a channel with 2 and with
//!   1,000 Ready endpoints, interleaved in rounds; the difference is what the
//!   endpoint count adds to an RPC (the pick, and touching a different
//!   connection each time).
//!
//! The backends are in-process echo servers ([`Backends`]) on a runtime and
//! thread of their own; the client runs on a current-thread runtime on a
//! dedicated thread, so `getrusage(RUSAGE_THREAD)` on that thread is the
//! whole client: the resolver and balancer tasks, every subchannel's
//! connect and HTTP/2 handshake, hyper's connection tasks and the RPCs.
//! The benchmark touches the client only through the API meant to last:
//! the builder with a custom resolver, `watch_state()` and `state().ready`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchboard::client::{BalancedChannel, Builder, PolicyKind, Resolver, StaticResolver};
use switchboard::echo::{EchoServerHandle, ServerConfig};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use tokio::runtime::Runtime;

use crate::procs;
use crate::stats::{Samples, Table};
use crate::BoxError;

/// The sizes to measure.
#[derive(Debug, Clone)]
pub struct Config {
    /// Endpoint counts for the ramp, ascending; one table row each.
    pub ramp_sizes: Vec<usize>,
    /// Ramps per size (fresh backends and client each); medians are shown.
    pub ramp_runs: usize,
    /// How long one ramp may take before the run fails.
    pub ramp_deadline: Duration,
    /// Ready endpoint counts for the per-RPC cost, e.g. 2 and 1,000.
    pub rpc_sizes: Vec<usize>,
    /// Measured rounds per size (one unmeasured warm-up round comes first).
    pub rounds: usize,
    /// Sequential unary RPCs per round.
    pub calls_per_round: usize,
}

/// The service name the channel reports in errors.
const SERVICE: &str = "bench.balancer";

/// The resolver under test: every address in one publication, as a registry
/// watch does when a large service first resolves. Kept to this one
/// function so that a change in how resolvers publish touches nothing else.
fn resolver(addresses: Vec<String>) -> Box<dyn Resolver> {
    Box::new(StaticResolver::new(addresses))
}

/// A round_robin channel over `addresses`; needs a tokio runtime.
fn channel(addresses: &[String]) -> BalancedChannel {
    Builder::with_resolver(SERVICE, resolver(addresses.to_vec()))
        .policy(PolicyKind::RoundRobin)
        .build()
}

/// Waits until `channel` has all `n` endpoints Ready, or `deadline` passes.
/// Returns when the first one became Ready, measured from `since`.
async fn wait_all_ready(
    channel: &BalancedChannel,
    n: usize,
    since: Instant,
    deadline: Duration,
) -> Result<Duration, BoxError> {
    let mut state = channel.watch_state();
    let mut first = None;
    let wait = async {
        loop {
            let ready = state.borrow_and_update().ready.len();
            if ready > 0 && first.is_none() {
                first = Some(since.elapsed());
            }
            if ready == n {
                return Ok(());
            }
            if state.changed().await.is_err() {
                return Err("the balancer stopped");
            }
        }
    };
    match tokio::time::timeout(deadline, wait).await {
        Ok(Ok(())) => Ok(first.unwrap_or_default()),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(format!(
            "{} of {n} endpoints Ready after {deadline:?}",
            channel.state().ready.len()
        )
        .into()),
    }
}

/// Echo servers on 127.0.0.1 (port 0 each), served by a one-worker runtime
/// of their own so that none of their work lands on the client's thread.
struct Backends {
    /// The servers; dropping one stops it at once.
    servers: Vec<EchoServerHandle>,
    /// Their addresses, in start order.
    addresses: Vec<String>,
    /// The backends' runtime; `None` once shut down.
    runtime: Option<Runtime>,
}

impl Backends {
    /// Starts `n` servers; returns once every one is accepting.
    fn start(n: usize) -> Result<Self, BoxError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-backends")
            .enable_all()
            .build()?;
        let servers = runtime.block_on(async {
            let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
            let mut servers = Vec::with_capacity(n);
            for _ in 0..n {
                servers.push(
                    EchoServerHandle::bind_and_start(any_port, ServerConfig::default()).await?,
                );
            }
            Ok::<_, BoxError>(servers)
        })?;
        let addresses = servers.iter().map(|s| s.address().to_owned()).collect();
        Ok(Self {
            servers,
            addresses,
            runtime: Some(runtime),
        })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.servers.clear();
        if let Some(runtime) = self.runtime.take() {
            // Waits for the servers' tasks, so the next measurement does not
            // share the machine with this set's teardown.
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A runtime for the client, on the calling thread only.
fn client_runtime() -> Result<Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// One ramp: from `build()` to every endpoint Ready.
struct Ramp {
    /// Until the first endpoint was Ready.
    first: Duration,
    /// Until all were.
    all: Duration,
    /// The client thread's CPU meanwhile.
    cpu: Duration,
}

/// Builds a channel over `addresses` and waits for all of them to be Ready.
/// Runs on the client thread, inside its runtime.
async fn ramp(addresses: &[String], deadline: Duration) -> Result<Ramp, BoxError> {
    let cpu0 = procs::thread_cpu();
    let started = Instant::now();
    let channel = channel(addresses);
    let first = wait_all_ready(&channel, addresses.len(), started, deadline).await?;
    let all = started.elapsed();
    let cpu = procs::thread_cpu() - cpu0;
    Ok(Ramp { first, all, cpu })
}

/// The ramps of one size.
struct RampRow {
    n: usize,
    runs: Vec<Ramp>,
}

/// What one channel's sequential RPCs cost, over all measured rounds.
#[derive(Default)]
struct RpcCost {
    /// Ready endpoints behind the channel.
    n: usize,
    latency: Samples,
    /// Client thread CPU over the measured rounds.
    cpu: Duration,
    calls: u64,
}

/// Sends `calls` unary echoes one after another; returns their latencies
/// and the client thread's CPU.
async fn sequential(
    client: &mut EchoClient<BalancedChannel>,
    calls: usize,
) -> Result<(Samples, Duration), BoxError> {
    let mut samples = Samples::default();
    let cpu0 = procs::thread_cpu();
    for _ in 0..calls {
        let sent = Instant::now();
        client
            .unary_echo(EchoRequest {
                message: "bench".into(),
            })
            .await?;
        samples.push(sent.elapsed());
    }
    Ok((samples, procs::thread_cpu() - cpu0))
}

/// Part (b): one channel per size over the first `n` of `addresses`, all
/// Ready, then interleaved rounds of sequential RPCs (order rotated each
/// round, so the machine's noise falls on every size alike).
async fn rpc_costs(addresses: &[String], config: &Config) -> Result<Vec<RpcCost>, BoxError> {
    let mut clients = Vec::new();
    let mut costs = Vec::new();
    for &n in &config.rpc_sizes {
        let channel = channel(&addresses[..n]);
        wait_all_ready(&channel, n, Instant::now(), config.ramp_deadline).await?;
        clients.push(EchoClient::new(channel));
        costs.push(RpcCost {
            n,
            ..RpcCost::default()
        });
    }
    // Round 0 warms every connection up and is not counted.
    for round in 0..=config.rounds {
        for k in 0..clients.len() {
            let i = (k + round) % clients.len();
            let (samples, cpu) = sequential(&mut clients[i], config.calls_per_round).await?;
            if round > 0 {
                costs[i].calls += samples.len() as u64;
                costs[i].latency.extend(samples);
                costs[i].cpu += cpu;
            }
        }
    }
    Ok(costs)
}

/// Everything the section measured.
struct Results {
    ramps: Vec<RampRow>,
    rpcs: Vec<RpcCost>,
}

/// Runs both parts; called on the client thread, outside any runtime.
fn measure(config: &Config) -> Result<Results, BoxError> {
    let mut ramps = Vec::new();
    for &n in &config.ramp_sizes {
        let mut runs = Vec::new();
        for _ in 0..config.ramp_runs {
            // Fresh backends and a fresh client runtime each time: nothing
            // from the previous ramp (closing connections, subchannel
            // tasks winding down) is billed to this one.
            let backends = Backends::start(n)?;
            let client = client_runtime()?;
            let result = client.block_on(ramp(&backends.addresses, config.ramp_deadline));
            drop(client);
            drop(backends);
            runs.push(result?);
        }
        ramps.push(RampRow { n, runs });
    }
    let largest = config.rpc_sizes.iter().copied().max().unwrap_or(0);
    let backends = Backends::start(largest)?;
    let client = client_runtime()?;
    let rpcs = client.block_on(rpc_costs(&backends.addresses, config));
    drop(client);
    drop(backends);
    Ok(Results { ramps, rpcs: rpcs? })
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 5. Balancer: 1,000 endpoints at once\n");
    let config = config.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let _ = tx.send(measure(&config).map_err(|e| e.to_string()));
        })?;
    let results = rx
        .await
        .map_err(|_| "the balancer benchmark's client thread panicked")??;
    print(results);
    Ok(())
}

/// The middle value (the upper one of an even count).
fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// `12.3 ms`, `456.7 µs`: one decimal at a readable scale.
fn fine(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros >= 1000.0 {
        format!("{:.1} ms", micros / 1000.0)
    } else {
        format!("{micros:.1} µs")
    }
}

fn print(mut results: Results) {
    let runs = results.ramps.first().map_or(0, |r| r.runs.len());
    println!(
        "(a) Ramp: one resolver publication of N addresses, round_robin, from `build()` \
         until `state().ready.len() == N`. Fresh in-process backends and client runtime \
         per run; medians of {runs} run(s). *Client CPU* is the client thread's \
         `getrusage(RUSAGE_THREAD)`: the resolver and balancer tasks, all N subchannels' \
         TCP connects and HTTP/2 handshakes, hyper's connection tasks (the backends run on \
         another thread). Linear cost keeps *CPU per endpoint* flat as N grows; a \
         quadratic term multiplies it by the growth in N.\n"
    );
    let mut table = Table::new(&[
        "endpoints",
        "first Ready",
        "all Ready",
        "all Ready (min-max)",
        "client CPU",
        "CPU per endpoint",
        "CPU per endpoint vs previous row",
    ]);
    let mut previous: Option<f64> = None;
    for row in &results.ramps {
        let all: Vec<Duration> = row.runs.iter().map(|r| r.all).collect();
        let cpu = median(row.runs.iter().map(|r| r.cpu).collect());
        let per_endpoint = cpu.as_secs_f64() * 1e6 / row.n.max(1) as f64;
        let versus = match previous {
            Some(before) => format!("× {:.2}", per_endpoint / before.max(1e-9)),
            None => "—".to_owned(),
        };
        previous = Some(per_endpoint);
        table.row(vec![
            row.n.to_string(),
            fine(median(row.runs.iter().map(|r| r.first).collect())),
            fine(median(all.clone())),
            format!(
                "{}-{}",
                fine(all.iter().copied().min().unwrap_or_default()),
                fine(all.iter().copied().max().unwrap_or_default())
            ),
            fine(cpu),
            format!("{per_endpoint:.1} µs"),
            versus,
        ]);
    }
    table.print();

    let calls = results.rpcs.first().map_or(0, |c| c.calls);
    println!(
        "(b) Per RPC: sequential unary echoes (one in flight) through round_robin channels \
         with 2 and with {} Ready endpoints on the same backends, {calls} RPCs each, in \
         interleaved rounds. *Client CPU* is the client thread's per RPC. The difference \
         between the rows is what the endpoint count adds to an RPC: the pick, plus a \
         different connection (colder caches) on every call.\n",
        results.rpcs.last().map_or(0, |c| c.n)
    );
    let mut table = Table::new(&[
        "Ready endpoints",
        "RPCs",
        "p50",
        "p90",
        "p99",
        "client CPU per RPC",
    ]);
    let mut rows = Vec::new();
    for cost in &mut results.rpcs {
        let latency = &mut cost.latency;
        let cpu_per_rpc = cost.cpu.as_secs_f64() * 1e9 / cost.calls.max(1) as f64;
        let p50 = latency.quantile(0.5);
        table.row(vec![
            cost.n.to_string(),
            cost.calls.to_string(),
            fine(p50),
            fine(latency.quantile(0.9)),
            fine(latency.quantile(0.99)),
            format!("{:.1} µs", cpu_per_rpc / 1000.0),
        ]);
        rows.push((cost.n, p50.as_nanos() as f64, cpu_per_rpc));
    }
    table.print();
    if let (Some(small), Some(large)) = (rows.first(), rows.last()) {
        if rows.len() > 1 {
            let (n0, p0, c0) = *small;
            let (n1, p1, c1) = *large;
            println!(
                "{n1} vs {n0} Ready endpoints: p50 {:+.0} ns per RPC (× {:.2}), client CPU \
                 {:+.0} ns per RPC (× {:.2}).\n",
                p1 - p0,
                p1 / p0.max(1.0),
                c1 - c0,
                c1 / c0.max(1.0)
            );
        }
    }
}
