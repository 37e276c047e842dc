//! The registry's HTTP side, on `--metrics-listen`: a status page at `/`
//! (plain HTML and a few lines of script, served from the binary, that poll
//! `/status.json` every second), `/metrics` in the Prometheus text format,
//! and `/healthz`.

use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use prometheus_client::registry::Registry as PromRegistry;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::fleet::{stream_json, Fleet};
use super::metrics::RegistryMetrics;
use super::store::Store;
use crate::metrics::http::{self, Handler};

/// The page at `/`: it fetches [`status_json`] once a second and redraws.
pub const PAGE: &str = include_str!("status.html");

/// Serves the status page, `/status.json`, `/metrics` and `/healthz` for
/// `store` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    metrics: RegistryMetrics,
    fleet: Arc<Fleet>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut registry = PromRegistry::default();
    metrics.register(&mut registry);
    store.register_metrics(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let handler: Handler = Arc::new(move |request: Request<Incoming>| {
        let store = store.clone();
        let metrics = metrics.clone();
        let registry = registry.clone();
        let fleet = fleet.clone();
        Box::pin(async move {
            match request.uri().path() {
                "/" | "/index.html" => {
                    http::reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into())
                }
                "/status.json" => http::reply(
                    StatusCode::OK,
                    "application/json",
                    status_json(&store, &fleet).await.to_string(),
                ),
                "/metrics" => {
                    metrics.refresh(&store).await;
                    let text =
                        crate::metrics::render(&registry.lock().unwrap_or_else(|p| p.into_inner()));
                    http::reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, text)
                }
                // A replica whose store is away must not get traffic.
                "/healthz" => match store.serving().is_none_or(|s| *s.borrow()) {
                    true => http::reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
                    false => http::reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain; charset=utf-8",
                        "store unreachable\n".into(),
                    ),
                },
                _ => http::not_found(),
            }
        })
    });
    http::serve(listener, handler, shutdown).await;
}

/// What the registry holds now: its epoch, the highest version of any
/// service, every service's endpoints with their leases, and who follows
/// this replica (its open Watch and ADS streams).
pub async fn status_json(store: &Arc<dyn Store>, fleet: &Fleet) -> Value {
    let mut services = Vec::new();
    let mut version = 0;
    if let Ok(list) = store.list().await {
        for service in list {
            let Ok(snapshot) = store.leased_endpoints(&service.service).await else {
                continue;
            };
            version = version.max(snapshot.version);
            let endpoints: Vec<Value> = snapshot
                .endpoints
                .iter()
                .map(|leased| {
                    let metadata: std::collections::BTreeMap<_, _> =
                        leased.endpoint.metadata.iter().collect();
                    json!({
                        "address": leased.endpoint.address,
                        "state": leased.endpoint.state.to_string(),
                        "metadata": metadata,
                        "lease_age_ms": leased.lease_age.as_millis() as u64,
                        "ttl_ms": leased.ttl.as_millis() as u64,
                    })
                })
                .collect();
            services.push(json!({
                "service": service.service,
                "version": snapshot.version,
                "endpoints": endpoints,
            }));
        }
    }
    json!({
        "epoch": store.epoch().to_string(),
        "version": version,
        "leases": store.lease_count(),
        "services": services,
        "clients": fleet
            .list(None)
            .iter()
            .map(|f| stream_json(&f.into()))
            .collect::<Vec<_>>(),
    })
}
