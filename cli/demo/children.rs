//! What the demo starts and watches: its child processes (registry
//! replicas, echo backends, the client), each a [`process::Child`] under a
//! label, and its own watch of the registry. Everything the scenario
//! learns arrives from them, in order, as an [`Observation`].

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use switchboard::client::resolver::ResolverEvent;
use switchboard::client::{RegistryResolver, Resolver, ResolverSink};
use switchboard::discovery::EndpointSet;
use switchboard::process::{self, Child, Stream};
use switchboard::registry::DEFAULT_SERVICE;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::EVENT_TIMEOUT;

/// Something the demo observed, in arrival order.
pub enum Observation {
    /// A line printed by the client.
    Client(String),
    /// The client exited.
    ClientExited,
    /// A registry watch message, rendered.
    Registry(RegistryChange),
    /// An echo process printed a line.
    Echo(String),
    /// The grpcio xDS client printed a line.
    Grpcio(String),
}

/// One endpoint change seen on the registry watch.
pub enum RegistryChange {
    Added(String),
    Draining(String),
    Removed(String),
    Snapshot(Vec<String>),
    /// The watch broke; the resolver keeps the set and moves on.
    Lost(String),
}

/// The processes one run of the scenario started, by label; each is
/// killed (SIGKILL) and reaped when it is taken away or the run ends.
pub struct Children {
    /// The `switchboard` executable this demo runs as: every child is one
    /// of its subcommands, so a fresh checkout needs no other build step.
    exe: PathBuf,
    /// Every child still running, by label.
    running: Vec<(String, Child)>,
    /// Where the children's lines go, as observations.
    observations: mpsc::UnboundedSender<Observation>,
}

impl Children {
    /// No children yet; their lines will go to `observations`.
    pub fn new(exe: PathBuf, observations: mpsc::UnboundedSender<Observation>) -> Self {
        Self {
            exe,
            running: Vec::new(),
            observations,
        }
    }

    /// Starts `switchboard <subcommand> <args>` as `label`. Each stdout line
    /// that `observe` turns into an observation is sent on as it comes, and
    /// `at_end` once the output ends (the child exited); stderr (its logs)
    /// is discarded. The task that follows the lines ends with them, which
    /// killing the child makes sure of.
    pub fn start(
        &mut self,
        label: &str,
        subcommand: &str,
        args: &[&str],
        observe: impl Fn(String) -> Option<Observation> + Send + 'static,
        at_end: Option<Observation>,
    ) -> Result<(), String> {
        let mut command = Command::new(&self.exe);
        command.arg(subcommand).args(args);
        self.start_command(label, command, observe, at_end)
    }

    /// As [`Children::start`], for any program: the grpcio client.
    pub fn start_command(
        &mut self,
        label: &str,
        command: Command,
        observe: impl Fn(String) -> Option<Observation> + Send + 'static,
        at_end: Option<Observation>,
    ) -> Result<(), String> {
        let program = command.get_program().to_string_lossy().into_owned();
        let child = Child::spawn_with(label, command, Stream::Lines, Stream::Discard)
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let mut lines = child.lines();
        let observations = self.observations.clone();
        tokio::spawn(async move {
            while let Some(line) = lines.next_line().await {
                if let Some(observation) = observe(line) {
                    let _ = observations.send(observation);
                }
            }
            if let Some(observation) = at_end {
                let _ = observations.send(observation);
            }
        });
        self.running.push((label.to_owned(), child));
        Ok(())
    }

    /// Where the children's lines go, for another source of observations.
    pub fn observations(&self) -> mpsc::UnboundedSender<Observation> {
        self.observations.clone()
    }

    /// The pid of the child `label`, if it runs.
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.child(label).map(Child::pid)
    }

    /// Sends `signal` to the child `label`, if it runs.
    pub fn signal(&self, label: &str, signal: i32) {
        if let Some(child) = self.child(label) {
            child.signal(signal);
        }
    }

    /// SIGKILLs the child `label` and forgets it.
    pub fn kill(&mut self, label: &str) {
        // Dropping a child kills and reaps it.
        self.running.retain(|(l, _)| l != label);
    }

    fn child(&self, label: &str) -> Option<&Child> {
        self.running
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, child)| child)
    }
}

/// The demo's own watch of the service, as a client would watch it: with
/// the library's resolver on every replica, which moves to another replica
/// when a stream breaks and resumes from the version it holds. The task is
/// stopped when this is dropped.
pub struct RegistryWatch {
    task: tokio::task::JoinHandle<()>,
}

impl RegistryWatch {
    /// Waits until the first replica of `registry` (a comma-separated list)
    /// listens, then watches it, sending each change to `observations`.
    pub async fn start(
        registry: &str,
        observations: mpsc::UnboundedSender<Observation>,
    ) -> Result<Self, String> {
        let first = registry.split(',').next().unwrap_or(registry);
        wait_listening(first).await?;
        let (sink, mut events) = ResolverSink::new();
        let resolver = Box::new(RegistryResolver::new(registry, DEFAULT_SERVICE));
        let resolving = resolver.resolve(sink);
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
                    ResolverEvent::ServiceConfig(_) => continue,
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
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = resolving => {}
                _ = apply => {}
            }
        });
        Ok(Self { task })
    }
}

impl Drop for RegistryWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until something accepts connections at `address`.
pub async fn wait_listening(address: &str) -> Result<(), String> {
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

/// A free loopback address for a child the demo must tell where to listen
/// (a backend comes back on the address it had).
pub fn free_address() -> Result<String, String> {
    process::free_port()
        .map(|port| format!("127.0.0.1:{port}"))
        .map_err(|e| format!("cannot find a free port: {e}"))
}
