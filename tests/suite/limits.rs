//! Caps: past a cap the registry answers RESOURCE_EXHAUSTED naming it, and
//! keeps serving everyone else; closed streams give their slots back. Each
//! refusal is counted once under its cap's label, the series dashboards
//! read (`switchboard_registry_refusals_total{reason="cap",cap=...}`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::cases::expect_status;
use crate::common::*;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{RegisterRequest, WatchRequest};
use switchboard::registry::xds::resources::ENDPOINTS;
use switchboard::registry::xds::stream::MAX_NAMES_PER_STREAM;
use switchboard::registry::{RegistryConfig, RegistryMetrics};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Code;

/// A client on its own connection.
async fn connection(address: &str) -> RegistryClient<Channel> {
    registry_client(address, STARTUP).await
}

/// Serves a registry with `config`; returns its address and the metrics it
/// counts into.
async fn serve_counted(config: RegistryConfig) -> (String, RegistryMetrics) {
    let metrics = RegistryMetrics::default();
    let address = serve_registry(RegistryConfig {
        metrics: metrics.clone(),
        ..config
    })
    .await;
    (address, metrics)
}

/// Refusals by cap as rendered: label to count.
fn cap_refusals(metrics: &RegistryMetrics) -> BTreeMap<String, f64> {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let prefix = "switchboard_registry_refusals_total{reason=\"cap\",cap=\"";
    switchboard::metrics::render(&registry)
        .lines()
        .filter_map(|line| {
            let (label, count) = line.strip_prefix(prefix)?.split_once("\"} ")?;
            Some((label.to_owned(), count.parse().ok()?))
        })
        .collect()
}

/// Waits until the refusals by cap are `expected` and no others: a call is
/// counted when it ends on the server, a little after its client heard.
async fn expect_cap_refusals(metrics: &RegistryMetrics, expected: &[(&str, f64)]) {
    let expected: BTreeMap<String, f64> = expected
        .iter()
        .map(|(label, count)| (label.to_string(), *count))
        .collect();
    let deadline = Instant::now() + STARTUP;
    loop {
        let seen = cap_refusals(metrics);
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "refusals by cap: {seen:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_capped_per_connection_and_in_all() {
    let (address, metrics) = serve_counted(RegistryConfig {
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
    expect_cap_refusals(
        &metrics,
        &[
            ("watch streams per connection", 1.0),
            ("watch streams", 1.0),
        ],
    )
    .await;

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
    let (address, metrics) = serve_counted(RegistryConfig {
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
    expect_cap_refusals(&metrics, &[("services", 2.0)]).await;
    drop(watches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_per_service_are_capped_and_a_takeover_is_not_a_new_one() {
    let (address, metrics) = serve_counted(RegistryConfig {
        max_endpoints_per_service: 1,
        ..RegistryConfig::default()
    })
    .await;
    let mut client = connection(&address).await;
    let register = |address: &str| RegisterRequest {
        service: SERVICE.into(),
        address: address.into(),
        ..RegisterRequest::default()
    };
    client
        .register(register("127.0.0.1:4000"))
        .await
        .expect("the first endpoint");
    let status = expect_status(
        client.register(register("127.0.0.1:4001")).await,
        Code::ResourceExhausted,
        "",
    );
    assert_eq!(
        status.message(),
        format!("endpoints per service ({SERVICE}) limit of 1 reached")
    );
    client
        .register(register("127.0.0.1:4000"))
        .await
        .expect("taking the address over adds no endpoint");
    expect_cap_refusals(&metrics, &[("endpoints per service", 1.0)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_naming_the_cap_and_others_are_served() {
    let (address, metrics) = serve_counted(RegistryConfig {
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

    // A server-streaming call's request is read before its handler runs.
    expect_status(
        client
            .watch(WatchRequest {
                service: "x".repeat(4000),
                ..Default::default()
            })
            .await,
        Code::ResourceExhausted,
        "message size limit of 2048 bytes",
    );
    // Unary, two KeepAlive streams and a Watch.
    expect_cap_refusals(&metrics, &[("message size", 4.0)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_per_second_are_capped_per_connection() {
    let (address, metrics) = serve_counted(RegistryConfig {
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
    expect_cap_refusals(
        &metrics,
        &[(
            "registrations per second per connection",
            refused.len() as f64,
        )],
    )
    .await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ads_stream_naming_too_many_services_is_ended_and_counted() {
    let (address, metrics) = serve_counted(RegistryConfig::default()).await;
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let names: Vec<String> = (0..=MAX_NAMES_PER_STREAM)
        .map(|i| format!("s{i}.example"))
        .collect();
    let subscribe = DiscoveryRequest {
        resource_names: names,
        type_url: ENDPOINTS.into(),
        ..Default::default()
    };
    // The request stream stays open: the registry ends the call, not the
    // client.
    let (requests, outbound) = tokio::sync::mpsc::channel(1);
    requests.send(subscribe).await.unwrap();
    let outcome = match AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
    {
        Ok(responses) => responses.into_inner().message().await,
        Err(status) => Err(status),
    };
    let status = expect_status(outcome, Code::ResourceExhausted, "");
    assert_eq!(
        status.message(),
        format!(
            "an ADS stream may name at most {MAX_NAMES_PER_STREAM} services; open another stream"
        )
    );
    // The label it was counted under before caps were typed.
    expect_cap_refusals(&metrics, &[("other", 1.0)]).await;
    drop(requests);
}
