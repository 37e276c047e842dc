//! Refused input: the code, a message naming the field, and no state change.

use super::*;

/// What a refused request must leave exactly as it was.
#[derive(Debug, PartialEq)]
struct Observed {
    resolved: ResolveResponse,
    services: ListServicesResponse,
}

async fn observe(client: &mut RegistryClient<Channel>) -> Observed {
    Observed {
        resolved: resolve_full(client, SERVICE).await,
        services: ListServicesResponse {
            services: list_services(client).await,
        },
    }
}

/// A valid registration of a fresh address, to spoil one field of.
fn good() -> RegisterRequest {
    request(SERVICE, "10.9.9.9:9000")
}

/// Lease ids that are not 32 hex digits.
const MALFORMED_LEASES: [&str; 4] = ["", "not-a-lease", "abc", "0123456789abcdef0123456789abcdeg"];

/// The registry a refused call is sent to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Holding {
    /// The default limits, one endpoint of [`SERVICE`] registered.
    OneEndpoint,
    /// At most 3 endpoints per service, and [`SERVICE`] has 3.
    AFullService,
}

/// One call of the registry API that must be refused.
#[derive(Debug, Clone)]
enum Call {
    Register(RegisterRequest),
    /// One heartbeat for this lease id, on a new KeepAlive stream.
    KeepAlive(String),
    Drain(String),
    Deregister(String),
    Watch(String),
    Resolve(String),
}

impl Call {
    /// Sends the call; an accepted one answers with its reply, as text.
    async fn send(self, mut client: RegistryClient<Channel>) -> Result<String, Status> {
        let reply = match self {
            Call::Register(req) => format!("{:?}", client.register(req).await?.into_inner()),
            Call::KeepAlive(lease) => format!("{:?}", keep_alive_once(&client, &lease).await?),
            Call::Drain(lease) => format!("{:?}", drain(&mut client, &lease).await?),
            Call::Deregister(lease) => format!("{:?}", deregister(&mut client, &lease).await?),
            Call::Watch(service) => {
                client
                    .watch(WatchRequest {
                        service,
                        ..Default::default()
                    })
                    .await?;
                "a watch stream".into()
            }
            Call::Resolve(service) => {
                format!("{:?}", client.resolve(ResolveRequest { service }).await?)
            }
        };
        Ok(reply)
    }
}

/// A refusal: the registry and the call, then the code and a fragment of
/// the message (which names the field or cap at fault).
type Refusal = Case<(Holding, Call), (Code, String)>;

/// A Register of [`good`] with one field spoiled, refused as `invalid
/// <field>`.
fn bad_register(name: &str, req: RegisterRequest, field: &str) -> Refusal {
    case(
        name,
        (Holding::OneEndpoint, Call::Register(req)),
        (Code::InvalidArgument, format!("invalid {field}")),
    )
}

/// Every refused input of the registry API, against one registry per
/// [`Holding`]: each answer has its code and a message naming the field or
/// cap, and Resolve and ListServices are the same after the call as before.
fn refusals() -> Vec<Refusal> {
    let with = |edit: fn(&mut RegisterRequest)| {
        let mut req = good();
        edit(&mut req);
        req
    };
    let mut cases = vec![
        bad_register("empty service", with(|r| r.service.clear()), "service"),
        bad_register(
            "254-byte service",
            // Four valid labels, 63 + 63 + 63 + 62 bytes and three dots.
            with(|r| r.service = [63, 63, 63, 62].map(|n| "a".repeat(n)).join(".")),
            "service",
        ),
        bad_register(
            "service with a space and a bang",
            with(|r| r.service = "bad service!".into()),
            "service",
        ),
        bad_register(
            "service with a slash",
            with(|r| r.service = "lb/example".into()),
            "service",
        ),
        bad_register(
            "service with a double dot",
            with(|r| r.service = "lb..example".into()),
            "service",
        ),
        bad_register(
            "address without port",
            with(|r| r.address = "10.9.9.9".into()),
            "address",
        ),
        bad_register(
            "port 0",
            with(|r| r.address = "10.9.9.9:0".into()),
            "address",
        ),
        bad_register(
            "port 70000",
            with(|r| r.address = "10.9.9.9:70000".into()),
            "address",
        ),
        bad_register(
            "signed port",
            with(|r| r.address = "10.9.9.9:+80".into()),
            "address",
        ),
        bad_register(
            "zero-padded port",
            with(|r| r.address = "10.9.9.9:080".into()),
            "address",
        ),
        bad_register(
            "IPv6 without brackets",
            with(|r| r.address = "fe80::1:8080".into()),
            "address",
        ),
        bad_register(
            "65 metadata entries",
            with(|r| r.metadata = (0..65).map(|i| (format!("k{i}"), "v".into())).collect()),
            "metadata",
        ),
        bad_register(
            "4100 bytes of metadata",
            with(|r| {
                r.metadata.insert("blob".into(), "x".repeat(4096));
            }),
            "metadata",
        ),
        bad_register(
            "empty metadata key",
            with(|r| {
                r.metadata.insert(String::new(), "v".into());
            }),
            "metadata",
        ),
        bad_register("TTL 500 ms", with(|r| r.ttl_ms = 500), "ttl_ms"),
        bad_register("TTL 301 s", with(|r| r.ttl_ms = 301_000), "ttl_ms"),
        case(
            "fourth endpoint with a cap of 3",
            (Holding::AFullService, Call::Register(good())),
            (Code::ResourceExhausted, "endpoints per service".into()),
        ),
    ];
    for lease in MALFORMED_LEASES {
        let invalid = || (Code::InvalidArgument, "invalid lease_id".to_owned());
        let call = |rpc: fn(String) -> Call| (Holding::OneEndpoint, rpc(lease.into()));
        cases.extend([
            case(
                format!("KeepAlive {lease:?}"),
                call(Call::KeepAlive),
                invalid(),
            ),
            case(format!("Drain {lease:?}"), call(Call::Drain), invalid()),
            case(
                format!("Deregister {lease:?}"),
                call(Call::Deregister),
                invalid(),
            ),
        ]);
    }
    for (rpc, call) in [
        ("KeepAlive", Call::KeepAlive as fn(String) -> Call),
        ("Drain", Call::Drain),
        ("Deregister", Call::Deregister),
    ] {
        let lease = random_lease_id();
        cases.push(case(
            format!("{rpc} unknown lease"),
            (Holding::OneEndpoint, call(lease.clone())),
            (Code::NotFound, format!("lease {lease}")),
        ));
    }
    for service in ["", "bad service!"] {
        let invalid = || (Code::InvalidArgument, "invalid service".to_owned());
        cases.extend([
            case(
                format!("Watch {service:?}"),
                (Holding::OneEndpoint, Call::Watch(service.into())),
                invalid(),
            ),
            case(
                format!("Resolve {service:?}"),
                (Holding::OneEndpoint, Call::Resolve(service.into())),
                invalid(),
            ),
        ]);
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_get_their_code_and_a_message_naming_the_field_and_change_nothing() {
    let one = Registry::start(config()).await;
    let full = Registry::start(RegistryConfig {
        max_endpoints_per_service: 3,
        ..config()
    })
    .await;
    let mut one_client = one.client().await;
    register(&mut one_client, request(SERVICE, &addr(0))).await;
    let mut full_client = full.client().await;
    for i in 0..3 {
        register(&mut full_client, request(SERVICE, &addr(i))).await;
    }
    cases::in_turn(refusals(), |refusal| {
        let mut client = match refusal.input.0 {
            Holding::OneEndpoint => one_client.clone(),
            Holding::AFullService => full_client.clone(),
        };
        async move {
            let (code, names) = refusal.expected;
            let before = observe(&mut client).await;
            let status = expect_status(refusal.input.1.send(client.clone()).await, code, &names);
            eprintln!(
                "refused {}: {:?} {:?}",
                refusal.name,
                status.code(),
                status.message()
            );
            assert_eq!(observe(&mut client).await, before, "state changed");
        }
    })
    .await;
}
