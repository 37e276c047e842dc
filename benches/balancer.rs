//! Section 5, the balancer: what a client pays when many endpoints appear at
//! once, and what the number of Ready endpoints adds to each RPC.
//!
//! - (a) ramp: a resolver publishes N addresses in one go (round_robin);
//!   the time from `build()` until every one is Ready, and the client's CPU
//!   meanwhile, for N = 10, 100, 1,000. A balancer that costs O(changed)
//!   per event costs the same per added endpoint at every N; one that
//!   rebuilds its whole state per event costs 10 times more per added
//!   endpoint from 100 to 1,000 than from 10 to 100.
//! - (b) per RPC: sequential unary echoes over channels with 2 and with
//!   1,000 Ready endpoints, interleaved in rounds, next to a control of
//!   plain tonic channels rotated by the benchmark: the control's growth is
//!   what a colder connection on every call costs; switchboard's growth
//!   beyond it is its balancer's.
//!
//! The backends are in-process echo servers ([`Backends`]) on a runtime and
//! thread of their own; the client runs on a current-thread runtime on a
//! dedicated thread, so that thread's CPU clock is the whole client: the
//! resolver and balancer tasks, every subchannel's connect and HTTP/2
//! handshake, hyper's connection tasks and the RPCs. The benchmark touches
//! the client only through the API meant to last: the builder with a custom
//! resolver, `watch_state()` and `state().ready`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchboard::client::{BalancedChannel, Builder, PolicyKind, Resolver, StaticResolver};
use switchboard::echo::{EchoServerHandle, ServerConfig};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use tokio::runtime::Runtime;
use tonic::transport::{Channel, Endpoint};

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
    /// Of which the balancer task itself was busy.
    balancer: Duration,
    /// Pickers the balancer built on the way.
    pickers: u64,
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
    let stats = channel.balancer_stats();
    Ok(Ramp {
        first,
        all,
        cpu,
        balancer: stats.busy(),
        pickers: stats.pickers.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// The ramps of one size.
struct RampRow {
    n: usize,
    runs: Vec<Ramp>,
}

/// A client whose per-RPC cost is measured.
enum Client {
    /// A switchboard round_robin channel over n endpoints.
    Switchboard(EchoClient<BalancedChannel>),
    /// The control: one plain tonic `Channel` per endpoint, rotated by the
    /// benchmark itself. What it adds from 2 to n endpoints is the cost of
    /// a different (colder) connection on each call, without any balancer.
    Rotation {
        clients: Vec<EchoClient<Channel>>,
        next: usize,
    },
}

impl Client {
    /// A Ready switchboard channel over `addresses`.
    async fn switchboard(addresses: &[String], deadline: Duration) -> Result<Self, BoxError> {
        let channel = channel(addresses);
        wait_all_ready(&channel, addresses.len(), Instant::now(), deadline).await?;
        Ok(Client::Switchboard(EchoClient::new(channel)))
    }

    /// A connected tonic channel to each of `addresses`.
    async fn rotation(addresses: &[String]) -> Result<Self, BoxError> {
        let mut clients = Vec::with_capacity(addresses.len());
        for address in addresses {
            let channel = Endpoint::from_shared(format!("http://{address}"))?
                .connect()
                .await?;
            clients.push(EchoClient::new(channel));
        }
        Ok(Client::Rotation { clients, next: 0 })
    }

    async fn echo(&mut self) -> Result<(), tonic::Status> {
        let request = EchoRequest {
            message: "bench".into(),
        };
        match self {
            Client::Switchboard(client) => client.unary_echo(request).await.map(drop),
            Client::Rotation { clients, next } => {
                *next = (*next + 1) % clients.len();
                clients[*next].unary_echo(request).await.map(drop)
            }
        }
    }
}

/// What one client's sequential RPCs cost, over all measured rounds.
struct RpcCost {
    /// Endpoints behind the client.
    n: usize,
    /// Whether this is the tonic control rather than switchboard.
    control: bool,
    latency: Samples,
    /// Client thread CPU over the measured rounds.
    cpu: Duration,
    calls: u64,
}

impl RpcCost {
    fn new(n: usize, control: bool) -> Self {
        Self {
            n,
            control,
            latency: Samples::default(),
            cpu: Duration::ZERO,
            calls: 0,
        }
    }
}

/// Sends `calls` unary echoes one after another; returns their latencies
/// and the client thread's CPU.
async fn sequential(client: &mut Client, calls: usize) -> Result<(Samples, Duration), BoxError> {
    let mut samples = Samples::default();
    let cpu0 = procs::thread_cpu();
    for _ in 0..calls {
        let sent = Instant::now();
        client.echo().await?;
        samples.push(sent.elapsed());
    }
    Ok((samples, procs::thread_cpu() - cpu0))
}

/// Part (b): for each size n, a switchboard channel and the tonic control
/// over the first n of `addresses`, all connected, then interleaved rounds
/// of sequential RPCs (order rotated each round, so the machine's noise
/// falls on every client alike).
async fn rpc_costs(addresses: &[String], config: &Config) -> Result<Vec<RpcCost>, BoxError> {
    let mut clients = Vec::new();
    let mut costs = Vec::new();
    for &n in &config.rpc_sizes {
        clients.push(Client::switchboard(&addresses[..n], config.ramp_deadline).await?);
        costs.push(RpcCost::new(n, false));
    }
    for &n in &config.rpc_sizes {
        clients.push(Client::rotation(&addresses[..n]).await?);
        costs.push(RpcCost::new(n, true));
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
    /// Part (a), one row per endpoint count.
    ramps: Vec<RampRow>,
    /// Part (b): the switchboard clients by size, then the controls.
    rpcs: Vec<RpcCost>,
}

/// Runs both parts; called on the client thread, outside any runtime.
fn measure(config: &Config) -> Result<Results, BoxError> {
    // One unmeasured ramp first: the process's first runtime, connections
    // and allocations cost more than any later ones.
    if let Some(&n) = config.ramp_sizes.first() {
        let backends = Backends::start(n)?;
        client_runtime()?.block_on(ramp(&backends.addresses, config.ramp_deadline))?;
    }
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

/// Runs the section on a client thread of its own (the harness's runtime
/// stays out of the measurement) and prints its tables.
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
fn median_count(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

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
         per run, after one unmeasured warm-up ramp; medians of {runs} runs. *Client CPU* \
         is the client thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`): the resolver and balancer \
         tasks, all N subchannels' TCP connects and HTTP/2 handshakes, hyper's connection \
         tasks (the backends run on another thread). *Marginal CPU per endpoint* is \
         (CPU(N) - CPU(previous N)) / (N - previous N): flat when the cost is linear, \
         growing with N when there is a quadratic term.\n"
    );
    let mut table = Table::new(&[
        "endpoints",
        "first Ready",
        "all Ready",
        "all Ready (min-max)",
        "client CPU",
        "CPU per endpoint",
        "marginal CPU per endpoint",
        "balancer task busy",
        "pickers built",
    ]);
    let mut previous: Option<(usize, Duration)> = None;
    let mut marginals = Vec::new();
    for row in &results.ramps {
        let all: Vec<Duration> = row.runs.iter().map(|r| r.all).collect();
        let cpu = median(row.runs.iter().map(|r| r.cpu).collect());
        let per_endpoint = cpu.as_secs_f64() * 1e6 / row.n.max(1) as f64;
        let marginal = match previous {
            Some((n0, cpu0)) if row.n > n0 => {
                let marginal = (cpu.as_secs_f64() - cpu0.as_secs_f64()) * 1e6 / (row.n - n0) as f64;
                marginals.push((n0, row.n, marginal));
                format!("{marginal:.1} µs")
            }
            _ => "—".to_owned(),
        };
        previous = Some((row.n, cpu));
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
            marginal,
            fine(median(row.runs.iter().map(|r| r.balancer).collect())),
            median_count(row.runs.iter().map(|r| r.pickers).collect()).to_string(),
        ]);
    }
    table.print();
    for pair in marginals.windows(2) {
        let ((a0, a1, a), (b0, b1, b)) = (pair[0], pair[1]);
        println!(
            "Marginal CPU per endpoint from {b0} to {b1} is × {:.2} that from {a0} to {a1} \
             (≈ 1 if linear, ≈ {:.0} if quadratic).\n",
            b / a.max(1e-9),
            (b0 + b1) as f64 / (a0 + a1).max(1) as f64
        );
    }

    let calls = results.rpcs.first().map_or(0, |c| c.calls);
    println!(
        "(b) Per RPC: sequential unary echoes (one in flight), {calls} per client, in \
         interleaved rounds, through switchboard round_robin channels and, as a control, \
         through plain tonic `Channel`s (one per endpoint) that the benchmark rotates \
         itself, all on the same backends. *Client CPU* is the client thread's CPU time per RPC. \
         The control's growth with the endpoint count is what a different (colder) \
         connection on every call costs without any balancer; switchboard's growth beyond \
         it is what its balancer adds per RPC.\n"
    );
    let mut table = Table::new(&[
        "client",
        "endpoints",
        "RPCs",
        "p50",
        "p90",
        "p99",
        "client CPU per RPC",
    ]);
    // (control, n, p50 ns, CPU ns per RPC)
    let mut rows = Vec::new();
    for cost in &mut results.rpcs {
        let cpu_per_rpc = cost.cpu.as_secs_f64() * 1e9 / cost.calls.max(1) as f64;
        let p50 = cost.latency.quantile(0.5);
        table.row(vec![
            if cost.control {
                "control: tonic Channels rotated".to_owned()
            } else {
                "switchboard round_robin".to_owned()
            },
            cost.n.to_string(),
            cost.calls.to_string(),
            fine(p50),
            fine(cost.latency.quantile(0.9)),
            fine(cost.latency.quantile(0.99)),
            format!("{:.1} µs", cpu_per_rpc / 1000.0),
        ]);
        rows.push((cost.control, cost.n, p50.as_nanos() as f64, cpu_per_rpc));
    }
    table.print();
    let growth = |control: bool| {
        let mine: Vec<_> = rows.iter().filter(|r| r.0 == control).collect();
        let (small, large) = (mine.first()?, mine.last()?);
        (small.1 < large.1).then_some((small.1, large.1, large.2 - small.2, large.3 - small.3))
    };
    if let (Some((n0, n1, p, c)), Some((_, _, cp, cc))) = (growth(false), growth(true)) {
        println!(
            "From {n0} to {n1} endpoints: switchboard p50 {p:+.0} ns and client CPU {c:+.0} ns \
             per RPC; the control {cp:+.0} ns and {cc:+.0} ns. Switchboard's own addition: \
             p50 {:+.0} ns, client CPU {:+.0} ns per RPC.\n",
            p - cp,
            c - cc
        );
    }
}
