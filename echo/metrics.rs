//! echo's metrics: its Echo RPCs by method and final status code, timed to
//! their end, and whether each server is registered.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use crate::metrics::rpc::{CallEnd, RpcCounts, RpcEnd, RpcObserver};
use crate::metrics::Labels;
use crate::registration::LeaseState;

/// Handles to every echo metric; the servers of one process share them.
/// Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct EchoMetrics {
    /// Echo RPCs by `method` and `code`, and their duration by `method`.
    pub rpcs: RpcCounts,
    /// 1 while a server's endpoint is registered, else 0, by `service`
    /// and `address`.
    pub registered: Family<Labels, Gauge>,
}

impl EchoMetrics {
    /// Registers every metric under `switchboard_echo_*` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("switchboard_echo");
        self.rpcs.register(
            r,
            "Echo RPCs by method and status code",
            "Echo RPC duration by method, until the call ends",
        );
        r.register(
            "registered",
            "1 while the server's endpoint is registered, else 0",
            self.registered.clone(),
        );
    }

    /// Records where the endpoint `address` of `service` stands now.
    pub fn set_lease(&self, service: &str, address: &str, state: &LeaseState) {
        self.registered
            .get_or_create(&vec![
                ("service", service.to_owned()),
                ("address", address.to_owned()),
            ])
            .set(i64::from(state.is_registered()));
    }
}

impl RpcObserver for EchoMetrics {
    fn rpc_ended(&self, call: &CallEnd<'_>) {
        self.rpcs.observe(call.method, call.code, call.elapsed);
    }
}

/// A tonic service whose calls are counted into [`EchoMetrics`]; keeps the
/// service's name, so it is added (and health-checked) like the service.
#[derive(Clone, Debug)]
pub struct Observed<S> {
    inner: RpcEnd<S, EchoMetrics>,
}

impl<S> Observed<S> {
    /// Counts the calls of `inner` into `metrics`.
    pub fn new(inner: S, metrics: EchoMetrics) -> Self {
        Self {
            inner: RpcEnd::new(inner, metrics),
        }
    }
}

impl<S: NamedService> NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Observed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move { Ok(call.await?.map(Body::new)) })
    }
}
