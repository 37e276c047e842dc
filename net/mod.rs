//! The network plumbing every side of switchboard shares: TLS settings,
//! the `:authority` repair for grpcio's multi-address targets, and the one
//! tonic server setup that the registry and every registered service use.

#[cfg(any(feature = "registry", feature = "registration"))]
pub mod authority_repair;
pub mod backoff;
pub mod error_chain;
#[cfg(any(feature = "registry", feature = "registration"))]
pub mod server;
pub mod tls;
