//! Property tests against one live registry: arbitrary Register, KeepAlive,
//! Drain, Deregister, Watch, Resolve and ListServices requests (random
//! strings, unicode, control characters, empty and huge fields, random and
//! mangled lease ids) get OK or exactly the documented status for their
//! class of input, never a crash; and watchers opened before the fuzzing end
//! up holding exactly what Resolve says, while a watcher of a service nobody
//! touched sees nothing at all.
//!
//! The expected outcome of each request comes from how its input was
//! generated (a valid service name, an invalid one of some kind, ...), not
//! from the registry's own validation code. Arbitrary strings, whose class is
//! not known up front, are judged by the documented rules instead; the rules
//! are also checked against every generated service name, so a generator bug
//! cannot hide a registry bug.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

use crate::common::*;
use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use prost::Message;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::watch_response::Event;
use switchboard::proto::registry::{
    DeregisterRequest, DrainRequest, Endpoint, EndpointState, KeepAliveRequest,
    ListServicesRequest, RegisterRequest, ResolveRequest, ResolveResponse, WatchRequest,
};
use switchboard::registry::RegistryConfig;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The registry's cap on one request message, set explicitly so the oracle
/// knows it.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Services that valid registrations mostly go to, each watched throughout.
const WATCHED: [&str; 2] = ["fuzz-a.hardening.test", "fuzz-b.hardening.test"];
/// A service no generated request names; its watcher must see no change.
const UNTOUCHED: &str = "untouched.hardening.test";
/// How long any one call may take before the registry counts as hung.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// How many generated cases (each 1-5 requests) to run.
const CASES: u32 = 300;

// ---------------------------------------------------------------------------
// Panics anywhere in the process (the registry runs in it) are counted.
// ---------------------------------------------------------------------------

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

// ---------------------------------------------------------------------------
// The documented rules, written from the README, independently of
// registry/validate.rs.
// ---------------------------------------------------------------------------

/// A service name: dot-separated labels of ASCII letters, digits, `-` and
/// `_`, each 1-63 bytes and not starting or ending with `-`, 253 bytes in all.
fn service_rule(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A lease id: 32 hex digits. Returns its value.
fn lease_rule(id: &str) -> Option<u128> {
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(id, 16).expect("32 hex digits"))
}

mod actions;
mod generators;
mod model;
mod wire;

use actions::*;
use generators::*;
use model::*;
use wire::*;
