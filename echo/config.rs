//! What one echo server needs to know: where it is reached, where and how
//! it registers, and how long its drain may take.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::metrics::EchoMetrics;
use super::EchoError;
use crate::net::backoff::BackoffConfig;
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
    /// Failures and latency injected into every Echo call.
    pub faults: Faults,
    /// Where to count the Echo RPCs; uncounted if `None`.
    pub metrics: Option<EchoMetrics>,
}

/// Faults an echo server injects on purpose, for tests, demos and failure
/// drills: a backend that is up but not well. The default injects nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Fraction of Echo calls (0 to 1) answered with `fail_code` instead of
    /// a reply.
    pub fail_rate: f64,
    /// The status injected failures carry.
    pub fail_code: tonic::Code,
    /// Latency added to every Echo call, failed ones included, so a slow
    /// and failing backend can be simulated at once.
    pub delay: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            fail_rate: 0.0,
            fail_code: tonic::Code::Unavailable,
            delay: Duration::ZERO,
        }
    }
}

/// The status codes `--fail-code` accepts, by their gRPC names. OK is not
/// among them: it is no failure.
const FAIL_CODES: [(&str, tonic::Code); 16] = [
    ("CANCELLED", tonic::Code::Cancelled),
    ("UNKNOWN", tonic::Code::Unknown),
    ("INVALID_ARGUMENT", tonic::Code::InvalidArgument),
    ("DEADLINE_EXCEEDED", tonic::Code::DeadlineExceeded),
    ("NOT_FOUND", tonic::Code::NotFound),
    ("ALREADY_EXISTS", tonic::Code::AlreadyExists),
    ("PERMISSION_DENIED", tonic::Code::PermissionDenied),
    ("RESOURCE_EXHAUSTED", tonic::Code::ResourceExhausted),
    ("FAILED_PRECONDITION", tonic::Code::FailedPrecondition),
    ("ABORTED", tonic::Code::Aborted),
    ("OUT_OF_RANGE", tonic::Code::OutOfRange),
    ("UNIMPLEMENTED", tonic::Code::Unimplemented),
    ("INTERNAL", tonic::Code::Internal),
    ("UNAVAILABLE", tonic::Code::Unavailable),
    ("DATA_LOSS", tonic::Code::DataLoss),
    ("UNAUTHENTICATED", tonic::Code::Unauthenticated),
];

impl Faults {
    /// Checks the settings, naming the flag a mistake belongs to.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(format!(
                "--fail-rate {}: must be a fraction from 0 to 1, e.g. 0.25",
                self.fail_rate
            ));
        }
        if self.fail_code == tonic::Code::Ok {
            return Err("--fail-code OK is no failure: use e.g. UNAVAILABLE or INTERNAL".into());
        }
        Ok(())
    }

    /// Parses a gRPC status code given by name (`UNAVAILABLE`, any case) or
    /// number (`14`); OK is refused.
    pub fn parse_code(text: &str) -> Result<tonic::Code, String> {
        let wanted = text.trim().to_ascii_uppercase();
        let by_number = wanted.parse::<i32>().ok();
        FAIL_CODES
            .iter()
            .find(|(name, code)| *name == wanted || by_number == Some(*code as i32))
            .map(|(_, code)| *code)
            .ok_or_else(|| {
                format!("invalid --fail-code {text:?}: use a gRPC status name such as UNAVAILABLE, INTERNAL or DEADLINE_EXCEEDED, or its number 1-16")
            })
    }

    /// Whether this call should fail, drawn at random at `fail_rate`.
    pub fn should_fail(&self) -> bool {
        self.fail_rate > 0.0 && rand::random::<f64>() < self.fail_rate
    }
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
            faults: Faults::default(),
            metrics: None,
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

    #[test]
    fn fault_settings_parse_and_refuse_nonsense() {
        assert_eq!(
            Faults::parse_code("unavailable").unwrap(),
            tonic::Code::Unavailable
        );
        assert_eq!(Faults::parse_code("13").unwrap(), tonic::Code::Internal);
        for bad in ["OK", "0", "17", "nope", ""] {
            assert!(Faults::parse_code(bad).is_err(), "{bad:?}");
        }
        Faults::default().validate().unwrap();
        for rate in [-0.1, 1.5, f64::NAN] {
            let faults = Faults {
                fail_rate: rate,
                ..Faults::default()
            };
            assert!(faults.validate().is_err(), "{rate}");
        }
        let always = Faults {
            fail_rate: 1.0,
            ..Faults::default()
        };
        assert!((0..100).all(|_| always.should_fail()));
        assert!((0..100).all(|_| !Faults::default().should_fail()));
    }
}
