//! Registration for any tonic service: serve it, keep it in the registry for
//! as long as it can serve, and drain it without failing an RPC when it
//! stops.
//!
//! - [`Server`] and its [`Builder`]: a tonic server with `grpc.health.v1`
//!   added, registered under a service name, drained by
//!   [`Server::shutdown`];
//! - [`lease_keeper`]: register, heartbeat every TTL/3, register again after
//!   an outage or a lost lease, and Drain + Deregister on the way out;
//! - [`kill_switch`]: cutting the connections a drain could not finish;
//! - [`RegistrationError`]: why a server could not start, in one line.
//!
//! # The drain order
//!
//! [`Server::shutdown`] runs these steps in order, each for a reason:
//!
//! 1. health turns NOT_SERVING (the whole server and every added service),
//!    for clients that health-check;
//! 2. the endpoint turns DRAINING in the registry, then is deregistered:
//!    watchers stop picking it while it still serves;
//! 3. the server keeps accepting for the drain grace, so clients that have
//!    not yet seen the change do not fail;
//! 4. tonic stops accepting and sends GOAWAY; in-flight RPCs, long streams
//!    included, run to completion;
//! 5. past the shutdown timeout the remaining connections are cut.
//!
//! Dropping a [`Server`] instead is a crash: connections are cut at once and
//! the registry ends the lease when its keepalive stream breaks.
//!
//! # Example
//!
//! ```no_run
//! # use tonic::service::Routes;
//! # async fn demo(routes: Routes) -> Result<(), switchboard::registration::RegistrationError> {
//! use switchboard::registration::{self, Server};
//! let listener = registration::bind("127.0.0.1:50061".parse().unwrap()).await?;
//! let server = Server::builder()
//!     .registry("127.0.0.1:50050")
//!     .service_name("helloworld.Greeter")
//!     .routes(routes) // or .add_service(GreeterServer::new(..)) for each service
//!     .serve(listener)
//!     .await?;
//! let mut lease = server.lease_state();
//! let _ = lease.wait_for(|state| state.is_registered()).await;
//! let report = server.shutdown().await;
//! assert!(report.deregistered);
//! # Ok(())
//! # }
//! ```

pub mod error;
pub mod kill_switch;
pub mod lease_keeper;
pub mod server;

use std::time::Duration;

pub use error::RegistrationError;
pub use lease_keeper::{LeaseKeeper, LeaseState, Registration, CALL_TIMEOUT};
pub use server::{advertised, bind, Builder, Server, ShutdownReport};

use crate::net::backoff::BackoffConfig;
use crate::registry::validate;

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
