//! What one echo server needs to know: where it is reached, where and how
//! it registers, and how long its drain may take.

use crate::registry::auth::Token;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::EchoError;
use crate::client::backoff::BackoffConfig;
use crate::registry::{validate, DEFAULT_SERVICE};
use crate::tls::{ClientTls, ServerTls};

/// Lease TTL asked for when none is given: the registry's own default.
pub const DEFAULT_TTL: Duration = validate::DEFAULT_TTL;
/// How long a draining server keeps accepting RPCs after it left the
/// registry, so that watchers have moved away before it sends GOAWAY.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How long in-flight RPCs get to finish once the server stops accepting.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Backoff between attempts to reach the registry. Far shorter than gRPC's
/// connection backoff because an endpoint must be back in the registry
/// within 2 s of a registry restart: at most 500 ms (±20 %) between
/// attempts, and a down registry refuses connections at once, so an attempt
/// costs next to nothing. The jitter keeps a fleet of backends from
/// reconnecting in lockstep. `min_connect_timeout` bounds one connect
/// attempt, so a registry host that drops packets is retried soon too.
pub fn registry_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(100),
        multiplier: 1.6,
        jitter: 0.2,
        max: Duration::from_millis(500),
        min_connect_timeout: Duration::from_secs(1),
    }
}

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
        let invalid = |setting| move |error| EchoError::Invalid { setting, error };
        if let Some(advertise) = &self.advertise {
            validate::address(advertise).map_err(invalid("advertise address"))?;
        }
        if let Some(registry) = &self.registry {
            validate::address(registry).map_err(invalid("registry address"))?;
        }
        validate::service_name(&self.service).map_err(invalid("service"))?;
        validate::metadata(&self.metadata).map_err(invalid("metadata"))?;
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        validate::ttl(ttl_ms).map_err(invalid("lease TTL"))?;
        Ok(())
    }

    /// The address to register for a server listening on `local`.
    pub fn advertised(&self, local: SocketAddr) -> Result<String, EchoError> {
        match &self.advertise {
            Some(advertise) => Ok(advertise.clone()),
            None if local.ip().is_unspecified() => Err(EchoError::WildcardWithoutAdvertise(local)),
            None => Ok(local.to_string()),
        }
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
