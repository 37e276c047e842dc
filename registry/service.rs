//! The `switchboard.registry.v1.Registry` gRPC service: validates each
//! request, then applies it to the lease table and the store.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use super::lease::{LeaseId, LeaseTable, StreamId};
use super::limits::{RegistrationRate, WatchSlots};
use super::store::Store;
use super::watch::watch_stream;
use super::{validate, RegistryConfig, RegistryError};
use crate::proto::registry::registry_server::Registry as RegistryApi;
use crate::proto::registry::{
    DeregisterRequest, DeregisterResponse, DrainRequest, DrainResponse, EndpointState,
    KeepAliveRequest, KeepAliveResponse, ListServicesRequest, ListServicesResponse,
    RegisterRequest, RegisterResponse, ResolveRequest, ResolveResponse, WatchRequest,
    WatchResponse,
};

/// The registry's state and its gRPC service. Cheap to clone; the lease
/// expiry task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
    /// Aborts the expiry task when the last handle goes.
    _expiry: Arc<AbortOnDrop>,
}

struct Shared {
    store: Arc<Store>,
    leases: LeaseTable,
    /// Numbers KeepAlive streams.
    next_stream: AtomicU64,
    /// Turns true when the registry shuts down, ending every open stream.
    closing: tokio::sync::watch::Sender<bool>,
    /// Caps on open Watch streams.
    watch_slots: Arc<WatchSlots>,
    /// Cap on Register calls per second per connection.
    registration_rate: RegistrationRate,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Registry {
    /// Creates a registry with a fresh random epoch and starts its lease
    /// expiry task. Must be called inside a tokio runtime.
    pub fn new(config: &RegistryConfig) -> Self {
        let epoch = loop {
            let epoch: u64 = rand::random();
            if epoch != 0 {
                break epoch;
            }
        };
        let shared = Arc::new(Shared {
            store: Arc::new(Store::new(
                epoch,
                config.max_endpoints_per_service,
                config.watch_buffer,
                config.warmup,
                config.max_services,
            )),
            leases: LeaseTable::default(),
            next_stream: AtomicU64::new(1),
            closing: tokio::sync::watch::Sender::new(false),
            watch_slots: WatchSlots::new(
                config.max_watch_streams,
                config.max_watch_streams_per_connection,
            ),
            registration_rate: RegistrationRate::new(config.max_registrations_per_second),
        });
        let expiry = tokio::spawn(expire_leases(shared.clone()));
        Self {
            shared,
            _expiry: Arc::new(AbortOnDrop(expiry)),
        }
    }

    /// The epoch that identifies this registry instance.
    pub fn epoch(&self) -> u64 {
        self.shared.store.epoch()
    }

    /// How many leases are live.
    pub fn lease_count(&self) -> usize {
        self.shared.leases.len()
    }

    /// Ends every open Watch and KeepAlive stream, now and from now on, with
    /// UNAVAILABLE. Called at shutdown: those streams never end on their
    /// own, so a graceful shutdown would otherwise wait for them forever.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }
}

/// Passes `stream` through until the registry closes its streams, then ends
/// it with UNAVAILABLE (dropping `stream`, and with it any leases it holds).
fn until_closed<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    closing: tokio::sync::watch::Receiver<bool>,
) -> BoxStream<T> {
    let state = (Some(Box::pin(stream)), closing);
    Box::pin(futures_util::stream::unfold(
        state,
        |(stream, mut closing)| async move {
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
        },
    ))
}

impl Shared {
    /// Ends a lease and removes its endpoint.
    fn end_lease(&self, id: LeaseId, reason: &str) -> Result<(), RegistryError> {
        let lease = self
            .leases
            .revoke(id)
            .ok_or_else(|| RegistryError::LeaseNotFound(id.to_string()))?;
        tracing::info!(service = %lease.service, address = %lease.address, reason, "endpoint removed");
        self.store.remove(&lease.service, &lease.address, id);
        Ok(())
    }
}

/// The one task that ends leases whose heartbeats stopped.
async fn expire_leases(shared: Arc<Shared>) {
    loop {
        let (expired, next) = shared.leases.take_expired(Instant::now());
        for (id, lease) in expired {
            tracing::info!(service = %lease.service, address = %lease.address, ttl = ?lease.ttl, "lease expired");
            shared.store.remove(&lease.service, &lease.address, id);
        }
        match next {
            Some(deadline) => tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = shared.leases.earlier_deadline() => {}
            },
            None => shared.leases.earlier_deadline().await,
        }
    }
}

/// Ends, when a KeepAlive stream goes away, the leases it still carries.
struct StreamLeases {
    shared: Arc<Shared>,
    stream: StreamId,
    leases: HashSet<LeaseId>,
}

impl Drop for StreamLeases {
    fn drop(&mut self) {
        for &id in &self.leases {
            if let Some(lease) = self.shared.leases.revoke_if_bound(id, self.stream) {
                tracing::info!(service = %lease.service, address = %lease.address, "keepalive stream ended; endpoint removed");
                self.shared.store.remove(&lease.service, &lease.address, id);
            }
        }
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

        let id = LeaseId::random();
        let service: Arc<str> = req.service.into();
        let address: Arc<str> = req.address.into();
        // The lease exists before the endpoint shows, so a concurrent
        // takeover of the same address can always find and end it.
        self.shared
            .leases
            .grant(id, service.clone(), address.clone(), ttl);
        match self
            .shared
            .store
            .upsert(&service, &address, req.metadata, id)
        {
            Ok(Some(previous)) => {
                self.shared.leases.revoke(previous);
                tracing::info!(%service, %address, "endpoint re-registered under a new lease");
            }
            Ok(None) => tracing::info!(%service, %address, ttl = ?ttl, "endpoint registered"),
            Err(err) => {
                self.shared.leases.revoke(id);
                // A refused first endpoint may have left an empty entry.
                self.shared.store.release(&service);
                return Err(err.into());
            }
        }
        Ok(Response::new(RegisterResponse {
            lease_id: id.to_string(),
            ttl_ms: ttl.as_millis() as u64,
            epoch: self.epoch(),
        }))
    }

    type KeepAliveStream = BoxStream<KeepAliveResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
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
                let reply = heartbeat
                    .lease_id
                    .parse::<LeaseId>()
                    .and_then(|id| {
                        let ttl = bound.shared.leases.refresh(id, bound.stream)?;
                        bound.leases.insert(id);
                        Ok(KeepAliveResponse {
                            lease_id: id.to_string(),
                            ttl_ms: ttl.as_millis() as u64,
                        })
                    })
                    .map_err(Status::from);
                let failed = reply.is_err();
                Some((reply, (inbound, bound, failed)))
            },
        );
        Ok(Response::new(until_closed(
            replies,
            self.shared.closing.subscribe(),
        )))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let id: LeaseId = request.into_inner().lease_id.parse()?;
        let lease = self.shared.leases.get(id)?;
        if !self
            .shared
            .store
            .set_state(&lease.service, &lease.address, id, EndpointState::Draining)
        {
            return Err(RegistryError::LeaseNotFound(id.to_string()).into());
        }
        tracing::info!(service = %lease.service, address = %lease.address, "endpoint draining");
        Ok(Response::new(DrainResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let id: LeaseId = request.into_inner().lease_id.parse()?;
        self.shared.end_lease(id, "deregistered")?;
        Ok(Response::new(DeregisterResponse {}))
    }

    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let slot = self.shared.watch_slots.acquire(request.remote_addr())?;
        let service = request.into_inner().service;
        validate::service_name(&service)?;
        // The slot lives as long as the stream does.
        let stream = watch_stream(self.shared.store.clone(), service).map(move |message| {
            let _slot = &slot;
            message
        });
        Ok(Response::new(until_closed(
            stream,
            self.shared.closing.subscribe(),
        )))
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let service = request.into_inner().service;
        validate::service_name(&service)?;
        Ok(Response::new(self.shared.store.resolve(&service)))
    }

    async fn list_services(
        &self,
        _request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Ok(Response::new(ListServicesResponse {
            services: self.shared.store.list(),
        }))
    }
}
