//! Registration and read tokens: a registry with tokens refuses writers and
//! readers without the right one (UNAUTHENTICATED, nothing changed), and the
//! echo and client binaries and library present them from token files.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::cases::{self, case, expect_status, Case};
use crate::common::*;
use switchboard::client::{BalancedChannel, PolicyKind};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{RegisterRequest, ResolveRequest, WatchRequest};
use switchboard::registry::auth::{AccessTokens, Bearer, Token};
use switchboard::registry::RegistryConfig;
use tonic::transport::Channel;
use tonic::Code;

const WRITE: &str = "write-5f1c0e";
const READ: &str = "read-9a77b2";

/// Writes `token` to a fresh file for this test run.
fn token_file(name: &str, token: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tokens-{}", free_port().expect("free port")));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// An in-process registry demanding both tokens; returns its address.
async fn protected_registry() -> String {
    let config = RegistryConfig {
        tokens: AccessTokens {
            write: Some(Token::new(WRITE).unwrap()),
            read: Some(Token::new(READ).unwrap()),
        },
        ..RegistryConfig::default()
    };
    serve_registry(config).await
}

/// A connection to the registry at `address`, once it serves.
async fn connect(address: &str) -> Channel {
    wait_for("registry", STARTUP, || {
        let uri = format!("http://{address}");
        async move { Channel::from_shared(uri).unwrap().connect().await.ok() }
    })
    .await
}

/// A registry client on `channel` that presents `token`, if any.
fn client_with(
    channel: &Channel,
    token: Option<&str>,
) -> RegistryClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>> {
    RegistryClient::with_interceptor(
        channel.clone(),
        Bearer(token.map(|t| Token::new(t).unwrap())),
    )
}

fn register_request() -> RegisterRequest {
    RegisterRequest {
        service: SERVICE.into(),
        address: "127.0.0.1:4000".into(),
        ..RegisterRequest::default()
    }
}

/// How many endpoints of [`SERVICE`] the registry on `channel` holds.
async fn registered(channel: &Channel) -> usize {
    client_with(channel, Some(READ))
        .resolve(ResolveRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints
        .len()
}

/// A call to the protected registry.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    Register,
    Watch,
    /// The health check, which must stay open to probes without tokens.
    Health,
}

/// What a call must get: served, or UNAUTHENTICATED with a message that
/// contains this.
type Outcome = Result<(), &'static str>;

/// Each RPC with each kind of token, in the order they are sent: the one
/// Register that may succeed comes last, so every refusal before it is seen
/// to have registered nothing.
fn token_cases() -> Vec<Case<(Rpc, Option<&'static str>), Outcome>> {
    vec![
        case(
            "Register without a token",
            (Rpc::Register, None),
            Err("Register needs the registry's write token"),
        ),
        case(
            "Register with a wrong token",
            (Rpc::Register, Some("guess")),
            Err("Register: wrong write token"),
        ),
        case(
            "Register with the read token",
            (Rpc::Register, Some(READ)),
            Err("Register: wrong write token"),
        ),
        case(
            "Watch without a token",
            (Rpc::Watch, None),
            Err("Watch needs the registry's read token"),
        ),
        case(
            "Watch with a wrong token",
            (Rpc::Watch, Some("guess")),
            Err("Watch: wrong read token"),
        ),
        case(
            "Watch with the read token",
            (Rpc::Watch, Some(READ)),
            Ok(()),
        ),
        case(
            "Watch with the write token",
            (Rpc::Watch, Some(WRITE)),
            Ok(()),
        ),
        case("Health without a token", (Rpc::Health, None), Ok(())),
        case(
            "Register with the write token",
            (Rpc::Register, Some(WRITE)),
            Ok(()),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rpc_needs_its_token_and_refusals_change_nothing() {
    let channel = connect(&protected_registry().await).await;
    cases::in_turn(token_cases(), |call| {
        let channel = channel.clone();
        async move {
            let (rpc, token) = call.input;
            let before = registered(&channel).await;
            let mut client = client_with(&channel, token);
            let outcome = match rpc {
                Rpc::Register => client.register(register_request()).await.map(drop),
                Rpc::Watch => client
                    .watch(WatchRequest {
                        service: SERVICE.into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Rpc::Health => tonic_health::pb::health_client::HealthClient::new(channel.clone())
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(|reply| {
                        assert_eq!(reply.into_inner().status, 1, "not SERVING");
                    }),
            };
            let registered_now = registered(&channel).await;
            match call.expected {
                Ok(()) => {
                    outcome.unwrap_or_else(|status| panic!("refused: {status:?}"));
                    let added = usize::from(matches!(rpc, Rpc::Register));
                    assert_eq!(registered_now, before + added);
                }
                Err(fragment) => {
                    expect_status(outcome, Code::Unauthenticated, fragment);
                    assert_eq!(registered_now, before, "the refusal changed the registry");
                }
            }
        }
    })
    .await;
    assert_eq!(registered(&channel).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_present_their_token_files() {
    let write = token_file("write", WRITE);
    let read = token_file("read", READ);
    let port = free_port().expect("free port");
    let registry = local(port);
    let registry_proc = Proc::sub(
        "registry",
        &[
            "--listen",
            &registry,
            "--warmup-ms",
            "0",
            "--token-file",
            write.to_str().unwrap(),
            "--read-token-file",
            read.to_str().unwrap(),
        ],
    );
    registry_proc
        .wait_line("registry listening on", STARTUP)
        .await;

    // Without the token: refused, still serving.
    let untrusted = free_port().expect("free port");
    let refused = start_echo(&registry, SERVICE, &[untrusted], &[]).await;
    refused.wait_line("refused the registration", STARTUP).await;
    // With it: registered.
    let trusted = free_port().expect("free port");
    let _trusted = start_echo(
        &registry,
        SERVICE,
        &[trusted],
        &["--token-file", write.to_str().unwrap()],
    )
    .await;

    let channel = BalancedChannel::builder(&format!("registry://{registry}/{SERVICE}"))
        .unwrap()
        .policy(PolicyKind::RoundRobin)
        .registry_token(Token::from_file(&read).unwrap())
        .build();
    wait_ready_set(&channel, &[local(trusted)], STARTUP).await;
    let mut client = EchoClient::new(channel);
    assert_eq!(
        served_by(&mut client, 3)
            .await
            .into_iter()
            .collect::<Vec<_>>(),
        vec![local(trusted)]
    );

    // A client without the read token is told why it sees nothing.
    let blind = BalancedChannel::builder(&format!("registry://{registry}/{SERVICE}"))
        .unwrap()
        .build();
    let error = wait_for("the resolver to report the refusal", STARTUP, || {
        let error = blind.state().resolver_error;
        async move { error }
    })
    .await;
    assert!(error.contains("token"), "{error}");
    let status = echo_once(&mut EchoClient::new(blind), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_config_writes_need_the_write_token_and_reads_the_read_token() {
    use switchboard::proto::registry::{
        DeleteServiceConfigRequest, GetServiceConfigRequest, SetServiceConfigRequest,
    };
    let channel = connect(&protected_registry().await).await;
    let set = || SetServiceConfigRequest {
        service: SERVICE.into(),
        json: r#"{"loadBalancingConfig": [{"round_robin": {}}]}"#.into(),
    };
    let get = || GetServiceConfigRequest {
        service: SERVICE.into(),
    };
    for token in [None, Some(READ)] {
        let outcome = client_with(&channel, token).set_service_config(set()).await;
        expect_status(outcome, Code::Unauthenticated, "SetServiceConfig");
    }
    let outcome = client_with(&channel, None).get_service_config(get()).await;
    expect_status(
        outcome,
        Code::Unauthenticated,
        "GetServiceConfig needs the registry's read token",
    );
    // The refusals stored nothing.
    let outcome = client_with(&channel, Some(READ))
        .get_service_config(get())
        .await;
    expect_status(outcome, Code::NotFound, "has no service config");

    let mut writer = client_with(&channel, Some(WRITE));
    let version = writer
        .set_service_config(set())
        .await
        .unwrap()
        .into_inner()
        .version;
    let stored = client_with(&channel, Some(READ))
        .get_service_config(get())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.version, version);
    assert!(stored.json.contains("round_robin"), "{}", stored.json);
    let delete = DeleteServiceConfigRequest {
        service: SERVICE.into(),
    };
    let outcome = client_with(&channel, Some(READ))
        .delete_service_config(delete.clone())
        .await;
    expect_status(outcome, Code::Unauthenticated, "DeleteServiceConfig");
    writer.delete_service_config(delete).await.unwrap();
}
