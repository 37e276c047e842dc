//! The registry: a small gRPC control plane holding the live endpoint set of
//! every service.
//!
//! Backends [`Register`](crate::proto::registry::registry_server::Registry)
//! an address under a lease and keep it alive over a heartbeat stream;
//! clients watch a service and receive the full set first, then every change.
//!
//! Without the `registry` feature only what clients share with it is
//! built: [`auth`]'s tokens, [`validate`], [`RegistryError`] and [`Cap`].
//!
//! - [`auth`]: bearer tokens for writers and readers;
//! - [`validate`]: what a well-formed request looks like (shared with the CLIs);
//! - [`cap`]: every cap by name, and the metric label of its refusals;
//! - [`limits`]: caps on what one client may hold open or do per second;
//! - [`message_size`]: the cap on one request message's size;
//! - [`lease`]: lease ids and the deadline-ordered lease table;
//! - [`store`]: the [`Store`] seam: leases, endpoint sets, versions, epoch
//!   and change streams, whatever holds them;
//! - `configs`: every service's config, with a channel per service to
//!   follow it;
//! - [`memory`]: the in-memory store, the default;
//! - `etcd` (feature `etcd`): replicas sharing one etcd cluster;
//! - [`watch`]: one Watch call's messages on the wire;
//! - [`fleet`]: every open Watch and ADS stream: who follows, what it was
//!   sent and accepted;
//! - [`service`]: the gRPC service over any store;
//! - [`xds`]: the same state served to stock gRPC clients and Envoy over
//!   xDS (ADS);
//! - [`server`]: the process around it (health, reflection, shutdown);
//! - [`metrics`] and [`rpc_metrics`]: Prometheus metrics, and the tower
//!   layer counting RPCs;
//! - [`status`]: the status page, `/metrics` and `/healthz`.

pub mod auth;
pub mod cap;
#[cfg(feature = "registry")]
pub mod config_dir;
#[cfg(feature = "registry")]
pub(crate) mod configs;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "registry")]
pub(crate) mod fanout;
#[cfg(feature = "registry")]
pub mod fleet;
#[cfg(feature = "registry")]
pub mod lease;
#[cfg(feature = "registry")]
pub mod limits;
#[cfg(feature = "registry")]
pub mod memory;
#[cfg(feature = "registry")]
pub mod message_size;
#[cfg(feature = "registry")]
pub mod metrics;
#[cfg(feature = "registry")]
pub mod rpc_metrics;
#[cfg(feature = "registry")]
pub mod server;
#[cfg(feature = "registry")]
pub mod service;
#[cfg(feature = "registry")]
pub mod status;
#[cfg(feature = "registry")]
pub mod store;
pub mod validate;
#[cfg(feature = "registry")]
pub mod watch;
#[cfg(feature = "registry")]
pub mod xds;

pub use cap::Cap;
pub use error::RegistryError;
#[cfg(feature = "registry")]
pub use memory::MemoryStore;
#[cfg(feature = "registry")]
pub use metrics::RegistryMetrics;
#[cfg(feature = "registry")]
pub use server::{serve, serve_registry, RegistryConfig};
#[cfg(feature = "registry")]
pub use service::Registry;
#[cfg(feature = "registry")]
pub use store::Store;

/// The service name used when none is given.
pub const DEFAULT_SERVICE: &str = "lb.example.grpc.io";

/// The registry's default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50050";
