//! Resolves a `dns:///host:port` target: every address the host name
//! resolves to (IPv4 and IPv6 alike) is an endpoint.
//!
//! DNS has no change stream, so the name is looked up again on a timer
//! (30 s by default) and whenever the balancer says a connection failed
//! ([`ResolveNow`](crate::client::resolver::ResolveNow)), since a backend that went
//! away may have moved to another address. Those nudges are rate-limited so
//! that a flapping backend cannot turn into a stream of lookups. Each answer
//! is published whole, as a reset, and the balancer applies only the
//! difference. A failed lookup keeps the last set in use.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::error::ResolverError;
use crate::client::resolver::{BoxFuture, Endpoint, Resolver, ResolverSink};

/// A name service: turns `host:port` into socket addresses. The default is
/// the system resolver ([`tokio::net::lookup_host`]); tests and custom name
/// services supply their own.
pub type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// Endpoints from DNS for one `host:port`.
#[derive(Clone)]
pub struct DnsResolver {
    /// The `host:port` to look up.
    name: String,
    /// Time between two periodic lookups.
    refresh: Duration,
    /// Least time between two lookups when nudged by failures.
    min_interval: Duration,
    /// How names are looked up.
    lookup: Lookup,
}

impl fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsResolver")
            .field("name", &self.name)
            .field("refresh", &self.refresh)
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}

impl DnsResolver {
    /// How often the name is looked up again when nothing fails.
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
    /// Least time between two lookups caused by connection failures.
    /// grpc-go waits 30 s; one second keeps a moved backend's outage short
    /// while bounding what a flapping one costs the name service.
    pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(1);

    /// A resolver for `name`, a `host:port`, using the system resolver.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            refresh: Self::DEFAULT_REFRESH,
            min_interval: Self::DEFAULT_MIN_INTERVAL,
            lookup: Arc::new(|name| {
                Box::pin(async move { tokio::net::lookup_host(name).await.map(Iterator::collect) })
            }),
        }
    }

    /// Looks the name up again every `refresh`.
    pub fn with_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    /// Looks up at most once per `min_interval` when nudged by failures.
    pub fn with_min_interval(mut self, min_interval: Duration) -> Self {
        self.min_interval = min_interval;
        self
    }

    /// Looks names up with `lookup` instead of the system resolver.
    pub fn with_lookup(mut self, lookup: Lookup) -> Self {
        self.lookup = lookup;
        self
    }

    /// One lookup, published: the whole set, or why there is none.
    async fn resolve_once(&self, sink: &ResolverSink) {
        match (self.lookup)(self.name.clone()).await {
            Ok(addresses) => {
                let mut endpoints: Vec<Endpoint> = Vec::with_capacity(addresses.len());
                for address in addresses {
                    // `[::1]:80` for IPv6, which is also how it is dialled.
                    let address = address.to_string();
                    if !endpoints.iter().any(|e| e.address == address) {
                        endpoints.push(Endpoint::new(address));
                    }
                }
                if endpoints.is_empty() {
                    sink.error(ResolverError::NoAddresses {
                        name: self.name.clone(),
                    });
                } else {
                    tracing::debug!(name = %self.name, endpoints = endpoints.len(), "resolved");
                    sink.reset(endpoints);
                }
            }
            Err(error) => {
                tracing::warn!(name = %self.name, %error, "DNS lookup failed; keeping the last known endpoints");
                sink.error(ResolverError::Lookup {
                    name: self.name.clone(),
                    detail: error.to_string(),
                });
            }
        }
    }

    /// Looks up, then again on each refresh or nudge, forever.
    async fn run(&self, sink: &ResolverSink) {
        loop {
            let looked_up = Instant::now();
            self.resolve_once(sink).await;
            tokio::select! {
                _ = tokio::time::sleep(self.refresh) => {}
                _ = sink.resolve_now_requested() => {
                    tokio::time::sleep_until(looked_up + self.min_interval).await;
                }
            }
        }
    }
}

impl Resolver for DnsResolver {
    fn resolve(self: Box<Self>, sink: ResolverSink) -> BoxFuture {
        Box::pin(async move {
            tokio::select! {
                _ = self.run(&sink) => {}
                _ = sink.closed() => {}
            }
        })
    }
}
