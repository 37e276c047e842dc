//! The registry process around the gRPC service: health, reflection, the
//! xDS (ADS) service, HTTP/2 keepalive and graceful shutdown.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::auth::{AccessTokens, RequireTokensLayer};
use super::fleet::Fleet;
use super::message_size::MessageSizeLayer;
use super::metrics::RegistryMetrics;
use super::rpc_metrics::RpcMetricsLayer;
use super::xds::AdsService;
use super::Registry;
use crate::net::server;
use crate::proto::registry::registry_server::RegistryServer;
use crate::tls::ServerTls;

/// How long a shutdown waits for connections to close once every stream has
/// been ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// HTTP/2 streams a connection may open beyond its Watch cap: KeepAlive
/// streams and unary calls.
const STREAM_HEADROOM: usize = 1024;

/// The warm-up the `registry` binary uses unless told otherwise: long
/// enough for backends (which retry every 100-500 ms) to re-register.
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(2);

/// Register calls one connection may make per second by default: far above
/// what backends need (one per endpoint, again after a registry restart),
/// far below what would let one client drown the registry.
pub const DEFAULT_REGISTRATIONS_PER_SECOND: u32 = 1000;

/// The default cap on one request message: the largest valid request (a
/// Register with full metadata) is about 5 KiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Tunables of a registry instance.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Most endpoints one service may hold; past it Register gets
    /// RESOURCE_EXHAUSTED.
    pub max_endpoints_per_service: usize,
    /// How many changes a watcher may fall behind before it is sent a fresh
    /// snapshot instead.
    pub watch_buffer: usize,
    /// How long a freshly started registry holds back the first snapshot of
    /// every Watch. A restarted registry knows no endpoint until backends
    /// re-register (within about a second); an early empty snapshot would
    /// make clients drop every backend and fail RPCs meanwhile.
    pub warmup: Duration,
    /// Tokens writers and readers must present; none by default.
    pub tokens: AccessTokens,
    /// Serve TLS (mutual TLS if it names a client CA); plaintext if `None`.
    pub tls: Option<ServerTls>,
    /// Most services with endpoints; past it Register of a new service gets
    /// RESOURCE_EXHAUSTED.
    pub max_services: usize,
    /// Most Watch streams open at once, in all.
    pub max_watch_streams: usize,
    /// Most Watch streams open at once on one client connection.
    pub max_watch_streams_per_connection: usize,
    /// Most Register calls per second on one client connection (a burst of
    /// one second's worth passes); `None` turns the cap off.
    pub max_registrations_per_second: Option<NonZeroU32>,
    /// Largest request message, in bytes; a larger one gets
    /// RESOURCE_EXHAUSTED before it is read.
    pub max_message_bytes: usize,
    /// Where the registry counts what it does; shared with whoever serves
    /// them (the status page's `/metrics`).
    pub metrics: RegistryMetrics,
    /// Every open Watch and ADS stream, shared the same way (the status
    /// page, `ListClients`).
    pub fleet: Arc<Fleet>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            max_endpoints_per_service: 10_000,
            watch_buffer: 128,
            // Embedded registries (tests, tools) start empty on purpose; the
            // `registry` binary defaults to `DEFAULT_WARMUP`.
            warmup: Duration::ZERO,
            tokens: AccessTokens::default(),
            tls: None,
            max_services: 10_000,
            max_watch_streams: 100_000,
            max_watch_streams_per_connection: 10_000,
            max_registrations_per_second: NonZeroU32::new(DEFAULT_REGISTRATIONS_PER_SECOND),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            metrics: RegistryMetrics::default(),
            fleet: Arc::default(),
        }
    }
}

/// Serves a new [`Registry`] on `listener` until `shutdown` resolves, then
/// closes connections gracefully.
pub async fn serve(
    listener: TcpListener,
    config: RegistryConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_registry(listener, Registry::new(&config), config, shutdown).await
}

/// Serves `registry` (on whichever store, perhaps shared with a status
/// page) on `listener` until `shutdown` resolves, then closes connections
/// gracefully.
pub async fn serve_registry(
    listener: TcpListener,
    registry: Registry,
    config: RegistryConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // xDS clients read the same store, through the same layers (tokens,
    // message size) and TLS as Watch.
    let ads = AdsService::new(registry.store().clone(), &config);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServer<Registry>>().await;
    let follow_store = registry
        .store()
        .serving()
        .map(|serving| tokio::spawn(follow_store_health(health.clone(), serving)));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled-in descriptor sets are valid");
    tracing::info!(epoch = registry.epoch(), "registry started");
    let closer = registry.clone();
    let ads_closer = ads.clone();
    let (began, shutdown_began) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: ending watch and keepalive streams");
        closer.close_streams();
        ads_closer.close_streams();
        let _ = began.send(());
    };
    if let Some(tls) = &config.tls {
        tracing::info!(mutual = tls.requires_client_certificate(), "serving TLS");
    }
    let serving = server::builder(config.tls.as_ref())?
        // Bounds every kind of stream one connection may hold open (hyper
        // sets no limit); the headroom above the Watch cap keeps that cap's
        // RESOURCE_EXHAUSTED, not an HTTP/2 queue, as what a Watch flood meets.
        .max_concurrent_streams(
            u32::try_from(
                config
                    .max_watch_streams_per_connection
                    .saturating_add(STREAM_HEADROOM),
            )
            .unwrap_or(u32::MAX),
        )
        .layer(RpcMetricsLayer::new(config.metrics.clone()))
        .layer(RequireTokensLayer::new(config.tokens.clone()))
        .layer(MessageSizeLayer::new(config.max_message_bytes))
        .add_service(health_service)
        .add_service(reflection)
        // tonic's own limit stays as a backstop behind the layer's.
        .add_service(
            RegistryServer::new(registry)
                .max_decoding_message_size(config.max_message_bytes.saturating_add(1)),
        )
        .add_service(ads.into_server(config.max_message_bytes))
        .serve_with_incoming_shutdown(server::incoming(listener, config.tls.is_some()), shutdown);
    // A client that stops reading can keep its stream from ever finishing;
    // past the grace period the connections are left to close with the
    // process.
    let grace = async {
        match shutdown_began.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    let _follow_store = follow_store.map(AbortOnDrop);
    tokio::select! {
        served = serving => served,
        () = grace => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; stopping anyway");
            Ok(())
        }
    }
}

/// Turns the registry's health (overall and for the Registry service)
/// NOT_SERVING while its store cannot serve, and SERVING again after.
async fn follow_store_health(
    health: tonic_health::server::HealthReporter,
    mut serving: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let up = *serving.borrow_and_update();
        let status = match up {
            true => tonic_health::ServingStatus::Serving,
            false => tonic_health::ServingStatus::NotServing,
        };
        health.set_service_status("", status).await;
        health
            .set_service_status(
                <RegistryServer<Registry> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        if serving.changed().await.is_err() {
            return;
        }
    }
}

/// Aborts a background task when the server it belongs to stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
