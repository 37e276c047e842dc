//! One run of the scenario for one client configuration: the setup
//! (registry replicas, the demo's watch, the backends, the client), then the
//! events of its [`Plan`], each measured and counted into a row of the
//! summary.
//!
//! What the run knows is typed: a [`View`] of what the registry lists and
//! what the client does, built from observations alone; the [`Phase`] it is
//! in, which owns the event under way and the [`Tally`] of what happened
//! since it began; and the [`Row`]s it has finished (see `summary.rs`).

use std::path::PathBuf;
use std::time::Duration;

use switchboard::client::PolicyKind;
use switchboard::registry::DEFAULT_SERVICE;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::children::{free_address, wait_listening, Children, Observation, RegistryWatch};
use super::summary::{ClientSaw, Event, Outcome, RegistrySaw, Row, Stop};
use super::view::{Client, Tally, Total, View};
use super::{Args, Contender, DemoScenario, EVENT_TIMEOUT};

/// The events a run goes through after its setup.
enum Plan {
    /// A backend SIGKILLed, started again, then one SIGTERMed (drained).
    Failover,
    /// A backend hung (SIGSTOP), resumed, then failing every call.
    Gray,
    /// Registry replicas on the etcd at this URL: a replica SIGKILLed, a
    /// backend, then every replica.
    Ha { etcd: String },
    /// A backend failing every call, then a service config pushed from the
    /// registry.
    Policy,
    /// Backends in zones a and b, the client in a: zone a dies, then
    /// returns.
    Zones,
}

/// The zone `--scenario zones` runs its client in.
const CLIENT_ZONE: &str = "a";

/// The zone of backend `i` of `n` under `--scenario zones`: the first half
/// in the client's.
fn zone_of(i: usize, n: usize) -> &'static str {
    match i < n / 2 {
        true => CLIENT_ZONE,
        false => "b",
    }
}

/// The config `--scenario policy` pushes: eject a backend that fails most
/// of its calls, and retry UNAVAILABLE elsewhere meanwhile.
const POLICY_CONFIG: &str = r#"{
  "loadBalancingConfig": [{"outlier_detection_experimental": {
    "interval": "1s", "baseEjectionTime": "30s", "maxEjectionPercent": 50,
    "failurePercentageEjection": {"threshold": 50, "minimumHosts": 3, "requestVolume": 20},
    "childPolicy": [{"round_robin": {}}]}}],
  "methodConfig": [{"name": [{}], "retryPolicy": {
    "maxAttempts": 3, "initialBackoff": "0.02s", "maxBackoff": "0.2s",
    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]
}"#;

/// The service config of `--scenario retries`' second run.
const RETRY_CONFIG: &str = r#"{"methodConfig": [{"name": [{}], "retryPolicy": {
  "maxAttempts": 3, "initialBackoff": "0.02s", "maxBackoff": "0.2s",
  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;

/// Where the run is.
enum Phase {
    /// Starting the registry, the backends and the client: nothing is counted.
    Setup,
    /// `event` is under way: `tally` counts what happened since it began,
    /// and `outcome` is what it was seen to do, once measured. Its row is
    /// finished when the next event begins, so that the failures it caused
    /// afterwards are its own.
    In {
        event: Event,
        tally: Tally,
        outcome: Option<Outcome>,
    },
}

/// One run of the scenario for one client configuration.
pub struct Scenario<'a> {
    args: &'a Args,
    contender: Contender,
    plan: Plan,
    started: Instant,
    /// The demo's watch of the registry, once it runs.
    watch: Option<RegistryWatch>,
    /// Every child process; killed when the scenario is dropped.
    children: Children,
    observed: mpsc::UnboundedReceiver<Observation>,
    view: View,
    phase: Phase,
    /// The rows finished so far.
    rows: Vec<Row>,
    /// What the grpcio client beside ours saw (`--scenario policy`).
    grpcio_note: Option<String>,
}

/// The grpcio client `--scenario policy` runs beside ours.
const GRPCIO_CLIENT: &str = include_str!("grpcio_client.py");

/// An xDS bootstrap naming the registry at `registry` as the server.
fn bootstrap_json(registry: &str) -> String {
    format!(
        r#"{{"xds_servers": [{{"server_uri": "{registry}", "channel_creds": [{{"type": "insecure"}}],
  "server_features": ["xds_v3"]}}], "node": {{"id": "switchboard-demo", "locality": {{}}}}}}"#
    )
}

/// Sets the demo service's config at `registry` (`SetServiceConfig`, what
/// `switchboard config set` sends); returns its version.
async fn set_config(registry: &str, json: &str) -> Result<u64, String> {
    use switchboard::proto::registry::registry_client::RegistryClient;
    use switchboard::proto::registry::SetServiceConfigRequest;
    let channel = switchboard::client::transport::channel(registry, None, EVENT_TIMEOUT)
        .await
        .map_err(|e| format!("cannot reach the registry at {registry}: {e}"))?;
    let reply = RegistryClient::new(channel)
        .set_service_config(SetServiceConfigRequest {
            service: DEFAULT_SERVICE.into(),
            json: json.into(),
        })
        .await
        .map_err(|s| format!("config set refused: {}", s.message()))?;
    Ok(reply.into_inner().version)
}

/// The label of registry replica `i` among the demo's children.
fn replica_label(i: usize) -> String {
    format!("registry-{}", i + 1)
}

/// The label of the backend at `address` among the demo's children.
fn backend_label(address: &str) -> String {
    format!("backend-{}", address.rsplit(':').next().unwrap_or(address))
}

impl<'a> Scenario<'a> {
    /// A run of `args`' scenario with `contender`, starting `exe`'s
    /// subcommands; `etcd` is the `--ha` run's etcd.
    pub fn new(exe: PathBuf, args: &'a Args, contender: Contender, etcd: Option<String>) -> Self {
        let (observations, observed) = mpsc::unbounded_channel();
        let plan = match (etcd, args.scenario) {
            (Some(etcd), _) => Plan::Ha { etcd },
            (None, DemoScenario::Gray) => Plan::Gray,
            (None, DemoScenario::Policy) => Plan::Policy,
            (None, DemoScenario::Zones) => Plan::Zones,
            (None, DemoScenario::Failover | DemoScenario::Retries) => Plan::Failover,
        };
        Self {
            args,
            contender,
            plan,
            started: Instant::now(),
            watch: None,
            children: Children::new(exe, observations),
            observed,
            view: View::new(),
            phase: Phase::Setup,
            rows: Vec::new(),
            grpcio_note: None,
        }
    }

    /// The rows it finished, and stops every process it started. An event
    /// measured but not followed by another (the run failed first) has no
    /// failures counted: they are counted until the next event.
    /// Also returns notes to print under the summary.
    pub fn into_rows(self) -> (Vec<Row>, Vec<String>) {
        let mut rows = self.rows;
        if let Phase::In {
            event,
            outcome: Some(outcome),
            ..
        } = self.phase
        {
            rows.push(Row {
                policy: self.contender,
                event,
                failed: 0,
                outcome,
            });
        }
        (rows, self.grpcio_note.into_iter().collect())
    }

    fn log(&self, source: &str, text: &str) {
        println!(
            "[{:>7.3}s] {source:<8} {text}",
            self.started.elapsed().as_secs_f64()
        );
    }

    pub async fn run(&mut self) -> Result<(), String> {
        println!("\n######## {} ########", self.contender);
        let replicas = match self.plan {
            Plan::Ha { .. } => 3,
            Plan::Failover | Plan::Gray | Plan::Policy | Plan::Zones => 1,
        };
        let replicas: Vec<String> = (0..replicas)
            .map(|_| free_address())
            .collect::<Result<_, _>>()?;
        // Two zones need two backends each to show a spill and a move.
        let count = match self.plan {
            Plan::Zones => self.args.backends.max(4),
            _ => self.args.backends,
        };
        let backends: Vec<String> = (0..count)
            .map(|_| free_address())
            .collect::<Result<_, _>>()?;

        for (i, replica) in replicas.iter().enumerate() {
            self.start_registry(i, replica)?;
        }
        // Backends, the client and the demo's own watch name every replica.
        let registry = replicas.join(",");
        let observations = self.children.observations();
        self.watch = Some(RegistryWatch::start(&registry, observations).await?);

        for (i, backend) in backends.iter().enumerate() {
            match self.plan {
                Plan::Zones => {
                    let zone = zone_of(i, backends.len());
                    self.start_echo(&registry, backend, &["--zone", zone])?
                }
                _ => self.start_echo(&registry, backend, &[])?,
            }
        }
        self.wait("every backend registered", |v| {
            backends.iter().all(|b| v.is_serving(b))
        })
        .await?;
        self.start_client(&registry)?;
        self.wait("the client to send traffic", |v| {
            !v.client.ready().is_empty()
        })
        .await?;
        self.steady().await;

        match self.plan {
            Plan::Ha { .. } => self.ha(&replicas, &backends[1]).await?,
            Plan::Gray => self.gray(&registry, &backends[1]).await?,
            Plan::Failover => self.failover(&registry, &backends).await?,
            Plan::Policy => self.policy(&registry, &backends[1]).await?,
            Plan::Zones => self.zones(&registry, &backends).await?,
        }
        self.stop_client().await
    }

    /// The failover events: a backend the client uses is SIGKILLed (the
    /// middle one for round_robin), started again, then the one the client
    /// uses now is SIGTERMed: a graceful drain.
    async fn failover(&mut self, registry: &str, backends: &[String]) -> Result<(), String> {
        let pick_first = self.contender.policy == PolicyKind::PickFirst;
        let victim = match self.view.client.ready().first() {
            Some(first) if pick_first => first.clone(),
            // Every other policy uses every backend.
            _ => backends[1].clone(),
        };
        self.take_away(&victim, Stop::Crash).await?;
        self.steady().await;

        self.begin(Event::Restarted {
            backend: victim.clone(),
        });
        let since = Instant::now();
        self.start_echo(registry, &victim, &[])?;
        self.wait("the backend to re-register", |v| v.is_serving(&victim))
            .await?;
        let registered = since.elapsed();
        let client = if pick_first {
            ClientSaw::StaysOnCurrent
        } else {
            self.wait("the client to use it again", |v| {
                v.client.ready().contains(&victim)
            })
            .await?;
            ClientSaw::BackInRotation(since.elapsed())
        };
        self.steady().await;
        self.measured(RegistrySaw::Registered(registered), client);

        let drained = self.view.client.ready().first().cloned();
        let drained = drained.ok_or("the client has no backend left to drain")?;
        self.take_away(&drained, Stop::Drain).await?;
        self.steady().await;
        Ok(())
    }

    /// One backend goes bad without dying: hung (SIGSTOP) for a phase, back
    /// (SIGCONT), then restarted failing every call. The rows show what
    /// each cost the client.
    async fn gray(&mut self, registry: &str, victim: &str) -> Result<(), String> {
        let label = backend_label(victim);
        if self.children.pid(&label).is_none() {
            return Err(format!("{victim} is not running"));
        }
        let backend = victim.to_owned();
        self.begin(Event::Hung {
            backend: backend.clone(),
        });
        self.children.signal(&label, libc::SIGSTOP);
        self.steady().await;
        self.measured(RegistrySaw::StillRegistered, ClientSaw::Nothing);

        self.begin(Event::Resumed {
            backend: backend.clone(),
        });
        self.children.signal(&label, libc::SIGCONT);
        self.steady().await;
        self.measured(RegistrySaw::Nothing, ClientSaw::Nothing);

        self.fail_every_call(registry, &backend).await
    }

    /// The `--scenario policy` events: a backend restarted failing every
    /// call, which round_robin keeps sending a third of the calls to; then
    /// the registry is given a config with outlier detection and retries,
    /// and the running client follows it.
    async fn policy(&mut self, registry: &str, victim: &str) -> Result<(), String> {
        let grpcio = self.start_grpcio(registry).await;
        let at_start = self.view.grpcio;
        self.fail_every_call(registry, victim).await?;

        // Pushed just after the client's per-second line, so the seconds
        // it counts from here on are all after the push.
        let lines = self.view.seconds.len();
        self.wait("the client's next per-second line", |v| {
            v.seconds.len() > lines
        })
        .await?;
        let at_push = self.view.grpcio;
        self.begin(Event::ConfigPushed);
        let since = Instant::now();
        let version = set_config(registry, POLICY_CONFIG).await?;
        self.log(
            "demo",
            &format!("switchboard config set {DEFAULT_SERVICE}: version {version}"),
        );
        // Until the backend is ejected its failures are retried elsewhere;
        // either way the client's next full second fails nothing.
        let pushed_at = self.view.seconds.len();
        self.wait("a second without a failed call", |v| {
            v.seconds[pushed_at..].contains(&0)
        })
        .await?;
        let stopped = since.elapsed();
        self.log(
            "demo",
            &format!(
                "no failed call in the client's second ending {} ms after the push",
                stopped.as_millis()
            ),
        );
        self.steady().await;
        self.steady().await;
        self.measured(
            RegistrySaw::ConfigPushed(version),
            ClientSaw::FailuresStopped(stopped),
        );
        self.grpcio_note = Some(match grpcio {
            Ok(()) => {
                let now = self.view.grpcio;
                format!(
                    "grpcio xds:/// client beside it, same config over xDS: before the config \
                     {} failed of {}, after it {} failed of {}",
                    at_push.failed - at_start.failed,
                    at_push.ok + at_push.failed - at_start.ok - at_start.failed,
                    now.failed - at_push.failed,
                    now.ok + now.failed - at_push.ok - at_push.failed,
                )
            }
            Err(why) => format!("grpcio xds:/// client not run: {why}"),
        });
        self.children.kill("grpcio");
        Ok(())
    }

    /// Starts a stock grpcio client on `xds:///` beside the switchboard
    /// client, if python3 can import grpcio; says why not otherwise.
    async fn start_grpcio(&mut self, registry: &str) -> Result<(), String> {
        let has_grpcio = std::process::Command::new("python3")
            .args(["-c", "import grpc"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_grpcio {
            let why = "python3 with grpcio not found (pip install grpcio)";
            self.log(
                "demo",
                &format!("skipping the grpcio xds:/// client: {why}"),
            );
            return Err(why.into());
        }
        let dir = std::env::temp_dir().join(format!("switchboard-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let script = dir.join("grpcio_client.py");
        let bootstrap = dir.join("xds-bootstrap.json");
        let written = std::fs::write(&script, GRPCIO_CLIENT)
            .and_then(|()| std::fs::write(&bootstrap, bootstrap_json(registry)));
        written.map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
        let rate = self.args.rate.to_string();
        self.log(
            "demo",
            &format!("starting a grpcio client on xds:///{DEFAULT_SERVICE} at {rate} RPC/s"),
        );
        let mut command = std::process::Command::new("python3");
        command
            .arg(&script)
            .arg(format!("xds:///{DEFAULT_SERVICE}"))
            .arg(&rate)
            .env("GRPC_XDS_BOOTSTRAP", &bootstrap);
        let line = |line| Some(Observation::Grpcio(line));
        self.children.start_command("grpcio", command, line, None)?;
        Ok(())
    }

    /// The `--scenario zones` events: every backend of the client's zone is
    /// SIGKILLed (calls move to the other zone), then started again (calls
    /// come back).
    async fn zones(&mut self, registry: &str, backends: &[String]) -> Result<(), String> {
        let local: Vec<String> = backends
            .iter()
            .enumerate()
            .filter(|(i, _)| zone_of(*i, backends.len()) == CLIENT_ZONE)
            .map(|(_, b)| b.clone())
            .collect();
        self.begin(Event::ZoneDown {
            zone: CLIENT_ZONE.into(),
        });
        let since = Instant::now();
        for backend in &local {
            let label = backend_label(backend);
            let pid = self.children.pid(&label).unwrap_or_default();
            self.log(
                "demo",
                &format!("SIGKILL {backend} (pid {pid}, zone {CLIENT_ZONE})"),
            );
            self.children.kill(&label);
        }
        self.wait("the client to leave the zone", |v| {
            let ready = v.client.ready();
            !ready.is_empty() && !ready.iter().any(|b| local.contains(b))
        })
        .await?;
        let moved = since.elapsed();
        self.wait("the registry to remove the zone", |v| {
            local.iter().all(|b| !v.listed.contains_key(b))
        })
        .await?;
        let removed = since.elapsed();
        self.steady().await;
        self.measured(
            RegistrySaw::Removed(removed),
            ClientSaw::StoppedUsing(moved),
        );

        self.begin(Event::ZoneBack {
            zone: CLIENT_ZONE.into(),
        });
        let since = Instant::now();
        for backend in &local {
            self.start_echo(registry, backend, &["--zone", CLIENT_ZONE])?;
        }
        self.wait("the zone to re-register", |v| {
            local.iter().all(|b| v.is_serving(b))
        })
        .await?;
        let registered = since.elapsed();
        self.wait("the client to use the zone again", |v| {
            local.iter().all(|b| v.client.ready().contains(b))
        })
        .await?;
        let back = since.elapsed();
        self.steady().await;
        self.measured(
            RegistrySaw::Registered(registered),
            ClientSaw::BackInRotation(back),
        );
        Ok(())
    }

    /// `victim` is restarted with `--fail-rate 1` and given two phases.
    async fn fail_every_call(&mut self, registry: &str, victim: &str) -> Result<(), String> {
        let label = backend_label(victim);
        self.begin(Event::FailingEveryCall {
            backend: victim.to_owned(),
        });
        self.children.kill(&label);
        self.wait("the old backend to leave", |v| {
            !v.listed.contains_key(victim)
        })
        .await?;
        self.start_echo(registry, victim, &["--fail-rate", "1"])?;
        self.wait("the failing backend to register", |v| v.is_serving(victim))
            .await?;
        self.steady().await;
        self.steady().await;
        self.measured(RegistrySaw::ServingErrors, ClientSaw::Nothing);
        Ok(())
    }

    /// The `--ha` events: a replica is SIGKILLed, then a backend, then
    /// every replica is SIGKILLed and started again. Endpoints must stay
    /// (no removal, no re-add) through replica losses, and a dead backend
    /// must still leave.
    async fn ha(&mut self, replicas: &[String], victim: &str) -> Result<(), String> {
        // 1. The first replica: every backend and the client started on it.
        self.begin(Event::ReplicaKilled {
            replica: 1,
            address: replicas[0].clone(),
        });
        self.kill_replica(0)?;
        self.steady().await;
        self.measure_kept();

        // 2. A backend: its stream breaks at the replica it moved to.
        self.take_away(victim, Stop::Crash).await?;
        self.steady().await;

        // 3. Every replica, then all of them again on the same addresses.
        self.begin(Event::ReplicasRestarted);
        for i in 1..replicas.len() {
            self.kill_replica(i)?;
        }
        let since = Instant::now();
        for (i, replica) in replicas.iter().enumerate() {
            self.start_registry(i, replica)?;
        }
        for replica in replicas {
            wait_listening(replica).await?;
        }
        let after = since.elapsed().as_millis();
        self.log(
            "demo",
            &format!("every replica answers again after {after} ms"),
        );
        self.steady().await;
        self.measure_kept();
        Ok(())
    }

    /// Stops the client, which prints its summary: the whole run's row.
    async fn stop_client(&mut self) -> Result<(), String> {
        self.begin(Event::ClientStopped);
        self.children.signal("client", libc::SIGINT);
        self.wait("the client's summary", |v| {
            matches!(v.client, Client::Exited(_))
        })
        .await?;
        let total = match self.view.client {
            Client::Exited(total) => total,
            _ => Total::default(),
        };
        let outcome = Outcome {
            registry: RegistrySaw::Nothing,
            client: ClientSaw::Served(total.ok),
        };
        // The client's own count, not the tally: the whole run's.
        self.finish(Event::ClientStopped, total.failed, outcome);
        Ok(())
    }

    /// Takes `backend` away, measuring how long until the registry drops
    /// it and the client stops using it.
    async fn take_away(&mut self, backend: &str, how: Stop) -> Result<(), String> {
        let label = backend_label(backend);
        let pid = self
            .children
            .pid(&label)
            .ok_or_else(|| format!("{backend} is not running"))?;
        self.begin(Event::Stopped {
            backend: backend.to_owned(),
            how,
            pid,
        });
        let since = Instant::now();
        self.children.signal(&label, how.signal());
        let mut client_left = None;
        let mut registry_left = None;
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            if client_left.is_none() && !self.view.client.ready().iter().any(|b| b == backend) {
                client_left = Some(since.elapsed());
                let after = since.elapsed().as_millis();
                let text = format!("client stopped sending to {backend} after {after} ms");
                self.log("demo", &text);
            }
            if registry_left.is_none() && !self.view.listed.contains_key(backend) {
                registry_left = Some(since.elapsed());
                let after = since.elapsed().as_millis();
                self.log(
                    "demo",
                    &format!("registry removed {backend} after {after} ms"),
                );
            }
            if let (Some(client), Some(registry)) = (client_left, registry_left) {
                self.children.kill(&label);
                let client = ClientSaw::StoppedUsing(client);
                self.measured(RegistrySaw::Removed(registry), client);
                return Ok(());
            }
            if !self.pump_until(deadline).await {
                return Err(format!(
                    "{backend} was still in use {EVENT_TIMEOUT:?} after {}",
                    how.name()
                ));
            }
        }
    }

    /// Starts registry number `i` (of the replicas) on `address`: in
    /// memory, or on the shared etcd with `--ha`.
    fn start_registry(&mut self, i: usize, address: &str) -> Result<(), String> {
        let mut args = vec!["--listen", address];
        match &self.plan {
            Plan::Ha { etcd } => {
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
            Plan::Failover | Plan::Gray | Plan::Policy | Plan::Zones => {
                self.log("demo", &format!("starting the registry on {address}"))
            }
        }
        let label = replica_label(i);
        self.children
            .start(&label, "registry", &args, |_| None, None)
    }

    /// SIGKILLs registry replica `i` and forgets it.
    fn kill_replica(&mut self, i: usize) -> Result<(), String> {
        let label = replica_label(i);
        let pid = self
            .children
            .pid(&label)
            .ok_or_else(|| format!("{label} is not running"))?;
        self.log("demo", &format!("SIGKILL {label} (pid {pid})"));
        self.children.kill(&label);
        Ok(())
    }

    /// Starts an echo backend at `backend` with `extra` flags.
    fn start_echo(&mut self, registry: &str, backend: &str, extra: &[&str]) -> Result<(), String> {
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
        let serving = |line: String| line.contains("serving").then_some(Observation::Echo(line));
        let label = backend_label(backend);
        self.children.start(&label, "echo", &args, serving, None)
    }

    /// Starts the client in live mode on `registry`, with the contender's
    /// policy at the demo's rate.
    fn start_client(&mut self, registry: &str) -> Result<(), String> {
        let target = format!("registry://{registry}/{DEFAULT_SERVICE}");
        let (policy, rate) = (self.contender.policy, self.args.rate);
        self.log(
            "demo",
            &format!("starting the client: {policy} at {rate} RPC/s"),
        );
        let (policy, rate) = (policy.to_string(), rate.to_string());
        let outlier: &[&str] = if self.contender.outlier_detection {
            &["--outlier-detection"]
        } else {
            &[]
        };
        // Under `--scenario policy` the policy is the client's default, so
        // the config the registry pushes can replace it.
        let policy_flag: &[&str] = match self.plan {
            Plan::Policy => &[],
            Plan::Zones => &["--policy", &policy, "--zone", CLIENT_ZONE],
            _ => &["--policy", &policy],
        };
        let args: Vec<&str> = ["--target", &target]
            .into_iter()
            .chain(policy_flag.iter().copied())
            .chain([
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
            ])
            .chain(outlier.iter().copied())
            .collect();
        let mut args = args;
        let config;
        if self.contender.retries {
            // gRFC A6: a call that fails before any response is tried again
            // on another backend, up to 3 attempts.
            config = std::env::temp_dir().join(format!(
                "switchboard-demo-retries-{}.json",
                std::process::id()
            ));
            std::fs::write(&config, RETRY_CONFIG)
                .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            args.extend(["--service-config", config.to_str().unwrap_or_default()]);
        }
        let line = |line| Some(Observation::Client(line));
        let exited = Some(Observation::ClientExited);
        self.children.start("client", "client", &args, line, exited)
    }

    /// Begins `event`, and finishes the row of the event before it with
    /// the failures counted since that one began.
    fn begin(&mut self, event: Event) {
        self.log("EVENT", &format!(">>> {}", event.timeline()));
        let tally = Tally {
            min_ready: self.view.client.ready().len(),
            ..Tally::default()
        };
        let next = Phase::In {
            event,
            tally,
            outcome: None,
        };
        if let Phase::In {
            event,
            tally,
            outcome: Some(outcome),
        } = std::mem::replace(&mut self.phase, next)
        {
            self.finish(event, tally.failed, outcome);
        }
    }

    /// Records what the event under way was seen to do.
    fn measured(&mut self, registry: RegistrySaw, client: ClientSaw) {
        if let Phase::In { outcome, .. } = &mut self.phase {
            *outcome = Some(Outcome { registry, client });
        }
    }

    /// Records what the registry watch and the client kept through the
    /// event under way: the cells of an event no endpoint should notice.
    fn measure_kept(&mut self) {
        let Phase::In { tally, .. } = &self.phase else {
            return;
        };
        let registry = RegistrySaw::Kept {
            removed: tally.removed,
            added: tally.added,
            listed: self.view.listed.len(),
        };
        let client = ClientSaw::ReadyNeverBelow(tally.min_ready);
        self.measured(registry, client);
    }

    /// Adds the row of `event`.
    fn finish(&mut self, event: Event, failed: u64, outcome: Outcome) {
        self.rows.push(Row {
            policy: self.contender,
            event,
            failed,
            outcome,
        });
    }

    /// Pumps observations for one phase of steady traffic.
    async fn steady(&mut self) {
        let until = Instant::now() + Duration::from_secs_f64(self.args.phase_secs);
        while self.pump_until(until).await {}
    }

    /// Pumps observations until `done` holds, or fails after the timeout.
    async fn wait(&mut self, what: &str, done: impl Fn(&View) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !done(&self.view) {
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
        let tally = match &mut self.phase {
            Phase::In { tally, .. } => Some(tally),
            Phase::Setup => None,
        };
        if let Some((source, text)) = self.view.observe(observation, tally) {
            self.log(source, &text);
        }
        true
    }
}
