//! Who follows the registry, and what they were sent and accepted: one
//! entry per open Watch or ADS stream, the question operators of proxyless
//! gRPC ask first (Envoy's CSDS, `istioctl proxy-status`).
//!
//! Each stream holds a [`FleetEntry`] for as long as it is open and notes
//! on it what it subscribes to and each version it sends; ADS streams also
//! note their node id and each ACK and NACK. [`Fleet::list`] is what the
//! status page, `ListClients` and `switchboard clients` show. One replica
//! knows its own streams: with several, ask each.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;

use crate::proto::registry as pb;

/// What kind of stream follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A switchboard Watch stream (one service).
    Watch,
    /// An xDS ADS stream (any number of resources of each type).
    Ads,
}

impl StreamKind {
    /// The name operators see.
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Watch => "watch",
            StreamKind::Ads => "ads",
        }
    }
}

/// A NACK: the client refused a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The version it refused.
    pub version: String,
    /// Its `error_detail` message.
    pub detail: String,
    /// When it came.
    pub at: SystemTime,
}

/// What one stream was sent and accepted of one type: `endpoints` and
/// `config` on Watch, `lds`, `rds`, `cds` and `eds` on ADS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeState {
    /// The last version sent.
    pub sent: Option<String>,
    /// The last version the client ACKed (ADS only: Watch has no ACKs).
    pub acked: Option<String>,
    /// How many NACKs it sent.
    pub nacks: u64,
    /// The last of them.
    pub last_nack: Option<Nack>,
}

/// One open stream, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follower {
    /// Numbers streams within this registry process.
    pub id: u64,
    /// Watch or ADS.
    pub kind: StreamKind,
    /// The client's address, when the transport knows it.
    pub peer: Option<SocketAddr>,
    /// The xDS node id the client sent (ADS only).
    pub node: Option<String>,
    /// When the stream opened.
    pub opened: SystemTime,
    /// The services it follows.
    pub services: BTreeSet<String>,
    /// Per type: sent, ACKed, NACKed.
    pub types: BTreeMap<&'static str, TypeState>,
}

/// Every open stream of this registry process.
#[derive(Debug, Default)]
pub struct Fleet {
    next: AtomicU64,
    streams: DashMap<u64, Follower>,
}

impl Fleet {
    /// A stream opened; it is listed until the entry is dropped.
    pub fn join(self: &Arc<Self>, kind: StreamKind, peer: Option<SocketAddr>) -> FleetEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.streams.insert(
            id,
            Follower {
                id,
                kind,
                peer,
                node: None,
                opened: SystemTime::now(),
                services: BTreeSet::new(),
                types: BTreeMap::new(),
            },
        );
        FleetEntry {
            fleet: self.clone(),
            id,
        }
    }

    /// The open streams (following `service`, if given), oldest first.
    pub fn list(&self, service: Option<&str>) -> Vec<Follower> {
        let mut list: Vec<Follower> = self
            .streams
            .iter()
            .filter(|f| service.is_none_or(|s| f.services.contains(s)))
            .map(|f| f.clone())
            .collect();
        list.sort_by_key(|f| f.id);
        list
    }

    /// How many streams are open.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

/// One stream's place in the [`Fleet`]; dropping it removes the stream.
#[derive(Debug)]
pub struct FleetEntry {
    fleet: Arc<Fleet>,
    id: u64,
}

impl FleetEntry {
    fn update(&self, change: impl FnOnce(&mut Follower)) {
        if let Some(mut follower) = self.fleet.streams.get_mut(&self.id) {
            change(&mut follower);
        }
    }

    /// The stream now follows exactly `services`.
    pub fn follows(&self, services: impl IntoIterator<Item = String>) {
        self.update(|f| f.services = services.into_iter().collect());
    }

    /// The client named itself (an xDS node id).
    pub fn node(&self, id: &str) {
        self.update(|f| {
            if f.node.as_deref() != Some(id) {
                f.node = Some(id.to_owned());
            }
        });
    }

    /// Version `version` of `kind` was sent.
    pub fn sent(&self, kind: &'static str, version: impl ToString) {
        self.update(|f| f.types.entry(kind).or_default().sent = Some(version.to_string()));
    }

    /// The client accepted version `version` of `kind`.
    pub fn acked(&self, kind: &'static str, version: &str) {
        self.update(|f| f.types.entry(kind).or_default().acked = Some(version.to_owned()));
    }

    /// The client refused version `version` of `kind`, saying `detail`.
    pub fn nacked(&self, kind: &'static str, version: &str, detail: &str) {
        self.update(|f| {
            let state = f.types.entry(kind).or_default();
            state.nacks += 1;
            state.last_nack = Some(Nack {
                version: version.to_owned(),
                detail: detail.to_owned(),
                at: SystemTime::now(),
            });
        });
    }
}

impl Drop for FleetEntry {
    fn drop(&mut self) {
        self.fleet.streams.remove(&self.id);
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl From<&Follower> for pb::ClientStream {
    fn from(f: &Follower) -> Self {
        Self {
            id: f.id,
            kind: f.kind.name().into(),
            peer: f.peer.map(|p| p.to_string()).unwrap_or_default(),
            node: f.node.clone().unwrap_or_default(),
            opened_unix_ms: unix_ms(f.opened),
            services: f.services.iter().cloned().collect(),
            types: f
                .types
                .iter()
                .map(|(kind, state)| pb::StreamTypeState {
                    r#type: (*kind).into(),
                    sent: state.sent.clone().unwrap_or_default(),
                    acked: state.acked.clone().unwrap_or_default(),
                    nacks: state.nacks,
                    nack_version: state
                        .last_nack
                        .as_ref()
                        .map(|n| n.version.clone())
                        .unwrap_or_default(),
                    nack_detail: state
                        .last_nack
                        .as_ref()
                        .map(|n| n.detail.clone())
                        .unwrap_or_default(),
                    nack_unix_ms: state.last_nack.as_ref().map_or(0, |n| unix_ms(n.at)),
                })
                .collect(),
        }
    }
}

/// One stream as JSON, as the status page's `clients` and
/// `switchboard clients -o json` show it.
pub fn stream_json(stream: &pb::ClientStream) -> serde_json::Value {
    let types: serde_json::Map<String, serde_json::Value> = stream
        .types
        .iter()
        .map(|t| {
            let last_nack = (t.nacks > 0).then(|| {
                serde_json::json!({
                    "version": t.nack_version,
                    "detail": t.nack_detail,
                    "unix_ms": t.nack_unix_ms,
                })
            });
            let state = serde_json::json!({
                "sent": (!t.sent.is_empty()).then_some(&t.sent),
                "acked": (!t.acked.is_empty()).then_some(&t.acked),
                "nacks": t.nacks,
                "last_nack": last_nack,
            });
            (t.r#type.clone(), state)
        })
        .collect();
    serde_json::json!({
        "id": stream.id,
        "kind": stream.kind,
        "peer": (!stream.peer.is_empty()).then_some(&stream.peer),
        "node": (!stream.node.is_empty()).then_some(&stream.node),
        "opened_unix_ms": stream.opened_unix_ms,
        "services": stream.services,
        "types": types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_listed_with_what_it_was_sent_and_refused_until_it_ends() {
        let fleet = Arc::new(Fleet::default());
        let watch = fleet.join(StreamKind::Watch, None);
        watch.follows(["a".to_string()]);
        watch.sent("endpoints", 7);
        let ads = fleet.join(StreamKind::Ads, "127.0.0.1:9".parse().ok());
        ads.node("node-1");
        ads.follows(["a".to_string(), "b".to_string()]);
        ads.sent("cds", "3");
        ads.nacked("cds", "3", "bad policy");
        ads.acked("eds", "3");

        let listed = fleet.list(Some("b"));
        assert_eq!(listed.len(), 1);
        let cds = &listed[0].types["cds"];
        assert_eq!(cds.sent.as_deref(), Some("3"));
        assert_eq!(cds.nacks, 1);
        assert_eq!(cds.last_nack.as_ref().unwrap().detail, "bad policy");
        assert_eq!(listed[0].node.as_deref(), Some("node-1"));
        assert_eq!(fleet.list(Some("a")).len(), 2);
        drop(watch);
        assert_eq!(fleet.list(None).len(), 1);
        drop(ads);
        assert!(fleet.is_empty());
    }
}
