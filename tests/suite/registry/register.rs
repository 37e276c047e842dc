//! Registration, watch, drain and deregister over real gRPC.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_gets_an_empty_reset_then_sees_register_and_deregister() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher
        .wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    {
        let view = watcher.view.borrow();
        let (_, first) = &view.log[0];
        assert_eq!(
            first.event,
            Some(Event::Reset(Default::default())),
            "an unknown service must start with an explicit empty reset, got {first:?}"
        );
    }

    let mut metadata = HashMap::new();
    metadata.insert("zone".to_owned(), "a".to_owned());
    let lease = register(
        &mut client,
        RegisterRequest {
            metadata: metadata.clone(),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    assert_eq!(lease.lease_id.len(), 32, "lease id {:?}", lease.lease_id);
    assert!(lease.lease_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(lease.ttl_ms, LONG_TTL_MS);

    watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    {
        let view = watcher.view.borrow();
        let (_, second) = &view.log[1];
        let Some(Event::Delta(delta)) = &second.event else {
            panic!("registration arrived as {second:?}, not a delta");
        };
        assert_eq!(delta.added.len(), 1, "{delta:?}");
        assert!(
            delta.updated.is_empty() && delta.removed.is_empty(),
            "{delta:?}"
        );
        assert_eq!(delta.added[0].metadata, metadata);
        assert_eq!(delta.added[0].state(), EndpointState::Serving);
    }

    // A watcher that arrives later gets the endpoint in its first reset.
    let mut late = Watcher::start(&client, SERVICE).await;
    late.wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    {
        let view = late.view.borrow();
        let Some(Event::Reset(snapshot)) = &view.log[0].1.event else {
            panic!("first message {:?} is not a reset", view.log[0].1);
        };
        assert_eq!(snapshot.endpoints.len(), 1, "{snapshot:?}");
        assert_eq!(snapshot.endpoints[0].address, addr(1));
        assert_eq!(snapshot.endpoints[0].metadata, metadata);
    }

    deregister(&mut client, &lease.lease_id)
        .await
        .expect("deregister");
    watcher.wait_for_set(&[], GENEROUS).await;
    late.wait_for_set(&[], GENEROUS).await;
    {
        let view = watcher.view.borrow();
        let (_, last) = view.log.last().unwrap();
        let Some(Event::Delta(delta)) = &last.event else {
            panic!("deregistration arrived as {last:?}, not a delta");
        };
        assert_eq!(delta.removed, vec![addr(1)], "{delta:?}");
        assert!(delta.added.is_empty() && delta.updated.is_empty());
    }
    let status = deregister(&mut client, &lease.lease_id)
        .await
        .expect_err("a deregistered lease is gone");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(resolve(&mut client, SERVICE).await, Some(vec![]));
    watcher.view.borrow().assert_clean("watcher");
    late.view.borrow().assert_clean("late watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_after_watch_returns_arrives_as_a_delta() {
    // Once Watch has answered, its snapshot is taken: a registration made
    // right after it must come as a delta, never folded into the first
    // reset. Many rounds at once keep the registry busy, which is when a
    // lazily taken snapshot would slip past the registration.
    const ROUNDS: usize = 200;
    let registry = Registry::start(config()).await;
    let client = registry.client().await;
    let mut rounds = tokio::task::JoinSet::new();
    for round in 0..ROUNDS {
        let mut client = client.clone();
        rounds.spawn(async move {
            let service = format!("round-{round}.example");
            let mut stream = client
                .watch(WatchRequest {
                    service: service.clone(),
                    ..Default::default()
                })
                .await
                .expect("watch")
                .into_inner();
            register(&mut client, request(&service, &addr(1))).await;
            let first = tokio::time::timeout(GENEROUS, stream.message())
                .await
                .expect("first message in time")
                .expect("watch stream")
                .expect("a first message");
            match first.event {
                Some(Event::Reset(snapshot)) if snapshot.endpoints.is_empty() => None,
                other => Some((round, other)),
            }
        });
    }
    let mut folded = Vec::new();
    while let Some(round) = rounds.join_next().await {
        folded.extend(round.expect("round task"));
    }
    assert!(
        folded.is_empty(),
        "{} of {ROUNDS} watches folded a later registration into their first reset, e.g. {:?}",
        folded.len(),
        folded.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_an_updated_delta_with_state_draining() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let mut metadata = HashMap::new();
    metadata.insert("weight".to_owned(), "3".to_owned());
    let lease = register(
        &mut client,
        RegisterRequest {
            metadata: metadata.clone(),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    let other = register(&mut client, request(SERVICE, &addr(2))).await;
    watcher.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;

    drain(&mut client, &lease.lease_id).await.expect("drain");
    watcher
        .wait_until("DRAINING", GENEROUS, |v| {
            v.state_of(&addr(1)) == Some(EndpointState::Draining)
        })
        .await;
    {
        let view = watcher.view.borrow();
        let (_, last) = view.log.last().unwrap();
        let Some(Event::Delta(delta)) = &last.event else {
            panic!("drain arrived as {last:?}, not a delta");
        };
        assert!(
            delta.added.is_empty() && delta.removed.is_empty(),
            "{delta:?}"
        );
        assert_eq!(delta.updated.len(), 1, "{delta:?}");
        let updated = &delta.updated[0];
        assert_eq!(updated.address, addr(1));
        assert_eq!(updated.state(), EndpointState::Draining);
        assert_eq!(updated.metadata, metadata, "drain must keep the metadata");
        assert_eq!(
            view.state_of(&addr(2)),
            Some(EndpointState::Serving),
            "draining one endpoint touched another"
        );
    }
    // A draining endpoint stays listed.
    let resolved = resolve_full(&mut client, SERVICE).await;
    let states: BTreeMap<String, EndpointState> = resolved
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.state()))
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([
            (addr(1), EndpointState::Draining),
            (addr(2), EndpointState::Serving)
        ])
    );

    // Draining twice is accepted and changes nothing.
    let messages = watcher.view.borrow().messages;
    drain(&mut client, &lease.lease_id)
        .await
        .expect("second drain");
    assert_eq!(resolve_full(&mut client, SERVICE).await, resolved);

    // The lease still works: deregistering removes the draining endpoint.
    deregister(&mut client, &lease.lease_id)
        .await
        .expect("deregister a draining endpoint");
    watcher.wait_for_set(&[addr(2)], GENEROUS).await;
    let view = watcher.view.borrow();
    assert_eq!(
        view.messages,
        messages + 1,
        "the second drain must not send a delta: {}",
        view.summary()
    );
    view.assert_clean("watcher");
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_services_lists_only_services_with_endpoints() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    assert_eq!(list_services(&mut client).await, vec![]);

    // A service that is only watched has no endpoints and is not listed.
    let mut watched = Watcher::start(&client, "c.watched.only").await;
    watched
        .wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    let b = register(&mut client, request("b.example", &addr(1))).await;
    register(&mut client, request("a.example", &addr(1))).await;
    register(&mut client, request("a.example", &addr(2))).await;
    let summary = |service: &str, endpoints: u32| ServiceSummary {
        service: service.into(),
        endpoints,
    };
    assert_eq!(
        list_services(&mut client).await,
        vec![summary("a.example", 2), summary("b.example", 1)],
        "sorted by name, with endpoint counts"
    );

    deregister(&mut client, &b.lease_id)
        .await
        .expect("deregister");
    assert_eq!(
        list_services(&mut client).await,
        vec![summary("a.example", 2)],
        "a service whose last endpoint left is no longer listed"
    );
}
