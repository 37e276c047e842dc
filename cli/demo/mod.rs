//! `switchboard demo`: the failover scenario end to end, with real
//! processes. It starts a registry, one echo process per backend and the
//! client in live mode; kills a backend with SIGKILL, starts it again, then
//! stops one with SIGTERM, for round_robin and for pick_first; and prints a
//! timeline and a summary table. `--scenario gray` instead makes one backend
//! go bad without dying (hung by SIGSTOP, then failing every call) and
//! compares round_robin with least_request plus outlier detection.
//! `--scenario policy` makes one backend fail every call, then has the
//! registry push outlier detection and retries to the running client.
//! `--scenario zones` runs backends in two zones and the client in one, and
//! kills that zone. `--ha`
//! (a build with `--features etcd`, and `etcd` on PATH) runs three registry
//! replicas on a throwaway etcd instead of one registry, and kills one
//! replica, a backend, then every replica. Every process it started is
//! killed when it ends, Ctrl-C included.

mod children;
mod scenario;
mod summary;
mod view;

use std::time::Duration;

use clap::{Parser, ValueEnum};
use switchboard::client::PolicyKind;
use switchboard::process;
#[cfg(feature = "etcd")]
use switchboard::registry::etcd::local::LocalEtcd;

use scenario::Scenario;
use summary::print_summary;

/// Runs the failover scenario with real processes and prints what happens.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// What to show: `failover` (kill, restart, drain), `gray` (a backend
    /// that hangs, then fails every call, without dying), `retries` (the
    /// failover with and without a retry policy), `policy` (a failing
    /// backend, then a config pushed from the registry) or `zones` (the
    /// client's zone dies and comes back).
    #[arg(long, value_enum, default_value_t = DemoScenario::Failover)]
    scenario: DemoScenario,
    /// Only this policy (default: round_robin, then pick_first; with
    /// `--scenario gray`: round_robin, then least_request with outlier
    /// detection).
    #[arg(long)]
    policy: Option<PolicyKind>,
    /// Client RPCs per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Number of echo backends (at least 2).
    #[arg(long, default_value_t = 3)]
    backends: usize,
    /// How long each phase of steady traffic lasts, in seconds.
    #[arg(long, default_value_t = 3.0)]
    phase_secs: f64,
    /// High availability: 3 registry replicas on a throwaway etcd; kill one
    /// replica, then a backend, then restart every replica. Needs a build
    /// with `--features etcd` and `etcd` on PATH.
    #[arg(long, conflicts_with = "scenario")]
    ha: bool,
}

/// The demo's scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoScenario {
    /// A backend killed, restarted and drained.
    Failover,
    /// A backend that is up but not well: hung, then failing every call.
    Gray,
    /// The failover scenario without, then with, a retry policy in the
    /// client's service config (gRFC A6): the kill costs the second run
    /// nothing.
    Retries,
    /// A backend failing every call under round_robin, then the registry
    /// pushes outlier detection and retries (`config set`): the failures
    /// stop with the client untouched.
    Policy,
    /// Two zones, the client in zone a: calls stay in a, move to b when a's
    /// backends are SIGKILLed, and come back when they return.
    Zones,
}

/// One client configuration the demo runs the scenario with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Contender {
    policy: PolicyKind,
    /// Wrap the policy in outlier detection.
    outlier_detection: bool,
    /// Give the client a service config that retries UNAVAILABLE.
    retries: bool,
}

impl std::fmt::Display for Contender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.policy)?;
        if self.outlier_detection {
            f.write_str("+od")?;
        }
        if self.retries {
            f.write_str("+retries")?;
        }
        Ok(())
    }
}

/// How long any one expected event may take before the demo gives up on it.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `switchboard demo`.
// The etcd is dropped (killed) before each `exit`, which runs no
// destructors; without the feature it is never there to drop.
#[cfg_attr(not(feature = "etcd"), allow(clippy::drop_non_drop))]
pub async fn run(args: Args) {
    if args.backends < 2 {
        process::exit_with("--backends must be at least 2 to show a failover");
    }
    if args.rate == 0 {
        process::exit_with("--rate must be at least 1");
    }
    // Every process the demo starts is one of this executable's
    // subcommands, so a fresh checkout needs no separate build step.
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => process::exit_with(&format!("cannot locate the switchboard binary: {err}")),
    };
    let plain = |policy| Contender {
        policy,
        outlier_detection: false,
        retries: false,
    };
    let etcd = if args.ha {
        match LocalEtcd::start().await {
            Ok(etcd) => Some(etcd),
            Err(err) => process::exit_with(&format!("demo --ha: {err}")),
        }
    } else {
        None
    };
    let etcd_url = etcd.as_ref().map(LocalEtcd::url);
    let contenders = match (args.policy, args.scenario) {
        (policy, _) if args.ha => vec![plain(policy.unwrap_or(PolicyKind::RoundRobin))],
        (Some(policy), DemoScenario::Failover) => vec![plain(policy)],
        (Some(policy), DemoScenario::Gray) => vec![Contender {
            policy,
            outlier_detection: policy != PolicyKind::RoundRobin,
            retries: false,
        }],
        (policy, DemoScenario::Retries) => {
            let policy = policy.unwrap_or(PolicyKind::RoundRobin);
            vec![
                plain(policy),
                Contender {
                    retries: true,
                    ..plain(policy)
                },
            ]
        }
        (None, DemoScenario::Failover) => {
            vec![plain(PolicyKind::RoundRobin), plain(PolicyKind::PickFirst)]
        }
        (policy, DemoScenario::Zones) => {
            vec![plain(policy.unwrap_or(PolicyKind::RoundRobin))]
        }
        (policy, DemoScenario::Policy) => {
            vec![plain(policy.unwrap_or(PolicyKind::RoundRobin))]
        }
        (None, DemoScenario::Gray) => vec![
            plain(PolicyKind::RoundRobin),
            Contender {
                policy: "least_request".parse().expect("a built-in policy"),
                outlier_detection: true,
                retries: false,
            },
        ],
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for contender in contenders {
        let mut scenario = Scenario::new(exe.clone(), &args, contender, etcd_url.clone());
        let outcome = tokio::select! {
            outcome = scenario.run() => outcome,
            _ = process::shutdown_signal() => {
                println!("\ninterrupted: stopping every process the demo started");
                drop(scenario);
                drop(etcd);
                std::process::exit(130);
            }
        };
        let (more, noted) = scenario.into_rows();
        rows.extend(more);
        notes.extend(noted);
        if let Err(err) = outcome {
            print_summary(&rows, &notes);
            drop(etcd);
            process::exit_with(&err);
        }
    }
    print_summary(&rows, &notes);
}

/// Without the `etcd` feature there is no etcd store to show: `--ha` stops
/// with a one-line error before anything would hold an etcd.
#[cfg(not(feature = "etcd"))]
enum LocalEtcd {}

#[cfg(not(feature = "etcd"))]
impl LocalEtcd {
    async fn start() -> Result<Self, String> {
        Err("it needs a build with `--features etcd` \
             (cargo build --release --features etcd; protoc must be installed)"
            .into())
    }

    fn url(&self) -> String {
        match *self {}
    }
}
