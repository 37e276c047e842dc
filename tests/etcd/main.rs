//! The etcd store's suite, built only with `--features etcd` (which needs
//! `protoc`): `cargo test --release --features etcd --test etcd`. Each test
//! starts its own throwaway etcd (from PATH or `$SWITCHBOARD_ETCD`) and
//! skips, saying so, when there is none.

// These tests drive the binaries and a real etcd: the etcd build only.
#![cfg(all(feature = "cli", feature = "etcd"))]

#[path = "../common/mod.rs"]
mod common;

/// Registry replicas on one etcd, as processes, under client load.
mod cluster;
/// Two `EtcdStore`s in process on one etcd.
mod store;
