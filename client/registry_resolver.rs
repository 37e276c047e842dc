//! Resolves a service by watching it in a switchboard registry.
//!
//! The watch stream drives everything, not traffic: each message is applied
//! to a local copy of the set and the whole set is published at once. When
//! the registry is unreachable or the stream breaks, the last set stays in
//! use, the resolver reconnects with backoff, and the reset that opens every
//! new stream replaces the set wholesale.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;

use super::backoff::{Backoff, BackoffConfig};
use super::error::status_chain;
use super::resolver::{BoxFuture, Endpoint, Resolver, ResolverSink};
use super::transport;
use crate::proto::registry::registry_client::RegistryClient;
use crate::proto::registry::watch_response::Event;
use crate::proto::registry::{self as pb, EndpointState, WatchRequest};
use crate::registry::auth::{Bearer, Token};
use crate::tls::ClientTls;

/// Watches `service` in the registry at `registry`.
#[derive(Debug, Clone)]
pub struct RegistryResolver {
    registry: String,
    service: String,
    backoff: BackoffConfig,
    token: Option<Token>,
    tls: Option<ClientTls>,
}

impl RegistryResolver {
    /// Backoff between reconnects to the registry: fast, since a restarted
    /// registry should be picked up within a second or two.
    pub fn default_backoff() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(100),
            multiplier: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(5),
            min_connect_timeout: Duration::from_secs(5),
        }
    }

    /// A resolver for `service` at the registry `host:port`.
    pub fn new(registry: impl Into<String>, service: impl Into<String>) -> Self {
        Self {
            registry: registry.into(),
            service: service.into(),
            backoff: Self::default_backoff(),
            token: None,
            tls: None,
        }
    }

    /// Presents `token` (the registry's read token) on every watch.
    pub fn with_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }

    /// Watches over TLS with `tls`; plaintext if `None`.
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the backoff between reconnects to the registry.
    pub fn with_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// Runs one watch stream until it ends, publishing every set. Returns
    /// why it ended, and whether it delivered anything (to reset backoff).
    async fn watch_once(&self, sink: &ResolverSink) -> (String, bool) {
        let channel = match transport::channel(
            &self.registry,
            self.tls.as_ref(),
            self.backoff.min_connect_timeout,
        )
        .await
        {
            Ok(channel) => channel,
            Err(err) => {
                return (
                    format!("registry {} unreachable: {err}", self.registry),
                    false,
                )
            }
        };
        let mut stream = match RegistryClient::with_interceptor(channel, Bearer(self.token.clone()))
            .watch(WatchRequest {
                service: self.service.clone(),
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return (
                    format!("watch {} failed: {}", self.service, status_chain(&status)),
                    false,
                )
            }
        };
        let mut set: Option<BTreeMap<String, Endpoint>> = None;
        let mut epoch = None;
        let mut delivered = false;
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(message) => message,
                Err(status) => {
                    return (
                        format!("watch stream broke: {}", status_chain(&status)),
                        delivered,
                    )
                }
            };
            if epoch.is_some_and(|e| e != message.epoch) {
                tracing::info!(service = %self.service, "registry restarted (new epoch)");
            }
            epoch = Some(message.epoch);
            match message.event {
                Some(Event::Reset(snapshot)) => {
                    set = Some(
                        snapshot
                            .endpoints
                            .into_iter()
                            .map(|e| (e.address.clone(), from_proto(e)))
                            .collect(),
                    );
                }
                Some(Event::Delta(delta)) => {
                    // Deltas only make sense after a reset; the registry
                    // always sends one first.
                    let Some(set) = set.as_mut() else { continue };
                    for endpoint in delta.added.into_iter().chain(delta.updated) {
                        set.insert(endpoint.address.clone(), from_proto(endpoint));
                    }
                    for address in delta.removed {
                        set.remove(&address);
                    }
                }
                None => continue,
            }
            if let Some(set) = &set {
                tracing::debug!(service = %self.service, version = message.version, endpoints = set.len(), "endpoint set updated");
                sink.update(set.values().cloned().collect());
                delivered = true;
            }
        }
        ("watch stream closed by the registry".into(), delivered)
    }
}

impl Resolver for RegistryResolver {
    fn resolve(self: Box<Self>, sink: ResolverSink) -> BoxFuture {
        Box::pin(async move {
            let mut backoff = Backoff::new(self.backoff);
            let mut last_reported: Option<String> = None;
            loop {
                let (why, delivered) = tokio::select! {
                    outcome = self.watch_once(&sink) => outcome,
                    _ = sink.closed() => return,
                };
                if delivered {
                    // A stream that worked starts a new run of failures.
                    backoff.reset();
                    last_reported = None;
                }
                let delay = backoff.next_delay();
                // Say it once per distinct failure, not on every retry.
                if last_reported.as_ref() != Some(&why) {
                    tracing::warn!(service = %self.service, "{why}; keeping the last known endpoints and retrying");
                    last_reported = Some(why.clone());
                } else {
                    tracing::debug!(service = %self.service, retry_in = ?delay, "{why}");
                }
                sink.error(why);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = sink.closed() => return,
                }
            }
        })
    }
}

fn from_proto(endpoint: pb::Endpoint) -> Endpoint {
    Endpoint {
        draining: endpoint.state == EndpointState::Draining as i32,
        address: endpoint.address,
        metadata: endpoint.metadata,
    }
}
