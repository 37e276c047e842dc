//! The switchboard benchmark harness: `cargo bench --bench bench`.
//!
//! It starts its own registry and echo child processes on 127.0.0.1 and
//! prints markdown: the machine, then one section per question.
//!
//! 1. [`datapath`]: how fast is an RPC through a switchboard channel next
//!    to plain tonic?
//! 2. [`failover`]: what happens to traffic when a backend is killed,
//!    drained or hung?
//! 3. [`fanout`]: how quickly does a change reach many watchers, and what
//!    do they cost the registry?
//! 4. [`churn`]: what do many heartbeating leases and steady churn cost the
//!    registry?
//! 5. [`balancer`]: what does a client pay when 1,000 endpoints appear at
//!    once, and what does the endpoint count add to each RPC?
//! 6. [`xds`]: how quickly does a change reach xDS subscribers, next to
//!    native watchers at the same count?
//! 7. [`gray`]: what do hung, failing, slow and weighted backends do to
//!    each policy, side by side with round_robin?
//! 8. `ha` (built with `--features etcd`, and `etcd` on PATH): what do
//!    registry replicas on etcd cost etcd and the watchers, and do they
//!    survive their own deaths? Its parts are `ha-fanout`, `ha-removal`,
//!    `ha-leases` and `ha-replicas`; without the feature or etcd they are
//!    skipped with a note.
//! 9. [`retries`]: what do retries, hedging and transparent retry save
//!    when a backend is killed, failing or slow, and what do they cost
//!    when nothing fails?
//! 10. [`affinity`]: where does traffic go under ring_hash, zones and slow
//!     start: which keys move when a backend leaves and what a hashed pick
//!     costs, how much stays in the client's zone and how fast it leaves a
//!     dead zone and returns, and how a joining backend's share ramps up?
//!     Its parts are `ring-hash`, `zones` and `slow-start`.
//!
//! `-- --smoke` runs every section with tiny sizes in seconds (CI: it must
//! just finish). Name sections (`-- fanout churn`) to run only those.

mod affinity;
mod balancer;
mod churn;
mod datapath;
mod failover;
mod fanout;
#[path = "../tests/common/faulty.rs"]
mod faulty;
mod gray;
#[cfg(feature = "etcd")]
mod ha;
#[path = "../tests/common/pki.rs"]
mod pki;
mod procs;
mod retries;
mod stats;
mod xds;

use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The sections, in order, by the name that selects them.
const SECTIONS: [&str; 15] = [
    "datapath",
    "failover",
    "fanout",
    "churn",
    "balancer",
    "xds",
    "gray",
    "ha-fanout",
    "ha-removal",
    "ha-leases",
    "ha-replicas",
    "retries",
    "ring-hash",
    "zones",
    "slow-start",
];
/// Section 8's parts, which need etcd.
const HA_SECTIONS: [&str; 4] = ["ha-fanout", "ha-removal", "ha-leases", "ha-replicas"];
/// Section 10's parts.
const AFFINITY_SECTIONS: [&str; 3] = ["ring-hash", "zones", "slow-start"];

fn main() {
    // `cargo bench` adds `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let chosen: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| SECTIONS.contains(a))
        .collect();
    if let Some(unknown) = args
        .iter()
        .find(|a| !a.starts_with("--") && !SECTIONS.contains(&a.as_str()))
    {
        eprintln!(
            "error: unknown section {unknown:?}: choose from {}",
            SECTIONS.join(", ")
        );
        std::process::exit(2);
    }
    let runs = |section: &str| chosen.is_empty() || chosen.contains(&section);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!("# switchboard benchmarks\n");
    println!(
        "- command: `cargo bench --bench bench{}`",
        if args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", args.join(" "))
        }
    );
    println!("- machine: {}", procs::machine());
    println!(
        "- mode: {}\n",
        if smoke {
            "smoke (tiny sizes; the numbers mean nothing)"
        } else {
            "full"
        }
    );

    let started = std::time::Instant::now();
    // Child processes live inside the sections' futures, so they are
    // killed when a section returns, fails or panics.
    let result: Result<(), BoxError> = runtime.block_on(async {
        if runs("datapath") {
            datapath::run(&datapath_config(smoke)).await?;
        }
        if runs("failover") {
            failover::run(&failover_config(smoke)).await?;
        }
        if runs("fanout") {
            fanout::run(&fanout_config(smoke)).await?;
        }
        if runs("churn") {
            churn::run(&churn_config(smoke)).await?;
        }
        if runs("balancer") {
            balancer::run(&balancer_config(smoke)).await?;
        }
        if runs("xds") {
            xds::run(&xds_config(smoke)).await?;
        }
        if runs("gray") {
            gray::run(&gray_config(smoke)).await?;
        }
        let ha: Vec<&str> = HA_SECTIONS.into_iter().filter(|s| runs(s)).collect();
        if !ha.is_empty() {
            run_ha(&ha, smoke).await?;
        }
        if runs("retries") {
            retries::run(&retries_config(smoke)).await?;
        }
        let affinity: Vec<&str> = AFFINITY_SECTIONS.into_iter().filter(|s| runs(s)).collect();
        if !affinity.is_empty() {
            affinity::run(&affinity, &affinity_config(smoke)).await?;
        }
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    println!(
        "_Total run time: {:.0} s._",
        started.elapsed().as_secs_f64()
    );
    if let Err(error) = result {
        eprintln!("error: benchmark failed: {error}");
        std::process::exit(1);
    }
}

#[cfg(feature = "etcd")]
async fn run_ha(sections: &[&str], smoke: bool) -> Result<(), BoxError> {
    ha::run(sections, &ha_config(smoke)).await
}

/// Without the feature there is no etcd store to measure.
#[cfg(not(feature = "etcd"))]
async fn run_ha(_sections: &[&str], _smoke: bool) -> Result<(), BoxError> {
    println!("## 8. HA on etcd\n");
    println!(
        "_Skipped: built without `--features etcd` \
         (`cargo bench --features etcd --bench bench -- ha-fanout ...`)._\n"
    );
    Ok(())
}

#[cfg(feature = "etcd")]
fn ha_config(smoke: bool) -> ha::Config {
    ha::Config {
        watchers: if smoke { 100 } else { 10_000 },
        connections_per_replica: 3,
        changes: if smoke { 2 } else { 10 },
        kills: if smoke { 2 } else { 10 },
        leases: if smoke { 300 } else { 10_000 },
        streams_per_replica: 3,
        settle: Duration::from_secs(if smoke { 1 } else { 7 }),
        window: Duration::from_secs(if smoke { 2 } else { 15 }),
        rate: if smoke { 200.0 } else { 2000.0 },
        before: Duration::from_millis(if smoke { 300 } else { 2000 }),
        after: Duration::from_millis(if smoke { 1000 } else { 3000 }),
        after_restart: Duration::from_millis(if smoke { 1000 } else { 22_000 }),
    }
}

fn datapath_config(smoke: bool) -> datapath::Config {
    if smoke {
        datapath::Config {
            concurrency: vec![1, 16, 64],
            rounds: 1,
            round: Duration::from_millis(200),
            warmup: Duration::from_millis(100),
        }
    } else {
        datapath::Config {
            concurrency: vec![1, 16, 64],
            rounds: 5,
            round: Duration::from_secs(2),
            warmup: Duration::from_secs(1),
        }
    }
}

fn failover_config(smoke: bool) -> failover::Config {
    failover::Config {
        rate: if smoke { 200.0 } else { 2000.0 },
        before: Duration::from_millis(if smoke { 300 } else { 2000 }),
        after: Duration::from_millis(if smoke { 300 } else { 2000 }),
    }
}

fn fanout_config(smoke: bool) -> fanout::Config {
    fanout::Config {
        watchers: if smoke {
            vec![10, 50]
        } else {
            vec![100, 1_000, 10_000]
        },
        connections: 8,
        changes: if smoke { 2 } else { 10 },
    }
}

fn churn_config(smoke: bool) -> churn::Config {
    churn::Config {
        leases: if smoke { 200 } else { 10_000 },
        streams: 8,
        churn_per_sec: if smoke { 20 } else { 200 },
        window: Duration::from_secs(if smoke { 1 } else { 10 }),
    }
}

fn balancer_config(smoke: bool) -> balancer::Config {
    if smoke {
        balancer::Config {
            ramp_sizes: vec![2, 10],
            ramp_runs: 1,
            ramp_deadline: Duration::from_secs(30),
            rpc_sizes: vec![2, 10],
            rounds: 1,
            calls_per_round: 200,
        }
    } else {
        balancer::Config {
            ramp_sizes: vec![10, 100, 1_000],
            ramp_runs: 5,
            ramp_deadline: Duration::from_secs(120),
            rpc_sizes: vec![2, 1_000],
            rounds: 10,
            calls_per_round: 2_000,
        }
    }
}

fn xds_config(smoke: bool) -> xds::Config {
    xds::Config {
        subscribers: if smoke { vec![10] } else { vec![1_000] },
        connections: 8,
        changes: if smoke { 2 } else { 10 },
    }
}

fn gray_config(smoke: bool) -> gray::Config {
    gray::Config {
        rate: if smoke { 200.0 } else { 2000.0 },
        warmup: Duration::from_millis(if smoke { 300 } else { 2000 }),
        window: Duration::from_millis(if smoke { 1500 } else { 4000 }),
    }
}

fn retries_config(smoke: bool) -> retries::Config {
    retries::Config {
        rate: if smoke { 200.0 } else { 2000.0 },
        before: Duration::from_millis(if smoke { 300 } else { 1000 }),
        window: Duration::from_millis(if smoke { 1000 } else { 5000 }),
        concurrency: 64,
        rounds: if smoke { 1 } else { 5 },
        round: Duration::from_millis(if smoke { 200 } else { 2000 }),
    }
}

fn affinity_config(smoke: bool) -> affinity::Config {
    affinity::Config {
        ring_backends: if smoke { 4 } else { 10 },
        keys: if smoke { 200 } else { 10_000 },
        concurrency: 64,
        rounds: if smoke { 1 } else { 5 },
        round: Duration::from_millis(if smoke { 200 } else { 2000 }),
        warmup: Duration::from_millis(if smoke { 100 } else { 1000 }),
        zone_rate: if smoke { 200.0 } else { 500.0 },
        slow_start_rate: if smoke { 200.0 } else { 2000.0 },
        before: Duration::from_millis(if smoke { 300 } else { 2000 }),
        after: Duration::from_millis(if smoke { 500 } else { 2000 }),
        window: Duration::from_millis(if smoke { 500 } else { 3000 }),
        bucket: Duration::from_millis(100),
    }
}
