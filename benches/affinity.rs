//! Section 10, where traffic goes: the policies that choose a backend for a
//! reason other than spreading load evenly, each measured from the calls
//! it sends (every echo reply names the backend that answered).
//!
//! - `ring-hash`: which keys move when one of ten backends is SIGKILLed,
//!   and whether they come back when it starts again on its address; one
//!   row per ring config in [`RING_CONFIGS`]. Then what a ring_hash pick
//!   costs next to round_robin at 64 in flight, in interleaved rounds.
//! - `zones`: two backends in zone a, two in zone b, a client in zone a
//!   at a fixed rate; zone a is SIGKILLed and started again.
//! - `slow-start`: a fourth backend joins three under load with a
//!   `slowStartConfig`; its share of the calls per bucket over the window,
//!   next to Envoy's curve.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use switchboard::client::slow_start::{self, SlowStartConfig};
use switchboard::client::{BalancedChannel, BalancerState, PolicyKind, RequestHash};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use tokio::time::Instant;

use crate::datapath::{self, Client, Totals, KEY_HEADER};
use crate::failover::{backend_of, failures, wait_all_ready, Load, Shot};
use crate::procs::Proc;
use crate::stats::{ms, Table};
use crate::BoxError;

/// Sizes, rates and windows of the three parts.
pub struct Config {
    /// Backends on the ring, one of which is killed.
    pub ring_backends: usize,
    /// Keys whose backend is compared before, during and after.
    pub keys: usize,
    /// RPCs in flight, finding the keys' backends and in the pick-cost
    /// rounds.
    pub concurrency: usize,
    /// Pick-cost rounds per contender.
    pub rounds: usize,
    /// Length of one pick-cost round.
    pub round: Duration,
    /// Unmeasured load per pick-cost contender first.
    pub warmup: Duration,
    /// RPCs per second, open loop, in the zones part.
    pub zone_rate: f64,
    /// RPCs per second, open loop, in the slow-start part.
    pub slow_start_rate: f64,
    /// Load before the kill (zones) or the join (slow start).
    pub before: Duration,
    /// Load after each step of the zones part, before the next.
    pub after: Duration,
    /// The slow-start window.
    pub window: Duration,
    /// The slow-start table's bucket.
    pub bucket: Duration,
}

/// The ring configs whose key movement is measured, one table row each: a
/// `loadBalancingConfig` entry. Calls carry their key as a [`RequestHash`],
/// so a row needs no `requestHashHeader`.
const RING_CONFIGS: &[&str] = &[
    // A42's defaults: minRingSize 1024, maxRingSize 4096.
    r#"{"ring_hash_experimental": {}}"#,
    // The stable ring: a fixed number of points per endpoint.
    r#"{"ring_hash_experimental": {"pointsPerEndpoint": 160}}"#,
];

/// ring_hash keyed by the header the pick-cost clients send.
const RING_HASH_BY_HEADER: &str = r#"{"loadBalancingConfig": [
    {"ring_hash_experimental": {"requestHashHeader": "x-key"}}]}"#;

/// Each RPC's deadline where no call should fail.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client gets to see a change of its endpoints or Ready set.
const SEE_TIMEOUT: Duration = Duration::from_secs(20);

pub async fn run(parts: &[&str], config: &Config) -> Result<(), BoxError> {
    println!("## 10. Where traffic goes: ring_hash, zones, slow start\n");
    let (_registry, registry) = Proc::registry();
    for part in parts {
        match *part {
            "ring-hash" => ring_hash(config, &registry).await?,
            "zones" => zones(config, &registry).await?,
            "slow-start" => slow_start(config, &registry).await?,
            _ => {}
        }
    }
    Ok(())
}

/// Waits until `channel`'s state satisfies `done`, for up to
/// [`SEE_TIMEOUT`]; `what` names it in the error.
async fn wait_state(
    channel: &BalancedChannel,
    what: &str,
    done: impl FnMut(&BalancerState) -> bool,
) -> Result<(), BoxError> {
    let mut state = channel.watch_state();
    let seen = tokio::time::timeout(SEE_TIMEOUT, state.wait_for(done))
        .await
        .is_ok_and(|r| r.is_ok());
    if !seen {
        return Err(format!("the client never {what}: {:?}", channel.state()).into());
    }
    Ok(())
}

/// Whether `state` lists exactly `addresses` as its endpoints.
fn lists(state: &BalancerState, addresses: &BTreeSet<String>) -> bool {
    state.endpoints.len() == addresses.len()
        && state
            .endpoints
            .iter()
            .all(|e| addresses.contains(&e.address))
}

// --- ring_hash ---------------------------------------------------------

async fn ring_hash(config: &Config, registry: &str) -> Result<(), BoxError> {
    println!(
        "### 10.1 ring_hash: keys moved when 1 of {} backends leaves, and the pick's cost\n",
        config.ring_backends
    );
    let mut table = Table::new(&[
        "ring config",
        "keys",
        "were on the victim (moved, the ideal)",
        "moved between survivors",
        "moved in all",
        "× the ideal 1/n",
        "failed calls",
        "after the restart",
    ]);
    for (i, ring) in RING_CONFIGS.iter().enumerate() {
        keys_moved(config, registry, i, ring, &mut table).await?;
    }
    println!(
        "{} echo processes via `registry://`, {} keys (`RequestHash::of_key(\"user-<i>\")`), \
         each called once per phase, {} at a time; the victim SIGKILLed, the keys called again \
         once the client's endpoint set has lost it (the ring rebuilt without it), then again \
         once the victim, started on its old address, is back in the set.\n",
        config.ring_backends, config.keys, config.concurrency
    );
    table.print();
    pick_cost(config, registry).await
}

/// The backend that answered each key `user-0`..., in key order; `None`
/// where the call failed.
async fn owners(client: &EchoClient<BalancedChannel>, config: &Config) -> Vec<Option<String>> {
    stream::iter(0..config.keys)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(EchoRequest {
                    message: "ring".into(),
                });
                request.set_timeout(CALL_TIMEOUT);
                request
                    .extensions_mut()
                    .insert(RequestHash::of_key(format!("user-{i}")));
                let reply = client.unary_echo(request).await.ok()?;
                Some(backend_of(&reply.into_inner().message))
            }
        })
        .buffered(config.concurrency)
        .collect()
        .await
}

/// One [`RING_CONFIGS`] row: fresh backends, a fresh client, one kill and
/// one restart.
async fn keys_moved(
    config: &Config,
    registry: &str,
    row: usize,
    ring: &str,
    table: &mut Table,
) -> Result<(), BoxError> {
    let service = format!("bench.ring-hash-{row}");
    let mut backends: Vec<(Proc, String)> = (0..config.ring_backends)
        .map(|_| Proc::echo(registry, &service, &[]))
        .collect();
    let all: BTreeSet<String> = backends.iter().map(|(_, a)| a.clone()).collect();
    let channel = BalancedChannel::builder(&format!("registry://{registry}/{service}"))?
        .service_config_json(&format!(r#"{{"loadBalancingConfig": [{ring}]}}"#))?
        .disable_service_config_lookup()
        .build();
    // The whole ring before the first key, or keys land on a partial one.
    wait_state(&channel, "listed every backend", |s| lists(s, &all)).await?;
    let client = EchoClient::new(channel.clone());
    let before = owners(&client, config).await;

    let victim_index = backends.len() / 2;
    let victim = backends[victim_index].1.clone();
    backends[victim_index].0.kill();
    let survivors: BTreeSet<String> = all.iter().filter(|a| **a != victim).cloned().collect();
    wait_state(&channel, "dropped the victim", |s| lists(s, &survivors)).await?;
    let during = owners(&client, config).await;

    backends[victim_index] = Proc::echo_on(&victim, registry, &service, &[]);
    wait_state(&channel, "listed the restarted victim", |s| lists(s, &all)).await?;
    let after = owners(&client, config).await;

    let (mut on_victim, mut between, mut failed, mut back) = (0, 0, 0, 0);
    for ((was, is), again) in before.iter().zip(&during).zip(&after) {
        if was.is_none() || is.is_none() || again.is_none() {
            failed += 1;
            continue;
        }
        if was.as_deref() == Some(victim.as_str()) {
            on_victim += 1;
        } else if was != is {
            between += 1;
        }
        if was == again {
            back += 1;
        }
    }
    let keys = config.keys;
    let pct = |n: usize| format!("{:.1} %", n as f64 * 100.0 / keys as f64);
    let ideal = keys as f64 / all.len() as f64;
    let moved = on_victim + between;
    table.row(vec![
        format!("`{ring}`"),
        keys.to_string(),
        format!(
            "{on_victim} ({}; ideal {:.1} %)",
            pct(on_victim),
            100.0 / all.len() as f64
        ),
        format!("{between} ({})", pct(between)),
        format!("{moved} ({})", pct(moved)),
        format!("{:.2}", moved as f64 / ideal),
        failed.to_string(),
        if back == keys {
            format!("all {keys} back on their backend")
        } else {
            format!("{back} of {keys} back, {} elsewhere", keys - back)
        },
    ]);
    Ok(())
}

/// ring_hash's pick next to round_robin's: section 1's closed loop at
/// `concurrency` in flight over two backends, every call keyed by header
/// in both contenders.
async fn pick_cost(config: &Config, registry: &str) -> Result<(), BoxError> {
    let servers: Vec<(Proc, String)> = (0..2)
        .map(|_| Proc::echo(registry, "bench.ring-hash-datapath", &[]))
        .collect();
    let target = format!("static:///{},{}", servers[0].1, servers[1].1);
    let round_robin = BalancedChannel::builder(&target)?
        .policy(PolicyKind::RoundRobin)
        .build();
    let ring_hash = BalancedChannel::builder(&target)?
        .service_config_json(RING_HASH_BY_HEADER)?
        .build();
    let contenders = [("round_robin", round_robin), ("ring_hash", ring_hash)];
    let procs: Vec<Proc> = servers.into_iter().map(|(p, _)| p).collect();
    let mut clients = Vec::new();
    for (name, channel) in &contenders {
        let client = Client::Keyed(EchoClient::new(channel.clone()));
        // ring_hash connects when a call lands: the warm-up makes both
        // connections.
        let mut ignored = Totals::default();
        datapath::round(
            &client,
            config.concurrency,
            config.warmup,
            &procs,
            &mut ignored,
        )
        .await;
        wait_all_ready(channel, 2).await?;
        if channel.policy() != *name {
            return Err(format!("{name} runs {}", channel.policy()).into());
        }
        clients.push(client);
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
    let mut table = Table::new(&[
        "in flight",
        "policy",
        "RPC/s",
        "p50",
        "p99",
        "client CPU µs/RPC",
        "errors",
    ]);
    for ((name, _), t) in contenders.iter().zip(totals.iter_mut()) {
        table.row(vec![
            config.concurrency.to_string(),
            name.to_string(),
            format!("{:.0}", t.rate()),
            ms(t.latency.quantile(0.5)),
            ms(t.latency.quantile(0.99)),
            format!("{:.1}", Totals::cpu_per_rpc(t.client_cpu, t.rpcs)),
            t.errors.to_string(),
        ]);
    }
    let (rr, rh) = (&totals[0], &totals[1]);
    let mut ratios = Table::new(&[
        "in flight",
        "ring_hash/round_robin RPC/s",
        "per round (min-max)",
        "ring_hash/round_robin client CPU per RPC",
    ]);
    ratios.row(vec![
        config.concurrency.to_string(),
        format!("{:.3}", rh.rate() / rr.rate()),
        datapath::per_round(rh, rr),
        format!(
            "{:.2}",
            Totals::cpu_per_rpc(rh.client_cpu, rh.rpcs)
                / Totals::cpu_per_rpc(rr.client_cpu, rr.rpcs)
        ),
    ]);
    println!(
        "Pick cost: {} rounds of {:?} per policy at {} in flight over 2 echo processes \
         (`static:///`), interleaved (order rotated each round); every call of both carries \
         `{KEY_HEADER}: user-<random of 1024>`, which ring_hash hashes (`requestHashHeader`) and \
         round_robin ignores.\n",
        config.rounds, config.round, config.concurrency
    );
    table.print();
    ratios.print();
    Ok(())
}

// --- zones -------------------------------------------------------------

/// Starts zone `zone`'s two backends, on `addresses` if given (a restart),
/// else on free ports. Blocking: run it off the runtime's threads while a
/// load runs.
fn start_zone(
    registry: &str,
    service: &str,
    zone: &str,
    addresses: Option<&[String]>,
) -> Vec<(Proc, String)> {
    let flags = ["--zone", zone];
    match addresses {
        Some(addresses) => addresses
            .iter()
            .map(|a| Proc::echo_on(a, registry, service, &flags))
            .collect(),
        None => (0..2)
            .map(|_| Proc::echo(registry, service, &flags))
            .collect(),
    }
}

/// The cells of one zones row: RPCs, failed, and the share answered in
/// each zone.
fn zone_cells(shots: &[&Shot], zone_a: &BTreeSet<String>) -> Vec<String> {
    let ok: Vec<&String> = shots
        .iter()
        .filter_map(|s| s.result.as_ref().ok())
        .collect();
    let in_a = ok.iter().filter(|b| zone_a.contains(**b)).count();
    let pct = |n: usize| format!("{:.1} %", n as f64 * 100.0 / ok.len().max(1) as f64);
    vec![
        shots.len().to_string(),
        failures(shots.iter().copied()),
        pct(in_a),
        pct(ok.len() - in_a),
    ]
}

/// When, after `from`, the last call sent since `from` that was not
/// answered in `zone` (failed, or answered elsewhere) was sent: from then
/// on every call went to `zone`. `since` names `from`.
fn last_outside(shots: &[&Shot], zone: &BTreeSet<String>, from: Instant, since: &str) -> String {
    shots
        .iter()
        .filter(|s| s.sent >= from && !s.result.as_ref().is_ok_and(|b| zone.contains(b)))
        .map(|s| s.sent - from)
        .max()
        .map_or(format!("none sent since {since}"), |t| {
            format!("+{} after {since}", ms(t))
        })
}

async fn zones(config: &Config, registry: &str) -> Result<(), BoxError> {
    println!("### 10.2 Zones: in-zone share, a dead zone and its return\n");
    let service = "bench.zones";
    let mut zone_a = start_zone(registry, service, "a", None);
    let zone_b = start_zone(registry, service, "b", None);
    let a: Vec<String> = zone_a.iter().map(|(_, x)| x.clone()).collect();
    let b: BTreeSet<String> = zone_b.iter().map(|(_, x)| x.clone()).collect();
    let a_set: BTreeSet<String> = a.iter().cloned().collect();
    let channel = BalancedChannel::builder(&format!("registry://{registry}/{service}"))?
        .policy(PolicyKind::RoundRobin)
        .zone("a")
        .keepalive(Duration::from_secs(1), Duration::from_secs(1))
        .build();
    wait_all_ready(&channel, 4).await?;

    let load = Load::start(&channel, config.zone_rate);
    tokio::time::sleep(config.before).await;
    let killed = Instant::now();
    for (proc, _) in &zone_a {
        proc.signal(libc::SIGKILL);
    }
    let only_b = {
        let a = a_set.clone();
        wait_state(&channel, "dropped zone a", |s| {
            !s.ready.iter().any(|r| a.contains(&**r))
        })
        .await?;
        killed.elapsed()
    };
    tokio::time::sleep(config.after).await;

    // Started again on their addresses, off the runtime's threads (the
    // load keeps running).
    for (proc, _) in &mut zone_a {
        proc.kill();
    }
    let restarted = Instant::now();
    zone_a = tokio::task::spawn_blocking({
        let (registry, a) = (registry.to_owned(), a.clone());
        move || start_zone(&registry, service, "a", Some(&a))
    })
    .await?;
    let serving = restarted.elapsed();
    let ready_again = {
        let a = a_set.clone();
        wait_state(&channel, "saw zone a Ready again", |s| {
            a.iter().all(|x| s.is_ready(x))
        })
        .await?;
        restarted.elapsed()
    };
    tokio::time::sleep(config.after).await;
    let mut shots = load.stop().await;
    shots.sort_by_key(|s| s.sent);
    drop(zone_a);
    drop(zone_b);

    // Steady: the calls done before the kill; those in flight at the kill
    // count with it.
    let steady: Vec<&Shot> = shots.iter().filter(|s| s.done < killed).collect();
    let dead: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.done >= killed && s.sent < restarted)
        .collect();
    let back: Vec<&Shot> = shots.iter().filter(|s| s.sent >= restarted).collect();
    let mut table = Table::new(&[
        "phase",
        "RPCs",
        "failed",
        "answered in zone a",
        "answered in zone b",
        "when",
    ]);
    let mut row = |name: &str, shots: &[&Shot], when: String| {
        let mut cells = vec![name.to_owned()];
        cells.extend(zone_cells(shots, &a_set));
        cells.push(when);
        table.row(cells);
    };
    row(
        "steady, 2 + 2 Ready",
        &steady,
        format!("{:?} of load", config.before),
    );
    row(
        "both zone-a backends SIGKILLed",
        &dead,
        format!(
            "last call not answered in b: {} (the client's Ready set was b only after {})",
            last_outside(&dead, &b, killed, "the kill"),
            ms(only_b)
        ),
    );
    row(
        "zone a started again (same addresses)",
        &back,
        format!(
            "last call not answered in a: {} (both processes serving after {}, both Ready in \
             the client after {})",
            last_outside(&back, &a_set, restarted, "the restart began"),
            ms(serving),
            ms(ready_again)
        ),
    );
    println!(
        "{:.0} RPC/s open-loop, round_robin with `Builder::zone(\"a\")` via `registry://` over 2 \
         echo processes started with `--zone a` and 2 with `--zone b`, RPC deadline 1s, client \
         keepalive 1 s / 1 s; {:?} of load before the kill, {:?} with zone a dead, {:?} after it \
         is back. The first row holds the calls done before the kill, the second those in flight at \
         the kill or sent after it until zone a's processes are started again, the last those \
         sent from then on.\n",
        config.zone_rate, config.before, config.after, config.after
    );
    table.print();
    Ok(())
}

// --- slow start --------------------------------------------------------

async fn slow_start(config: &Config, registry: &str) -> Result<(), BoxError> {
    println!("### 10.3 Slow start: a fourth backend joining under load\n");
    let service = "bench.slow-start";
    let slow = SlowStartConfig {
        window: config.window,
        aggression: 1.0,
        min_weight_percent: 10.0,
    };
    let json = format!(
        r#"{{"loadBalancingConfig": [{{"round_robin": {{"slowStartConfig": {{
            "slowStartWindow": "{}s", "aggression": {:.1}, "minWeightPercent": {:.0}}}}}}}]}}"#,
        slow.window.as_secs_f64(),
        slow.aggression,
        slow.min_weight_percent
    );
    let backends: Vec<(Proc, String)> =
        (0..3).map(|_| Proc::echo(registry, service, &[])).collect();
    let channel = BalancedChannel::builder(&format!("registry://{registry}/{service}"))?
        .service_config_json(&json)?
        .disable_service_config_lookup()
        .build();
    wait_all_ready(&channel, 3).await?;
    let load = Load::start(&channel, config.slow_start_rate);
    tokio::time::sleep(config.before).await;
    let (joined_proc, joined) = tokio::task::spawn_blocking({
        let registry = registry.to_owned();
        move || Proc::echo(&registry, service, &[])
    })
    .await?;
    wait_state(&channel, "saw the new backend Ready", |s| {
        s.is_ready(&joined)
    })
    .await?;
    // Its window began when the policy saw it Ready, just before this.
    let ready = Instant::now();
    let reference = (
        config.window + config.bucket * 5,
        config.window + config.bucket * 15,
    );
    tokio::time::sleep_until(ready + reference.1).await;
    let shots = load.stop().await;
    drop(joined_proc);
    drop(backends);

    let others = 3.0;
    let expected = |elapsed: Duration| {
        let w = slow_start::weight(&slow, elapsed);
        w / (w + others)
    };
    let in_range = |from: Duration, to: Duration| -> Vec<&Shot> {
        shots
            .iter()
            .filter(|s| s.sent >= ready + from && s.sent < ready + to)
            .collect()
    };
    let share = |shots: &[&Shot]| {
        let ok: Vec<&String> = shots
            .iter()
            .filter_map(|s| s.result.as_ref().ok())
            .collect();
        let new = ok.iter().filter(|b| ***b == joined).count();
        (new, ok.len(), new as f64 / ok.len().max(1) as f64)
    };
    let mut table = Table::new(&[
        "since Ready",
        "calls",
        "to the new backend",
        "its share",
        "Envoy's curve: w / (w + 3)",
        "failed",
    ]);
    let buckets = (config.window.as_nanos() / config.bucket.as_nanos().max(1)) as u32;
    let (mut sum_new, mut sum_all, mut sum_expected) = (0, 0, 0.0);
    for k in 0..buckets {
        let (from, to) = (config.bucket * k, config.bucket * (k + 1));
        let shots = in_range(from, to);
        let (new, all, got) = share(&shots);
        let want = expected(from + config.bucket / 2);
        sum_new += new;
        sum_all += all;
        sum_expected += want * all as f64;
        table.row(vec![
            format!("{:.1}-{:.1} s", from.as_secs_f64(), to.as_secs_f64()),
            all.to_string(),
            new.to_string(),
            format!("{:.1} %", got * 100.0),
            format!("{:.1} %", want * 100.0),
            failures(shots.iter().copied()),
        ]);
    }
    let after = in_range(reference.0, reference.1);
    let (new, all, got) = share(&after);
    table.row(vec![
        format!(
            "{:.1}-{:.1} s (after the window)",
            reference.0.as_secs_f64(),
            reference.1.as_secs_f64()
        ),
        all.to_string(),
        new.to_string(),
        format!("{:.1} %", got * 100.0),
        "25.0 % (full share)".to_owned(),
        failures(after.iter().copied()),
    ]);
    println!(
        "{:.0} RPC/s open-loop through round_robin with `slowStartConfig` (window {:?}, \
         aggression {}, minWeightPercent {}) via `registry://` over 3 echo processes; after {:?} \
         of load a fourth joins. Calls are bucketed by when they were sent, from when the client \
         listed the new backend Ready; the curve is taken at each bucket's middle, `w = max(10 %, \
         t / window)` against the others' weight 1 each.\n",
        config.slow_start_rate,
        slow.window,
        slow.aggression,
        slow.min_weight_percent,
        config.before
    );
    table.print();
    println!(
        "Over the window: {sum_new} of {sum_all} calls to the new backend ({:.1} %); the curve \
         says {:.1} %.\n",
        sum_new as f64 * 100.0 / sum_all.max(1) as f64,
        sum_expected * 100.0 / sum_all.max(1) as f64
    );
    Ok(())
}
