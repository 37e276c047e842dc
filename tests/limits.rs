//! Caps: past a cap the registry answers RESOURCE_EXHAUSTED naming it, and
//! keeps serving everyone else; closed streams give their slots back.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{RegisterRequest, WatchRequest, WatchResponse};
use switchboard::registry::RegistryConfig;
use tonic::transport::Channel;
use tonic::Code;

/// A client on its own connection.
async fn connection(address: &str) -> RegistryClient<Channel> {
    registry_client(address, STARTUP).await
}

async fn open_watch(
    client: &mut RegistryClient<Channel>,
) -> Result<tonic::Streaming<WatchResponse>, tonic::Status> {
    let mut stream = client
        .watch(WatchRequest {
            service: SERVICE.into(),
        })
        .await?
        .into_inner();
    // The first message proves the stream is really open.
    stream.next().await.expect("a first message")?;
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_capped_per_connection_and_in_all() {
    let address = serve_registry(RegistryConfig {
        max_watch_streams: 5,
        max_watch_streams_per_connection: 3,
        ..RegistryConfig::default()
    })
    .await;
    let mut first = connection(&address).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            open_watch(&mut first)
                .await
                .expect("within the per-connection cap"),
        );
    }
    let status = open_watch(&mut first).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("watch streams per connection"),
        "{status:?}"
    );

    // Another connection is still served, up to the total cap.
    let mut second = connection(&address).await;
    held.push(open_watch(&mut second).await.expect("another connection"));
    held.push(open_watch(&mut second).await.expect("another connection"));
    let status = open_watch(&mut second).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("watch streams limit of 5"),
        "{status:?}"
    );

    // Closing streams gives their slots back.
    held.clear();
    wait_for("slots to come back", Duration::from_secs(10), || {
        let address = address.clone();
        async move {
            let mut client = connection(&address).await;
            open_watch(&mut client).await.ok().map(|_| ())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_capped_and_watchers_do_not_use_up_the_cap() {
    let address = serve_registry(RegistryConfig {
        max_services: 2,
        ..RegistryConfig::default()
    })
    .await;
    let mut client = connection(&address).await;
    // Watching many services holds no service slot.
    let mut watches = Vec::new();
    for i in 0..5 {
        let stream = client
            .watch(WatchRequest {
                service: format!("watched-{i}.example"),
            })
            .await
            .unwrap()
            .into_inner();
        watches.push(stream);
    }
    let register = |service: &str| RegisterRequest {
        service: service.into(),
        address: "127.0.0.1:4000".into(),
        ..RegisterRequest::default()
    };
    let a = client
        .register(register("a.example"))
        .await
        .expect("first service")
        .into_inner();
    client
        .register(register("b.example"))
        .await
        .expect("second service");
    let status = client.register(register("c.example")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("services limit of 2"),
        "{status:?}"
    );
    // More endpoints in a service that exists are not a new service.
    let a2 = client
        .register(RegisterRequest {
            address: "127.0.0.1:4001".into(),
            ..register("a.example")
        })
        .await
        .expect("a second endpoint of an existing service")
        .into_inner();
    // A service only gives its slot back once its last endpoint leaves.
    for (lease, still_full) in [(a.lease_id, true), (a2.lease_id, false)] {
        client
            .deregister(switchboard::proto::registry::DeregisterRequest { lease_id: lease })
            .await
            .unwrap();
        let outcome = client.register(register("c.example")).await;
        if still_full {
            assert_eq!(outcome.unwrap_err().code(), Code::ResourceExhausted);
        } else {
            outcome.expect("a.example emptied, so c.example fits");
        }
    }
    drop(watches);
}
