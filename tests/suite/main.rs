//! The integration suite: one test binary, one module per area, so the
//! whole of tonic, rustls and tokio is compiled and linked once rather than
//! once per file. Every test drives real processes (the `switchboard`
//! binary) or real servers on 127.0.0.1; `tests/common/` is the shared
//! harness. One area: `cargo test --release --test suite client::`.
//! What each module proves is in docs/testing.md.

// These tests drive the binaries and servers: the default build only.
#![cfg(feature = "cli")]

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod cli;
mod client;
mod echo;
mod faults;
mod flood;
mod gray;
mod greeter;
mod health;
mod interop;
mod limits;
mod metrics;
mod ops;
mod policy;
mod properties;
mod registry;
mod resume;
mod retry;
mod ring_hash;
mod stall;
mod tls;
mod xds;
mod zones;
