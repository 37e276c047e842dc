//! The registry: a small gRPC control plane holding the live endpoint set of
//! every service.
//!
//! Backends [`Register`](crate::proto::registry::registry_server::Registry)
//! an address under a lease and keep it alive over a heartbeat stream;
//! clients watch a service and receive the full set first, then every change.
//!
//! - [`auth`]: bearer tokens for writers and readers;
//! - [`validate`]: what a well-formed request looks like (shared with the CLIs);
//! - [`limits`]: caps on what one client may hold open or do per second;
//! - [`message_size`]: the cap on one request message's size;
//! - [`lease`]: lease ids and the deadline-ordered lease table;
//! - [`store`]: the [`Store`] seam: leases, endpoint sets, versions, epoch
//!   and change streams, whatever holds them;
//! - [`memory`]: the in-memory store, the default;
//! - [`watch`]: one Watch call's messages on the wire;
//! - [`service`]: the gRPC service over any store;
//! - [`xds`]: the same state served to stock gRPC clients and Envoy over
//!   xDS (ADS);
//! - [`server`]: the process around it (health, reflection, shutdown).

pub mod auth;
pub mod error;
pub mod lease;
pub mod limits;
pub mod memory;
pub mod message_size;
pub mod server;
pub mod service;
pub mod store;
pub mod validate;
pub mod watch;
pub mod xds;

pub use error::RegistryError;
pub use memory::MemoryStore;
pub use server::{serve, RegistryConfig};
pub use service::Registry;
pub use store::Store;

/// The service name used when none is given.
pub const DEFAULT_SERVICE: &str = "lb.example.grpc.io";

/// The registry's default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50050";
