//! The `switchboard.registry.v1.Registry` gRPC service: validates each
//! request, applies the per-connection caps, then hands it to the
//! [`Store`], whichever one holds the state, and speaks the wire format.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::config_dir::ConfigDir;
use super::fleet::{Fleet, StreamKind};
use super::lease::{LeaseId, StreamId};
use super::limits::{RegistrationRate, WatchSlots};
use super::memory::MemoryStore;
use super::store::{NewEndpoint, Position, Store};
use super::watch::watch_stream;
use super::{validate, RegistryConfig};
use crate::metrics::rpc::{keep_end_cause, EndCause};
use crate::proto::registry::registry_server::Registry as RegistryApi;
use crate::proto::registry::{
    ClientStream, DeleteServiceConfigRequest, DeleteServiceConfigResponse, GetServiceConfigRequest,
    GetServiceConfigResponse, ListClientsRequest, ListClientsResponse, SetServiceConfigRequest,
    SetServiceConfigResponse,
};
use crate::proto::registry::{
    DeregisterEndpointRequest, DeregisterEndpointResponse, DeregisterRequest, DeregisterResponse,
    DrainEndpointRequest, DrainEndpointResponse, DrainRequest, DrainResponse, KeepAliveRequest,
    KeepAliveResponse, LeasedEndpoint, ListEndpointsRequest, ListEndpointsResponse,
    ListServicesRequest, ListServicesResponse, RegisterRequest, RegisterResponse, ResolveRequest,
    ResolveResponse, ServiceSummary, WatchRequest, WatchResponse,
};
use crate::service_config::ServiceConfig;

/// The registry's gRPC service over a [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    /// Numbers KeepAlive streams.
    next_stream: AtomicU64,
    /// Turns true when the registry shuts down, ending every open stream.
    closing: tokio::sync::watch::Sender<bool>,
    /// Caps on open Watch streams.
    watch_slots: Arc<WatchSlots>,
    /// Cap on Register calls per second per connection.
    registration_rate: RegistrationRate,
    /// Counts open watchers.
    metrics: super::metrics::RegistryMetrics,
    /// Where service configs are kept as files, if anywhere.
    config_dir: std::sync::OnceLock<Arc<ConfigDir>>,
    /// Every open Watch (and, through the ADS service, xDS) stream.
    fleet: Arc<Fleet>,
}

impl Registry {
    /// A registry on a fresh in-memory store. Must be called inside a tokio
    /// runtime (the store's lease expiry task runs on it).
    pub fn new(config: &RegistryConfig) -> Self {
        Self::with_store(Arc::new(MemoryStore::new(config)), config)
    }

    /// A registry on `store`, with the per-connection caps of `config` (the
    /// store applies its own caps on services and endpoints).
    pub fn with_store(store: Arc<dyn Store>, config: &RegistryConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                next_stream: AtomicU64::new(1),
                closing: tokio::sync::watch::Sender::new(false),
                watch_slots: WatchSlots::new(
                    config.max_watch_streams,
                    config.max_watch_streams_per_connection,
                ),
                registration_rate: RegistrationRate::new(config.max_registrations_per_second),
                metrics: config.metrics.clone(),
                config_dir: std::sync::OnceLock::new(),
                fleet: config.fleet.clone(),
            }),
        }
    }

    /// Keeps service configs in `dir` as well as in the store: loads them
    /// now and whenever the files change (in the returned task), and
    /// writes every config an operator sets. Once per registry.
    pub fn follow_config_dir(&self, dir: Arc<ConfigDir>) -> tokio::task::JoinHandle<()> {
        let _ = self.shared.config_dir.set(dir.clone());
        tokio::spawn(dir.follow(self.shared.store.clone()))
    }

    /// The epoch that identifies the store's history.
    pub fn epoch(&self) -> u64 {
        self.shared.store.epoch()
    }

    /// How many leases are live.
    pub fn lease_count(&self) -> usize {
        self.shared.store.lease_count()
    }

    /// The store behind this registry.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Who follows this registry: its open Watch and ADS streams.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.shared.fleet
    }

    /// Ends every open Watch and KeepAlive stream, now and from now on, with
    /// UNAVAILABLE. Called at shutdown: those streams never end on their
    /// own, so a graceful shutdown would otherwise wait for them forever.
    pub fn close_streams(&self) {
        self.shared.store.closing();
        self.shared.closing.send_replace(true);
    }
}

/// Passes `stream` through until the registry closes its streams, then ends
/// it with UNAVAILABLE (dropping `stream`, and with it any leases it holds).
/// The status it ends with is kept in the call's `cause` slot for the
/// metrics layer.
fn until_closed<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    closing: tokio::sync::watch::Receiver<bool>,
    cause: Option<EndCause>,
) -> BoxStream<T> {
    let state = (Some(Box::pin(stream)), closing);
    let stream = futures_util::stream::unfold(state, |(stream, mut closing)| async move {
        let mut stream = stream?;
        // `None` once the registry closes its streams (or is gone).
        let next = tokio::select! {
            item = stream.next() => Some(item),
            _ = closing.wait_for(|closed| *closed) => None,
        };
        match next {
            Some(item) => item.map(|item| (item, (Some(stream), closing))),
            None => Some((
                Err(Status::unavailable(
                    "registry shutting down; reconnect to another instance",
                )),
                (None, closing),
            )),
        }
    });
    Box::pin(keep_end_cause(cause, stream))
}

/// Ends, when a KeepAlive stream goes away, the leases it still carries.
struct StreamLeases {
    shared: Arc<Shared>,
    stream: StreamId,
    leases: HashSet<LeaseId>,
}

impl Drop for StreamLeases {
    fn drop(&mut self) {
        self.shared.store.stream_ended(self.stream, &self.leases);
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RegistryApi for Registry {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        // Counted before validation: a flood of malformed requests costs the
        // registry as much as a flood of good ones.
        self.shared.registration_rate.admit(request.remote_addr())?;
        let req = request.into_inner();
        validate::service_name(&req.service)?;
        validate::address(&req.address)?;
        validate::metadata(&req.metadata)?;
        let ttl = validate::ttl(req.ttl_ms)?;

        let grant = self
            .shared
            .store
            .register(NewEndpoint {
                service: req.service.into(),
                address: req.address.into(),
                metadata: req.metadata,
                ttl,
            })
            .await?;
        Ok(Response::new(RegisterResponse {
            lease_id: grant.lease.to_string(),
            ttl_ms: grant.ttl.as_millis() as u64,
            epoch: grant.epoch,
        }))
    }

    type KeepAliveStream = BoxStream<KeepAliveResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let cause = EndCause::of(request.extensions());
        let inbound = request.into_inner();
        let bound = StreamLeases {
            shared: self.shared.clone(),
            stream: self.shared.next_stream.fetch_add(1, Ordering::Relaxed),
            leases: HashSet::new(),
        };
        // No task: the response stream reads the request stream itself, so
        // when the connection dies hyper drops both and `StreamLeases` ends
        // the leases right away.
        let replies = futures_util::stream::unfold(
            (inbound, bound, false),
            |(mut inbound, mut bound, failed)| async move {
                if failed {
                    return None;
                }
                let heartbeat = match inbound.next().await? {
                    Ok(heartbeat) => heartbeat,
                    Err(status) => {
                        // An oversized or undecodable heartbeat: tell the
                        // sender why its stream ends (a vanished peer never
                        // reads it, which costs nothing).
                        tracing::debug!(%status, "keepalive stream broke");
                        return Some((Err(status), (inbound, bound, true)));
                    }
                };
                let reply = match heartbeat.lease_id.parse::<LeaseId>() {
                    Ok(id) => bound
                        .shared
                        .store
                        .keep_alive(id, bound.stream)
                        .await
                        .map(|ttl| {
                            bound.leases.insert(id);
                            KeepAliveResponse {
                                lease_id: id.to_string(),
                                ttl_ms: ttl.as_millis() as u64,
                            }
                        }),
                    Err(err) => Err(err),
                }
                .map_err(Status::from);
                let failed = reply.is_err();
                Some((reply, (inbound, bound, failed)))
            },
        );
        Ok(Response::new(until_closed(
            replies,
            self.shared.closing.subscribe(),
            cause,
        )))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let id: LeaseId = request.into_inner().lease_id.parse()?;
        self.shared.store.drain(id).await?;
        Ok(Response::new(DrainResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let id: LeaseId = request.into_inner().lease_id.parse()?;
        self.shared.store.deregister(id).await?;
        Ok(Response::new(DeregisterResponse {}))
    }

    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let slot = self.shared.watch_slots.acquire(request.remote_addr())?;
        let peer = request.remote_addr();
        let cause = EndCause::of(request.extensions());
        let WatchRequest {
            service,
            epoch,
            version,
        } = request.into_inner();
        validate::service_name(&service)?;
        let from = match (epoch, version) {
            (Some(epoch), Some(version)) => Some(Position { epoch, version }),
            (None, None) => None,
            _ => {
                return Err(Status::invalid_argument(
                    "invalid epoch/version: a resumed watch names both or neither",
                ))
            }
        };
        // The slot lives as long as the stream does.
        let config = self.shared.store.watch_config(&service).await?;
        let updates = self.shared.store.watch(&service, from).await?;
        let watcher = OpenWatcher::new(self.shared.metrics.watchers.clone());
        let entry = self.shared.fleet.join(StreamKind::Watch, peer);
        entry.follows([service.clone()]);
        let epoch = self.shared.store.epoch();
        let stream = watch_stream(updates, config, epoch, from).map(move |message| {
            let _slot = &slot;
            let _watcher = &watcher;
            if let Ok(message) = &message {
                if message.event.is_some() {
                    entry.sent("endpoints", message.version);
                }
                if let Some(config) = &message.service_config {
                    entry.sent("config", config.version);
                }
            }
            message
        });
        Ok(Response::new(until_closed(
            stream,
            self.shared.closing.subscribe(),
            cause,
        )))
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let service = request.into_inner().service;
        validate::service_name(&service)?;
        let snapshot = self.shared.store.resolve(&service).await?;
        Ok(Response::new(ResolveResponse {
            epoch: snapshot.epoch,
            version: snapshot.version,
            endpoints: snapshot.endpoints.iter().map(Into::into).collect(),
        }))
    }

    async fn list_services(
        &self,
        _request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let services = self.shared.store.list().await?;
        Ok(Response::new(ListServicesResponse {
            services: services
                .into_iter()
                .map(|s| ServiceSummary {
                    service: s.service,
                    endpoints: s.endpoints.try_into().unwrap_or(u32::MAX),
                })
                .collect(),
        }))
    }

    async fn list_endpoints(
        &self,
        request: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let service = request.into_inner().service;
        validate::service_name(&service)?;
        let snapshot = self.shared.store.leased_endpoints(&service).await?;
        Ok(Response::new(ListEndpointsResponse {
            epoch: snapshot.epoch,
            version: snapshot.version,
            endpoints: snapshot
                .endpoints
                .iter()
                .map(|leased| LeasedEndpoint {
                    endpoint: Some((&leased.endpoint).into()),
                    lease_age_ms: leased.lease_age.as_millis() as u64,
                    ttl_ms: leased.ttl.as_millis() as u64,
                })
                .collect(),
        }))
    }

    async fn drain_endpoint(
        &self,
        request: Request<DrainEndpointRequest>,
    ) -> Result<Response<DrainEndpointResponse>, Status> {
        let (peer, req) = operator_request(request, |r| (&r.service, &r.address))?;
        self.shared
            .store
            .drain_address(&req.service, &req.address)
            .await?;
        tracing::info!(service = %req.service, address = %req.address, %peer, "operator drained endpoint");
        Ok(Response::new(DrainEndpointResponse {}))
    }

    async fn deregister_endpoint(
        &self,
        request: Request<DeregisterEndpointRequest>,
    ) -> Result<Response<DeregisterEndpointResponse>, Status> {
        let (peer, req) = operator_request(request, |r| (&r.service, &r.address))?;
        self.shared
            .store
            .deregister_address(&req.service, &req.address)
            .await?;
        tracing::info!(service = %req.service, address = %req.address, %peer, "operator deregistered endpoint");
        Ok(Response::new(DeregisterEndpointResponse {}))
    }

    async fn set_service_config(
        &self,
        request: Request<SetServiceConfigRequest>,
    ) -> Result<Response<SetServiceConfigResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        validate::service_name(&req.service)?;
        let config = ServiceConfig::from_json(&req.json)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The file first: a config that cannot be kept is not set.
        if let Some(dir) = self.shared.config_dir.get() {
            dir.write(&req.service, &config.to_json()).map_err(|e| {
                Status::unavailable(format!("cannot write the service config file: {e}"))
            })?;
        }
        let version = self.shared.store.set_config(&req.service, &config).await?;
        tracing::info!(service = %req.service, version, %peer, "operator set service config");
        Ok(Response::new(SetServiceConfigResponse { version }))
    }

    async fn get_service_config(
        &self,
        request: Request<GetServiceConfigRequest>,
    ) -> Result<Response<GetServiceConfigResponse>, Status> {
        let req = request.into_inner();
        validate::service_name(&req.service)?;
        match self.shared.store.config(&req.service).await? {
            Some(stored) => Ok(Response::new(GetServiceConfigResponse {
                json: stored.json.to_string(),
                version: stored.version,
            })),
            None => Err(no_config(&req.service)),
        }
    }

    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        let service = request.into_inner().service;
        if !service.is_empty() {
            validate::service_name(&service)?;
        }
        let followers = self
            .shared
            .fleet
            .list((!service.is_empty()).then_some(service.as_str()));
        Ok(Response::new(ListClientsResponse {
            streams: followers.iter().map(ClientStream::from).collect(),
        }))
    }

    async fn delete_service_config(
        &self,
        request: Request<DeleteServiceConfigRequest>,
    ) -> Result<Response<DeleteServiceConfigResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        validate::service_name(&req.service)?;
        if let Some(dir) = self.shared.config_dir.get() {
            dir.remove(&req.service).map_err(|e| {
                Status::unavailable(format!("cannot remove the service config file: {e}"))
            })?;
        }
        if !self.shared.store.delete_config(&req.service).await? {
            return Err(no_config(&req.service));
        }
        tracing::info!(service = %req.service, %peer, "operator deleted service config");
        Ok(Response::new(DeleteServiceConfigResponse {}))
    }
}

/// Counts one open Watch stream in the watchers gauge while it lives.
struct OpenWatcher(prometheus_client::metrics::gauge::Gauge);

impl OpenWatcher {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenWatcher {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The caller's address for the audit log, or `unknown`.
/// An operator's call naming one endpoint: who sent it (for the log) and
/// the request, once its service and address are valid.
fn operator_request<T>(
    request: Request<T>,
    endpoint: impl Fn(&T) -> (&String, &String),
) -> Result<(String, T), Status> {
    let peer = peer_of(&request);
    let req = request.into_inner();
    let (service, address) = endpoint(&req);
    validate::service_name(service)?;
    validate::address(address)?;
    Ok((peer, req))
}

fn no_config(service: &str) -> Status {
    Status::not_found(format!("service {service} has no service config"))
}

fn peer_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string())
}
