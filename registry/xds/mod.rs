//! The registry as an xDS management server: the v3 Aggregated Discovery
//! Service (state-of-the-world) on the registry's own port, so that stock
//! gRPC clients (grpc-go, grpc-java, grpcio, C++) and Envoy follow a
//! service's live endpoints with an `xds:///<service>` target and no
//! switchboard code.
//!
//! - [`resources`]: what one service becomes: Listener, RouteConfiguration,
//!   Cluster, ClusterLoadAssignment;
//! - [`policy`]: its service config's traffic policy in xDS terms
//!   (balancing list, outlier detection, circuit breakers, per-method
//!   retries and timeouts);
//! - [`stream`]: one ADS stream: its subscriptions per type, nonces, ACKs
//!   and NACKs, and the store watches behind them;
//! - [`cache`]: each resource built and encoded once per version and
//!   shared by every stream that sends it.
//!
//! It reads the registry only through the [`Store`] trait, so it serves
//! whatever store the registry runs on. See `docs/xds.md`.

pub mod cache;
pub mod policy;
pub mod resources;
pub mod stream;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures_util::Stream;
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};

use self::cache::ResourceCache;
use super::fleet::Fleet;
use super::limits::WatchSlots;
use super::metrics::RegistryMetrics;
use super::store::Store;
use super::RegistryConfig;
use crate::discovery::Endpoint;
use crate::metrics::rpc::{keep_end_cause, EndCause};

/// The gRPC path prefix of the ADS methods, for the token check.
pub use super::auth::ADS_PATH;

/// Host-name endpoints remembered so each is warned about once; past this
/// many the set is cleared and warnings start over.
const REFUSED_REMEMBERED: usize = 1024;

/// The ADS service over a [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
}

/// What every ADS stream of one registry shares.
struct Shared {
    store: Arc<dyn Store>,
    /// Caps open ADS streams, in all and per connection, as Watch is capped
    /// (a pool of its own: one ADS stream may carry many services).
    slots: Arc<WatchSlots>,
    /// Turns true when the registry shuts down, ending every open stream.
    closing: tokio::sync::watch::Sender<bool>,
    /// Addresses already warned about as not IP socket addresses: with a
    /// thousand subscribers, a warning per stream would flood the log.
    refused: Mutex<HashSet<String>>,
    /// Every open stream, for the fleet view.
    fleet: Arc<Fleet>,
    /// Counts NACKs.
    metrics: RegistryMetrics,
    /// The resources built so far, by service, kind and what they were
    /// built from: a thousand subscribers of a service get one build.
    resources: ResourceCache,
}

impl AdsService {
    /// An ADS service reading `store`, with the Watch stream caps of
    /// `config`, listing its streams in `config.fleet`.
    pub fn new(store: Arc<dyn Store>, config: &RegistryConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                slots: WatchSlots::new(
                    config.max_watch_streams,
                    config.max_watch_streams_per_connection,
                ),
                closing: tokio::sync::watch::Sender::new(false),
                refused: Mutex::new(HashSet::new()),
                fleet: config.fleet.clone(),
                metrics: config.metrics.clone(),
                resources: ResourceCache::new(cache::DEFAULT_BUDGET_BYTES),
            }),
        }
    }

    /// The tonic service, refusing request messages over
    /// `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes.saturating_add(1))
    }

    /// Ends every open ADS stream with UNAVAILABLE, now and from now on, so
    /// a graceful shutdown does not wait on streams that never end alone.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// How many ADS streams are open.
    pub fn open_streams(&self) -> usize {
        self.shared.slots.open()
    }
}

impl Shared {
    /// Notes an endpoint left out of EDS for its host-name address.
    fn refuse(&self, endpoint: &Endpoint) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.len() >= REFUSED_REMEMBERED {
            refused.clear();
        }
        if refused.insert(endpoint.address.clone()) {
            tracing::warn!(
                address = %endpoint.address,
                "endpoint left out of xDS: gRPC xDS clients need an IP address, not a host name; register it by IP"
            );
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let slot = self.shared.slots.acquire(request.remote_addr())?;
        let peer = request.remote_addr();
        // The stream's own caps end it mid-way: their status goes out as
        // trailers, so it is kept for the metrics layer on the way.
        let cause = EndCause::of(request.extensions());
        let inbound = request.into_inner();
        Ok(Response::new(Box::pin(keep_end_cause(
            cause,
            stream::responses(
                stream::AdsStream::new(self.shared.clone(), slot, peer),
                inbound,
                self.shared.closing.subscribe(),
            ),
        ))))
    }

    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "incremental (delta) xDS is not served; use state-of-the-world ADS (StreamAggregatedResources)",
        ))
    }
}
