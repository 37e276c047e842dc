//! `switchboard demo`: the failover scenario end to end, with real
//! processes. It starts a registry, one echo process per backend and the
//! client in live mode; kills a backend with SIGKILL, starts it again, then
//! stops one with SIGTERM, for round_robin and for pick_first; and prints a
//! timeline and a summary table. `--scenario gray` instead makes one backend
//! go bad without dying (hung by SIGSTOP, then failing every call) and
//! compares round_robin with least_request plus outlier detection. `--ha`
//! (a build with `--features etcd`, and `etcd` on PATH) runs three registry
//! replicas on a throwaway etcd instead of one registry, and kills one
//! replica, a backend, then every replica. Every process it started is
//! killed when it ends, Ctrl-C included.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use switchboard::client::resolver::ResolverEvent;
use switchboard::client::{PolicyKind, RegistryResolver, Resolver, ResolverSink};
use switchboard::discovery::EndpointSet;
use switchboard::process;
#[cfg(feature = "etcd")]
use switchboard::registry::etcd::local::LocalEtcd;
use switchboard::registry::DEFAULT_SERVICE;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Runs the failover scenario with real processes and prints what happens.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// What to show: `failover` (kill, restart, drain) or `gray` (a backend
    /// that hangs, then fails every call, without dying).
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
}

/// One client configuration the demo runs the scenario with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Contender {
    policy: PolicyKind,
    /// Wrap the policy in outlier detection.
    outlier_detection: bool,
}

impl std::fmt::Display for Contender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.policy)?;
        if self.outlier_detection {
            f.write_str("+od")?;
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
    let bins = match Binaries::find_or_build() {
        Ok(bins) => bins,
        Err(err) => process::exit_with(&err),
    };
    let plain = |policy| Contender {
        policy,
        outlier_detection: false,
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
        }],
        (None, DemoScenario::Failover) => {
            vec![plain(PolicyKind::RoundRobin), plain(PolicyKind::PickFirst)]
        }
        (None, DemoScenario::Gray) => vec![
            plain(PolicyKind::RoundRobin),
            Contender {
                policy: "least_request".parse().expect("a built-in policy"),
                outlier_detection: true,
            },
        ],
    };
    let mut rows = Vec::new();
    for contender in contenders {
        let mut scenario = Scenario::new(&bins, &args, contender, etcd_url.clone());
        let outcome = tokio::select! {
            outcome = scenario.run() => outcome,
            _ = process::shutdown_signal() => {
                println!("\ninterrupted: stopping every process the demo started");
                drop(scenario);
                drop(etcd);
                std::process::exit(130);
            }
        };
        rows.append(&mut scenario.rows);
        drop(scenario);
        if let Err(err) = outcome {
            print_summary(&rows);
            drop(etcd);
            process::exit_with(&err);
        }
    }
    print_summary(&rows);
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

/// The `switchboard` executable this demo runs as: every process the
/// demo starts is one of its subcommands, so a fresh checkout needs no
/// separate build step.
struct Binaries {
    /// Path of this very executable.
    exe: PathBuf,
}

impl Binaries {
    /// Finds this executable.
    fn find_or_build() -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot locate the switchboard binary: {e}"))?;
        Ok(Self { exe })
    }
}

/// Something the demo observed, in arrival order.
enum Observation {
    /// A line printed by the client.
    Client(String),
    /// The client exited.
    ClientExited,
    /// A registry watch message, rendered.
    Registry(RegistryChange),
    /// An echo process printed a line.
    Echo(String),
}

/// One endpoint change seen on the registry watch.
enum RegistryChange {
    Added(String),
    Draining(String),
    Removed(String),
    Snapshot(Vec<String>),
    /// The watch broke; the resolver keeps the set and moves on.
    Lost(String),
}

/// One line of the summary table.
struct Row {
    policy: Contender,
    event: String,
    failed: u64,
    registry: String,
    client: String,
}

/// One run of the scenario for one policy.
struct Scenario<'a> {
    bins: &'a Binaries,
    args: &'a Args,
    policy: PolicyKind,
    contender: Contender,
    /// The etcd the registry replicas share (`--ha`); `None` runs one
    /// in-memory registry.
    etcd: Option<String>,
    started: Instant,
    /// Every child process; killed when the scenario is dropped.
    children: Vec<(String, Child)>,
    observations: mpsc::UnboundedSender<Observation>,
    observed: mpsc::UnboundedReceiver<Observation>,
    /// Addresses the registry lists, with whether they are draining.
    registry_set: BTreeMap<String, bool>,
    /// The client's ready set.
    client_ready: Vec<String>,
    /// Failed RPCs the client reported since the last event.
    failed_since_event: u64,
    /// Endpoints the registry watch added and removed since the last event.
    added_since_event: u64,
    removed_since_event: u64,
    /// The smallest ready set the client reported since the last event.
    min_ready_since_event: usize,
    client_done: bool,
    /// The client's final `total ok=.. failed=..` line.
    client_total: Option<(u64, u64)>,
    rows: Vec<Row>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Scenario<'_> {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        for (_, child) in &mut self.children {
            let _ = child.start_kill();
        }
    }
}

impl<'a> Scenario<'a> {
    fn new(bins: &'a Binaries, args: &'a Args, contender: Contender, etcd: Option<String>) -> Self {
        let (observations, observed) = mpsc::unbounded_channel();
        Self {
            bins,
            args,
            policy: contender.policy,
            contender,
            etcd,
            started: Instant::now(),
            children: Vec::new(),
            observations,
            observed,
            registry_set: BTreeMap::new(),
            client_ready: Vec::new(),
            failed_since_event: 0,
            added_since_event: 0,
            removed_since_event: 0,
            min_ready_since_event: 0,
            client_done: false,
            client_total: None,
            rows: Vec::new(),
            watcher: None,
        }
    }

    fn log(&self, source: &str, text: &str) {
        println!(
            "[{:>7.3}s] {source:<8} {text}",
            self.started.elapsed().as_secs_f64()
        );
    }

    async fn run(&mut self) -> Result<(), String> {
        println!("\n######## {} ########", self.contender);
        let replicas = if self.etcd.is_some() { 3 } else { 1 };
        let replicas: Vec<String> = (0..replicas)
            .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
            .collect::<Result<_, _>>()?;
        let ports: Vec<u16> = (0..self.args.backends)
            .map(|_| free_port())
            .collect::<Result<_, _>>()?;
        let backends: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();

        for (i, replica) in replicas.iter().enumerate() {
            self.start_registry(i, replica)?;
        }
        // Backends, the client and the demo's own watch name every replica.
        let registry = replicas.join(",");
        self.watch_registry(&registry).await?;

        for backend in &backends {
            self.start_backend(&registry, backend)?;
        }
        let all = backends.clone();
        self.wait("every backend registered", |s| {
            all.iter().all(|b| s.registry_set.get(b) == Some(&false))
        })
        .await?;

        let target = format!("registry://{registry}/{DEFAULT_SERVICE}");
        self.log(
            "demo",
            &format!(
                "starting the client: {} at {} RPC/s",
                self.policy, self.args.rate
            ),
        );
        let rate = self.args.rate.to_string();
        let policy = self.policy.to_string();
        let outlier: &[&str] = if self.contender.outlier_detection {
            &["--outlier-detection"]
        } else {
            &[]
        };
        let client_args: Vec<&str> = [
            "--target",
            &target,
            "--policy",
            &policy,
            "--rate",
            &rate,
            "--timeout",
            "1s",
            "--backoff-initial",
            "200ms",
            "--backoff-max",
            "2s",
            "--keepalive-interval",
            "1s",
            "--keepalive-timeout",
            "1s",
        ]
        .into_iter()
        .chain(outlier.iter().copied())
        .collect();
        self.spawn("client", "client", &client_args, |line| {
            Some(Observation::Client(line))
        })?;
        self.wait("the client to send traffic", |s| !s.client_ready.is_empty())
            .await?;
        self.steady().await;
        if self.etcd.is_some() {
            self.ha(&replicas, &backends[1]).await?;
            return self.stop_client().await;
        }
        if self.args.scenario == DemoScenario::Gray {
            self.gray(&registry, &backends[1]).await?;
            return self.stop_client().await;
        }

        // 1. SIGKILL the backend the client uses (the middle one for round_robin).
        let victim = match self.policy {
            PolicyKind::PickFirst => self.client_ready[0].clone(),
            // Every other policy uses every backend.
            _ => backends[1].clone(),
        };
        self.kill_backend(&victim, libc::SIGKILL, "SIGKILL").await?;
        self.steady().await;

        // 2. Start it again.
        let event = format!("restart {victim}");
        self.event(&event);
        let since = Instant::now();
        self.start_backend(&registry, &victim)?;
        let v = victim.clone();
        self.wait("the backend to re-register", |s| {
            s.registry_set.get(&v) == Some(&false)
        })
        .await?;
        let registered = since.elapsed();
        let client = if self.policy != PolicyKind::PickFirst {
            let v = victim.clone();
            self.wait("the client to use it again", |s| {
                s.client_ready.contains(&v)
            })
            .await?;
            format!("back in rotation after {} ms", since.elapsed().as_millis())
        } else {
            "stays on its current backend (pick_first)".into()
        };
        self.steady().await;
        self.row(
            event,
            format!("registered after {} ms", registered.as_millis()),
            client,
        );

        // 3. SIGTERM the backend the client uses now: a graceful drain.
        let drained = self.client_ready[0].clone();
        self.kill_backend(&drained, libc::SIGTERM, "SIGTERM")
            .await?;
        self.steady().await;

        self.stop_client().await
    }

    /// Starts registry number `i` (of the replicas) on `address`: in
    /// memory, or on the shared etcd with `--ha`.
    fn start_registry(&mut self, i: usize, address: &str) -> Result<(), String> {
        let mut args = vec!["--listen", address];
        match &self.etcd {
            Some(etcd) => {
                self.log(
                    "demo",
                    &format!(
                        "starting registry replica {} on {address} (etcd at {etcd})",
                        i + 1
                    ),
                );
                // The state lives in etcd: a replica needs no warm-up.
                args.extend(["--store", "etcd", "--etcd-endpoints", etcd]);
                args.extend(["--warmup-ms", "0"]);
            }
            None => self.log("demo", &format!("starting the registry on {address}")),
        }
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&replica_label(i), "registry", &args, |_| None)
    }

    /// The `--ha` events: a replica is SIGKILLed, then a backend, then
    /// every replica is SIGKILLed and started again. Endpoints must stay
    /// (no removal, no re-add) through replica losses, and a dead backend
    /// must still leave.
    async fn ha(&mut self, replicas: &[String], victim: &str) -> Result<(), String> {
        // 1. The first replica: every backend and the client started on it.
        let event = format!("SIGKILL replica 1 {}", replicas[0]);
        self.event(&event);
        self.kill_child(&replica_label(0))?;
        self.steady().await;
        let (registry, client) = self.kept();
        self.row(event, registry, client);

        // 2. A backend: its stream breaks at the replica it moved to.
        self.kill_backend(victim, libc::SIGKILL, "SIGKILL").await?;
        self.steady().await;

        // 3. Every replica, then all of them again on the same addresses.
        let event = "SIGKILL + restart all replicas".to_owned();
        self.event(&event);
        for i in 1..replicas.len() {
            self.kill_child(&replica_label(i))?;
        }
        let since = Instant::now();
        for (i, replica) in replicas.iter().enumerate() {
            self.start_registry(i, replica)?;
        }
        for replica in replicas {
            wait_listening(replica).await?;
        }
        self.log(
            "demo",
            &format!(
                "every replica answers again after {} ms",
                since.elapsed().as_millis()
            ),
        );
        self.steady().await;
        let (registry, client) = self.kept();
        self.row(event, registry, client);
        Ok(())
    }

    /// What the registry watch and the client kept since the last event:
    /// the summary cells of an event no endpoint should notice.
    fn kept(&self) -> (String, String) {
        let registry = format!(
            "{} removed, {} added, {} listed",
            self.removed_since_event,
            self.added_since_event,
            self.registry_set.len()
        );
        let client = format!("ready set never below {}", self.min_ready_since_event);
        (registry, client)
    }

    /// SIGKILLs the child `label` and forgets it.
    fn kill_child(&mut self, label: &str) -> Result<(), String> {
        let pid = self
            .children
            .iter()
            .find(|(n, _)| n == label)
            .and_then(|(_, c)| c.id())
            .ok_or_else(|| format!("{label} is not running"))?;
        self.log("demo", &format!("SIGKILL {label} (pid {pid})"));
        signal(pid, libc::SIGKILL);
        self.children.retain(|(n, _)| n != label);
        Ok(())
    }

    /// One backend goes bad without dying: hung (SIGSTOP) for a phase, back
    /// (SIGCONT), then restarted failing every call. The rows show what
    /// each cost the client.
    async fn gray(&mut self, registry: &str, victim: &str) -> Result<(), String> {
        let label = format!("backend-{}", victim.rsplit(':').next().unwrap_or(victim));
        let pid = self
            .children
            .iter()
            .find(|(n, _)| *n == label)
            .and_then(|(_, c)| c.id())
            .ok_or_else(|| format!("{victim} is not running"))?;
        let event = format!("SIGSTOP {victim} (hung)");
        self.event(&event);
        signal(pid, libc::SIGSTOP);
        self.steady().await;
        self.row(event, "still registered".into(), "-".into());

        let event = format!("SIGCONT {victim}");
        self.event(&event);
        signal(pid, libc::SIGCONT);
        self.steady().await;
        self.row(event, "-".into(), "-".into());

        let event = format!("{victim} fails every call");
        self.event(&format!("{event}: restarted with --fail-rate 1"));
        signal(pid, libc::SIGKILL);
        self.children.retain(|(n, _)| *n != label);
        let v = victim.to_owned();
        self.wait("the old backend to leave", |s| {
            !s.registry_set.contains_key(&v)
        })
        .await?;
        self.start_echo(registry, victim, &["--fail-rate", "1"])?;
        self.wait("the failing backend to register", |s| {
            s.registry_set.get(&v) == Some(&false)
        })
        .await?;
        self.steady().await;
        self.steady().await;
        self.row(event, "registered, serving errors".into(), "-".into());
        Ok(())
    }

    /// Stops the client, which prints its summary, and records it.
    async fn stop_client(&mut self) -> Result<(), String> {
        self.event("stop the client");
        if let Some((_, child)) = self.children.iter().find(|(n, _)| n == "client") {
            if let Some(pid) = child.id() {
                signal(pid, libc::SIGINT);
            }
        }
        self.wait("the client's summary", |s| s.client_done).await?;
        let (ok, failed) = self.client_total.unwrap_or_default();
        self.rows.push(Row {
            policy: self.contender,
            event: "whole run (client summary)".into(),
            failed,
            registry: "-".into(),
            client: format!("{ok} RPCs served"),
        });
        Ok(())
    }

    /// Kills `backend` with `signal`, measuring how long until the registry
    /// drops it and the client stops using it.
    async fn kill_backend(
        &mut self,
        backend: &str,
        signal_number: i32,
        name: &str,
    ) -> Result<(), String> {
        let label = format!("backend-{}", backend.rsplit(':').next().unwrap_or(backend));
        let pid = self
            .children
            .iter()
            .find(|(n, _)| *n == label)
            .and_then(|(_, c)| c.id())
            .ok_or_else(|| format!("{backend} is not running"))?;
        let event = format!("{name} {backend}");
        self.event(&format!("{event} (pid {pid})"));
        let since = Instant::now();
        signal(pid, signal_number);
        let b = backend.to_owned();
        let mut client_left = None;
        let mut registry_left = None;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while client_left.is_none() || registry_left.is_none() {
            if client_left.is_none() && !self.client_ready.contains(&b) {
                client_left = Some(since.elapsed());
                self.log(
                    "demo",
                    &format!(
                        "client stopped sending to {b} after {} ms",
                        since.elapsed().as_millis()
                    ),
                );
            }
            if registry_left.is_none() && !self.registry_set.contains_key(&b) {
                registry_left = Some(since.elapsed());
                self.log(
                    "demo",
                    &format!(
                        "registry removed {b} after {} ms",
                        since.elapsed().as_millis()
                    ),
                );
            }
            if client_left.is_some() && registry_left.is_some() {
                break;
            }
            if !self.pump_until(deadline).await {
                return Err(format!(
                    "{b} was still in use {EVENT_TIMEOUT:?} after {name}"
                ));
            }
        }
        self.children.retain(|(n, _)| *n != label);
        self.row(
            event,
            format!(
                "removed after {} ms",
                registry_left.unwrap_or_default().as_millis()
            ),
            format!(
                "stopped using it after {} ms",
                client_left.unwrap_or_default().as_millis()
            ),
        );
        Ok(())
    }

    fn row(&mut self, event: String, registry: String, client: String) {
        // Failures counted since this event started are filled in by the
        // next event; remember this row and settle its count then.
        self.rows.push(Row {
            policy: self.contender,
            event,
            failed: 0,
            registry,
            client,
        });
    }

    /// Marks a new event: failures since the previous one belong to it.
    fn event(&mut self, text: &str) {
        if let Some(last) = self
            .rows
            .iter_mut()
            .rev()
            .find(|r| r.policy == self.contender)
        {
            last.failed = self.failed_since_event;
        }
        self.failed_since_event = 0;
        self.added_since_event = 0;
        self.removed_since_event = 0;
        self.min_ready_since_event = self.client_ready.len();
        self.log("EVENT", &format!(">>> {text}"));
    }

    fn start_backend(&mut self, registry: &str, backend: &str) -> Result<(), String> {
        self.start_echo(registry, backend, &[])
    }

    /// Starts an echo backend at `backend` with `extra` flags.
    fn start_echo(&mut self, registry: &str, backend: &str, extra: &[&str]) -> Result<(), String> {
        let label = format!("backend-{}", backend.rsplit(':').next().unwrap_or(backend));
        self.log(
            "demo",
            &format!("starting echo backend {backend} {}", extra.join(" ")),
        );
        let args: Vec<&str> = [
            "--registry",
            registry,
            "--listen",
            backend,
            "--drain-grace-ms",
            "500",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
        self.spawn(&label, "echo", &args, |line| {
            line.contains("serving").then_some(Observation::Echo(line))
        })
    }

    /// Pumps observations for one phase of steady traffic.
    async fn steady(&mut self) {
        let until = Instant::now() + Duration::from_secs_f64(self.args.phase_secs);
        while self.pump_until(until).await {}
    }

    /// Pumps observations until `done` holds, or fails after the timeout.
    async fn wait(&mut self, what: &str, done: impl Fn(&Self) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !done(self) {
            if !self.pump_until(deadline).await {
                return Err(format!(
                    "gave up waiting for {what} after {EVENT_TIMEOUT:?}"
                ));
            }
        }
        Ok(())
    }

    /// Handles one observation; false once `deadline` passed first.
    async fn pump_until(&mut self, deadline: Instant) -> bool {
        let observation = match tokio::time::timeout_at(deadline, self.observed.recv()).await {
            Ok(Some(observation)) => observation,
            _ => return false,
        };
        match observation {
            Observation::Client(line) => {
                if let Some(ready) = line.split_once("ready:").map(|(_, r)| r.trim()) {
                    self.client_ready = ready
                        .split(", ")
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect();
                    self.min_ready_since_event =
                        self.min_ready_since_event.min(self.client_ready.len());
                }
                if let Some(failed) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("failed="))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    if line.starts_with("t=") {
                        self.failed_since_event += failed;
                    }
                }
                if let Some(total) = line.trim().strip_prefix("total ") {
                    let number = |key: &str| {
                        total
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix(key))
                            .and_then(|n| n.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    self.client_total = Some((number("ok="), number("failed=")));
                }
                self.log("client", &line);
            }
            Observation::ClientExited => self.client_done = true,
            Observation::Echo(line) => self.log("echo", &line),
            Observation::Registry(change) => match change {
                RegistryChange::Snapshot(all) => {
                    self.registry_set = all.into_iter().map(|a| (a, false)).collect();
                }
                RegistryChange::Added(address) => {
                    self.log("registry", &format!("+ {address} registered"));
                    self.added_since_event += 1;
                    self.registry_set.insert(address, false);
                }
                RegistryChange::Draining(address) => {
                    self.log("registry", &format!("~ {address} DRAINING"));
                    self.registry_set.insert(address, true);
                }
                RegistryChange::Removed(address) => {
                    self.log("registry", &format!("- {address} removed"));
                    self.removed_since_event += 1;
                    self.registry_set.remove(&address);
                }
                RegistryChange::Lost(why) => {
                    self.log("registry", &format!("watch: {why}; keeping the set"));
                }
            },
        }
        true
    }

    /// Starts a child whose stdout lines `observe` may turn into
    /// observations; stderr (logs) is discarded.
    fn spawn(
        &mut self,
        name: &str,
        subcommand: &str,
        args: &[&str],
        observe: impl Fn(String) -> Option<Observation> + Send + 'static,
    ) -> Result<(), String> {
        let bin = &self.bins.exe;
        let mut child = Command::new(bin)
            .arg(subcommand)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let observations = self.observations.clone();
        let is_client = name == "client";
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(observation) = observe(line) {
                    let _ = observations.send(observation);
                }
            }
            if is_client {
                let _ = observations.send(Observation::ClientExited);
            }
        });
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Watches the service in the registry (any of its replicas), as a
    /// client would: with the library's resolver, which moves to another
    /// replica when a stream breaks and resumes from the version it holds.
    async fn watch_registry(&mut self, registry: &str) -> Result<(), String> {
        let first = registry.split(',').next().unwrap_or(registry);
        wait_listening(first).await?;
        let (sink, mut events) = ResolverSink::new();
        let resolver = Box::new(RegistryResolver::new(registry, DEFAULT_SERVICE));
        let resolving = resolver.resolve(sink);
        let observations = self.observations.clone();
        // The library's own applier turns each message into what changed.
        let apply = async move {
            let mut set = EndpointSet::new();
            while let Some(event) = events.recv().await {
                let update = match event {
                    ResolverEvent::Update(update) => update,
                    ResolverEvent::Error(why) => {
                        let _ = observations
                            .send(Observation::Registry(RegistryChange::Lost(why.to_string())));
                        continue;
                    }
                };
                let first = !set.is_known();
                let applied = set.apply(update);
                let changes: Vec<RegistryChange> = if first {
                    vec![RegistryChange::Snapshot(
                        set.addresses().map(str::to_owned).collect(),
                    )]
                } else {
                    let joined = applied.added.into_iter().chain(applied.updated);
                    joined
                        .map(|address| match set.get(&address) {
                            Some(e) if e.is_draining() => RegistryChange::Draining(address),
                            _ => RegistryChange::Added(address),
                        })
                        .chain(applied.removed.into_iter().map(RegistryChange::Removed))
                        .collect()
                };
                for change in changes {
                    let _ = observations.send(Observation::Registry(change));
                }
            }
        };
        // One task runs both, so aborting it stops the resolver too.
        self.watcher = Some(tokio::spawn(async move {
            tokio::select! {
                _ = resolving => {}
                _ = apply => {}
            }
        }));
        Ok(())
    }
}

/// The label of registry replica `i` among the demo's children.
fn replica_label(i: usize) -> String {
    format!("registry-{}", i + 1)
}

/// Waits until something accepts connections at `address`.
async fn wait_listening(address: &str) -> Result<(), String> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        match tokio::net::TcpStream::connect(address).await {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => return Err(format!("registry at {address} did not come up: {err}")),
        }
    }
}

fn print_summary(rows: &[Row]) {
    println!("\n==== summary ====");
    let header = ["policy", "event", "failed RPCs", "registry", "client"];
    println!(
        "{:<17} {:<34} {:>11}  {:<30} {}",
        header[0], header[1], header[2], header[3], header[4]
    );
    for row in rows {
        println!(
            "{:<17} {:<34} {:>11}  {:<30} {}",
            row.policy.to_string(),
            row.event,
            row.failed,
            row.registry,
            row.client
        );
    }
    println!("(failed RPCs are counted from an event until the next one)");
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a child we started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}
