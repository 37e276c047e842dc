//! The echo backend: the grpc-go examples `grpc.examples.echo.Echo` service,
//! as a well-run production backend. It is in the registry only while it can
//! serve, comes back by itself after a registry outage, and leaves without
//! failing an RPC when asked to stop.
//!
//! - [`service`]: the four Echo RPCs; each reply is
//!   `"<message> (from <addr>)"`;
//! - [`config`]: what one server needs to know;
//! - [`metrics`]: RPCs by method and code, and the registration state;
//! - [`server`]: one server from a bound listener to a graceful drain, with
//!   reflection; staying registered and draining are
//!   [`crate::registration`]'s work, as for any other service.
//!
//! To run a backend in-process (a test, a demo):
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard::echo::EchoError> {
//! use switchboard::echo::{EchoServerHandle, ServerConfig};
//! let config = ServerConfig {
//!     registry: Some("127.0.0.1:50050".into()),
//!     ..ServerConfig::default()
//! };
//! let server = EchoServerHandle::bind_and_start("127.0.0.1:0".parse().unwrap(), config).await?;
//! let mut lease = server.lease_state();
//! let _ = lease.wait_for(|state| state.is_registered()).await;
//! let report = server.shutdown().await;
//! assert!(report.deregistered);
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod metrics;
pub mod server;
pub mod service;

pub use crate::registration::{bind, registry_backoff, LeaseState, ShutdownReport};
pub use config::{Faults, ServerConfig};
pub use metrics::EchoMetrics;
pub use server::EchoServerHandle;
pub use service::EchoService;

/// Why an echo server could not start: the reasons any registered server
/// has, see [`crate::registration::RegistrationError`].
pub type EchoError = crate::registration::RegistrationError;

/// The ports one `echo` process serves when given none, as in the grpc-go
/// load-balancing example.
pub const DEFAULT_PORTS: [u16; 2] = [50051, 50052];

/// The registry `echo` registers with when given none.
pub const DEFAULT_REGISTRY: &str = crate::registry::DEFAULT_LISTEN;
