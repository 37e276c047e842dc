//! Registration and read tokens: a registry with tokens refuses writers and
//! readers without the right one (UNAUTHENTICATED, nothing changed), and the
//! echo and client binaries and library present them from token files.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
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
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tokens-{}", free_port()));
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

async fn client_with(
    address: &str,
    token: Option<&str>,
) -> RegistryClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>> {
    let channel = wait_for("registry", STARTUP, || {
        let uri = format!("http://{address}");
        async move { Channel::from_shared(uri).unwrap().connect().await.ok() }
    })
    .await;
    RegistryClient::with_interceptor(channel, Bearer(token.map(|t| Token::new(t).unwrap())))
}

fn register_request() -> RegisterRequest {
    RegisterRequest {
        service: SERVICE.into(),
        address: "127.0.0.1:4000".into(),
        ..RegisterRequest::default()
    }
}

async fn registered(address: &str) -> usize {
    let mut reader = client_with(address, Some(READ)).await;
    reader
        .resolve(ResolveRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_write_token_and_refusals_change_nothing() {
    let address = protected_registry().await;
    for (token, case) in [
        (None, "no token"),
        (Some("guess"), "a wrong token"),
        (Some(READ), "the read token"),
    ] {
        let status = client_with(&address, token)
            .await
            .register(register_request())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert!(status.message().contains("Register"), "{case}: {status:?}");
        assert_eq!(registered(&address).await, 0, "{case} changed the registry");
    }
    client_with(&address, Some(WRITE))
        .await
        .register(register_request())
        .await
        .expect("the write token registers");
    assert_eq!(registered(&address).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_need_the_read_token_and_health_stays_open() {
    let address = protected_registry().await;
    let watch = |token| {
        let address = address.clone();
        async move {
            client_with(&address, token)
                .await
                .watch(WatchRequest {
                    service: SERVICE.into(),
                })
                .await
                .map(|_| ())
        }
    };
    assert_eq!(watch(None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(
        watch(Some("guess")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    watch(Some(READ)).await.expect("the read token watches");
    watch(Some(WRITE))
        .await
        .expect("the write token also reads");

    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reply = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");
    assert_eq!(reply.into_inner().status, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_present_their_token_files() {
    let write = token_file("write", WRITE);
    let read = token_file("read", READ);
    let port = free_port();
    let registry = local(port);
    let registry_proc = Proc::spawn(
        &bin("registry"),
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
    let untrusted = free_port();
    let refused = start_echo(&registry, SERVICE, &[untrusted], &[]).await;
    refused.wait_line("refused the registration", STARTUP).await;
    // With it: registered.
    let trusted = free_port();
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
