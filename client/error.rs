//! How client-side failures are described: typed errors inside, one line
//! at the edge.
//!
//! Three enums name every cause the client library produces:
//!
//! - [`ConnectError`]: why one backend connection could not be made, or was
//!   lost (refused, timed out, refused by TLS, not an HTTP/2 server, ...);
//!   carried by subchannel states as an `Arc`, so every state and picker
//!   that mentions it shares one value.
//! - [`ResolverError`]: why a resolver cannot reach its source, while the
//!   last known endpoints stay in use.
//! - [`Error`]: why an RPC failed in the channel before or without reaching
//!   a backend. It becomes a [`tonic::Status`] with the right code, and the
//!   status keeps the typed error as its source, so a caller can branch on
//!   the cause:
//!
//! ```no_run
//! # fn demo(status: tonic::Status) {
//! use switchboard::client::Error;
//!
//! let cause = std::error::Error::source(&status).and_then(|e| e.downcast_ref::<Error>());
//! if let Some(Error::NoEndpoints { all_draining: true, .. }) = cause {
//!     // every endpoint is draining: a rollout, not an outage
//! }
//! # }
//! ```
//!
//! Every `Display` is the one-line message the library has always printed,
//! byte for byte: logs, CLI output and tests that quote them keep working.
//! Causes that come from other crates (I/O, hyper, h2, rustls) are kept as
//! their text, as they are neither `Clone` nor comparable, and the states
//! that carry these errors are compared to tell observers of real changes.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::connectivity::ConnectivityState;
use super::target::TargetError;

/// Why an RPC failed inside the channel. Converts into a [`tonic::Status`]
/// whose source is this error (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The resolver has no endpoint that serves: none at all, or all
    /// draining.
    #[error(
        "no endpoints available for service {service}{}{}",
        if *.all_draining { " (all draining)" } else { "" },
        Suffix("; resolver: ", .resolver.as_ref())
    )]
    NoEndpoints {
        /// The service being balanced.
        service: String,
        /// Whether endpoints are listed but every one is draining.
        all_draining: bool,
        /// Why the resolver cannot reach its source, if it cannot.
        resolver: Option<ResolverError>,
    },
    /// Endpoints are listed but no connection to any of them is Ready.
    #[error(
        "no ready endpoint for service {service}{}",
        Suffix("; last error: ", .last.as_deref())
    )]
    NoReadyEndpoint {
        /// The service being balanced.
        service: String,
        /// The most recent connection failure, if any.
        #[source]
        last: Option<Arc<ConnectError>>,
    },
    /// No endpoint set is known yet and the resolver cannot reach its source.
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    /// The RPC's deadline passed before it got an answer.
    #[error(
        "deadline exceeded ({connectivity:?}{}; service {service})",
        Suffix(": ", .waiting_on.as_deref())
    )]
    DeadlineExceeded {
        /// The service being balanced.
        service: String,
        /// The channel's state when the deadline passed.
        connectivity: ConnectivityState,
        /// Why the channel had no Ready backend then, if it had none.
        #[source]
        waiting_on: Option<Arc<Error>>,
    },
    /// The RPC was sent to `address` and its connection failed; it is not
    /// retried, as the backend may have run it.
    #[error("RPC to {address} failed: {detail}")]
    RpcFailed {
        /// The backend it was sent to.
        address: Arc<str>,
        /// What the connection said.
        detail: String,
    },
    /// The channel's balancer task has stopped (the runtime is shutting
    /// down).
    #[error("the balancer stopped")]
    BalancerStopped,
    /// The backend address does not form a request URI.
    #[error("cannot address {authority}: {detail}")]
    InvalidUri {
        /// The backend's authority.
        authority: String,
        /// Why the URI was refused.
        detail: String,
    },
    /// The target string was refused.
    #[error(transparent)]
    Target(#[from] TargetError),
}

impl Error {
    /// The gRPC status code an RPC failing with this error gets.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::NoEndpoints { .. }
            | Error::NoReadyEndpoint { .. }
            | Error::Resolver(_)
            | Error::RpcFailed { .. }
            | Error::BalancerStopped => tonic::Code::Unavailable,
            Error::DeadlineExceeded { .. } => tonic::Code::DeadlineExceeded,
            Error::InvalidUri { .. } => tonic::Code::Internal,
            Error::Target(_) => tonic::Code::InvalidArgument,
        }
    }

    /// The status an RPC failing with this error gets: its code and
    /// message, and the error itself as the source, for callers to
    /// downcast. Shared errors (a picker's) become statuses without a copy.
    pub fn into_status(self: Arc<Self>) -> tonic::Status {
        let mut status = tonic::Status::new(self.code(), self.to_string());
        status.set_source(self);
        status
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        Arc::new(error).into_status()
    }
}

/// Why a connection to one backend could not be made, or was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The address is no `host:port`.
    #[error("invalid backend address {address:?}: {detail}")]
    InvalidAddress {
        /// The address as given.
        address: Arc<str>,
        /// Why it does not parse.
        detail: String,
    },
    /// The TCP connection failed (refused, unreachable, ...).
    #[error("connect to {address} failed: {detail}")]
    Dial {
        /// The backend address.
        address: Arc<str>,
        /// The I/O error's kind: `ConnectionRefused` when nothing listens.
        kind: io::ErrorKind,
        /// The I/O error's text.
        detail: String,
    },
    /// The TLS handshake failed or the server would not speak HTTP/2 over
    /// TLS; the text says why and what to check.
    #[error("{detail}")]
    Tls {
        /// The backend address.
        address: Arc<str>,
        /// The TLS layer's one-line explanation.
        detail: String,
    },
    /// The server ended the TLS session right after the handshake, which
    /// is how TLS 1.3 servers refuse a client certificate.
    #[error(
        "{address} ended the TLS session after the handshake: {detail}{}",
        if *.presented_certificate {
            "; check that it trusts the CA of the client certificate"
        } else {
            "; it may demand a client certificate"
        }
    )]
    TlsRefused {
        /// The backend address.
        address: Arc<str>,
        /// What the TLS session said (usually the alert).
        detail: String,
        /// Whether the client presented a certificate.
        presented_certificate: bool,
    },
    /// The server closed the connection right after the TLS handshake.
    #[error("{address} closed the connection right after the TLS handshake")]
    ClosedAfterTls {
        /// The backend address.
        address: Arc<str>,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake with {address} failed: {detail}")]
    Handshake {
        /// The backend address.
        address: Arc<str>,
        /// The HTTP/2 layer's error and its causes.
        detail: String,
    },
    /// The server closed the connection before its first HTTP/2 frame: a
    /// dying process whose socket still accepts.
    #[error("{address} closed the connection before sending HTTP/2 SETTINGS")]
    ClosedBeforeSettings {
        /// The backend address.
        address: Arc<str>,
    },
    /// The connection failed (reset, ...) before the server's first HTTP/2
    /// frame.
    #[error("connection to {address} failed before HTTP/2 SETTINGS: {detail}")]
    FailedBeforeSettings {
        /// The backend address.
        address: Arc<str>,
        /// The connection's error and its causes.
        detail: String,
    },
    /// The server's first frame was not SETTINGS: it does not speak HTTP/2.
    #[error("{address} is not an HTTP/2 server: its first frame has type {frame_type:#04x}, not SETTINGS")]
    NotHttp2 {
        /// The backend address.
        address: Arc<str>,
        /// The type byte of the frame it sent.
        frame_type: u8,
    },
    /// The attempt took longer than the connect timeout (e.g. a hung
    /// process whose kernel still accepts connections).
    #[error("connect to {address} timed out after {timeout:?}")]
    Timeout {
        /// The backend address.
        address: Arc<str>,
        /// The connect timeout in force.
        timeout: Duration,
    },
    /// A Ready connection ended with an error.
    #[error("connection to {address} lost: {detail}")]
    Lost {
        /// The backend address.
        address: Arc<str>,
        /// The connection's error and its causes.
        detail: String,
    },
    /// Outlier detection ejected the backend for failing too many calls;
    /// its connection stays open for its return.
    #[error("ejected by outlier detection ({address})")]
    Ejected {
        /// The backend address.
        address: Arc<str>,
    },
    /// Health checking is on and the backend says it is not SERVING; its
    /// connection stays open, unpicked, until it says SERVING again.
    #[error("{address} is connected but its health is {status}")]
    Unhealthy {
        /// The backend address.
        address: Arc<str>,
        /// The status it reported, e.g. `NOT_SERVING`.
        status: &'static str,
    },
    /// Health checking is on and the backend's health Watch failed (e.g.
    /// NOT_FOUND for a service it does not know).
    #[error("{address} is connected but its health check failed: {detail}")]
    HealthCheckFailed {
        /// The backend address.
        address: Arc<str>,
        /// The status code the Watch ended with.
        code: tonic::Code,
        /// The status's message and causes.
        detail: String,
    },
}

impl ConnectError {
    /// The backend address the error is about.
    pub fn address(&self) -> &str {
        match self {
            ConnectError::InvalidAddress { address, .. }
            | ConnectError::Dial { address, .. }
            | ConnectError::Tls { address, .. }
            | ConnectError::TlsRefused { address, .. }
            | ConnectError::ClosedAfterTls { address }
            | ConnectError::Handshake { address, .. }
            | ConnectError::ClosedBeforeSettings { address }
            | ConnectError::FailedBeforeSettings { address, .. }
            | ConnectError::NotHttp2 { address, .. }
            | ConnectError::Timeout { address, .. }
            | ConnectError::Lost { address, .. }
            | ConnectError::Unhealthy { address, .. }
            | ConnectError::Ejected { address }
            | ConnectError::HealthCheckFailed { address, .. } => address,
        }
    }

    /// Whether nothing listens at the address (the TCP connection was
    /// refused).
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            ConnectError::Dial {
                kind: io::ErrorKind::ConnectionRefused,
                ..
            }
        )
    }
}

/// Why a resolver cannot reach its source; the last known endpoints stay
/// in use meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolverError {
    /// No connection to the registry could be made.
    #[error("registry {registry} unreachable: {detail}")]
    Unreachable {
        /// The registry's `host:port`.
        registry: String,
        /// Why the connection failed.
        detail: String,
    },
    /// The registry refused the watch (a missing token, ...).
    #[error("watch {service} failed: {detail}")]
    WatchFailed {
        /// The watched service.
        service: String,
        /// The status code the registry answered with.
        code: tonic::Code,
        /// The status's message and causes.
        detail: String,
    },
    /// An open watch stream failed.
    #[error("watch stream broke: {detail}")]
    StreamBroke {
        /// The status code the stream ended with.
        code: tonic::Code,
        /// The status's message and causes.
        detail: String,
    },
    /// The registry ended the watch stream.
    #[error("watch stream closed by the registry")]
    StreamClosed,
    /// A DNS lookup failed.
    #[error("cannot resolve {name}: {detail}")]
    Lookup {
        /// The `host:port` looked up.
        name: String,
        /// What the name service said.
        detail: String,
    },
    /// A DNS name resolved to no address.
    #[error("DNS name {name} has no addresses")]
    NoAddresses {
        /// The `host:port` looked up.
        name: String,
    },
    /// A custom resolver's own explanation.
    #[error("{0}")]
    Other(String),
}

impl From<String> for ResolverError {
    fn from(text: String) -> Self {
        ResolverError::Other(text)
    }
}

impl From<&str> for ResolverError {
    fn from(text: &str) -> Self {
        ResolverError::Other(text.to_owned())
    }
}

/// Displays `label` and the value when there is one, nothing otherwise:
/// the optional tails of the messages above.
struct Suffix<'a, T>(&'static str, Option<&'a T>);

impl<T: fmt::Display> fmt::Display for Suffix<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(value) => write!(f, "{}{value}", self.0),
            None => Ok(()),
        }
    }
}

// Kept at their old path.
pub use crate::net::error_chain::{source_chain, status_chain};

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn address() -> Arc<str> {
        Arc::from("127.0.0.1:1")
    }

    #[test]
    fn messages_are_the_one_liners_of_old() {
        let refused = Arc::new(ConnectError::Dial {
            address: address(),
            kind: io::ErrorKind::ConnectionRefused,
            detail: "Connection refused (os error 111)".into(),
        });
        assert!(refused.is_refused());
        assert_eq!(refused.address(), "127.0.0.1:1");
        let cases: Vec<(Error, &str)> = vec![
            (
                Error::NoEndpoints {
                    service: "svc".into(),
                    all_draining: true,
                    resolver: Some(ResolverError::StreamClosed),
                },
                "no endpoints available for service svc (all draining); resolver: watch stream closed by the registry",
            ),
            (
                Error::NoEndpoints {
                    service: "svc".into(),
                    all_draining: false,
                    resolver: None,
                },
                "no endpoints available for service svc",
            ),
            (
                Error::NoReadyEndpoint {
                    service: "svc".into(),
                    last: Some(refused.clone()),
                },
                "no ready endpoint for service svc; last error: connect to 127.0.0.1:1 failed: Connection refused (os error 111)",
            ),
            (
                Error::DeadlineExceeded {
                    service: "svc".into(),
                    connectivity: ConnectivityState::TransientFailure,
                    waiting_on: Some(Arc::new(Error::NoReadyEndpoint {
                        service: "svc".into(),
                        last: None,
                    })),
                },
                "deadline exceeded (TransientFailure: no ready endpoint for service svc; service svc)",
            ),
            (
                Error::DeadlineExceeded {
                    service: "svc".into(),
                    connectivity: ConnectivityState::Connecting,
                    waiting_on: None,
                },
                "deadline exceeded (Connecting; service svc)",
            ),
            (
                Error::Resolver(ResolverError::Unreachable {
                    registry: "127.0.0.1:2".into(),
                    detail: "transport error".into(),
                }),
                "registry 127.0.0.1:2 unreachable: transport error",
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.to_string(), expected);
        }
        let cases: Vec<(ConnectError, &str)> = vec![
            (
                ConnectError::NotHttp2 {
                    address: address(),
                    frame_type: 0x48,
                },
                "127.0.0.1:1 is not an HTTP/2 server: its first frame has type 0x48, not SETTINGS",
            ),
            (
                ConnectError::Timeout {
                    address: address(),
                    timeout: Duration::from_millis(500),
                },
                "connect to 127.0.0.1:1 timed out after 500ms",
            ),
            (
                ConnectError::TlsRefused {
                    address: address(),
                    detail: "received fatal alert: CertificateRequired".into(),
                    presented_certificate: false,
                },
                "127.0.0.1:1 ended the TLS session after the handshake: received fatal alert: CertificateRequired; it may demand a client certificate",
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.to_string(), expected);
        }
    }

    #[test]
    fn a_status_keeps_the_typed_error_and_says_it_once() {
        let error = Error::NoReadyEndpoint {
            service: "svc".into(),
            last: Some(Arc::new(ConnectError::ClosedBeforeSettings {
                address: address(),
            })),
        };
        let status = tonic::Status::from(error.clone());
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), error.to_string());
        assert_eq!(status_chain(&status), error.to_string());
        let cause = status.source().and_then(|e| e.downcast_ref::<Error>());
        assert_eq!(cause, Some(&error));
        let deadline = Error::DeadlineExceeded {
            service: "svc".into(),
            connectivity: ConnectivityState::Connecting,
            waiting_on: None,
        };
        assert_eq!(
            tonic::Status::from(deadline).code(),
            tonic::Code::DeadlineExceeded
        );
    }
}
