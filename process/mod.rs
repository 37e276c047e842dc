//! A process's edges.
//!
//! The edges of a service binary (with the `cli` feature): one-line errors
//! for bad flags (`parse_args`, `parse_duration`), logging
//! (`init_logging`), the shutdown signal (`shutdown_signal`), the
//! `--metrics-listen` socket (`bind_metrics`) and one-line fatal errors
//! (`exit_with`). The `switchboard` binary and the greeter example use
//! them; so can any service built on the registration module.

mod edges;

pub use edges::*;
