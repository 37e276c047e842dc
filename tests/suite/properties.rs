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

// ---------------------------------------------------------------------------
// Generators: each input carries whether it was generated valid.
// ---------------------------------------------------------------------------

/// A generated field and whether the documented rules accept it.
#[derive(Debug, Clone)]
struct Field<T> {
    value: T,
    valid: bool,
}

fn valid<T>(value: T) -> Field<T> {
    Field { value, valid: true }
}

fn invalid<T>(value: T) -> Field<T> {
    Field {
        value,
        valid: false,
    }
}

/// `len` bytes of 63-byte labels (`xxx...x.xxx...`), never ending in a dot.
fn long_name(len: usize) -> String {
    let mut name = vec!["x".repeat(63); len / 64 + 1].join(".");
    name.truncate(len);
    if name.ends_with('.') {
        name.pop();
        name.push('y');
    }
    name
}

/// Inserts `c` into the ASCII string `s` at a position picked by `at`.
fn insert_at(s: &str, at: Index, c: &str) -> String {
    let i = at.index(s.len() + 1);
    format!("{}{c}{}", &s[..i], &s[i..])
}

/// Characters no service name or host name may contain: punctuation,
/// whitespace, control characters, non-ASCII letters, emoji, zero-width.
fn foreign_char() -> impl Strategy<Value = String> {
    "[ /:@*%+!~,;=?#&$\\[\\]\\\\\"'\\x00-\\x1f\\x7f\u{e9}\u{c5}\u{65e5}\u{1f980}\u{200b}\u{130}\u{ff10}]"
}

fn service_label() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z0-9_]([A-Za-z0-9_-]{0,10}[A-Za-z0-9_])?",
        1 => "[a-z0-9]{63}",
        1 => Just("_grpc".to_owned()),
    ]
}

fn valid_service() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::collection::vec(service_label(), 1..5)
            .prop_map(|labels| labels.join("."))
            .prop_filter("at most 253 bytes", |s| s.len() <= 253),
        1 => Just(long_name(253)),
        1 => Just("_grpc._tcp.x".to_owned()),
        1 => "[0-9]{1,5}",
        1 => "[a-z]-{1,3}[a-z]",
    ]
    .prop_filter("not the untouched service", |s| s != UNTOUCHED)
}

fn invalid_service() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (254usize..400).prop_map(long_name),
        // Huge: some pass the message cap, some do not.
        (60_000usize..100_000).prop_map(long_name),
        ("[a-z]{1,8}", "[a-z]{64,80}").prop_map(|(s, label)| format!("{s}.{label}")),
        (valid_service(), foreign_char(), any::<Index>())
            .prop_map(|(s, c, at)| insert_at(&s, at, &c)),
        (valid_service(), 0..4u8).prop_map(|(s, how)| match how {
            0 => format!(".{s}"),
            1 => format!("{s}."),
            2 => format!("{s}..x"),
            _ => ".".to_owned(),
        }),
        (valid_service(), any::<bool>()).prop_map(|(s, front)| if front {
            format!("-{s}")
        } else {
            format!("{s}-")
        }),
    ]
}

/// Any string at all, judged by the documented rule.
fn arbitrary_service() -> impl Strategy<Value = Field<String>> {
    prop_oneof![
        "\\PC{0,40}",
        "[\\x00-\\x7f]{0,20}",
        any::<String>(),
        "[a-z.\\-_]{0,12}",
    ]
    .prop_filter("not the untouched service", |s| s != UNTOUCHED)
    .prop_map(|s| Field {
        valid: service_rule(&s),
        value: s,
    })
}

fn service() -> impl Strategy<Value = Field<String>> {
    prop_oneof![
        6 => select(WATCHED.to_vec()).prop_map(|s| valid(s.to_owned())),
        2 => valid_service().prop_map(valid),
        3 => invalid_service().prop_map(invalid),
        2 => arbitrary_service(),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![Just(1u16), Just(65535u16), 1u16..=65535]
}

/// A host name that does not look like an IPv4 address.
fn host_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", 1..4)
        .prop_map(|labels| labels.join("."))
        .prop_filter("not numeric", |h| {
            !h.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
        host_name(),
    ]
}

fn valid_address() -> impl Strategy<Value = String> {
    prop_oneof![
        // A small pool, so registrations take each other's addresses over.
        3 => (1u8..=6, 8000u16..8003).prop_map(|(h, p)| format!("10.0.0.{h}:{p}")),
        2 => (any::<[u8; 4]>(), port()).prop_map(|(o, p)| format!("{}:{p}", Ipv4Addr::from(o))),
        2 => (any::<u128>(), port()).prop_map(|(a, p)| format!("[{}]:{p}", Ipv6Addr::from(a))),
        2 => (host_name(), port()).prop_map(|(h, p)| format!("{h}:{p}")),
        1 => select(vec!["localhost:1", "[::1]:65535", "[::ffff:1.2.3.4]:80", "[::]:443"])
            .prop_map(str::to_owned),
    ]
}

fn bad_port() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "0",
            "00",
            "+80",
            "080",
            "65536",
            "70000",
            "-1",
            " 80",
            "80 ",
            "",
            "8o",
            "0x50",
            "1e3",
            "99999999999999999999999",
            "\u{661}\u{662}",
            "\u{ff18}\u{ff10}",
        ])
        .prop_map(str::to_owned),
        (65_536u64..=u64::MAX).prop_map(|p| p.to_string()),
    ]
}

fn invalid_address() -> impl Strategy<Value = String> {
    prop_oneof![
        (host(), bad_port()).prop_map(|(h, p)| format!("{h}:{p}")),
        // No port at all.
        host(),
        any::<u128>().prop_map(|a| format!("[{}]", Ipv6Addr::from(a))),
        (any::<u128>(), port()).prop_map(|(a, p)| format!("[{}]{p}", Ipv6Addr::from(a))),
        // No host.
        port().prop_map(|p| format!(":{p}")),
        // IPv6 without brackets.
        (any::<u128>(), port()).prop_map(|(a, p)| format!("{}:{p}", Ipv6Addr::from(a))),
        select(vec![
            "",
            "[zz::1]:80",
            "[1.2.3.4]:80",
            "[fe80::1%eth0]:80",
            "[]:80",
            "256.1.1.1:80",
            "1.2.3:80",
            "1.2.3.4.5:80",
            "1..2.3:80",
            "01.2.3.4:80",
            "a_b:80",
            "-a:80",
            "a-:80",
            "a..b:80",
            "[::1]:",
            "host:80:",
        ])
        .prop_map(str::to_owned),
        (host_name(), foreign_char(), any::<Index>(), port())
            .prop_map(|(h, c, at, p)| format!("{}:{p}", insert_at(&h, at, &c))),
        (262usize..400).prop_map(|n| format!("{}:80", long_name(n))),
        (60_000usize..100_000).prop_map(|n| format!("{}:80", long_name(n))),
    ]
}

/// Arbitrary text made invalid as an address by a character no address can
/// hold.
fn foreign_address() -> impl Strategy<Value = String> {
    ("\\PC{0,30}", foreign_char(), any::<Index>()).prop_map(|(s, c, at)| {
        let boundaries: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
        let i = boundaries[at.index(boundaries.len())];
        format!("{}{c}{}", &s[..i], &s[i..])
    })
}

fn address() -> impl Strategy<Value = Field<String>> {
    prop_oneof![
        7 => valid_address().prop_map(valid),
        3 => invalid_address().prop_map(invalid),
        1 => foreign_address().prop_map(invalid),
    ]
}

type Metadata = HashMap<String, String>;

fn valid_metadata() -> impl Strategy<Value = Metadata> {
    prop_oneof![
        // Keys and values of up to 8 characters (32 bytes): 8 entries stay
        // far below 4 KiB.
        4 => prop::collection::hash_map("\\PC{1,8}", "\\PC{0,8}", 0..=8),
        1 => Just(Metadata::new()),
        1 => prop::collection::hash_map("k[0-9]{1,6}", "[\\x00-\\x1f]{0,4}", 64..=64),
        1 => Just(Metadata::from([("k".repeat(128), "v".to_owned())])),
        1 => Just(Metadata::from([("k".to_owned(), "x".repeat(4095))])),
        // 126 bytes in 42 characters.
        1 => "\\PC{0,8}".prop_map(|v| Metadata::from([("\u{65e5}".repeat(42), v)])),
    ]
}

fn invalid_metadata() -> impl Strategy<Value = Metadata> {
    prop_oneof![
        prop::collection::hash_map("k[0-9]{1,6}", "[a-z]{0,4}", 65..=100),
        prop::collection::hash_map("[a-z]{1,8}", "[a-z]{0,4}", 0..4).prop_map(|mut m| {
            m.insert(String::new(), "v".into());
            m
        }),
        "[a-z]{129,300}".prop_map(|k| Metadata::from([(k, String::new())])),
        // 129 bytes in 43 characters.
        Just(Metadata::from([("\u{65e5}".repeat(43), String::new())])),
        (4097usize..8000).prop_map(|n| Metadata::from([("k".to_owned(), "x".repeat(n - 1))])),
        prop::collection::hash_map("k[0-9]{1,6}", "[a-z]{300}", 15..=20),
        (60_000usize..100_000).prop_map(|n| Metadata::from([("blob".to_owned(), "x".repeat(n))])),
    ]
}

fn metadata() -> impl Strategy<Value = Field<Metadata>> {
    prop_oneof![
        8 => valid_metadata().prop_map(valid),
        2 => invalid_metadata().prop_map(invalid),
    ]
}

fn ttl() -> impl Strategy<Value = Field<u64>> {
    prop_oneof![
        2 => Just(0u64).prop_map(valid),
        1 => Just(1000u64).prop_map(valid),
        1 => Just(300_000u64).prop_map(valid),
        4 => (1000u64..=300_000).prop_map(valid),
        1 => (1u64..1000).prop_map(invalid),
        1 => prop_oneof![Just(300_001u64), 300_001u64..=u64::MAX, Just(u64::MAX)].prop_map(invalid),
    ]
}

#[derive(Debug, Clone)]
struct RegisterInput {
    service: Field<String>,
    address: Field<String>,
    metadata: Field<Metadata>,
    ttl_ms: Field<u64>,
}

fn register_input() -> impl Strategy<Value = RegisterInput> {
    (service(), address(), metadata(), ttl()).prop_map(|(service, address, metadata, ttl_ms)| {
        RegisterInput {
            service,
            address,
            metadata,
            ttl_ms,
        }
    })
}

/// A lease id to send: one the registry granted (maybe mangled), one granted
/// by another registry instance, or arbitrary text.
#[derive(Debug, Clone)]
enum LeaseInput {
    /// A granted lease, as returned or in upper case.
    Granted {
        pick: Index,
        upper: bool,
    },
    /// A granted lease with one character replaced by `to`.
    Changed {
        pick: Index,
        at: Index,
        to: char,
    },
    /// A granted lease with something around it.
    Padded {
        pick: Index,
        before: String,
        after: String,
    },
    /// The lease of another registry instance.
    Foreign,
    Text(String),
}

fn lease_input() -> impl Strategy<Value = LeaseInput> {
    let text = prop_oneof![
        "[0-9a-fA-F]{0,64}",
        "[0-9a-f]{32}",
        "[0-9A-F]{32}",
        "[+\\-][0-9a-f]{31}",
        "0x[0-9a-f]{30}",
        "[0-9a-f]{30}\u{e9}",
        "[g-z]{32}",
        "\\PC{0,40}",
        Just(String::new()),
        (60_000usize..100_000).prop_map(|n| "0".repeat(n)),
    ];
    prop_oneof![
        4 => (any::<Index>(), any::<bool>()).prop_map(|(pick, upper)| LeaseInput::Granted { pick, upper }),
        2 => (any::<Index>(), any::<Index>(), select("0123456789abcdefABCDEFgz+ \u{e9}".chars().collect::<Vec<_>>()))
            .prop_map(|(pick, at, to)| LeaseInput::Changed { pick, at, to }),
        1 => (any::<Index>(), select(vec!["", " ", "0"]), select(vec!["", "\n", " ", "0"]))
            .prop_filter("something added", |(_, b, a)| !(b.is_empty() && a.is_empty()))
            .prop_map(|(pick, b, a)| LeaseInput::Padded { pick, before: b.into(), after: a.into() }),
        1 => Just(LeaseInput::Foreign),
        4 => text.prop_map(LeaseInput::Text),
    ]
}

#[derive(Debug, Clone)]
enum Action {
    Register(RegisterInput),
    KeepAlive(Vec<LeaseInput>),
    Drain(LeaseInput),
    Deregister(LeaseInput),
    Watch(Field<String>),
    Resolve(Field<String>),
    ListServices,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => register_input().prop_map(Action::Register),
        2 => prop::collection::vec(lease_input(), 1..4).prop_map(Action::KeepAlive),
        2 => lease_input().prop_map(Action::Drain),
        2 => lease_input().prop_map(Action::Deregister),
        1 => service().prop_map(Action::Watch),
        2 => service().prop_map(Action::Resolve),
        1 => Just(Action::ListServices),
    ]
}

// ---------------------------------------------------------------------------
// The model: what the test knows about every lease it was granted.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Nothing ended it; it lives until its TTL runs out.
    Live,
    /// It heartbeated on a KeepAlive stream that has since closed: the
    /// registry ends it as the stream goes away.
    Doomed,
    /// Deregistered or taken over: gone before that call answered.
    Revoked,
    /// The registry said NOT_FOUND (it expired); its endpoint may take a
    /// moment more to leave.
    Gone,
}

#[derive(Debug, Clone)]
struct Lease {
    id: u128,
    metadata: Metadata,
    ttl: Duration,
    /// Before Register was sent: the lease ends no earlier than `sent + ttl`
    /// unless something ends it.
    sent: Instant,
    /// After Register answered: unrefreshed, it ends by `answered + ttl`.
    answered: Instant,
    fate: Fate,
    draining: bool,
}

impl Lease {
    /// Whether the registry must still hold it at `at`.
    fn surely_live(&self, at: Instant) -> bool {
        self.fate == Fate::Live && self.sent + self.ttl > at
    }

    /// Whether the registry must have let it go by `at` (allowing for
    /// asynchronous removal by polling).
    fn surely_ended(&self, at: Instant) -> bool {
        match self.fate {
            Fate::Live => self.answered + self.ttl < at,
            Fate::Doomed | Fate::Revoked | Fate::Gone => true,
        }
    }

    fn state(&self) -> i32 {
        if self.draining {
            EndpointState::Draining as i32
        } else {
            EndpointState::Serving as i32
        }
    }
}

#[derive(Default)]
struct Model {
    leases: Vec<Lease>,
    /// Index into `leases` of the lease holding each (service, address).
    holders: HashMap<(String, String), usize>,
    /// The status codes seen, for the summary.
    outcomes: BTreeMap<String, usize>,
}

impl Model {
    fn find(&self, id: u128) -> Option<usize> {
        self.leases.iter().position(|l| l.id == id)
    }

    fn count(&mut self, what: String) {
        *self.outcomes.entry(what).or_default() += 1;
    }
}

/// What the registry must answer.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Ok,
    /// INVALID_ARGUMENT naming this field.
    Invalid(&'static str),
    /// NOT_FOUND naming this lease (lower-case hex).
    NotFound(String),
    /// The lease may or may not have ended (its TTL is running out, or its
    /// KeepAlive stream just closed).
    OkOrNotFound(String),
    /// RESOURCE_EXHAUSTED naming the message size cap.
    TooLarge,
}

impl Expect {
    fn allows_ok(&self) -> bool {
        matches!(self, Expect::Ok | Expect::OkOrNotFound(_))
    }
}

/// A string for failure messages: long ones are cut.
fn short(s: &str) -> String {
    if s.len() <= 80 {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(40).collect();
        format!("{cut:?}... ({} bytes)", s.len())
    }
}

fn check_refusal(what: &str, status: &Status, expect: &Expect) -> Result<(), TestCaseError> {
    let message = status.message();
    let fine = match expect {
        Expect::Invalid(field) => {
            status.code() == Code::InvalidArgument
                && message.starts_with(&format!("invalid {field}: "))
        }
        Expect::NotFound(id) | Expect::OkOrNotFound(id) => {
            status.code() == Code::NotFound && message.contains(&format!("lease {id} not found"))
        }
        Expect::TooLarge => {
            status.code() == Code::ResourceExhausted
                && message.contains(&format!("message size limit of {MAX_MESSAGE_BYTES} bytes"))
        }
        Expect::Ok => false,
    };
    if fine {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what}: expected {expect:?}, got {:?} {:?}",
            status.code(),
            short(message)
        )))
    }
}

async fn within<T>(
    what: &str,
    call: impl std::future::Future<Output = T>,
) -> Result<T, TestCaseError> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .map_err(|_| TestCaseError::fail(format!("{what}: no answer within {CALL_DEADLINE:?}")))
}

// ---------------------------------------------------------------------------
// Watchers: a task per watch stream building the view a client would.
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Running one action against the registry and judging the answer.
// ---------------------------------------------------------------------------

struct Harness {
    client: RegistryClient<Channel>,
    epoch: u64,
    /// A lease granted by another registry instance.
    foreign_lease: String,
    model: RefCell<Model>,
}

/// A lease id to send, and what the registry must answer for it.
struct LeaseCall {
    id: String,
    /// Index into the model of the lease it names, if any.
    lease: Option<usize>,
}

impl Harness {
    fn resolve_lease(&self, input: &LeaseInput) -> LeaseCall {
        let model = self.model.borrow();
        let granted = |pick: &Index| (!model.leases.is_empty()).then(|| pick.get(&model.leases).id);
        let id = match input {
            LeaseInput::Granted { pick, upper } => match granted(pick) {
                Some(id) if *upper => format!("{id:032X}"),
                Some(id) => format!("{id:032x}"),
                None => format!("{:032x}", rand::random::<u128>()),
            },
            LeaseInput::Changed { pick, at, to } => {
                let id = granted(pick).unwrap_or_else(rand::random);
                let mut chars: Vec<char> = format!("{id:032x}").chars().collect();
                let i = at.index(chars.len());
                // Make sure the character really changes.
                chars[i] = if to.eq_ignore_ascii_case(&chars[i]) {
                    if chars[i] == '0' {
                        '1'
                    } else {
                        '0'
                    }
                } else {
                    *to
                };
                chars.into_iter().collect()
            }
            LeaseInput::Padded {
                pick,
                before,
                after,
            } => {
                let id = granted(pick).unwrap_or_else(rand::random);
                format!("{before}{id:032x}{after}")
            }
            LeaseInput::Foreign => self.foreign_lease.clone(),
            LeaseInput::Text(text) => text.clone(),
        };
        let lease = lease_rule(&id).and_then(|value| model.find(value));
        LeaseCall { id, lease }
    }

    /// What a call naming `call` must get, given the request's encoded size.
    fn expect_for_lease(&self, call: &LeaseCall, encoded_len: usize, end: Instant) -> Expect {
        if encoded_len > MAX_MESSAGE_BYTES {
            return Expect::TooLarge;
        }
        let Some(value) = lease_rule(&call.id) else {
            return Expect::Invalid("lease_id");
        };
        let id = format!("{value:032x}");
        match call.lease.map(|i| self.model.borrow().leases[i].clone()) {
            None => Expect::NotFound(id),
            Some(lease) if lease.surely_live(end) => Expect::Ok,
            Some(lease) if matches!(lease.fate, Fate::Revoked | Fate::Gone) => Expect::NotFound(id),
            Some(_) => Expect::OkOrNotFound(id),
        }
    }

    /// Marks a lease the registry answered NOT_FOUND for.
    fn gone(&self, lease: Option<usize>) {
        if let Some(i) = lease {
            let mut model = self.model.borrow_mut();
            let lease = &mut model.leases[i];
            if lease.fate != Fate::Revoked {
                lease.fate = Fate::Gone;
            }
        }
    }

    async fn run(&self, action: Action) -> Result<(), TestCaseError> {
        match action {
            Action::Register(input) => self.register(input).await,
            Action::KeepAlive(inputs) => self.keep_alive(inputs).await,
            Action::Drain(input) => self.drain_or_deregister(input, false).await,
            Action::Deregister(input) => self.drain_or_deregister(input, true).await,
            Action::Watch(service) => self.watch(service).await,
            Action::Resolve(service) => self.resolve(service).await,
            Action::ListServices => self.list_services().await,
        }
    }

    fn record(&self, rpc: &str, outcome: &Result<(), Status>) {
        let code = match outcome {
            Ok(()) => "OK".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.model.borrow_mut().count(format!("{rpc} {code}"));
    }

    async fn register(&self, input: RegisterInput) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            service_rule(&input.service.value),
            input.service.valid,
            "generator and rule disagree on {}",
            short(&input.service.value)
        );
        let request = RegisterRequest {
            service: input.service.value.clone(),
            address: input.address.value.clone(),
            metadata: input.metadata.value.clone(),
            ttl_ms: input.ttl_ms.value,
        };
        let expect = if request.encoded_len() > MAX_MESSAGE_BYTES {
            Expect::TooLarge
        } else if !input.service.valid {
            Expect::Invalid("service")
        } else if !input.address.valid {
            Expect::Invalid("address")
        } else if !input.metadata.valid {
            Expect::Invalid("metadata")
        } else if !input.ttl_ms.valid {
            Expect::Invalid("ttl_ms")
        } else {
            Expect::Ok
        };
        let what = format!(
            "Register service {} address {} metadata of {} entries ({} bytes) ttl_ms {}",
            short(&input.service.value),
            short(&input.address.value),
            request.metadata.len(),
            request
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>(),
            request.ttl_ms
        );
        let sent = Instant::now();
        let outcome = within(&what, self.client.clone().register(request)).await?;
        let answered = Instant::now();
        self.record(
            "Register",
            &outcome.as_ref().map(drop).map_err(Clone::clone),
        );
        let reply = match outcome {
            Err(status) => return check_refusal(&what, &status, &expect),
            Ok(reply) if expect == Expect::Ok => reply.into_inner(),
            Ok(reply) => {
                return Err(TestCaseError::fail(format!(
                    "{what}: expected {expect:?}, got OK {reply:?}"
                )))
            }
        };
        let granted = if input.ttl_ms.value == 0 {
            5000
        } else {
            input.ttl_ms.value
        };
        prop_assert_eq!(reply.ttl_ms, granted, "{}: granted TTL", what);
        prop_assert_eq!(reply.epoch, self.epoch, "{}: epoch", what);
        let id = lease_rule(&reply.lease_id)
            .filter(|_| reply.lease_id.bytes().all(|b| !b.is_ascii_uppercase()))
            .ok_or_else(|| TestCaseError::fail(format!("{what}: lease id {:?}", reply.lease_id)))?;
        let mut model = self.model.borrow_mut();
        prop_assert!(model.find(id).is_none(), "{}: lease id reused", what);
        let key = (input.service.value.clone(), input.address.value.clone());
        if let Some(previous) = model.holders.get(&key).copied() {
            // Taken over: the old lease is dead from now on.
            model.leases[previous].fate = Fate::Revoked;
        }
        model.leases.push(Lease {
            id,
            metadata: input.metadata.value,
            ttl: Duration::from_millis(granted),
            sent,
            answered,
            fate: Fate::Live,
            draining: false,
        });
        let index = model.leases.len() - 1;
        model.holders.insert(key, index);
        Ok(())
    }

    async fn keep_alive(&self, inputs: Vec<LeaseInput>) -> Result<(), TestCaseError> {
        let calls: Vec<LeaseCall> = inputs.iter().map(|i| self.resolve_lease(i)).collect();
        let requests: Vec<KeepAliveRequest> = calls
            .iter()
            .map(|c| KeepAliveRequest {
                lease_id: c.id.clone(),
            })
            .collect();
        let what = format!(
            "KeepAlive of {:?}",
            calls.iter().map(|c| short(&c.id)).collect::<Vec<_>>()
        );
        // An oversized heartbeat ends the stream where it stands: every
        // heartbeat before it is answered, none after it.
        let first_oversized = requests
            .iter()
            .position(|r| r.encoded_len() > MAX_MESSAGE_BYTES);
        let refusal = |i: usize, status: &Status, expect: &Expect| {
            if first_oversized == Some(i) && check_refusal(&what, status, &Expect::TooLarge).is_ok()
            {
                return Ok(());
            }
            check_refusal(&what, status, expect)
        };
        let mut client = self.client.clone();
        let mut replies = match within(
            &what,
            client.keep_alive(tokio_stream::iter(requests.clone())),
        )
        .await?
        {
            Ok(replies) => Some(replies.into_inner()),
            Err(status) => {
                // Refused before any reply: only the first heartbeat's
                // refusal can explain that.
                let end = Instant::now();
                let expect = self.expect_for_lease(&calls[0], requests[0].encoded_len(), end);
                self.record("KeepAlive", &Err(status.clone()));
                refusal(0, &status, &expect)?;
                if status.code() == Code::NotFound {
                    self.gone(calls[0].lease);
                }
                None
            }
        };
        let mut refreshed = Vec::new();
        if let Some(stream) = replies.as_mut() {
            for (i, (call, request)) in calls.iter().zip(&requests).enumerate() {
                let next = within(&what, stream.message()).await?;
                let expect = self.expect_for_lease(call, request.encoded_len(), Instant::now());
                match next {
                    Ok(Some(reply)) => {
                        self.record("KeepAlive", &Ok(()));
                        prop_assert!(
                            expect.allows_ok(),
                            "{}: heartbeat {} answered OK, expected {:?}",
                            what,
                            short(&call.id),
                            expect
                        );
                        let lease = self.model.borrow().leases[call.lease.expect("known")].clone();
                        prop_assert_eq!(reply.lease_id, format!("{:032x}", lease.id));
                        prop_assert_eq!(reply.ttl_ms, lease.ttl.as_millis() as u64);
                        refreshed.push(call.lease.expect("known"));
                    }
                    Ok(None) => {
                        return Err(TestCaseError::fail(format!(
                            "{what}: stream ended before answering {}",
                            short(&call.id)
                        )))
                    }
                    Err(status) => {
                        self.record("KeepAlive", &Err(status.clone()));
                        refusal(i, &status, &expect)?;
                        if status.code() == Code::NotFound {
                            self.gone(call.lease);
                        }
                        break;
                    }
                }
            }
            // Every heartbeat answered or refused; then the stream ends.
            let end = within(&what, stream.message()).await?;
            prop_assert!(
                matches!(end, Ok(None)),
                "{}: after the last answer: {:?}",
                what,
                end
            );
        }
        // Their KeepAlive stream is gone, so are they.
        let mut model = self.model.borrow_mut();
        for i in refreshed {
            if model.leases[i].fate == Fate::Live {
                model.leases[i].fate = Fate::Doomed;
            }
        }
        Ok(())
    }

    async fn drain_or_deregister(
        &self,
        input: LeaseInput,
        deregister: bool,
    ) -> Result<(), TestCaseError> {
        let call = self.resolve_lease(&input);
        let rpc = if deregister { "Deregister" } else { "Drain" };
        let what = format!("{rpc} {}", short(&call.id));
        let mut client = self.client.clone();
        let (outcome, encoded_len) = if deregister {
            let request = DeregisterRequest {
                lease_id: call.id.clone(),
            };
            let len = request.encoded_len();
            (
                within(&what, client.deregister(request)).await?.map(drop),
                len,
            )
        } else {
            let request = DrainRequest {
                lease_id: call.id.clone(),
            };
            let len = request.encoded_len();
            (within(&what, client.drain(request)).await?.map(drop), len)
        };
        let expect = self.expect_for_lease(&call, encoded_len, Instant::now());
        self.record(rpc, &outcome);
        match outcome {
            Ok(()) => {
                prop_assert!(expect.allows_ok(), "{}: OK, expected {:?}", what, expect);
                let mut model = self.model.borrow_mut();
                let lease = &mut model.leases[call.lease.expect("known")];
                if deregister {
                    lease.fate = Fate::Revoked;
                } else {
                    lease.draining = true;
                }
                Ok(())
            }
            Err(status) => {
                check_refusal(&what, &status, &expect)?;
                if matches!(expect, Expect::OkOrNotFound(_)) {
                    self.gone(call.lease);
                }
                Ok(())
            }
        }
    }

    fn expect_for_service(&self, service: &Field<String>, encoded_len: usize) -> Expect {
        if encoded_len > MAX_MESSAGE_BYTES {
            Expect::TooLarge
        } else if service.valid {
            Expect::Ok
        } else {
            Expect::Invalid("service")
        }
    }

    async fn watch(&self, service: Field<String>) -> Result<(), TestCaseError> {
        let request = WatchRequest {
            service: service.value.clone(),
            ..Default::default()
        };
        let expect = self.expect_for_service(&service, request.encoded_len());
        let what = format!("Watch {}", short(&service.value));
        let mut client = self.client.clone();
        let outcome = match within(&what, client.watch(request)).await? {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                within(&what, stream.message())
                    .await?
                    .map(|first| (first, stream))
            }
            Err(status) => Err(status),
        };
        self.record("Watch", &outcome.as_ref().map(drop).map_err(Clone::clone));
        match outcome {
            Ok((first, _stream)) => {
                prop_assert_eq!(&expect, &Expect::Ok, "{}: answered", what);
                let first = first.ok_or_else(|| {
                    TestCaseError::fail(format!("{what}: stream ended without a message"))
                })?;
                prop_assert_eq!(first.epoch, self.epoch, "{}: epoch", what);
                prop_assert!(
                    matches!(first.event, Some(Event::Reset(_))),
                    "{}: first message {:?}",
                    what,
                    first
                );
                Ok(())
            }
            Err(status) => check_refusal(&what, &status, &expect),
        }
    }

    async fn resolve(&self, service: Field<String>) -> Result<(), TestCaseError> {
        let request = ResolveRequest {
            service: service.value.clone(),
        };
        let expect = self.expect_for_service(&service, request.encoded_len());
        let what = format!("Resolve {}", short(&service.value));
        let before = Instant::now();
        let outcome = within(&what, self.client.clone().resolve(request)).await?;
        let after = Instant::now();
        self.record("Resolve", &outcome.as_ref().map(drop).map_err(Clone::clone));
        match outcome {
            Ok(reply) => {
                prop_assert_eq!(&expect, &Expect::Ok, "{}: answered", what);
                let reply = reply.into_inner();
                prop_assert_eq!(reply.epoch, self.epoch, "{}: epoch", what);
                // Revoked leases are gone before their call answers.
                let problems = self.compare(&service.value, &reply, before, after, false);
                prop_assert!(problems.is_empty(), "{}: {:?}", what, problems);
                Ok(())
            }
            Err(status) => check_refusal(&what, &status, &expect),
        }
    }

    async fn list_services(&self) -> Result<(), TestCaseError> {
        let outcome = within(
            "ListServices",
            self.client.clone().list_services(ListServicesRequest {}),
        )
        .await?;
        self.record(
            "ListServices",
            &outcome.as_ref().map(drop).map_err(Clone::clone),
        );
        let services = outcome
            .map_err(|s| TestCaseError::fail(format!("ListServices: {s:?}")))?
            .into_inner()
            .services;
        prop_assert!(
            services.windows(2).all(|w| w[0].service < w[1].service),
            "ListServices not sorted"
        );
        prop_assert!(
            services.iter().all(|s| s.endpoints > 0),
            "ListServices lists an empty service"
        );
        prop_assert!(
            services.iter().all(|s| service_rule(&s.service)),
            "ListServices lists an invalid name"
        );
        Ok(())
    }

    /// What is wrong with `reply` as the set of `service` some time between
    /// `before` and `after`. With `settled`, leases that have surely ended
    /// must be gone too (the caller polls, allowing for asynchronous removal);
    /// otherwise only revoked ones, which leave before their call answers.
    fn compare(
        &self,
        service: &str,
        reply: &ResolveResponse,
        before: Instant,
        after: Instant,
        settled: bool,
    ) -> Vec<String> {
        let model = self.model.borrow();
        let mut problems = Vec::new();
        let listed: HashMap<&str, _> = reply
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e))
            .collect();
        for endpoint in &reply.endpoints {
            let key = (service.to_owned(), endpoint.address.clone());
            let Some(&holder) = model.holders.get(&key) else {
                problems.push(format!("{} listed but never registered", endpoint.address));
                continue;
            };
            let lease = &model.leases[holder];
            if lease.metadata != endpoint.metadata || lease.state() != endpoint.state {
                problems.push(format!(
                    "{} listed with metadata {:?} state {}, registered with {:?} state {}",
                    endpoint.address,
                    endpoint.metadata,
                    endpoint.state,
                    lease.metadata,
                    lease.state()
                ));
            }
        }
        for ((s, address), &holder) in &model.holders {
            if s != service {
                continue;
            }
            let lease = &model.leases[holder];
            let present = listed.contains_key(address.as_str());
            if lease.surely_live(after) && !present {
                problems.push(format!("{address} missing; its lease is live"));
            }
            let must_be_gone = if settled {
                lease.surely_ended(before)
            } else {
                lease.fate == Fate::Revoked
            };
            if must_be_gone && present {
                problems.push(format!(
                    "{address} still listed; its lease is {:?}",
                    lease.fate
                ));
            }
        }
        problems
    }
}

/// Serves a registry on the current runtime; the handle tells whether it
/// stopped (it never should).
async fn serve(
    config: RegistryConfig,
) -> (String, JoinHandle<Result<(), tonic::transport::Error>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local addr").to_string();
    let task = tokio::spawn(switchboard::registry::serve(
        listener,
        config,
        std::future::pending(),
    ));
    (address, task)
}

#[test]
fn arbitrary_requests_get_ok_or_their_documented_status_and_watchers_stay_consistent() {
    count_panics();
    let runtime = runtime();
    let config = RegistryConfig {
        max_message_bytes: MAX_MESSAGE_BYTES,
        // The fuzzer is one connection registering as fast as it can.
        max_registrations_per_second: None,
        ..RegistryConfig::default()
    };
    let (harness, watchers, untouched, registry) = runtime.block_on(async {
        let (address, registry) = serve(config.clone()).await;
        let (other, _other_task) = serve(config.clone()).await;
        let mut client = registry_client(&address, STARTUP).await;
        let foreign_lease = registry_client(&other, STARTUP)
            .await
            .register(RegisterRequest {
                service: WATCHED[0].into(),
                address: "10.0.0.1:8000".into(),
                metadata: Metadata::new(),
                ttl_ms: 300_000,
            })
            .await
            .expect("register with the other registry")
            .into_inner()
            .lease_id;
        client
            .register(RegisterRequest {
                service: UNTOUCHED.into(),
                address: "10.1.1.1:1".into(),
                metadata: Metadata::from([("zone".into(), "a".into())]),
                ttl_ms: 300_000,
            })
            .await
            .expect("register the untouched endpoint");
        let epoch = client
            .resolve(ResolveRequest {
                service: UNTOUCHED.into(),
            })
            .await
            .expect("resolve")
            .into_inner()
            .epoch;
        let mut watchers = Vec::new();
        for service in WATCHED {
            watchers.push((
                service,
                first_message(Watcher::start(&client, service).await).await,
            ));
        }
        let untouched = first_message(Watcher::start(&client, UNTOUCHED).await).await;
        let harness = Harness {
            client,
            epoch,
            foreign_lease,
            model: RefCell::new(Model::default()),
        };
        (harness, watchers, untouched, registry)
    });

    let started = std::time::Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        // Shrinking replays against a registry whose state moved on; keep
        // it short.
        max_shrink_iters: 32,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(action(), 1..6), |actions| {
        runtime.block_on(async {
            for action in actions {
                harness.run(action).await?;
            }
            Ok(())
        })
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, actions)) => {
            // Inputs can be 100 KB long: show them cut.
            let mut shown = format!("{actions:#?}");
            if shown.len() > 4000 {
                let cut = (0..=4000)
                    .rev()
                    .find(|&i| shown.is_char_boundary(i))
                    .unwrap_or(0);
                shown.truncate(cut);
                shown.push_str("...");
            }
            panic!("{reason}\nminimal failing input (state carries over between cases): {shown}");
        }
        Err(TestError::Abort(reason)) => panic!("proptest aborted: {reason}"),
    }
    let fuzzing = started.elapsed();

    runtime.block_on(async {
        // Every watcher converges on what Resolve says, which is what the
        // model says; none broke the protocol on the way.
        let mut client = harness.client.clone();
        let mut last = Vec::new();
        let converged = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                last.clear();
                for (service, watcher) in &watchers {
                    let before = Instant::now();
                    let reply = client
                        .resolve(ResolveRequest {
                            service: (*service).into(),
                        })
                        .await
                        .expect("resolve a watched service")
                        .into_inner();
                    let after = Instant::now();
                    let view = watcher.view.borrow();
                    assert!(
                        view.violations.is_empty() && view.ended.is_none(),
                        "watcher of {service}: {}",
                        view.summary()
                    );
                    if view.version == Some(reply.version) {
                        let resolved: BTreeMap<String, Endpoint> = reply
                            .endpoints
                            .iter()
                            .map(|e| (e.address.clone(), e.clone()))
                            .collect();
                        assert_eq!(
                            view.endpoints, resolved,
                            "watcher of {service} at version {} holds another set than Resolve",
                            reply.version
                        );
                    } else {
                        last.push(format!(
                            "{service}: watcher at version {:?}, Resolve at {}",
                            view.version, reply.version
                        ));
                    }
                    for problem in harness.compare(service, &reply, before, after, true) {
                        last.push(format!("{service}: {problem}"));
                    }
                }
                if last.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(converged.is_ok(), "watchers did not converge: {last:?}");

        let untouched = untouched.view.borrow();
        assert!(
            untouched.messages == 1
                && untouched.violations.is_empty()
                && untouched.ended.is_none()
                && untouched.endpoints.keys().eq(["10.1.1.1:1"]),
            "the untouched service's watcher saw something: {}",
            untouched.summary()
        );

        // Still serving as normal.
        let after = RegisterRequest {
            service: WATCHED[1].into(),
            address: "192.0.2.1:443".into(),
            metadata: Metadata::from([("after".into(), "fuzz".into())]),
            ttl_ms: 300_000,
        };
        client
            .register(after)
            .await
            .expect("a normal Register after the fuzzing");
        let mut resolved = resolve(&mut client, WATCHED[1]).await.expect("resolve");
        resolved.retain(|a| a == "192.0.2.1:443");
        assert_eq!(resolved, ["192.0.2.1:443"]);
        wait_for(
            "the watcher to see the last registration",
            Duration::from_secs(10),
            || {
                let seen = watchers[1]
                    .1
                    .view
                    .borrow()
                    .endpoints
                    .contains_key("192.0.2.1:443");
                async move { seen.then_some(()) }
            },
        )
        .await;
        assert!(!registry.is_finished(), "the registry stopped serving");
    });

    let model = harness.model.borrow();
    let views: Vec<String> = watchers
        .iter()
        .map(|(s, w)| {
            let v = w.view.borrow();
            format!(
                "{s}: {} messages ({} resets), {} endpoints",
                v.messages,
                v.resets,
                v.endpoints.len()
            )
        })
        .collect();
    eprintln!(
        "{CASES} cases in {fuzzing:?}; {} leases granted; outcomes {:?}; watchers {views:?}",
        model.leases.len(),
        model.outcomes
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

// ---------------------------------------------------------------------------
// Below the API: arbitrary bytes as the request message.
// ---------------------------------------------------------------------------

/// Sends and receives messages as raw bytes, to put anything on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[derive(Debug, Clone, Copy)]
enum Rpc {
    Register,
    KeepAlive,
    Drain,
    Deregister,
    Watch,
    Resolve,
}

impl Rpc {
    fn path(self) -> PathAndQuery {
        PathAndQuery::from_static(match self {
            Rpc::Register => "/switchboard.registry.v1.Registry/Register",
            Rpc::KeepAlive => "/switchboard.registry.v1.Registry/KeepAlive",
            Rpc::Drain => "/switchboard.registry.v1.Registry/Drain",
            Rpc::Deregister => "/switchboard.registry.v1.Registry/Deregister",
            Rpc::Watch => "/switchboard.registry.v1.Registry/Watch",
            Rpc::Resolve => "/switchboard.registry.v1.Registry/Resolve",
        })
    }

    /// Whether `bytes` decode as this RPC's request message.
    fn decodes(self, bytes: &[u8]) -> bool {
        match self {
            Rpc::Register => RegisterRequest::decode(bytes).is_ok(),
            Rpc::KeepAlive => KeepAliveRequest::decode(bytes).is_ok(),
            Rpc::Drain => DrainRequest::decode(bytes).is_ok(),
            Rpc::Deregister => DeregisterRequest::decode(bytes).is_ok(),
            Rpc::Watch => WatchRequest::decode(bytes).is_ok(),
            Rpc::Resolve => ResolveRequest::decode(bytes).is_ok(),
        }
    }
}

/// Request messages: random bytes, a string field that is not UTF-8, or a
/// valid request cut short or with bytes appended.
fn wire_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (1u8..=2, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(field, mut text)| {
            text.push(0xff);
            let mut message = vec![(field << 3) | 2, text.len() as u8];
            message.extend(text);
            message
        }),
        (
            register_input(),
            any::<Index>(),
            prop::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(input, cut, extra)| {
                let mut message = RegisterRequest {
                    service: input.service.value,
                    address: input.address.value,
                    metadata: input.metadata.value,
                    ttl_ms: input.ttl_ms.value,
                }
                .encode_to_vec();
                message.truncate(cut.index(message.len() + 1));
                message.extend(extra);
                message
            }),
    ]
}

fn rpc() -> impl Strategy<Value = Rpc> {
    select(vec![
        Rpc::Register,
        Rpc::KeepAlive,
        Rpc::Drain,
        Rpc::Deregister,
        Rpc::Watch,
        Rpc::Resolve,
    ])
}

/// Sends `message` as the request of `rpc`; the first answer.
async fn send_raw(channel: &Channel, rpc: Rpc, message: Vec<u8>) -> Result<(), Status> {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    match rpc {
        Rpc::Register | Rpc::Drain | Rpc::Deregister | Rpc::Resolve => grpc
            .unary::<_, Vec<u8>, _>(tonic::Request::new(message), rpc.path(), Raw)
            .await
            .map(drop),
        Rpc::Watch => {
            let mut stream = grpc
                .server_streaming::<_, Vec<u8>, _>(tonic::Request::new(message), rpc.path(), Raw)
                .await?
                .into_inner();
            stream.message().await.map(drop)
        }
        Rpc::KeepAlive => {
            let requests = tokio_stream::iter([message]);
            let mut stream = grpc
                .streaming::<_, _, Vec<u8>, _>(tonic::Request::new(requests), rpc.path(), Raw)
                .await?
                .into_inner();
            stream.message().await.map(drop)
        }
    }
}

#[test]
fn undecodable_messages_get_internal_and_the_registry_serves_on() {
    count_panics();
    let runtime = runtime();
    let (address, registry, channel) = runtime.block_on(async {
        let (address, registry) = serve(RegistryConfig {
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_registrations_per_second: None,
            ..RegistryConfig::default()
        })
        .await;
        let channel = wait_for("the registry", STARTUP, || {
            let uri = format!("http://{address}");
            async move { Channel::from_shared(uri).ok()?.connect().await.ok() }
        })
        .await;
        (address, registry, channel)
    });
    let outcomes = RefCell::new(BTreeMap::<String, usize>::new());
    let mut runner = TestRunner::new(Config {
        cases: 200,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    });
    let result = runner.run(&(rpc(), wire_message()), |(rpc, message)| {
        let what = format!("{rpc:?} with a {}-byte message", message.len());
        let oversized = message.len() > MAX_MESSAGE_BYTES;
        let decodes = rpc.decodes(&message);
        let outcome = runtime.block_on(within(&what, send_raw(&channel, rpc, message)))?;
        let code = outcome.as_ref().err().map_or(Code::Ok, Status::code);
        *outcomes
            .borrow_mut()
            .entry(format!("{rpc:?} {code:?}"))
            .or_default() += 1;
        let message = outcome.as_ref().err().map_or("", Status::message);
        if oversized {
            prop_assert_eq!(code, Code::ResourceExhausted, "{}: {}", what, message);
        } else if !decodes {
            // gRPC's code for a request that does not parse.
            prop_assert_eq!(code, Code::Internal, "{}: {}", what, message);
            prop_assert!(
                message.starts_with("failed to decode Protobuf message"),
                "{}: {}",
                what,
                message
            );
        } else {
            prop_assert!(
                matches!(code, Code::Ok | Code::InvalidArgument | Code::NotFound),
                "{}: a request that decodes got {:?} {}",
                what,
                code,
                message
            );
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    runtime.block_on(async {
        // The same connection and a new one still serve.
        for mut client in [
            RegistryClient::new(channel.clone()),
            registry_client(&address, STARTUP).await,
        ] {
            client
                .register(RegisterRequest {
                    service: "after.hardening.test".into(),
                    address: "192.0.2.9:80".into(),
                    ..RegisterRequest::default()
                })
                .await
                .expect("a normal Register after the garbage");
            assert_eq!(
                resolve(&mut client, "after.hardening.test").await,
                Some(vec!["192.0.2.9:80".to_owned()])
            );
        }
        assert!(!registry.is_finished(), "the registry stopped serving");
    });
    eprintln!("raw messages: outcomes {:?}", outcomes.borrow());
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

/// `watcher`, once its first message (the reset) has arrived.
async fn first_message(mut watcher: Watcher) -> Watcher {
    watcher
        .wait_until("first message", STARTUP, |view| view.messages > 0)
        .await;
    watcher
}

/// The runtime one property test drives its registry and client on: proptest
/// cases are synchronous, so each case blocks on it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
