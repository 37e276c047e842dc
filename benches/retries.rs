//! Section 9, retries (gRFC A6): the same faults and the same fault-free
//! data path, each with four clients side by side in one run:
//!
//! - **without retries**: no policy and no transparent resend of refused
//!   streams (what a channel did before A6 support);
//! - **transparent only**: the default, no service config;
//! - **retryPolicy**: 3 attempts on UNAVAILABLE;
//! - **hedging**: 3 attempts 20 ms apart, UNAVAILABLE non-fatal.
//!
//! The faults hit one of three echo processes under a constant open-loop
//! rate through round_robin (no outlier detection, so only the retries
//! differ): a SIGKILL, every call failing UNAVAILABLE, every call 200 ms
//! slower. The data path is section 1's closed loop at 64 in flight over
//! two backends, in interleaved rounds.

use std::time::Duration;

use switchboard::client::{BalancedChannel, ConnectivityState, PolicyKind, RetryStats};
use switchboard::proto::echo::echo_client::EchoClient;
use tokio::time::Instant;

use crate::datapath::{self, Client, Totals};
use crate::failover::{failures, wait_all_ready, Load, Shot, RPC_TIMEOUT};
use crate::procs::Proc;
use crate::stats::{ms, Samples, Table};
use crate::BoxError;

/// The load and how long to measure.
pub struct Config {
    /// RPCs per second, open loop, in the fault scenarios.
    pub rate: f64,
    /// Load before the kill, or before measuring.
    pub before: Duration,
    /// Load measured after the kill, or with the fault.
    pub window: Duration,
    /// RPCs in flight on the data path.
    pub concurrency: usize,
    /// Data-path rounds per contender.
    pub rounds: usize,
    /// Length of one data-path round.
    pub round: Duration,
}

/// The four clients compared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Without,
    Transparent,
    Retry,
    Hedging,
}

const MODES: [Mode; 4] = [Mode::Without, Mode::Transparent, Mode::Retry, Mode::Hedging];

/// The retry policy: A6's example shape, UNAVAILABLE only.
const RETRY_CONFIG: &str = r#"{"methodConfig": [{"name": [{}], "retryPolicy": {
    "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;

/// The hedging delay, but where a row says otherwise: the tests' 20 ms.
const HEDGING_DELAY: Duration = Duration::from_millis(20);

/// The hedging policy: 3 attempts `delay` apart.
fn hedging_config(delay: Duration) -> String {
    format!(
        r#"{{"methodConfig": [{{"name": [{{}}], "hedgingPolicy": {{
            "maxAttempts": 3, "hedgingDelay": "{:.6}s",
            "nonFatalStatusCodes": ["UNAVAILABLE"]}}}}]}}"#,
        delay.as_secs_f64()
    )
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Without => "without retries",
            Mode::Transparent => "transparent only",
            Mode::Retry => "retryPolicy",
            Mode::Hedging => "hedging",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Mode::Without => "without",
            Mode::Transparent => "transparent",
            Mode::Retry => "retry",
            Mode::Hedging => "hedging",
        }
    }

    /// A fresh round_robin client for `target`; `hedging_delay` is the
    /// hedging column's.
    fn channel(self, target: &str, hedging_delay: Duration) -> Result<BalancedChannel, BoxError> {
        let mut builder = BalancedChannel::builder(target)?
            .policy(PolicyKind::RoundRobin)
            // As in the failover section, so the SIGKILL rows compare.
            .keepalive(Duration::from_secs(1), Duration::from_secs(1));
        builder = match self {
            Mode::Without => builder.disable_retries().disable_transparent_retries(),
            Mode::Transparent => builder,
            Mode::Retry => builder.service_config_json(RETRY_CONFIG)?,
            Mode::Hedging => builder.service_config_json(&hedging_config(hedging_delay))?,
        };
        Ok(builder.build())
    }
}

/// What the client sent beyond one attempt per call.
fn extra_attempts(stats: &RetryStats) -> String {
    format!(
        "{} retries, {} transparent, {} hedges",
        stats.retries(),
        stats.transparent_retries(),
        stats.hedges()
    )
}

fn failed(shots: &[&Shot]) -> usize {
    shots.iter().filter(|s| s.result.is_err()).count()
}

/// Three fresh backends for `service`, the first started with `flags`.
fn backends(registry: &str, service: &str, flags: &[&str]) -> Vec<(Proc, String)> {
    (0..3)
        .map(|i| Proc::echo(registry, service, if i == 0 { flags } else { &[] }))
        .collect()
}

/// One cell of the fault table and one row of the detail table.
struct Cell {
    main: String,
    /// Calls that failed.
    failed: usize,
    detail: Vec<String>,
}

async fn kill(config: &Config, registry: &str, mode: Mode) -> Result<Cell, BoxError> {
    let service = format!("bench.retries-kill-{}", mode.slug());
    let backends = backends(registry, &service, &[]);
    let channel = mode.channel(&format!("registry://{registry}/{service}"), HEDGING_DELAY)?;
    wait_all_ready(&channel, 3).await?;
    let load = Load::start(&channel, config.rate);
    tokio::time::sleep(config.before).await;
    backends[0].0.signal(libc::SIGKILL);
    tokio::time::sleep(config.window).await;
    let shots = load.stop().await;
    drop(backends);
    Ok(failed_cell("SIGKILL one backend", mode, &shots, &channel))
}

async fn failing(config: &Config, registry: &str, mode: Mode) -> Result<Cell, BoxError> {
    let service = format!("bench.retries-fail-{}", mode.slug());
    let backends = backends(
        registry,
        &service,
        &["--fail-rate", "1", "--fail-code", "UNAVAILABLE"],
    );
    let channel = mode.channel(&format!("registry://{registry}/{service}"), HEDGING_DELAY)?;
    wait_all_ready(&channel, 3).await?;
    let load = Load::start(&channel, config.rate);
    tokio::time::sleep(config.window).await;
    let shots = load.stop().await;
    drop(backends);
    Ok(failed_cell(
        "one backend fails 100 % UNAVAILABLE",
        mode,
        &shots,
        &channel,
    ))
}

/// A fault row's cell: how many of `shots` failed, and what `channel`
/// sent beyond one attempt per call.
fn failed_cell(scenario: &str, mode: Mode, shots: &[Shot], channel: &BalancedChannel) -> Cell {
    Cell {
        failed: shots.iter().filter(|s| s.result.is_err()).count(),
        main: format!("**{}** of {}", failures(shots), shots.len()),
        detail: vec![
            scenario.into(),
            mode.name().into(),
            shots.len().to_string(),
            failures(shots),
            extra_attempts(channel.retry_stats()),
        ],
    }
}

/// The slow scenario's latencies: all measured calls, and those the fast
/// backends answered.
struct SlowRun {
    cell: Cell,
    all_p99: Duration,
    fast_p95: Duration,
    fast_p99: Duration,
}

/// The slow scenario: every backend takes `base`, one 200 ms more.
async fn slow(
    config: &Config,
    registry: &str,
    mode: Mode,
    base: Duration,
    hedging_delay: Duration,
) -> Result<SlowRun, BoxError> {
    let service = format!("bench.retries-slow-{}-{}", base.as_millis(), mode.slug());
    let (slow_delay, base_delay) = (
        format!("{}ms", (base + Duration::from_millis(200)).as_millis()),
        format!("{}ms", base.as_millis()),
    );
    let slow_flags = ["--delay", slow_delay.as_str()];
    let base_flags = ["--delay", base_delay.as_str()];
    let backends: Vec<(Proc, String)> = (0..3)
        .map(|i| {
            let flags: &[&str] = match i {
                0 => &slow_flags,
                _ if base.is_zero() => &[],
                _ => &base_flags,
            };
            Proc::echo(registry, &service, flags)
        })
        .collect();
    let slow_one = backends[0].1.clone();
    let channel = mode.channel(&format!("registry://{registry}/{service}"), hedging_delay)?;
    wait_all_ready(&channel, 3).await?;
    let load = Load::start(&channel, config.rate);
    tokio::time::sleep(config.before).await;
    let from = Instant::now();
    tokio::time::sleep(config.window).await;
    let shots = load.stop().await;
    drop(backends);
    let measured: Vec<&Shot> = shots.iter().filter(|s| s.sent >= from).collect();
    let (mut all, mut fast) = (Samples::default(), Samples::default());
    for shot in &measured {
        all.push(shot.done - shot.sent);
        if shot.result.as_ref().is_ok_and(|b| *b != slow_one) {
            fast.push(shot.done - shot.sent);
        }
    }
    let answered_slow = measured
        .iter()
        .filter(|s| s.result.as_ref().is_ok_and(|b| *b == slow_one))
        .count();
    let (all_p99, fast_p95, fast_p99) =
        (all.quantile(0.99), fast.quantile(0.95), fast.quantile(0.99));
    Ok(SlowRun {
        cell: Cell {
            failed: failed(&measured),
            main: format!("p50 {}, **p99 {}**", ms(all.quantile(0.5)), ms(all_p99)),
            detail: vec![
                "one backend +200 ms".into(),
                mode.name().into(),
                measured.len().to_string(),
                failed(&measured).to_string(),
                format!(
                    "{}; {:.1} % answered by the slow one",
                    extra_attempts(channel.retry_stats()),
                    answered_slow as f64 * 100.0 / measured.len().max(1) as f64
                ),
            ],
        },
        all_p99,
        fast_p95,
        fast_p99,
    })
}

/// The fault-free data path: one closed-loop client per mode over two
/// backends, interleaved rounds.
async fn data_path(config: &Config, registry: &str) -> Result<Vec<Totals>, BoxError> {
    let servers: Vec<(Proc, String)> = (0..2)
        .map(|_| Proc::echo(registry, "bench.retries-datapath", &[]))
        .collect();
    let target = format!("static:///{},{}", servers[0].1, servers[1].1);
    let mut clients = Vec::new();
    for mode in MODES {
        let channel = mode.channel(&target, HEDGING_DELAY)?;
        if channel.wait_ready(Duration::from_secs(20)).await != ConnectivityState::Ready {
            return Err(
                format!("{} never became ready: {:?}", mode.name(), channel.state()).into(),
            );
        }
        clients.push(Client::Switchboard(EchoClient::new(channel)));
    }
    let procs: Vec<Proc> = servers.into_iter().map(|(p, _)| p).collect();
    for client in &clients {
        let mut ignored = Totals::default();
        datapath::round(
            client,
            config.concurrency,
            config.round / 2,
            &procs,
            &mut ignored,
        )
        .await;
    }
    let mut totals: Vec<Totals> = clients.iter().map(|_| Totals::default()).collect();
    for r in 0..config.rounds {
        for k in 0..clients.len() {
            let i = (k + r) % clients.len();
            datapath::round(
                &clients[i],
                config.concurrency,
                config.round,
                &procs,
                &mut totals[i],
            )
            .await;
        }
    }
    Ok(totals)
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 9. Retries, hedging and transparent retry (gRFC A6)\n");
    let (_registry, registry) = Proc::registry();
    let mut details = Table::new(&["scenario", "client", "RPCs", "failed", "extra attempts"]);
    // The retryPolicy column's failures across the fault rows.
    let mut retry_failed = 0;
    let mut row = |name: &str, cells: Vec<Cell>, details: &mut Table| {
        let mut main = vec![name.to_owned()];
        for (mode, cell) in MODES.iter().zip(cells) {
            if *mode == Mode::Retry {
                retry_failed += cell.failed;
            }
            main.push(cell.main);
            details.row(cell.detail);
        }
        main
    };

    let mut cells = Vec::new();
    for mode in MODES {
        cells.push(kill(config, &registry, mode).await?);
    }
    let kill_row = row("SIGKILL one backend: failed RPCs", cells, &mut details);

    let mut cells = Vec::new();
    for mode in MODES {
        cells.push(failing(config, &registry, mode).await?);
    }
    let fail_row = row(
        &format!(
            "one backend fails 100 % UNAVAILABLE: failed RPCs over {:?}",
            config.window
        ),
        cells,
        &mut details,
    );

    // Hedging here waits for the fast backends' p95 as the run without
    // retries measured it ("The Tail at Scale"'s deferred hedge): at the
    // tests' 20 ms, the third of calls that start on the slow backend
    // would put the p99 at 20 ms or more.
    let mut runs = vec![
        slow(
            config,
            &registry,
            Mode::Without,
            Duration::ZERO,
            HEDGING_DELAY,
        )
        .await?,
    ];
    let hedging_delay = runs[0].fast_p95.max(Duration::from_micros(100));
    for mode in [Mode::Transparent, Mode::Retry, Mode::Hedging] {
        runs.push(slow(config, &registry, mode, Duration::ZERO, hedging_delay).await?);
    }
    let at_20 = slow(
        config,
        &registry,
        Mode::Hedging,
        Duration::ZERO,
        HEDGING_DELAY,
    )
    .await?;
    // The yardstick: how fast the fast backends answer when nothing hedges.
    let fast_p99 = runs[0].fast_p99;
    let hedged_p99 = runs[3].all_p99;
    let slow_row = row(
        &format!(
            "one backend +200 ms: latency (hedgingDelay {}, the fast backends' p95)",
            ms(hedging_delay)
        ),
        runs.into_iter().map(|r| r.cell).collect(),
        &mut details,
    );
    let mut at_20_row = at_20.cell.detail;
    at_20_row[1] = format!("hedging, hedgingDelay {}", ms(HEDGING_DELAY));
    at_20_row[4] = format!("{}; {}", at_20.cell.main.replace("**", ""), at_20_row[4]);
    details.row(at_20_row);

    // Loopback answers in a fraction of tokio's 1 ms timer tick, so no
    // hedge can fire at the p95 there; a 5 ms service time is closer to
    // a real backend's.
    let base = Duration::from_millis(5);
    let slow_base = slow(config, &registry, Mode::Without, base, HEDGING_DELAY).await?;
    let base_delay = slow_base.fast_p95;
    let hedged_base = slow(config, &registry, Mode::Hedging, base, base_delay).await?;
    let (base_fast_p99, base_hedged_p99) = (slow_base.fast_p99, hedged_base.all_p99);
    let mut base_row = vec![format!(
        "every backend {}, one +200 ms: latency (hedgingDelay {}, the fast backends' p95)",
        ms(base),
        ms(base_delay)
    )];
    base_row.push(slow_base.cell.main);
    base_row.extend(["-".to_owned(), "-".to_owned()]);
    base_row.push(hedged_base.cell.main);
    for mut detail in [slow_base.cell.detail, hedged_base.cell.detail] {
        detail[0] = format!("every backend {}, one +200 ms", ms(base));
        details.row(detail);
    }

    let mut totals = data_path(config, &registry).await?;
    let base_rate = totals[0].rate();
    let base_cpu = Totals::cpu_per_rpc(totals[0].client_cpu, totals[0].rpcs);
    let mut data_row = vec![format!(
        "data path at {} in flight, no faults: RPC/s, client CPU per RPC",
        config.concurrency
    )];
    for (mode, t) in MODES.iter().zip(totals.iter_mut()) {
        let cpu = Totals::cpu_per_rpc(t.client_cpu, t.rpcs);
        data_row.push(format!(
            "{:.0} RPC/s (×{:.3}), {cpu:.1} µs (×{:.2})",
            t.rate(),
            t.rate() / base_rate,
            cpu / base_cpu
        ));
        details.row(vec![
            "data path".into(),
            mode.name().into(),
            t.rpcs.to_string(),
            t.errors.to_string(),
            format!(
                "p50 {}, p99 {}",
                ms(t.latency.quantile(0.5)),
                ms(t.latency.quantile(0.99))
            ),
        ]);
    }

    let mut header = vec!["scenario"];
    header.extend(MODES.iter().map(|m| m.name()));
    let mut table = Table::new(&header);
    for r in [kill_row, fail_row, slow_row, base_row, data_row] {
        table.row(r);
    }
    table.print();
    let retry_rate = totals[2].rate() / base_rate;
    let within = |hedged: Duration, fast: Duration| {
        let ratio = hedged.as_secs_f64() / fast.as_secs_f64().max(1e-9);
        format!(
            "{} against {}: {ratio:.2}× ({})",
            ms(hedged),
            ms(fast),
            verdict(ratio <= 2.0)
        )
    };
    println!(
        "Targets: retryPolicy 0 failed in every fault row: {}. Hedging p99 within 2× of the fast \
         backends' p99 without retries: on loopback {}; at {} per call {}. RetryPolicy data \
         path within 5 % of without: ×{retry_rate:.3} ({}).\n",
        verdict(retry_failed == 0),
        within(hedged_p99, fast_p99),
        ms(base),
        within(base_hedged_p99, base_fast_p99),
        verdict(retry_rate >= 0.95),
    );
    details.print();
    println!(
        "{:.0} RPC/s open-loop over 3 echo processes through round_robin (no outlier detection), \
         RPC deadline {RPC_TIMEOUT:?}, a fresh client and backend set per cell; SIGKILL after {:?} \
         of load, then {:?} measured; the failing backend measured from the start for {:?}; the \
         slow backend measured for {:?} after {:?}. Data path: {} rounds of {:?} per client at \
         {} in flight over 2 backends, interleaved (order rotated each round); ratios against \
         \"without retries\".\n",
        config.rate,
        config.before,
        config.window,
        config.window,
        config.window,
        config.before,
        config.rounds,
        config.round,
        config.concurrency,
    );
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}
