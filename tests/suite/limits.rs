//! Caps: past a cap the registry answers RESOURCE_EXHAUSTED naming it, and
//! keeps serving everyone else; closed streams give their slots back.

use std::time::Duration;

use crate::common::cases::expect_status;
use crate::common::*;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{RegisterRequest, WatchRequest};
use switchboard::registry::RegistryConfig;
use tonic::transport::Channel;
use tonic::Code;

/// A client on its own connection.
async fn connection(address: &str) -> RegistryClient<Channel> {
    registry_client(address, STARTUP).await
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
    expect_status(
        open_watch(&mut first).await,
        Code::ResourceExhausted,
        "watch streams per connection",
    );

    // Another connection is still served, up to the total cap.
    let mut second = connection(&address).await;
    held.push(open_watch(&mut second).await.expect("another connection"));
    held.push(open_watch(&mut second).await.expect("another connection"));
    expect_status(
        open_watch(&mut second).await,
        Code::ResourceExhausted,
        "watch streams limit of 5",
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
                ..Default::default()
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
    expect_status(
        client.register(register("c.example")).await,
        Code::ResourceExhausted,
        "services limit of 2",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_naming_the_cap_and_others_are_served() {
    let address = serve_registry(RegistryConfig {
        max_message_bytes: 2048,
        ..RegistryConfig::default()
    })
    .await;
    let mut client = connection(&address).await;
    let oversized = RegisterRequest {
        service: SERVICE.into(),
        address: "127.0.0.1:4000".into(),
        metadata: [("blob".to_owned(), "x".repeat(4000))].into(),
        ..RegisterRequest::default()
    };
    expect_status(
        client.register(oversized).await,
        Code::ResourceExhausted,
        "message size limit of 2048 bytes",
    );
    // Nothing was registered, and a streaming call meets the same cap.
    assert_eq!(resolve(&mut client, SERVICE).await, Some(vec![]));
    client
        .register(RegisterRequest {
            service: SERVICE.into(),
            address: "127.0.0.1:4000".into(),
            ..RegisterRequest::default()
        })
        .await
        .expect("a small request on the same connection");
    let huge_heartbeat = switchboard::proto::registry::KeepAliveRequest {
        lease_id: "0".repeat(5000),
    };
    let outcome = match client
        .keep_alive(tokio_stream::iter([huge_heartbeat]))
        .await
    {
        Ok(replies) => replies.into_inner().message().await.map(|_| ()),
        Err(status) => Err(status),
    };
    expect_status(outcome, Code::ResourceExhausted, "message size limit");
    // The refused stream bound nothing: the lease is untouched.
    assert_eq!(
        resolve(&mut client, SERVICE).await,
        Some(vec!["127.0.0.1:4000".to_owned()])
    );

    // Heartbeats sent before an oversized one are answered first.
    let lease = client
        .register(RegisterRequest {
            service: SERVICE.into(),
            address: "127.0.0.1:4001".into(),
            ..RegisterRequest::default()
        })
        .await
        .expect("register")
        .into_inner();
    let heartbeat = switchboard::proto::registry::KeepAliveRequest {
        lease_id: lease.lease_id.clone(),
    };
    let huge_heartbeat = switchboard::proto::registry::KeepAliveRequest {
        lease_id: "0".repeat(5000),
    };
    let mut replies = client
        .keep_alive(tokio_stream::iter([heartbeat, huge_heartbeat]))
        .await
        .expect("the stream opens")
        .into_inner();
    let answered = replies
        .message()
        .await
        .expect("the first heartbeat is answered")
        .expect("a reply");
    assert_eq!(answered.lease_id, lease.lease_id);
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_per_second_are_capped_per_connection() {
    let address = serve_registry(RegistryConfig {
        max_registrations_per_second: std::num::NonZeroU32::new(20),
        ..RegistryConfig::default()
    })
    .await;
    let register = |i: usize| RegisterRequest {
        service: SERVICE.into(),
        address: format!("127.0.0.1:{}", 4000 + i),
        ..RegisterRequest::default()
    };
    let mut flooder = connection(&address).await;
    // All at once on the one connection: the burst is spent long before a
    // refill could admit them all, however slow the machine.
    let outcomes: Vec<Result<(), tonic::Status>> =
        futures_util::future::join_all((0..100).map(|i| {
            let mut client = flooder.clone();
            async move { client.register(register(i)).await.map(|_| ()) }
        }))
        .await;
    let refused: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    // A burst of one second's worth passes (plus what refills meanwhile);
    // past it, every refusal names the cap.
    let admitted = outcomes.len() - refused.len();
    assert!((20..100).contains(&admitted), "{admitted} admitted");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("registrations per second per connection limit of 20"),
            "{status:?}"
        );
    }
    let mut registered = resolve(&mut flooder, SERVICE).await.unwrap();
    assert_eq!(
        registered.len(),
        admitted,
        "refused calls registered nothing"
    );

    // Another connection has its own budget, and the flooder's refills.
    let mut other = connection(&address).await;
    other
        .register(register(1000))
        .await
        .expect("another connection is served");
    wait_for("the flooder's budget to refill", STARTUP, || {
        let mut flooder = flooder.clone();
        async move { flooder.register(register(2000)).await.ok() }
    })
    .await;
    registered = resolve(&mut other, SERVICE).await.unwrap();
    assert_eq!(registered.len(), admitted + 2);
}
