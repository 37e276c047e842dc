//! What the demo knows of the system, from its observations alone: what
//! the registry lists, what the client does, and the tally of what happened
//! since an event began.

use std::collections::BTreeMap;

use super::children::{Observation, RegistryChange};

/// What happened since an event began. Failed RPCs are the client's
/// per-second counts; the rest is what the registry watch and the client's
/// ready set showed.
#[derive(Debug, Default)]
pub struct Tally {
    pub failed: u64,
    /// Endpoints the registry watch added.
    pub added: u64,
    /// Endpoints the registry watch removed.
    pub removed: u64,
    /// The smallest ready set the client reported.
    pub min_ready: usize,
}

/// The client's final `total ok=.. failed=..` line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Total {
    pub ok: u64,
    pub failed: u64,
}

/// The client, as its output shows it.
pub enum Client {
    /// Started; no ready set reported yet.
    Starting,
    /// Sending RPCs to the backends of its last `ready:` line.
    Sending { ready: Vec<String> },
    /// Printed its summary, on its way out.
    Summarised(Total),
    /// Its output ended: it exited, with its summary if it printed one.
    Exited(Total),
}

impl Client {
    /// The backends it sends to (none unless it is sending).
    pub fn ready(&self) -> &[String] {
        match self {
            Client::Sending { ready } => ready,
            _ => &[],
        }
    }
}

/// Whether the registry lists an endpoint as serving or as draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Serving,
    Draining,
}

/// What the registry lists and what the client does, from observations.
pub struct View {
    /// The endpoints the registry watch lists, by address.
    pub listed: BTreeMap<String, Listing>,
    pub client: Client,
    /// The grpcio xDS client's calls so far, when it runs.
    pub grpcio: Total,
    /// The failed count of each per-second line the client printed.
    pub seconds: Vec<u64>,
}

impl View {
    /// Nothing seen yet: no endpoint listed, the client starting.
    pub fn new() -> Self {
        Self {
            listed: BTreeMap::new(),
            client: Client::Starting,
            grpcio: Total::default(),
            seconds: Vec::new(),
        }
    }

    /// Whether the registry lists `address`, and not as draining.
    pub fn is_serving(&self, address: &str) -> bool {
        self.listed.get(address) == Some(&Listing::Serving)
    }

    /// Takes in one observation, counting it into `tally` (the event's
    /// under way, if any); returns the timeline line it makes, if any.
    pub fn observe(
        &mut self,
        observation: Observation,
        mut tally: Option<&mut Tally>,
    ) -> Option<(&'static str, String)> {
        let line = match observation {
            Observation::Client(line) => {
                self.client_line(&line, tally);
                ("client", line)
            }
            Observation::ClientExited => {
                let total = match self.client {
                    Client::Summarised(total) => total,
                    _ => Total::default(),
                };
                self.client = Client::Exited(total);
                return None;
            }
            Observation::Echo(line) => ("echo", line),
            Observation::Grpcio(line) => {
                let count = |key: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(key)?.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                self.grpcio.ok += count("ok=");
                self.grpcio.failed += count("failed=");
                ("grpcio", line)
            }
            Observation::Registry(change) => match change {
                RegistryChange::Snapshot(all) => {
                    self.listed = all.into_iter().map(|a| (a, Listing::Serving)).collect();
                    return None;
                }
                RegistryChange::Added(address) => {
                    if let Some(tally) = tally.as_mut() {
                        tally.added += 1;
                    }
                    let line = format!("+ {address} registered");
                    self.listed.insert(address, Listing::Serving);
                    ("registry", line)
                }
                RegistryChange::Draining(address) => {
                    let line = format!("~ {address} DRAINING");
                    self.listed.insert(address, Listing::Draining);
                    ("registry", line)
                }
                RegistryChange::Removed(address) => {
                    if let Some(tally) = tally.as_mut() {
                        tally.removed += 1;
                    }
                    let line = format!("- {address} removed");
                    self.listed.remove(&address);
                    ("registry", line)
                }
                RegistryChange::Lost(why) => ("registry", format!("watch: {why}; keeping the set")),
            },
        };
        Some(line)
    }

    /// A line of the client's: a new ready set, a second's counts, or its
    /// summary.
    fn client_line(&mut self, line: &str, mut tally: Option<&mut Tally>) {
        if let Some(ready) = line.split_once("ready:").map(|(_, r)| r.trim()) {
            if let Client::Starting | Client::Sending { .. } = self.client {
                let ready: Vec<String> = ready
                    .split(", ")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                if let Some(tally) = tally.as_mut() {
                    tally.min_ready = tally.min_ready.min(ready.len());
                }
                self.client = Client::Sending { ready };
            }
        }
        let number = |text: &str, key: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|n| n.parse::<u64>().ok())
        };
        // Only the per-second lines: the summary's count is the whole run's.
        if let (Some(failed), true) = (number(line, "failed="), line.starts_with("t=")) {
            self.seconds.push(failed);
            if let Some(tally) = tally {
                tally.failed += failed;
            }
        }
        if let Some(total) = line.trim().strip_prefix("total ") {
            self.client = Client::Summarised(Total {
                ok: number(total, "ok=").unwrap_or(0),
                failed: number(total, "failed=").unwrap_or(0),
            });
        }
    }
}
