//! How leases end: a broken KeepAlive stream, a TTL that runs out, a takeover; each removal asserted by its cause.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_keepalive_connection_removes_the_endpoint_from_every_watcher() {
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let admin = registry.client().await;
    let mut watchers = Vec::new();
    for _ in 0..3 {
        // Each watcher on its own connection.
        let client = registry.client().await;
        watchers.push(Watcher::start(&client, SERVICE).await);
    }

    // The backend reaches the registry through a relay the test can cut.
    let relay = Relay::start(&registry.addr).await;
    let mut backend = registry_client(&relay.addr, STARTUP).await;
    // The TTL is the longest allowed, so only the stream break can remove it.
    let lease = register(&mut backend, request(SERVICE, &addr(1))).await;
    let survivor = register(&mut registry.client().await, request(SERVICE, &addr(2))).await;
    let mut keepalive = KeepAlive::open(&backend).await;
    keepalive
        .beat(&lease.lease_id)
        .await
        .expect("first heartbeat");
    for watcher in &mut watchers {
        watcher.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;
    }

    relay.cut();
    for (i, watcher) in watchers.iter_mut().enumerate() {
        watcher
            .wait_until("removal after the cut", GENEROUS, |v| {
                !v.endpoints.contains_key(&addr(1))
            })
            .await;
        let view = watcher.view.borrow();
        assert_eq!(view.addresses(), vec![addr(2)], "watcher {i}");
        view.assert_clean(&format!("watcher {i}"));
    }
    assert_removed_by(&metrics, 1, 0);
    // The lease went with the stream.
    let mut admin = admin;
    let status = drain(&mut admin, &lease.lease_id)
        .await
        .expect_err("the lease ended with its stream");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    drop((keepalive, survivor));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_task_that_dies_takes_its_endpoint_out_with_its_stream() {
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let admin = registry.client().await;
    let mut watchers = Vec::new();
    for _ in 0..2 {
        let client = registry.client().await;
        watchers.push(Watcher::start(&client, SERVICE).await);
    }

    // The backend owns its channel, its lease and its KeepAlive stream; the
    // test aborts it, dropping all of them at once.
    let registry_addr = registry.addr.clone();
    let (ready, is_ready) = oneshot::channel();
    let backend = tokio::spawn(async move {
        let mut client = registry_client(&registry_addr, STARTUP).await;
        let lease = register(&mut client, request(SERVICE, &addr(1))).await;
        let mut keepalive = KeepAlive::open(&client).await;
        keepalive.beat(&lease.lease_id).await.expect("heartbeat");
        let _ = ready.send(());
        let _held = (client, keepalive);
        std::future::pending::<()>().await;
    });
    tokio::time::timeout(STARTUP, is_ready)
        .await
        .expect("backend registers in time")
        .expect("backend registers");
    for watcher in &mut watchers {
        watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    }

    backend.abort();
    for (i, watcher) in watchers.iter_mut().enumerate() {
        watcher.wait_for_set(&[], GENEROUS).await;
        watcher.view.borrow().assert_clean(&format!("watcher {i}"));
    }
    assert_removed_by(&metrics, 1, 0);
    assert_eq!(list_services(&mut admin.clone()).await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_moved_to_a_new_stream_survives_the_old_stream_closing() {
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    // A second lease stays on the old stream: its removal shows when the
    // registry has processed the old stream's end.
    let witness = register(&mut client, request(SERVICE, &addr(3))).await;
    let mut old = KeepAlive::open(&client).await;
    old.beat(&lease.lease_id).await.expect("heartbeat on old");
    old.beat(&witness.lease_id)
        .await
        .expect("witness heartbeat");
    // A reconnecting backend heartbeats on a new stream, then the old one
    // goes away: the lease now belongs to the new stream.
    let mut new = KeepAlive::open(&client).await;
    new.beat(&lease.lease_id).await.expect("heartbeat on new");
    drop(old);
    watcher
        .wait_until("the old stream's end", GENEROUS, |v| {
            v.removed_at.contains_key(&addr(3))
        })
        .await;
    // One more change, so a removal published by the same stream end would
    // have arrived before it.
    register(&mut client, request(SERVICE, &addr(2))).await;
    watcher.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;
    new.beat(&lease.lease_id)
        .await
        .expect("the lease is still alive after the old stream closed");
    assert!(
        !watcher.view.borrow().removed_at.contains_key(&addr(1)),
        "closing a stream the lease had left removed it: {}",
        watcher.view.borrow().summary()
    );

    // Closing the stream it is bound to does end it.
    drop(new);
    watcher.wait_for_set(&[addr(2)], GENEROUS).await;
    watcher.view.borrow().assert_clean("watcher");
    // The witness and then the lease, each with its stream.
    assert_removed_by(&metrics, 2, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_heartbeats_end_the_lease_at_its_ttl_not_before() {
    const TTL: Duration = Duration::from_secs(2);
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let registered = Instant::now();
    let lease = register(
        &mut client,
        RegisterRequest {
            ttl_ms: TTL.as_millis() as u64,
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    assert_eq!(lease.ttl_ms, TTL.as_millis() as u64);
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;

    // Heartbeat for a while (longer than the TTL in total), then stop while
    // keeping the stream, and its connection, open.
    let mut keepalive = KeepAlive::open(&client).await;
    let mut last_beat = registered;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        last_beat = Instant::now();
        let reply = keepalive.beat(&lease.lease_id).await.expect("heartbeat");
        assert_eq!(reply.lease_id, lease.lease_id);
        assert_eq!(reply.ttl_ms, TTL.as_millis() as u64);
    }

    watcher
        .wait_until("expiry", TTL + GENEROUS, |v| {
            v.removed_at.contains_key(&addr(1))
        })
        .await;
    let removed = watcher.view.borrow().removed_at[&addr(1)];
    let after_last_beat = removed.saturating_duration_since(last_beat);
    let after_register = removed.saturating_duration_since(registered);
    eprintln!(
        "TTL {TTL:?}: removed {after_last_beat:?} after the last heartbeat was sent \
         (error {:+} ms), {after_register:?} after registering",
        after_last_beat.as_millis() as i128 - TTL.as_millis() as i128
    );
    assert!(
        after_last_beat >= TTL - Duration::from_millis(100),
        "removed {after_last_beat:?} after the last heartbeat, before the {TTL:?} TTL"
    );
    // Ended by its TTL, with its stream still open.
    assert_removed_by(&metrics, 0, 1);
    assert!(
        after_register > TTL + Duration::from_secs(1),
        "heartbeats did not extend the lease: removed {after_register:?} after registering"
    );
    // The stream is still open, but the lease is gone.
    let status = keepalive
        .beat(&lease.lease_id)
        .await
        .expect_err("an expired lease cannot be refreshed");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    watcher.view.borrow().assert_clean("watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_heartbeated_ends_at_its_ttl() {
    const TTL: Duration = Duration::from_secs(1);
    let (config, metrics) = counted();
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let sent = Instant::now();
    register(
        &mut client,
        RegisterRequest {
            ttl_ms: TTL.as_millis() as u64,
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    watcher
        .wait_until("expiry", TTL + GENEROUS, |v| {
            v.removed_at.contains_key(&addr(1))
        })
        .await;
    let lived = watcher.view.borrow().removed_at[&addr(1)].saturating_duration_since(sent);
    eprintln!("TTL {TTL:?} without heartbeats: removed {lived:?} after registering");
    assert!(
        lived >= TTL - Duration::from_millis(100),
        "removed after {lived:?}"
    );
    assert_removed_by(&metrics, 0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_can_act() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    let before = resolve_full(&mut client, SERVICE).await;

    // A second client, on its own connection, guesses: random ids, and the
    // real id with one hex digit changed (a leaked prefix does not help).
    let mut guesser = registry.client().await;
    let near_misses = (0..lease.lease_id.len()).map(|at| {
        let mut id = lease.lease_id.clone().into_bytes();
        id[at] = if id[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(id).expect("hex")
    });
    let guesses: Vec<String> = (0..200)
        .map(|_| random_lease_id())
        .chain(near_misses)
        .filter(|id| *id != lease.lease_id)
        .collect();
    for (i, stranger) in guesses.iter().enumerate() {
        let drained = drain(&mut guesser, stranger).await;
        let deregistered = deregister(&mut guesser, stranger).await;
        let mut attempts = vec![("Drain", drained), ("Deregister", deregistered)];
        if i % 8 == 0 {
            // A KeepAlive stream per guess is slower; a sample suffices.
            attempts.push((
                "KeepAlive",
                keep_alive_once(&guesser, stranger).await.map(drop),
            ));
        }
        for (rpc, result) in attempts {
            let status = result.expect_err(&format!("{rpc} with a guessed lease id succeeded"));
            assert_eq!(status.code(), Code::NotFound, "{rpc}: {status:?}");
            assert!(
                status.message().contains(stranger.as_str()),
                "{rpc}: the message should name the lease: {status:?}"
            );
        }
    }
    assert_eq!(
        resolve_full(&mut client, SERVICE).await,
        before,
        "a guesser changed the endpoint"
    );
    // The holder still can.
    drain(&mut client, &lease.lease_id)
        .await
        .expect("holder drains");
    watcher
        .wait_until("DRAINING", GENEROUS, |v| {
            v.state_of(&addr(1)) == Some(EndpointState::Draining)
        })
        .await;
    let view = watcher.view.borrow();
    assert_eq!(
        view.messages,
        3,
        "reset, added, drained: {}",
        view.summary()
    );
    view.assert_clean("watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registering_an_address_takes_it_over_and_the_old_lease_is_gone() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    let meta = |version: &str| HashMap::from([("version".to_owned(), version.to_owned())]);
    let old = register(
        &mut client,
        RegisterRequest {
            metadata: meta("1"),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    // A second lease on the old stream shows when the stream has ended.
    let witness = register(&mut client, request(SERVICE, &addr(5))).await;
    let mut old_stream = KeepAlive::open(&client).await;
    old_stream
        .beat(&old.lease_id)
        .await
        .expect("old lease heartbeat");
    old_stream
        .beat(&witness.lease_id)
        .await
        .expect("witness heartbeat");
    drain(&mut client, &old.lease_id).await.expect("drain old");
    watcher
        .wait_until("DRAINING", GENEROUS, |v| {
            v.state_of(&addr(1)) == Some(EndpointState::Draining)
        })
        .await;

    // A restarted backend registers the same address again.
    let new = register(
        &mut client,
        RegisterRequest {
            metadata: meta("2"),
            ..request(SERVICE, &addr(1))
        },
    )
    .await;
    assert_ne!(new.lease_id, old.lease_id);
    watcher
        .wait_until("the new registration", GENEROUS, |v| {
            v.endpoints
                .get(&addr(1))
                .is_some_and(|e| e.metadata == meta("2"))
        })
        .await;
    {
        let view = watcher.view.borrow();
        let (_, last) = view.log.last().unwrap();
        let Some(Event::Delta(delta)) = &last.event else {
            panic!("takeover arrived as {last:?}");
        };
        assert!(
            delta.added.is_empty() && delta.removed.is_empty() && delta.updated.len() == 1,
            "a takeover is one update, not a removal and an addition: {delta:?}"
        );
        assert_eq!(
            delta.updated[0].state(),
            EndpointState::Serving,
            "the new registration serves"
        );
    }

    // The old lease id is dead for every RPC, and using it changes nothing.
    let status = old_stream
        .beat(&old.lease_id)
        .await
        .expect_err("old lease refreshed");
    assert_eq!(status.code(), Code::NotFound, "KeepAlive: {status:?}");
    let status = drain(&mut client, &old.lease_id)
        .await
        .expect_err("old lease drained");
    assert_eq!(status.code(), Code::NotFound, "Drain: {status:?}");
    let status = deregister(&mut client, &old.lease_id)
        .await
        .expect_err("old lease deregistered");
    assert_eq!(status.code(), Code::NotFound, "Deregister: {status:?}");
    // The old stream has ended with that error, ending the leases it still
    // carried (the witness); its end must not take the address from the new
    // lease.
    drop(old_stream);
    watcher
        .wait_until("the old stream's end", GENEROUS, |v| {
            v.removed_at.contains_key(&addr(5))
        })
        .await;
    let resolved = resolve_full(&mut client, SERVICE).await;
    assert_eq!(resolved.endpoints.len(), 1, "{resolved:?}");
    assert_eq!(resolved.endpoints[0].metadata, meta("2"));
    assert_eq!(resolved.endpoints[0].state(), EndpointState::Serving);

    // The new lease holds it: its deregistration is the only removal.
    let deregistered = Instant::now();
    deregister(&mut client, &new.lease_id)
        .await
        .expect("new lease deregisters");
    watcher.wait_for_set(&[], GENEROUS).await;
    let view = watcher.view.borrow();
    let removals = view
        .log
        .iter()
        .filter(|(_, m)| matches!(&m.event, Some(Event::Delta(d)) if d.removed.contains(&addr(1))))
        .collect::<Vec<_>>();
    assert_eq!(removals.len(), 1, "{}", view.summary());
    assert!(
        removals[0].0 >= deregistered,
        "removed before the new lease deregistered"
    );
    view.assert_clean("watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_service_still_accepts_a_takeover() {
    let config = RegistryConfig {
        max_endpoints_per_service: 3,
        ..config()
    };
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;
    for i in 0..3 {
        register(&mut client, request(SERVICE, &addr(i))).await;
    }
    let taken = register(&mut client, request(SERVICE, &addr(0))).await;
    assert_eq!(
        resolve(&mut client, SERVICE).await,
        Some(vec![addr(0), addr(1), addr(2)])
    );
    deregister(&mut client, &taken.lease_id)
        .await
        .expect("deregister");
    // Room again for a new address.
    register(&mut client, request(SERVICE, &addr(3))).await;
}
