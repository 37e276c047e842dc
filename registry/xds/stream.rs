//! One ADS stream, state-of-the-world.
//!
//! The client subscribes per type URL by naming resources; every request
//! of a type carries its whole name list. The stream answers a type when
//! the client first asks for it, when its name list changes, and when what
//! the registry holds for those names changes, and at no other time: an
//! ACK or a NACK alone is never answered, so a client that rejects a
//! version is not sent it again in a loop (the next change brings a new
//! one).
//!
//! Each response carries a fresh nonce. A request whose nonce is not the
//! latest one sent for its type answers an older response and is ignored:
//! the client will answer the latest one too, with its current names.
//!
//! A response's version is the registry version of its services, in name
//! order and joined by commas (a single service's version for the usual
//! one-name subscription). For LDS, RDS and CDS, whose resources carry the
//! service config's policy, a service with a config adds its config
//! version (`12.c5`), so a config change is a new version, and a deleted
//! config gives back the version without it. A response waits until every
//! name of its type has its first snapshot from the store, so a subscriber
//! is never told that a service which exists does not.
//!
//! No task: the response stream reads the request stream and the store
//! watches itself, so everything of a stream goes when hyper drops it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;
use tonic::{Status, Streaming};

use super::cache::Basis;
use super::resources::{resource, Kind};
use super::Shared;
use crate::discovery::{EndpointSet, Update, Versioned};
use crate::registry::cap::Cap;
use crate::registry::fleet::{FleetEntry, StreamKind};
use crate::registry::limits::WatchSlot;
use crate::registry::store::{StoredConfig, UpdateStream};
use crate::registry::validate;
use crate::service_config::ZonePreference;

/// Most distinct service names one stream may subscribe to, over all types:
/// each is a store watch.
pub const MAX_NAMES_PER_STREAM: usize = 1024;

/// One ADS stream's state.
pub struct AdsStream {
    shared: Arc<Shared>,
    /// The stream's share of the ADS stream cap, given back on drop.
    _slot: WatchSlot,
    /// For logs.
    peer: Option<SocketAddr>,
    /// The client's node id, from its first request that names one.
    node: String,
    /// By type URL.
    subscriptions: HashMap<String, Subscription>,
    /// Every service some served type names.
    services: HashMap<String, ServiceView>,
    /// The store's changes of each of `services` with a valid name.
    watches: StreamMap<String, UpdateStream>,
    /// The service config changes of the same services.
    configs: StreamMap<String, WatchStream<Option<StoredConfig>>>,
    /// Numbers responses; a nonce is unique within the stream.
    next_nonce: u64,
    /// This stream in the fleet view: node, services, sent, ACKs, NACKs.
    entry: FleetEntry,
    /// The node's `locality.zone`: EDS puts its zone's endpoints first.
    zone: Option<Arc<str>>,
}

/// What the client asked of one type, and what it was last sent.
struct Subscription {
    kind: Kind,
    /// The names of the client's latest request.
    names: BTreeSet<String>,
    /// The latest response of this type.
    sent: Option<Sent>,
    /// A response is due whatever the registry holds: the client's first
    /// request of the type, or its names changed.
    owed: bool,
    /// The version last NACKed, so each rejection is logged once.
    nacked: Option<String>,
}

/// A response as sent.
struct Sent {
    nonce: String,
    version: String,
    /// What it said of each name; the type is answered again when this
    /// changes.
    facts: Vec<(String, Fact)>,
}

/// What a response said of one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fact {
    /// LDS, RDS, CDS: whether the resource exists, and the version of the
    /// service config it was built from (its content depends on nothing
    /// else, so endpoint changes do not resend it).
    Exists { exists: bool, config: Option<u64> },
    /// EDS: the version of the endpoints sent, and the config's zone
    /// preference they were grouped by.
    Endpoints(u64, Option<ZonePreference>),
}

/// One service as this stream follows it.
struct ServiceView {
    set: EndpointSet,
    /// The version of `set`; `None` until the store's first snapshot.
    version: Option<u64>,
    /// The service's config, read when the watch opens and then followed.
    config: Option<StoredConfig>,
}

impl ServiceView {
    /// The version this service gives a response of `kind`: the endpoints'
    /// version, and for the kinds built from the config, its version.
    fn version_for(&self, kind: Kind) -> String {
        let endpoints = self.version.unwrap_or(0);
        match (&self.config, kind) {
            (Some(config), Kind::Listener | Kind::Route | Kind::Cluster) => {
                format!("{endpoints}.c{}", config.version)
            }
            // Named by what it changes, not the config's version, so that
            // a config change elsewhere leaves EDS's version alone.
            (_, Kind::Endpoints) => match self.zone_preference() {
                Some(preference) if !preference.enabled => format!("{endpoints}.zoff"),
                Some(preference) => {
                    format!("{endpoints}.z{}", preference.overprovisioning_percent)
                }
                None => endpoints.to_string(),
            },
            _ => endpoints.to_string(),
        }
    }

    /// The config's `zonePreference`, which EDS is grouped by.
    fn zone_preference(&self) -> Option<ZonePreference> {
        self.config.as_ref()?.config.zone_preference
    }

    /// What this service's resource of `kind` is built from, naming it in
    /// the shared cache: EDS depends on the endpoints alone, the other
    /// kinds on the service config alone.
    fn basis(&self, kind: Kind, zone: &Option<Arc<str>>) -> Basis {
        match kind {
            Kind::Endpoints => Basis::Endpoints {
                epoch: self.set.epoch(),
                version: self.version.unwrap_or(0),
                zone: zone.clone(),
                preference: self.zone_preference(),
            },
            _ => Basis::Config(
                self.config
                    .as_ref()
                    .map(|config| (config.version, config.json.clone())),
            ),
        }
    }
}

impl AdsStream {
    /// A stream with no subscriptions yet.
    pub(super) fn new(shared: Arc<Shared>, slot: WatchSlot, peer: Option<SocketAddr>) -> Self {
        let entry = shared.fleet.join(StreamKind::Ads, peer);
        Self {
            entry,
            zone: None,
            shared,
            _slot: slot,
            peer,
            node: String::new(),
            subscriptions: HashMap::new(),
            services: HashMap::new(),
            watches: StreamMap::new(),
            configs: StreamMap::new(),
            next_nonce: 1,
        }
    }

    /// Takes one request: an ACK, a NACK, a first request of a type or a
    /// change of its names. Says whether a response may now be owed: a
    /// plain ACK or NACK changes nothing [`respond`](Self::respond) looks
    /// at, and with a thousand streams ACKing every change, skipping that
    /// look is worth it.
    async fn on_request(&mut self, request: DiscoveryRequest) -> Result<bool, Status> {
        if self.node.is_empty() {
            if let Some(node) = &request.node {
                self.node = node.id.clone();
                self.entry.node(&node.id);
                self.zone = node
                    .locality
                    .as_ref()
                    .map(|l| l.zone.as_str())
                    .filter(|z| !z.is_empty())
                    .map(Arc::from);
            }
        }
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "DiscoveryRequest without a type_url: name the resource type to subscribe to",
            ));
        }
        let kind = Kind::of(&request.type_url);
        // Looked up before inserting: an ACK, by far the most common
        // request, then costs no copy of its type URL.
        if !self.subscriptions.contains_key(&request.type_url) {
            self.subscriptions.insert(
                request.type_url.clone(),
                Subscription {
                    kind,
                    names: BTreeSet::new(),
                    sent: None,
                    owed: false,
                    nacked: None,
                },
            );
        }
        let Some(subscription) = self.subscriptions.get_mut(&request.type_url) else {
            return Ok(false);
        };
        if request.response_nonce.is_empty() {
            // The first request of this type on this stream.
            subscription.owed = true;
        } else {
            let Some(sent) = subscription
                .sent
                .as_ref()
                .filter(|sent| sent.nonce == request.response_nonce)
            else {
                tracing::debug!(type_url = %request.type_url, nonce = %request.response_nonce, "request answers an older response; ignored");
                return Ok(false);
            };
            match &request.error_detail {
                Some(error) => {
                    self.entry
                        .nacked(kind.label(), &sent.version, &error.message);
                    self.shared.metrics.xds_nacked(kind.label());
                    if subscription.nacked.as_ref() != Some(&sent.version) {
                        tracing::warn!(
                            node = %self.node,
                            peer = ?self.peer,
                            type_url = %request.type_url,
                            version = %sent.version,
                            error = %error.message,
                            "xDS client rejected (NACKed) a response; it is not resent, the next change sends a new version"
                        );
                        subscription.nacked = Some(sent.version.clone());
                    }
                }
                None => {
                    tracing::trace!(type_url = %request.type_url, version = %request.version_info, "ACK");
                    self.entry.acked(kind.label(), &request.version_info);
                }
            }
        }
        let names: BTreeSet<String> = request.resource_names.into_iter().collect();
        if names != subscription.names {
            subscription.names = names;
            subscription.owed = true;
            if kind.is_served() {
                self.follow_named_services().await?;
            }
        }
        Ok(subscription_owed(&self.subscriptions, &request.type_url))
    }

    /// Opens a store watch for each newly named service and drops those no
    /// type names any more.
    async fn follow_named_services(&mut self) -> Result<(), Status> {
        let wanted: BTreeSet<&String> = self
            .subscriptions
            .values()
            .filter(|s| s.kind.is_served())
            .flat_map(|s| s.names.iter())
            .collect();
        if wanted.len() > MAX_NAMES_PER_STREAM {
            return Err(Cap::AdsServicesPerStream.refusal(format!(
                "an ADS stream may name at most {MAX_NAMES_PER_STREAM} services; open another stream"
            )));
        }
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        let new: Vec<String> = wanted
            .into_iter()
            .filter(|name| !self.services.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.services.remove(&name);
            self.watches.remove(&name);
            self.configs.remove(&name);
        }
        let mut followed: Vec<String> = self.services.keys().cloned().collect();
        followed.extend(new.iter().cloned());
        self.entry.follows(followed);
        for name in new {
            if validate::service_name(&name).is_err() {
                // No service can have this name: it exists never, at once.
                let mut set = EndpointSet::new();
                set.apply(Update::Reset(Vec::new()));
                self.services.insert(
                    name,
                    ServiceView {
                        set,
                        version: Some(0),
                        config: None,
                    },
                );
                continue;
            }
            let updates = self.shared.store.watch(&name, None).await?;
            let mut config_watch = self.shared.store.watch_config(&name).await?;
            // The current config is taken now, so no response waits for it;
            // the stream yields only what changes after.
            let config = config_watch.borrow_and_update().clone();
            self.watches.insert(name.clone(), updates);
            self.configs
                .insert(name.clone(), WatchStream::from_changes(config_watch));
            self.services.insert(
                name,
                ServiceView {
                    set: EndpointSet::new(),
                    version: None,
                    config,
                },
            );
        }
        Ok(())
    }

    /// Applies one store update of `service`.
    fn on_update(&mut self, service: &str, update: &Versioned) {
        let Some(view) = self.services.get_mut(service) else {
            return;
        };
        let applied = view.set.apply_versioned(update.clone());
        if !applied.anomalies.is_empty() {
            tracing::debug!(%service, anomalies = ?applied.anomalies, "store update did not fit");
        }
        view.version = Some(update.version);
    }

    /// Takes the new service config of `service` (`None`: deleted).
    fn on_config(&mut self, service: &str, config: Option<StoredConfig>) {
        let Some(view) = self.services.get_mut(service) else {
            return;
        };
        tracing::debug!(%service, version = ?config.as_ref().map(|c| c.version), "service config changed");
        view.config = config;
    }

    /// Takes in every endpoint and config change already waiting, so a
    /// burst becomes one response per type.
    fn take_waiting(&mut self) {
        while let Some(Some((service, update))) = self.watches.next().now_or_never() {
            self.on_update(&service, &update);
        }
        while let Some(Some((service, config))) = self.configs.next().now_or_never() {
            self.on_config(&service, config);
        }
    }

    /// Queues a response for every type that is owed one or whose services
    /// changed, once all its services have their first snapshot.
    fn respond(&mut self, out: &mut VecDeque<DiscoveryResponse>) {
        for (type_url, subscription) in &mut self.subscriptions {
            let kind = subscription.kind;
            let mut facts = Vec::with_capacity(subscription.names.len());
            for name in &subscription.names {
                let fact = if kind.is_served() {
                    let Some((view, version)) = self
                        .services
                        .get(name)
                        .and_then(|view| Some((view, view.version?)))
                    else {
                        // Still waiting for the store's first snapshot.
                        break;
                    };
                    match kind {
                        Kind::Endpoints => Fact::Endpoints(version, view.zone_preference()),
                        _ => Fact::Exists {
                            exists: !view.set.is_empty(),
                            config: view.config.as_ref().map(|c| c.version),
                        },
                    }
                } else {
                    Fact::Exists {
                        exists: false,
                        config: None,
                    }
                };
                facts.push((name.clone(), fact));
            }
            if facts.len() != subscription.names.len() {
                continue;
            }
            let changed = subscription
                .sent
                .as_ref()
                .is_none_or(|sent| sent.facts != facts);
            if !subscription.owed && !changed {
                continue;
            }
            let versions: Vec<String> = subscription
                .names
                .iter()
                .map(|name| {
                    self.services
                        .get(name)
                        .map_or_else(|| "0".to_owned(), |view| view.version_for(kind))
                })
                .collect();
            let version = if versions.is_empty() {
                "0".to_owned()
            } else {
                versions.join(",")
            };
            let shared = &self.shared;
            let zone = &self.zone;
            let resources = subscription
                .names
                .iter()
                .filter_map(|name| {
                    let view = self.services.get(name)?;
                    // Existence is not part of a basis: decided here, per
                    // stream, before the cache is asked.
                    if !kind.is_served() || (kind.omits_absent() && view.set.is_empty()) {
                        return None;
                    }
                    let built = shared.resources.get_or_build(
                        kind,
                        name,
                        view.basis(kind, zone),
                        || {
                            let config = view.config.as_ref().map(|c| &*c.config);
                            // Only the stream that builds hears of the
                            // endpoints left out; the warning is once per
                            // address anyway.
                            let zone = zone.as_deref();
                            resource(kind, name, &view.set, config, zone, &mut |endpoint| {
                                shared.refuse(endpoint)
                            })
                        },
                    )?;
                    Some(Any::clone(&built))
                })
                .collect();
            let nonce = self.next_nonce.to_string();
            self.next_nonce += 1;
            out.push_back(DiscoveryResponse {
                version_info: version.clone(),
                resources,
                type_url: type_url.clone(),
                nonce: nonce.clone(),
                ..Default::default()
            });
            self.entry.sent(kind.label(), &version);
            subscription.sent = Some(Sent {
                nonce,
                version,
                facts,
            });
            subscription.owed = false;
        }
    }
}

/// Whether the subscription of `type_url` is owed a response.
fn subscription_owed(subscriptions: &HashMap<String, Subscription>, type_url: &str) -> bool {
    subscriptions.get(type_url).is_some_and(|s| s.owed)
}

/// What one turn of the stream got.
enum Event {
    /// Boxed: a request is large next to the other events.
    Request(Box<Option<Result<DiscoveryRequest, Status>>>),
    Update(String, Arc<Versioned>),
    Config(String, Option<StoredConfig>),
    Closing,
}

/// The responses of one ADS stream: reads `inbound` and the store, until
/// the client ends its side, the stream breaks, or `closing` turns true.
pub(super) fn responses(
    stream: AdsStream,
    inbound: Streaming<DiscoveryRequest>,
    closing: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = Result<DiscoveryResponse, Status>> + Send + 'static {
    struct State {
        stream: AdsStream,
        inbound: Streaming<DiscoveryRequest>,
        /// Ends when `closing` turns true (or its sender goes). Made once:
        /// a fresh `wait_for` per turn registered and dropped a waiter on
        /// every request and update of every stream.
        closing: Pin<Box<dyn Future<Output = ()> + Send>>,
        queued: VecDeque<DiscoveryResponse>,
        ended: bool,
    }
    let state = State {
        stream,
        inbound,
        closing: Box::pin(async move {
            let mut closing = closing;
            let _ = closing.wait_for(|closed| *closed).await;
        }),
        queued: VecDeque::new(),
        ended: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(response) = state.queued.pop_front() {
                return Some((Ok(response), state));
            }
            if state.ended {
                return None;
            }
            let event = tokio::select! {
                biased;
                () = &mut state.closing => Event::Closing,
                request = state.inbound.next() => Event::Request(Box::new(request)),
                Some((service, update)) = state.stream.watches.next(),
                    if !state.stream.watches.is_empty() => Event::Update(service, update),
                Some((service, config)) = state.stream.configs.next(),
                    if !state.stream.configs.is_empty() => Event::Config(service, config),
            };
            match event {
                Event::Closing => {
                    state.ended = true;
                    return Some((
                        Err(Status::unavailable(
                            "registry shutting down; reconnect to another instance",
                        )),
                        state,
                    ));
                }
                Event::Request(request) => match *request {
                    // The client closed its side: it wants nothing more.
                    None => return None,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "ADS stream broke");
                        state.ended = true;
                        return Some((Err(status), state));
                    }
                    Some(Ok(request)) => match state.stream.on_request(request).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(status) => {
                            state.ended = true;
                            return Some((Err(status), state));
                        }
                    },
                },
                Event::Update(service, update) => {
                    state.stream.on_update(&service, &update);
                    state.stream.take_waiting();
                }
                Event::Config(service, config) => {
                    state.stream.on_config(&service, config);
                    state.stream.take_waiting();
                }
            }
            state.stream.respond(&mut state.queued);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::store::{NewEndpoint, Store};
    use crate::registry::xds::resources::ENDPOINTS;
    use crate::registry::xds::AdsService;
    use crate::registry::{MemoryStore, RegistryConfig};

    /// A stream subscribed to the EDS of `service` on `ads`, holding the
    /// store's first snapshot and the response it drew.
    async fn eds_stream(ads: &AdsService, service: &str) -> (AdsStream, DiscoveryResponse) {
        let slot = ads.shared.slots.acquire(None).unwrap();
        let mut stream = AdsStream::new(ads.shared.clone(), slot, None);
        let owed = stream
            .on_request(DiscoveryRequest {
                type_url: ENDPOINTS.into(),
                resource_names: vec![service.into()],
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(owed, "a first request is owed a response");
        let (name, update) = stream.watches.next().await.unwrap();
        stream.on_update(&name, &update);
        let mut out = VecDeque::new();
        stream.respond(&mut out);
        let response = out.pop_front().expect("a response");
        (stream, response)
    }

    async fn register(store: &MemoryStore, service: &str, address: &str) {
        store
            .register(NewEndpoint {
                service: service.into(),
                address: address.into(),
                metadata: Default::default(),
                ttl: std::time::Duration::from_secs(60),
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn streams_at_one_version_send_one_shared_build() {
        let config = RegistryConfig::default();
        let store = Arc::new(MemoryStore::new(&config));
        register(&store, "svc", "10.0.0.1:80").await;
        register(&store, "svc", "backend.internal:80").await;
        let ads = AdsService::new(store.clone(), &config);
        let (mut first, one) = eds_stream(&ads, "svc").await;
        let (_second, two) = eds_stream(&ads, "svc").await;
        assert_eq!(one.version_info, two.version_info);
        assert_eq!(one.resources, two.resources, "byte for byte");
        let version: u64 = one.version_info.parse().unwrap();
        let basis = Basis::Endpoints {
            epoch: first.services["svc"].set.epoch(),
            version,
            zone: None,
            preference: None,
        };
        let cached = ads
            .shared
            .resources
            .get_or_build(Kind::Endpoints, "svc", basis.clone(), || None)
            .expect("kept");
        let again = ads
            .shared
            .resources
            .get_or_build(Kind::Endpoints, "svc", basis, || None)
            .expect("kept");
        assert!(Arc::ptr_eq(&cached, &again));
        assert_eq!(*cached, one.resources[0]);
        // The host name was refused (and so warned about) by the build.
        assert!(ads
            .shared
            .refused
            .lock()
            .unwrap()
            .contains("backend.internal:80"));

        // An ACK draws nothing, and says so.
        let ack = DiscoveryRequest {
            type_url: ENDPOINTS.into(),
            resource_names: vec!["svc".into()],
            version_info: one.version_info.clone(),
            response_nonce: one.nonce.clone(),
            ..Default::default()
        };
        assert!(!first.on_request(ack).await.unwrap());

        // A new version is a new build.
        register(&store, "svc", "10.0.0.2:80").await;
        let (name, update) = first.watches.next().await.unwrap();
        first.on_update(&name, &update);
        let mut out = VecDeque::new();
        first.respond(&mut out);
        let three = out.pop_front().expect("a response to the change");
        assert_ne!(three.version_info, one.version_info);
        assert_ne!(three.resources, one.resources);
    }

    #[tokio::test]
    async fn naming_too_many_services_is_refused_by_the_ads_cap() {
        let config = RegistryConfig::default();
        let ads = AdsService::new(Arc::new(MemoryStore::new(&config)), &config);
        let slot = ads.shared.slots.acquire(None).unwrap();
        let mut stream = AdsStream::new(ads.shared.clone(), slot, None);
        let refused = stream
            .on_request(DiscoveryRequest {
                type_url: ENDPOINTS.into(),
                resource_names: (0..=MAX_NAMES_PER_STREAM)
                    .map(|i| format!("s{i}.example"))
                    .collect(),
                ..Default::default()
            })
            .await
            .expect_err("one name too many");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let cap = std::error::Error::source(&refused).and_then(|e| e.downcast_ref::<Cap>());
        assert_eq!(cap, Some(&Cap::AdsServicesPerStream));
    }
}
