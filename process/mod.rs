//! A process's edges, and the processes it starts.
//!
//! - The edges of a service binary (with the `cli` feature): one-line
//!   errors for bad flags (`parse_args`, `parse_duration`), logging
//!   (`init_logging`), the shutdown signal (`shutdown_signal`), the
//!   `--metrics-listen` socket (`bind_metrics`) and one-line fatal errors
//!   (`exit_with`). The `switchboard` binary and the greeter example use
//!   them; so can any service built on the registration module.
//! - [`Child`]: a child process whose output is read as lines (or logged to
//!   a file) and which is killed when dropped, whatever way the parent
//!   leaves; and [`free_port`], for a port a child must be told before it
//!   starts. `switchboard demo`, the throwaway etcd of the etcd store, the
//!   tests and the benchmarks start every process through it, so each of
//!   them stops its children the same way.

mod child;
#[cfg(feature = "cli")]
mod edges;

pub use child::{free_port, Child, Lines, Stream};
#[cfg(feature = "cli")]
pub use edges::*;
