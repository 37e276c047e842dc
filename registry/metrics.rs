//! The registry's metrics: what it holds (gauges refreshed at each scrape),
//! what happened to it (counters), and how its RPCs went (by method and
//! code, with latency, from [`rpc_metrics`](super::rpc_metrics)).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use super::cap::{Cap, OTHER};
use super::store::Store;
use crate::discovery::EndpointState;
use crate::metrics::rpc::RpcCounts;
use crate::metrics::Labels;

/// Handles to every registry metric. Cheap to clone; all clones count into
/// the same metrics.
#[derive(Clone, Debug, Default)]
pub struct RegistryMetrics {
    /// Endpoints now, by service and state (refreshed at each scrape).
    pub endpoints: Family<Labels, Gauge>,
    /// Live leases (refreshed at each scrape).
    pub leases: Gauge,
    /// Open Watch streams.
    pub watchers: Gauge,
    /// Endpoints registered (takeovers included).
    pub registrations: Counter,
    /// Leases that ran out without a heartbeat.
    pub expiries: Counter,
    /// Endpoints removed because their KeepAlive stream broke.
    pub stream_breaks: Counter,
    /// Endpoints marked DRAINING (by their backend or an operator).
    pub drains: Counter,
    /// Endpoints deregistered (by their backend or an operator).
    pub deregistrations: Counter,
    /// Watchers that fell behind and were sent a fresh snapshot.
    pub watcher_resets: Counter,
    /// Requests refused, by `reason` (`cap` with the cap's label, or `auth`).
    pub refusals: Family<Labels, Counter>,
    /// RPCs by `method` and `code`, and their duration by `method`
    /// (streams: until they end).
    pub rpcs: RpcCounts,
    /// xDS responses clients refused, by `type` (`lds`, `rds`, `cds`, `eds`).
    pub xds_nacks: Family<Labels, Counter>,
}

impl RegistryMetrics {
    /// Registers every metric under `switchboard_registry_*` in `registry`.
    pub fn register(&self, registry: &mut PromRegistry) {
        let r = registry.sub_registry_with_prefix("switchboard_registry");
        r.register(
            "endpoints",
            "Endpoints registered now, by service and state",
            self.endpoints.clone(),
        );
        r.register("leases", "Live leases", self.leases.clone());
        r.register("watchers", "Open Watch streams", self.watchers.clone());
        r.register(
            "registrations",
            "Endpoints registered",
            self.registrations.clone(),
        );
        r.register(
            "lease_expiries",
            "Leases that ran out without a heartbeat",
            self.expiries.clone(),
        );
        r.register(
            "stream_break_removals",
            "Endpoints removed because their KeepAlive stream broke",
            self.stream_breaks.clone(),
        );
        r.register("drains", "Endpoints marked DRAINING", self.drains.clone());
        r.register(
            "deregistrations",
            "Endpoints deregistered",
            self.deregistrations.clone(),
        );
        r.register(
            "watcher_resets",
            "Watchers that fell behind and were sent a fresh snapshot",
            self.watcher_resets.clone(),
        );
        r.register(
            "refusals",
            "Requests refused by a cap or for lack of a valid token",
            self.refusals.clone(),
        );
        r.register(
            "xds_nacks",
            "xDS responses clients refused (NACKed), by type",
            self.xds_nacks.clone(),
        );
        self.rpcs.register(
            r,
            "RPCs by method and status code",
            "RPC duration by method (streams: until they end)",
        );
    }

    /// Sets the gauges of what `store` holds now.
    pub async fn refresh(&self, store: &Arc<dyn Store>) {
        self.leases.set(store.lease_count() as i64);
        let Ok(services) = store.list().await else {
            return;
        };
        self.endpoints.clear();
        for service in services {
            let Ok(snapshot) = store.resolve(&service.service).await else {
                continue;
            };
            for state in [EndpointState::Serving, EndpointState::Draining] {
                let count = snapshot
                    .endpoints
                    .iter()
                    .filter(|e| e.state == state)
                    .count();
                self.endpoints
                    .get_or_create(&vec![
                        ("service", service.service.clone()),
                        ("state", state.to_string()),
                    ])
                    .set(count as i64);
            }
        }
    }

    /// Counts one refusal by `cap`; `None` for a RESOURCE_EXHAUSTED no
    /// cap of the registry explains, labelled [`OTHER`].
    pub fn refused_by_cap(&self, cap: Option<Cap>) {
        let label = cap.map_or(OTHER, Cap::label);
        self.refusals
            .get_or_create(&vec![("reason", "cap".into()), ("cap", label.to_owned())])
            .inc();
    }

    /// Counts one NACK of an xDS response of `kind` (`lds`, `cds`, ...).
    pub fn xds_nacked(&self, kind: &'static str) {
        self.xds_nacks
            .get_or_create(&vec![("type", kind.to_owned())])
            .inc();
    }

    /// Counts one refusal for a missing or wrong token.
    pub fn refused_by_auth(&self) {
        self.refusals
            .get_or_create(&vec![("reason", "auth".into())])
            .inc();
    }
}
