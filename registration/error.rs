//! Why a registered server could not start. Each message is one line that
//! says what to change, because binaries print it as is.

use std::net::SocketAddr;

use crate::registry::RegistryError;

/// A server that could not start. Nothing was registered when one of these
/// is returned.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// A setting breaks the registry's rules; it would be refused at
    /// Register time, so it is refused before anything starts.
    #[error("{setting}: {error}")]
    Invalid {
        /// Which setting, e.g. `advertise address`.
        setting: &'static str,
        /// The rule it breaks.
        error: RegistryError,
    },
    /// A registry is set but no service name to register under, and no
    /// gRPC service was added to take the name from.
    #[error("no service name to register under: set one, or add a gRPC service to take its name")]
    NoServiceName,
    /// The server listens on 0.0.0.0 or [::] and was given no address to
    /// advertise: clients cannot connect to a wildcard.
    #[error("listening on {0} (a wildcard address) needs an address to advertise, e.g. --advertise <reachable-host>:{port}", port = .0.port())]
    WildcardWithoutAdvertise(SocketAddr),
    /// Another socket holds the port.
    #[error("cannot listen on {addr}: port {port} is already in use; stop whatever holds it or pick another port", port = .addr.port())]
    PortInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Binding failed for another reason (permissions, no such interface).
    #[error("cannot listen on {addr} (port {port}): {error}", port = .addr.port())]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The listener handed in has no local address (it is not bound).
    #[error("cannot read the listener's address: {0}")]
    LocalAddr(std::io::Error),
    /// tonic refused the TLS settings.
    #[error("cannot serve TLS: {0}; check the certificate and key files")]
    Tls(String),
}
