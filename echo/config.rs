//! What one echo server needs to know: where it is reached, where and how
//! it registers, and how long its drain may take.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::EchoError;
use crate::client::backoff::BackoffConfig;
use crate::registration::{self, registry_backoff};
pub use crate::registration::{DEFAULT_DRAIN_GRACE, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_TTL};
use crate::registry::auth::Token;
use crate::registry::DEFAULT_SERVICE;
use crate::tls::{ClientTls, ServerTls};

/// The settings of one echo server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The `host:port` clients use, registered and named in every reply;
    /// `None` for the listener's own address.
    pub advertise: Option<String>,
    /// The registry's `host:port`; `None` serves without registering (for
    /// static targets and tests).
    pub registry: Option<String>,
    /// The service to register under.
    pub service: String,
    /// Labels registered with the endpoint.
    pub metadata: HashMap<String, String>,
    /// Lease TTL asked of the registry.
    pub ttl: Duration,
    /// Time between leaving the registry and refusing new connections.
    pub drain_grace: Duration,
    /// Time in-flight RPCs get to finish before their connections are cut.
    pub shutdown_timeout: Duration,
    /// Backoff between attempts to reach the registry.
    pub registry_backoff: BackoffConfig,
    /// The registry's write token, when it demands one.
    pub registry_token: Option<Token>,
    /// Serve TLS (mutual TLS if it names a client CA); plaintext if `None`.
    pub tls: Option<ServerTls>,
    /// Reach the registry over TLS with these settings; plaintext if `None`.
    pub registry_tls: Option<ClientTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            advertise: None,
            registry: None,
            service: DEFAULT_SERVICE.to_owned(),
            metadata: HashMap::new(),
            ttl: DEFAULT_TTL,
            drain_grace: DEFAULT_DRAIN_GRACE,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            registry_backoff: registry_backoff(),
            registry_token: None,
            tls: None,
            registry_tls: None,
        }
    }
}

impl ServerConfig {
    /// Checks everything the registry would check at Register time, so a
    /// mistake stops the server before it starts rather than being retried
    /// forever.
    pub fn validate(&self) -> Result<(), EchoError> {
        self.builder().validate()
    }

    /// The address to register for a server listening on `local`.
    pub fn advertised(&self, local: SocketAddr) -> Result<String, EchoError> {
        registration::advertised(self.advertise.as_deref(), local)
    }

    /// A [`registration::Builder`] with these settings and no services yet.
    pub fn builder(&self) -> registration::Builder {
        let mut builder = registration::Server::builder()
            .service_name(self.service.clone())
            .ttl(self.ttl)
            .drain_grace(self.drain_grace)
            .shutdown_timeout(self.shutdown_timeout)
            .registry_backoff(self.registry_backoff);
        if let Some(registry) = &self.registry {
            builder = builder.registry(registry.clone());
        }
        if let Some(advertise) = &self.advertise {
            builder = builder.advertise(advertise.clone());
        }
        for (key, value) in &self.metadata {
            builder = builder.metadata(key.clone(), value.clone());
        }
        if let Some(token) = &self.registry_token {
            builder = builder.token(token.clone());
        }
        if let Some(tls) = &self.registry_tls {
            builder = builder.registry_tls(tls.clone());
        }
        if let Some(tls) = &self.tls {
            builder = builder.tls(tls.clone());
        }
        builder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_settings_are_named() {
        ServerConfig::default().validate().unwrap();
        let cases = [
            (
                ServerConfig {
                    advertise: Some("nope".into()),
                    ..ServerConfig::default()
                },
                "advertise address",
            ),
            (
                ServerConfig {
                    registry: Some("127.0.0.1:0".into()),
                    ..ServerConfig::default()
                },
                "registry address",
            ),
            (
                ServerConfig {
                    service: "a..b".into(),
                    ..ServerConfig::default()
                },
                "service",
            ),
            (
                ServerConfig {
                    ttl: Duration::from_millis(10),
                    ..ServerConfig::default()
                },
                "lease TTL",
            ),
        ];
        for (config, setting) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.starts_with(setting), "{err}");
        }
    }

    #[test]
    fn advertises_the_listener_unless_told_otherwise() {
        let config = ServerConfig::default();
        let local: SocketAddr = "127.0.0.1:7".parse().unwrap();
        assert_eq!(config.advertised(local).unwrap(), "127.0.0.1:7");
        let wildcard: SocketAddr = "0.0.0.0:7".parse().unwrap();
        assert!(config.advertised(wildcard).is_err());
        let config = ServerConfig {
            advertise: Some("backend:7".into()),
            ..config
        };
        assert_eq!(config.advertised(wildcard).unwrap(), "backend:7");
    }
}
