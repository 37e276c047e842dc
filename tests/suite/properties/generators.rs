//! Generators: each input carries whether it was generated valid.

use super::*;

/// A generated field and whether the documented rules accept it.
#[derive(Debug, Clone)]
pub(super) struct Field<T> {
    pub(super) value: T,
    pub(super) valid: bool,
}

pub(super) fn valid<T>(value: T) -> Field<T> {
    Field { value, valid: true }
}

pub(super) fn invalid<T>(value: T) -> Field<T> {
    Field {
        value,
        valid: false,
    }
}

/// `len` bytes of 63-byte labels (`xxx...x.xxx...`), never ending in a dot.
pub(super) fn long_name(len: usize) -> String {
    let mut name = vec!["x".repeat(63); len / 64 + 1].join(".");
    name.truncate(len);
    if name.ends_with('.') {
        name.pop();
        name.push('y');
    }
    name
}

/// Inserts `c` into the ASCII string `s` at a position picked by `at`.
pub(super) fn insert_at(s: &str, at: Index, c: &str) -> String {
    let i = at.index(s.len() + 1);
    format!("{}{c}{}", &s[..i], &s[i..])
}

/// Characters no service name or host name may contain: punctuation,
/// whitespace, control characters, non-ASCII letters, emoji, zero-width.
pub(super) fn foreign_char() -> impl Strategy<Value = String> {
    "[ /:@*%+!~,;=?#&$\\[\\]\\\\\"'\\x00-\\x1f\\x7f\u{e9}\u{c5}\u{65e5}\u{1f980}\u{200b}\u{130}\u{ff10}]"
}

pub(super) fn service_label() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[A-Za-z0-9_]([A-Za-z0-9_-]{0,10}[A-Za-z0-9_])?",
        1 => "[a-z0-9]{63}",
        1 => Just("_grpc".to_owned()),
    ]
}

pub(super) fn valid_service() -> impl Strategy<Value = String> {
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

pub(super) fn invalid_service() -> impl Strategy<Value = String> {
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
pub(super) fn arbitrary_service() -> impl Strategy<Value = Field<String>> {
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

pub(super) fn service() -> impl Strategy<Value = Field<String>> {
    prop_oneof![
        6 => select(WATCHED.to_vec()).prop_map(|s| valid(s.to_owned())),
        2 => valid_service().prop_map(valid),
        3 => invalid_service().prop_map(invalid),
        2 => arbitrary_service(),
    ]
}

pub(super) fn port() -> impl Strategy<Value = u16> {
    prop_oneof![Just(1u16), Just(65535u16), 1u16..=65535]
}

/// A host name that does not look like an IPv4 address.
pub(super) fn host_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", 1..4)
        .prop_map(|labels| labels.join("."))
        .prop_filter("not numeric", |h| {
            !h.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

pub(super) fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
        host_name(),
    ]
}

pub(super) fn valid_address() -> impl Strategy<Value = String> {
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

pub(super) fn bad_port() -> impl Strategy<Value = String> {
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

pub(super) fn invalid_address() -> impl Strategy<Value = String> {
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
pub(super) fn foreign_address() -> impl Strategy<Value = String> {
    ("\\PC{0,30}", foreign_char(), any::<Index>()).prop_map(|(s, c, at)| {
        let boundaries: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
        let i = boundaries[at.index(boundaries.len())];
        format!("{}{c}{}", &s[..i], &s[i..])
    })
}

pub(super) fn address() -> impl Strategy<Value = Field<String>> {
    prop_oneof![
        7 => valid_address().prop_map(valid),
        3 => invalid_address().prop_map(invalid),
        1 => foreign_address().prop_map(invalid),
    ]
}

pub(super) type Metadata = HashMap<String, String>;

pub(super) fn valid_metadata() -> impl Strategy<Value = Metadata> {
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

pub(super) fn invalid_metadata() -> impl Strategy<Value = Metadata> {
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

pub(super) fn metadata() -> impl Strategy<Value = Field<Metadata>> {
    prop_oneof![
        8 => valid_metadata().prop_map(valid),
        2 => invalid_metadata().prop_map(invalid),
    ]
}

pub(super) fn ttl() -> impl Strategy<Value = Field<u64>> {
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
pub(super) struct RegisterInput {
    pub(super) service: Field<String>,
    pub(super) address: Field<String>,
    pub(super) metadata: Field<Metadata>,
    pub(super) ttl_ms: Field<u64>,
}

pub(super) fn register_input() -> impl Strategy<Value = RegisterInput> {
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
pub(super) enum LeaseInput {
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

pub(super) fn lease_input() -> impl Strategy<Value = LeaseInput> {
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
pub(super) enum Action {
    Register(RegisterInput),
    KeepAlive(Vec<LeaseInput>),
    Drain(LeaseInput),
    Deregister(LeaseInput),
    Watch(Field<String>),
    Resolve(Field<String>),
    ListServices,
}

pub(super) fn action() -> impl Strategy<Value = Action> {
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
