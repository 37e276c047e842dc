//! Resolves a service by watching it in a switchboard registry.
//!
//! The watch stream drives everything, not traffic: each message is passed
//! on to the balancer as the [`Update`](crate::discovery::Update) it is, a
//! reset or a delta, which the balancer applies to its set. When the
//! registry is unreachable or the stream breaks, the last set stays in use,
//! the resolver reconnects with backoff (to the next replica, when it was
//! given several), and the reset that opens every new stream is applied as
//! the difference it makes.
//!
//! Messages also bring the service's config (on the first message of
//! each stream and after each change): it is passed on as parsed, and one
//! this client cannot parse (a newer registry's) is logged and skipped, so
//! the last good config stays in force, as gRPC does.
//!
//! The resolver remembers the epoch and version of the last message it
//! applied and names them when it reconnects: a registry that can continue
//! from there (a replica of the same shared store, or the same in-memory
//! registry after a blip) sends only what was missed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::client::backoff::{Backoff, BackoffConfig};
use crate::client::error::{status_chain, ResolverError};
use crate::client::resolver::{BoxFuture, Resolver, ResolverSink};
use crate::client::transport;
use crate::discovery::Versioned;
use crate::proto::registry::registry_client::RegistryClient;
use crate::proto::registry::{ServiceConfigUpdate, WatchRequest};
use crate::registry::auth::{Bearer, Token};
use crate::registry::validate;
use crate::service_config::ServiceConfig;
use crate::tls::ClientTls;

/// Watches `service` in the registry at `registry`.
#[derive(Debug, Clone)]
pub struct RegistryResolver {
    /// `host:port`, or several replicas' as `host:port,host:port`.
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

    /// A resolver for `service` at the registry `host:port` (or any of the
    /// replicas `host:port,host:port`).
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

    /// Runs one watch stream at `registry` until it ends, publishing every
    /// set, resuming from and keeping `position` (the epoch and version of
    /// the last message applied). Returns why it ended, and whether it
    /// delivered anything (to reset backoff).
    async fn watch_once(
        &self,
        registry: &str,
        position: &mut Option<(u64, u64)>,
        sink: &ResolverSink,
    ) -> (ResolverError, bool) {
        let channel = match transport::channel(
            registry,
            self.tls.as_ref(),
            self.backoff.min_connect_timeout,
        )
        .await
        {
            Ok(channel) => channel,
            Err(detail) => {
                return (
                    ResolverError::Unreachable {
                        registry: registry.to_owned(),
                        detail,
                    },
                    false,
                )
            }
        };
        let mut stream = match RegistryClient::with_interceptor(channel, Bearer(self.token.clone()))
            .watch(WatchRequest {
                service: self.service.clone(),
                epoch: position.map(|(epoch, _)| epoch),
                version: position.map(|(_, version)| version),
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return (
                    ResolverError::WatchFailed {
                        service: self.service.clone(),
                        code: status.code(),
                        detail: status_chain(&status),
                    },
                    false,
                )
            }
        };
        let mut delivered = false;
        let mut config_version = None;
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(message) => message,
                Err(status) => {
                    return (
                        ResolverError::StreamBroke {
                            code: status.code(),
                            detail: status_chain(&status),
                        },
                        delivered,
                    )
                }
            };
            if let Some(update) = &message.service_config {
                self.service_config(update, &mut config_version, sink);
            }
            // A message without an event brings only the config.
            let Ok(Versioned {
                epoch: received,
                version,
                update,
            }) = Versioned::try_from(message)
            else {
                continue;
            };
            if position.is_some_and(|(e, _)| e != received) {
                tracing::info!(service = %self.service, "registry restarted (new epoch)");
            }
            *position = Some((received, version));
            tracing::debug!(service = %self.service, version, "endpoint update");
            sink.update(update);
            delivered = true;
        }
        (ResolverError::StreamClosed, delivered)
    }

    /// Passes a config on, unless it is the version this stream already
    /// passed on, or does not parse here.
    fn service_config(
        &self,
        update: &ServiceConfigUpdate,
        passed: &mut Option<u64>,
        sink: &ResolverSink,
    ) {
        if *passed == Some(update.version) {
            return;
        }
        if update.json.is_empty() {
            *passed = Some(update.version);
            sink.service_config(None);
            return;
        }
        match ServiceConfig::from_json(&update.json) {
            Ok(config) => {
                tracing::info!(service = %self.service, version = update.version, "service config from the registry");
                *passed = Some(update.version);
                sink.service_config(Some(Arc::new(config)));
            }
            Err(err) => tracing::warn!(
                service = %self.service,
                version = update.version,
                "ignoring the registry's service config, keeping the last good one: {err}"
            ),
        }
    }
}

impl Resolver for RegistryResolver {
    fn resolve(self: Box<Self>, sink: ResolverSink) -> BoxFuture {
        Box::pin(async move {
            let mut backoff = Backoff::new(self.backoff);
            let mut last_reported: Option<ResolverError> = None;
            // The target was checked when parsed; an unchecked list is tried
            // as one address and fails as an unreachable registry.
            let replicas: Vec<String> = validate::registry_addresses(&self.registry)
                .map(|list| list.into_iter().map(str::to_owned).collect())
                .unwrap_or_else(|_| vec![self.registry.clone()]);
            let mut replica = 0;
            let mut position = None;
            loop {
                let registry = &replicas[replica];
                let (why, delivered) = tokio::select! {
                    outcome = self.watch_once(registry, &mut position, &sink) => outcome,
                    _ = sink.closed() => return,
                };
                // The next attempt goes to the next replica.
                replica = (replica + 1) % replicas.len();
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
