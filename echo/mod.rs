//! The echo backend: the grpc-go examples `grpc.examples.echo.Echo` service,
//! as a well-run production backend. It is in the registry only while it can
//! serve, comes back by itself after a registry outage, and leaves without
//! failing an RPC when asked to stop.
//!
//! - [`service`]: the four Echo RPCs; each reply is
//!   `"<message> (from <addr>)"`;
//! - [`config`]: what one server needs to know;
//! - [`lease_keeper`]: register, heartbeat, register again after an outage,
//!   and Drain + Deregister on the way out;
//! - [`kill_switch`]: cutting the connections a drain could not finish;
//! - [`server`]: one server from a bound listener to a graceful drain.
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
pub mod error;
pub mod kill_switch;
pub mod lease_keeper;
pub mod server;
pub mod service;

pub use config::{registry_backoff, Faults, ServerConfig};
pub use error::EchoError;
pub use lease_keeper::LeaseState;
pub use server::{bind, EchoServerHandle, ShutdownReport};
pub use service::EchoService;

/// The ports one `echo` process serves when given none, as in the grpc-go
/// load-balancing example.
pub const DEFAULT_PORTS: [u16; 2] = [50051, 50052];

/// The registry `echo` registers with when given none.
pub const DEFAULT_REGISTRY: &str = crate::registry::DEFAULT_LISTEN;
