//! Resumed watches and several registry addresses: a watcher that names the
//! position it holds is not sent what it already has, and backends and
//! clients given several replicas move to the next one when theirs dies.

use std::time::Duration;

use crate::common::*;
use switchboard::client::PolicyKind;
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::registry::{watch_response::Event, RegisterRequest, WatchRequest};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_watch_skips_the_reset_it_already_holds() {
    let registry = serve_registry(Default::default()).await;
    let mut client = registry_client(&registry, STARTUP).await;
    let register = |address: &str| RegisterRequest {
        service: SERVICE.into(),
        address: address.into(),
        ..Default::default()
    };
    client.register(register("127.0.0.1:1001")).await.unwrap();
    let mut first = watch(&mut client, SERVICE).await;
    let held = first.message().await.unwrap().unwrap();
    drop(first);

    // Nothing missed: the resumed stream's first message is the next change.
    let mut resumed = client
        .watch(WatchRequest {
            service: SERVICE.into(),
            epoch: Some(held.epoch),
            version: Some(held.version),
        })
        .await
        .unwrap()
        .into_inner();
    // It opens with the service's config alone (none here), at the
    // position the watcher holds.
    let opening = resumed.message().await.unwrap().unwrap();
    assert_eq!(opening.event, None);
    assert_eq!((opening.epoch, opening.version), (held.epoch, held.version));
    assert_eq!(opening.service_config, Some(Default::default()));
    client.register(register("127.0.0.1:1002")).await.unwrap();
    let next = resumed.message().await.unwrap().unwrap();
    assert!(next.version > held.version);
    match next.event {
        Some(Event::Delta(delta)) => {
            assert_eq!(delta.added.len(), 1);
            assert_eq!(delta.added[0].address, "127.0.0.1:1002");
        }
        other => panic!("expected a delta, got {other:?}"),
    }

    // A position this registry cannot continue from gets a reset.
    for (epoch, version) in [(held.epoch, held.version), (held.epoch ^ 1, next.version)] {
        let mut stale = client
            .watch(WatchRequest {
                service: SERVICE.into(),
                epoch: Some(epoch),
                version: Some(version),
            })
            .await
            .unwrap()
            .into_inner();
        let opening = stale.message().await.unwrap().unwrap();
        match opening.event {
            Some(Event::Reset(snapshot)) => assert_eq!(snapshot.endpoints.len(), 2),
            other => panic!("expected a reset, got {other:?}"),
        }
    }

    // Half a position is a mistake, named as such.
    let status = client
        .watch(WatchRequest {
            service: SERVICE.into(),
            epoch: Some(held.epoch),
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("epoch/version"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_and_clients_move_to_the_next_registry() {
    let (p1, p2) = (
        free_port().expect("free port"),
        free_port().expect("free port"),
    );
    let mut r1 = start_registry(p1).await;
    let _r2 = start_registry(p2).await;
    let replicas = format!("{},{}", local(p1), local(p2));
    let port = free_port().expect("free port");
    let backend = local(port);
    let _echo = start_echo(&replicas, SERVICE, &[port], &["--ttl-ms", "1000"]).await;
    wait_registered(&local(p1), SERVICE, std::slice::from_ref(&backend), STARTUP).await;

    let channel = channel(
        &format!("registry://{replicas}/{SERVICE}"),
        PolicyKind::RoundRobin,
    );
    wait_ready_set(&channel, std::slice::from_ref(&backend), STARTUP).await;

    r1.kill();
    // The backend registers at the second replica (its lease died with the
    // first), and the client follows it there.
    wait_registered(&local(p2), SERVICE, std::slice::from_ref(&backend), STARTUP).await;
    wait_ready_set(&channel, std::slice::from_ref(&backend), STARTUP).await;
    let mut echo = EchoClient::new(channel.clone());
    wait_for("an RPC through the second replica", STARTUP, || {
        let mut echo = echo.clone();
        async move { echo_once(&mut echo, Duration::from_secs(2)).await.ok() }
    })
    .await;
    assert_eq!(
        echo_once(&mut echo, Duration::from_secs(5)).await.unwrap(),
        backend
    );
}
