//! switchboard: live service discovery and client-side load balancing for gRPC.
//!
//! - [`discovery`]: endpoints and updates, the vocabulary all of them speak;
//! - [`registry`]: the control plane backends register with and clients watch.
//! - [`registration`]: keeping any tonic server registered, and draining
//!   it on shutdown.
//! - [`echo`]: the `grpc.examples.echo.Echo` backend, one user of
//!   [`registration`].
//! - [`client`]: the resolver and balancers behind a tower/tonic channel.
//! - [`service_config`]: the gRPC service config (balancing, timeouts,
//!   retries, hedging), typed and validated.
//! - [`metrics`]: Prometheus metrics and the small server exposing them.
//! - [`net`]: what every side shares on the wire: [`tls`] (TLS and mutual
//!   TLS settings), [`authority_repair`] (lets clients with a multi-address
//!   target, grpcio's, past h2's `:authority` check) and the one tonic
//!   server setup.
//! - [`process`]: a service binary's edges (flags, logging, signals) and
//!   the child processes the demo, the etcd store's throwaway etcd, the
//!   tests and the benchmarks start.

pub mod client;
pub mod discovery;
#[cfg(feature = "echo")]
pub mod echo;
pub mod metrics;
pub mod net;
// Built for the binaries (`cli`) and for the etcd store's throwaway etcd
// (`etcd`, which implies `registry` but not `cli`); a client-only build
// starts no process.
#[cfg(any(feature = "cli", feature = "etcd"))]
pub mod process;
pub mod proto;
#[cfg(feature = "registration")]
pub mod registration;
pub mod registry;
pub mod service_config;

/// The `:authority` repair; lives in [`net`].
#[cfg(any(feature = "registry", feature = "registration"))]
pub use net::authority_repair;
/// TLS settings; lives in [`net`].
pub use net::tls;
