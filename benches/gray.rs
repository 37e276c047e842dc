//! Section 6, grey failures: one of three backends is up but not well, at a
//! constant open-loop rate, and each policy is measured side by side with
//! round_robin on a fresh client and backend set:
//!
//! - **hung** (SIGSTOP): RPCs that failed in a fixed window after the stop;
//! - **failing** (every call UNAVAILABLE): failures before the ejection,
//!   time from the first failure to the ejection, failures after it;
//! - **slow** (+50 ms per call): p50 and p99 latency;
//! - **weights 1:2:3**: the share of calls each backend served.
//!
//! Hung and weighted backends are echo processes. Failing and slow ones are
//! echo processes with `--fail-rate` / `--delay` when the echo binary has
//! them, else in-process echo servers with the same faults (the table says
//! which).

use std::collections::BTreeMap;
use std::time::Duration;

use switchboard::client::{
    BalancedChannel, LeastRequestConfig, OutlierDetectionConfig, PolicyKind,
};
use tokio::time::Instant;

use crate::failover::{Load, Shot, RPC_TIMEOUT};
use crate::faulty::FaultyEcho;
use crate::procs::Proc;
use crate::stats::{ms, Samples, Table};
use crate::BoxError;

/// The load and how long to measure.
pub struct Config {
    /// RPCs per second, open loop.
    pub rate: f64,
    /// Load before the fault (or before measuring).
    pub warmup: Duration,
    /// How long each scenario is measured.
    pub window: Duration,
}

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lb {
    RoundRobin,
    LeastRequest,
    PeakEwma,
    RoundRobinOutlier,
    LeastRequestOutlier,
    WeightedRoundRobin,
}

impl Lb {
    fn name(self) -> &'static str {
        match self {
            Lb::RoundRobin => "round_robin",
            Lb::LeastRequest => "least_request",
            Lb::PeakEwma => "least_request + peak-EWMA",
            Lb::RoundRobinOutlier => "round_robin + outlier_detection",
            Lb::LeastRequestOutlier => "least_request + outlier_detection",
            Lb::WeightedRoundRobin => "weighted_round_robin",
        }
    }

    /// The name as a service name may spell it.
    fn slug(self) -> String {
        self.name()
            .chars()
            .filter(|c| *c != ' ')
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }

    fn channel(self, target: &str) -> Result<BalancedChannel, BoxError> {
        let policy = match self {
            Lb::RoundRobin | Lb::RoundRobinOutlier => PolicyKind::RoundRobin,
            Lb::LeastRequest | Lb::LeastRequestOutlier => {
                PolicyKind::LeastRequest(LeastRequestConfig::default())
            }
            Lb::PeakEwma => PolicyKind::LeastRequest(LeastRequestConfig::peak_ewma()),
            Lb::WeightedRoundRobin => PolicyKind::WeightedRoundRobin,
        };
        let mut builder = BalancedChannel::builder(target)?
            .policy(policy)
            // As in the failover section, so the SIGSTOP rows compare.
            .keepalive(Duration::from_secs(1), Duration::from_secs(1));
        if matches!(self, Lb::RoundRobinOutlier | Lb::LeastRequestOutlier) {
            builder = builder.outlier_detection(OutlierDetectionConfig::default());
        }
        Ok(builder.build())
    }
}

/// A backend, kept only to be stopped when dropped: an echo process or an
/// in-process echo with faults.
enum Backend {
    Process { _proc: Proc },
    InProcess { _echo: FaultyEcho },
}

/// A fault the victim has from the start.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Fail,
    Slow,
}

/// Three backends for `service`, the first with `fault`; returns them,
/// their addresses and the target to reach them by.
async fn backends(
    registry: &str,
    service: &str,
    fault: Fault,
    processes: bool,
) -> (Vec<Backend>, Vec<String>, String) {
    let mut backends = Vec::new();
    let mut addresses = Vec::new();
    for i in 0..3 {
        if processes {
            let flags: &[&str] = match (i, fault) {
                (0, Fault::Fail) => &["--fail-rate", "1"],
                (0, Fault::Slow) => &["--delay", "50ms"],
                _ => &[],
            };
            let (proc, address) = Proc::echo(registry, service, flags);
            backends.push(Backend::Process { _proc: proc });
            addresses.push(address);
        } else {
            let echo = FaultyEcho::start().await;
            if i == 0 {
                match fault {
                    Fault::Fail => echo.faults.set_fail(true),
                    Fault::Slow => echo.faults.set_delay(Duration::from_millis(50)),
                }
            }
            addresses.push(echo.address.clone());
            backends.push(Backend::InProcess { _echo: echo });
        }
    }
    let target = if processes {
        format!("registry://{registry}/{service}")
    } else {
        format!("static:///{}", addresses.join(","))
    };
    (backends, addresses, target)
}

/// Waits until `channel` uses `n` backends.
async fn all_ready(channel: &BalancedChannel, n: usize) -> Result<(), BoxError> {
    let mut state = channel.watch_state();
    let ready = state.wait_for(|s| s.ready.len() == n);
    let outcome = tokio::time::timeout(Duration::from_secs(20), ready).await;
    match outcome {
        Ok(Ok(_)) => Ok(()),
        _ => Err(format!(
            "the client never used all {n} backends: {:?}",
            channel.state()
        )
        .into()),
    }
}

fn failed(shots: &[&Shot]) -> usize {
    shots.iter().filter(|s| s.result.is_err()).count()
}

async fn hung(config: &Config, registry: &str, lb: Lb, table: &mut Table) -> Result<(), BoxError> {
    let service = format!("bench.gray-stop-{}", lb.slug());
    let mut backends: Vec<(Proc, String)> = (0..3)
        .map(|_| Proc::echo(registry, &service, &[]))
        .collect();
    let channel = lb.channel(&format!("registry://{registry}/{service}"))?;
    all_ready(&channel, 3).await?;
    let load = Load::start(&channel, config.rate);
    tokio::time::sleep(config.warmup).await;
    let victim = backends[1].1.clone();
    let stopped = Instant::now();
    backends[1].0.signal(libc::SIGSTOP);
    tokio::time::sleep(config.window).await;
    let shots = load.stop().await;
    backends[1].0.signal(libc::SIGCONT);
    backends.clear();
    let after: Vec<&Shot> = shots.iter().filter(|s| s.sent >= stopped).collect();
    table.row(vec![
        "SIGSTOP one backend".into(),
        lb.name().into(),
        after.len().to_string(),
        format!("**{}**", failed(&after)),
        format!("victim {victim} hung for {}", ms(config.window)),
    ]);
    Ok(())
}

async fn failing(
    config: &Config,
    registry: &str,
    processes: bool,
    lb: Lb,
    table: &mut Table,
) -> Result<(), BoxError> {
    let service = format!("bench.gray-fail-{}", lb.slug());
    let (backends, addresses, target) = backends(registry, &service, Fault::Fail, processes).await;
    let victim = addresses[0].clone();
    let channel = lb.channel(&target)?;
    all_ready(&channel, 3).await?;
    let mut state = channel.watch_state();
    let load = Load::start(&channel, config.rate);
    let ejected = {
        let gone = state.wait_for(|s| !s.is_ready(&victim));
        match tokio::time::timeout(config.window, gone).await {
            Ok(Ok(_)) => Some(Instant::now()),
            _ => None,
        }
    };
    tokio::time::sleep(
        config
            .window
            .saturating_sub(ejected.map_or(config.window, |_| Duration::ZERO)),
    )
    .await;
    let shots = load.stop().await;
    drop(backends);
    let first_failure = shots
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| s.done)
        .min();
    let all: Vec<&Shot> = shots.iter().collect();
    let (before, after, time) = match ejected {
        Some(at) => {
            let before: Vec<&Shot> = shots.iter().filter(|s| s.sent < at).collect();
            let after: Vec<&Shot> = shots.iter().filter(|s| s.sent >= at).collect();
            let time = first_failure.map_or("-".into(), |f| ms(at.saturating_duration_since(f)));
            (
                failed(&before).to_string(),
                format!("**{}** of {}", failed(&after), after.len()),
                time,
            )
        }
        None => (
            format!("{} of {}", failed(&all), all.len()),
            "(never ejected)".into(),
            format!("never ({})", ms(config.window)),
        ),
    };
    table.row(vec![
        "one backend fails 100 %".into(),
        lb.name().into(),
        before,
        time,
        after,
    ]);
    Ok(())
}

async fn slow(
    config: &Config,
    registry: &str,
    processes: bool,
    lb: Lb,
    table: &mut Table,
) -> Result<(), BoxError> {
    let service = format!("bench.gray-slow-{}", lb.slug());
    let (backends, addresses, target) = backends(registry, &service, Fault::Slow, processes).await;
    let channel = lb.channel(&target)?;
    all_ready(&channel, 3).await?;
    let load = Load::start(&channel, config.rate);
    tokio::time::sleep(config.warmup).await;
    let from = Instant::now();
    tokio::time::sleep(config.window).await;
    let shots = load.stop().await;
    drop(backends);
    let measured: Vec<&Shot> = shots.iter().filter(|s| s.sent >= from).collect();
    let mut latency = Samples::default();
    for shot in &measured {
        latency.push(shot.done - shot.sent);
    }
    let to_slow = measured
        .iter()
        .filter(|s| s.result.as_ref().is_ok_and(|b| *b == addresses[0]))
        .count();
    table.row(vec![
        "one backend +50 ms".into(),
        lb.name().into(),
        format!(
            "p50 {}, **p99 {}**",
            ms(latency.quantile(0.5)),
            ms(latency.quantile(0.99))
        ),
        format!(
            "{:.1} % of {} to the slow one",
            to_slow as f64 * 100.0 / measured.len().max(1) as f64,
            measured.len()
        ),
        failed(&measured).to_string(),
    ]);
    Ok(())
}

async fn weighted(
    config: &Config,
    registry: &str,
    lb: Lb,
    table: &mut Table,
) -> Result<(), BoxError> {
    let service = format!("bench.gray-weights-{}", lb.slug());
    let backends: Vec<(Proc, String)> = [1, 2, 3]
        .iter()
        .map(|w| Proc::echo(registry, &service, &["--meta", &format!("weight={w}")]))
        .collect();
    let channel = lb.channel(&format!("registry://{registry}/{service}"))?;
    all_ready(&channel, 3).await?;
    let load = Load::start(&channel, config.rate);
    tokio::time::sleep(config.window).await;
    let shots = load.stop().await;
    let mut served: BTreeMap<&str, usize> = BTreeMap::new();
    for shot in &shots {
        if let Ok(backend) = &shot.result {
            *served.entry(backend.as_str()).or_default() += 1;
        }
    }
    let total: usize = served.values().sum();
    let split: Vec<String> = backends
        .iter()
        .zip([1, 2, 3])
        .map(|((_, address), w)| {
            let n = served.get(address.as_str()).copied().unwrap_or(0);
            format!("w{w}: {:.1} %", n as f64 * 100.0 / total.max(1) as f64)
        })
        .collect();
    table.row(vec![
        "weights 1:2:3 (want 16.7 / 33.3 / 50.0 %)".into(),
        lb.name().into(),
        split.join(", "),
        total.to_string(),
        failed(&shots.iter().collect::<Vec<_>>()).to_string(),
    ]);
    Ok(())
}

/// Whether the echo binary has `--fail-rate` and `--delay`.
fn echo_has_fault_flags() -> bool {
    std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["echo", "--help"])
        .output()
        .is_ok_and(|o| {
            let help = String::from_utf8_lossy(&o.stdout);
            help.contains("--fail-rate") && help.contains("--delay")
        })
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 7. Grey failures: hung, failing, slow and weighted backends\n");
    let (_registry, registry) = Proc::registry();
    let processes = echo_has_fault_flags();

    let mut table = Table::new(&[
        "scenario",
        "policy",
        "RPCs after the stop",
        "failed",
        "note",
    ]);
    for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::PeakEwma] {
        hung(config, &registry, lb, &mut table).await?;
    }
    table.print();

    let mut table = Table::new(&[
        "scenario",
        "policy",
        "failed before ejection",
        "first failure → ejected",
        "failed after ejection",
    ]);
    for lb in [
        Lb::RoundRobin,
        Lb::RoundRobinOutlier,
        Lb::LeastRequestOutlier,
    ] {
        failing(config, &registry, processes, lb, &mut table).await?;
    }
    table.print();

    let mut table = Table::new(&["scenario", "policy", "latency", "traffic", "failed"]);
    for lb in [Lb::RoundRobin, Lb::LeastRequest, Lb::PeakEwma] {
        slow(config, &registry, processes, lb, &mut table).await?;
    }
    table.print();

    let mut table = Table::new(&["scenario", "policy", "split", "RPCs", "failed"]);
    for lb in [Lb::RoundRobin, Lb::WeightedRoundRobin] {
        weighted(config, &registry, lb, &mut table).await?;
    }
    table.print();

    println!(
        "{:.0} RPC/s open-loop over 3 backends, RPC deadline {RPC_TIMEOUT:?}, client keepalive \
         1 s / 1 s, a fresh client and backend set per row; {:?} of load before each fault or \
         measurement, {:?} measured. Failing and slow backends: {}.\n",
        config.rate,
        config.warmup,
        config.window,
        if processes {
            "echo processes with --fail-rate 1 / --delay 50ms"
        } else {
            "in-process echo servers (this echo binary has no --fail-rate / --delay)"
        }
    );
    Ok(())
}
