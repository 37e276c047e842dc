//! What the summary table says, typed: the events the demo causes, what
//! the registry and the client were seen to do about each, and the rows.

use std::time::Duration;

use super::Contender;

/// How a backend is taken away.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// SIGKILL: a crash.
    Crash,
    /// SIGTERM: a graceful drain.
    Drain,
}

impl Stop {
    pub fn signal(self) -> i32 {
        match self {
            Stop::Crash => libc::SIGKILL,
            Stop::Drain => libc::SIGTERM,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stop::Crash => "SIGKILL",
            Stop::Drain => "SIGTERM",
        }
    }
}

/// Something the demo does to the system; each is a row of the summary.
pub enum Event {
    /// `backend` (process `pid`) was signalled away.
    Stopped {
        backend: String,
        how: Stop,
        pid: u32,
    },
    /// `backend` was started again on its address.
    Restarted { backend: String },
    /// `backend` was SIGSTOPped: up, but answering nothing.
    Hung { backend: String },
    /// `backend` was SIGCONTed.
    Resumed { backend: String },
    /// `backend` was restarted with `--fail-rate 1`.
    FailingEveryCall { backend: String },
    /// Registry replica `replica` (from 1), at `address`, was SIGKILLed.
    ReplicaKilled { replica: usize, address: String },
    /// Every replica was SIGKILLed and started again.
    ReplicasRestarted,
    /// The registry was given a service config (outlier detection and
    /// retries) with `config set`.
    ConfigPushed,
    /// Every backend of the client's zone was SIGKILLed.
    ZoneDown { zone: String },
    /// The zone's backends were started again.
    ZoneBack { zone: String },
    /// The client was stopped; its row is the whole run's.
    ClientStopped,
}

impl Event {
    /// Its name in the summary.
    pub fn summary(&self) -> String {
        match self {
            Event::Stopped { backend, how, .. } => format!("{} {backend}", how.name()),
            Event::Restarted { backend } => format!("restart {backend}"),
            Event::Hung { backend } => format!("SIGSTOP {backend} (hung)"),
            Event::Resumed { backend } => format!("SIGCONT {backend}"),
            Event::FailingEveryCall { backend } => format!("{backend} fails every call"),
            Event::ReplicaKilled { replica, address } => {
                format!("SIGKILL replica {replica} {address}")
            }
            Event::ReplicasRestarted => "SIGKILL + restart all replicas".into(),
            Event::ConfigPushed => "config set: ejection + retries".into(),
            Event::ZoneDown { zone } => format!("SIGKILL all of zone {zone}"),
            Event::ZoneBack { zone } => format!("restart zone {zone}"),
            Event::ClientStopped => "whole run (client summary)".into(),
        }
    }

    /// Its line in the timeline.
    pub fn timeline(&self) -> String {
        match self {
            Event::Stopped { pid, .. } => format!("{} (pid {pid})", self.summary()),
            Event::FailingEveryCall { .. } => {
                format!("{}: restarted with --fail-rate 1", self.summary())
            }
            Event::ClientStopped => "stop the client".into(),
            _ => self.summary(),
        }
    }
}

/// What the registry did about an event, as the summary says it.
pub enum RegistrySaw {
    Removed(Duration),
    Registered(Duration),
    /// An event no endpoint should notice: what changed anyway.
    Kept {
        removed: u64,
        added: u64,
        listed: usize,
    },
    StillRegistered,
    ServingErrors,
    /// A service config was set at this version, and pushed on Watch.
    ConfigPushed(u64),
    Nothing,
}

impl std::fmt::Display for RegistrySaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistrySaw::Removed(after) => write!(f, "removed after {} ms", after.as_millis()),
            RegistrySaw::Registered(after) => {
                write!(f, "registered after {} ms", after.as_millis())
            }
            RegistrySaw::Kept {
                removed,
                added,
                listed,
            } => write!(f, "{removed} removed, {added} added, {listed} listed"),
            RegistrySaw::StillRegistered => f.write_str("still registered"),
            RegistrySaw::ServingErrors => f.write_str("registered, serving errors"),
            RegistrySaw::ConfigPushed(version) => write!(f, "pushed config version {version}"),
            RegistrySaw::Nothing => f.write_str("-"),
        }
    }
}

/// What the client did about an event, as the summary says it.
pub enum ClientSaw {
    StoppedUsing(Duration),
    BackInRotation(Duration),
    /// pick_first keeps the backend it has.
    StaysOnCurrent,
    ReadyNeverBelow(usize),
    /// A full second without a failed call ended this long after.
    FailuresStopped(Duration),
    Served(u64),
    Nothing,
}

impl std::fmt::Display for ClientSaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientSaw::StoppedUsing(after) => {
                write!(f, "stopped using it after {} ms", after.as_millis())
            }
            ClientSaw::BackInRotation(after) => {
                write!(f, "back in rotation after {} ms", after.as_millis())
            }
            ClientSaw::StaysOnCurrent => f.write_str("stays on its current backend (pick_first)"),
            ClientSaw::ReadyNeverBelow(n) => write!(f, "ready set never below {n}"),
            ClientSaw::FailuresStopped(after) => {
                write!(
                    f,
                    "no failure in the second ending {} ms after",
                    after.as_millis()
                )
            }
            ClientSaw::Served(ok) => write!(f, "{ok} RPCs served"),
            ClientSaw::Nothing => f.write_str("-"),
        }
    }
}

/// What an event was seen to do, once measured.
pub struct Outcome {
    pub registry: RegistrySaw,
    pub client: ClientSaw,
}

/// One line of the summary table.
pub struct Row {
    pub policy: Contender,
    pub event: Event,
    /// Counted from the event until the next one.
    pub failed: u64,
    pub outcome: Outcome,
}

/// Prints the summary table of `rows`, then `notes`.
pub fn print_summary(rows: &[Row], notes: &[String]) {
    println!("\n==== summary ====");
    let header = ["policy", "event", "failed RPCs", "registry", "client"];
    println!(
        "{:<19} {:<34} {:>11}  {:<30} {}",
        header[0], header[1], header[2], header[3], header[4]
    );
    for row in rows {
        println!(
            "{:<19} {:<34} {:>11}  {:<30} {}",
            row.policy.to_string(),
            row.event.summary(),
            row.failed,
            row.outcome.registry.to_string(),
            row.outcome.client
        );
    }
    println!("(failed RPCs are counted from an event until the next one)");
    for note in notes {
        println!("{note}");
    }
}
