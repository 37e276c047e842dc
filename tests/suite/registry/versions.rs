//! Versions and epochs: what a watcher can tell about the registry it follows.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_increase_with_every_message_and_the_epoch_is_one_per_instance() {
    let registry = Registry::start(config()).await;
    let mut client = registry.client().await;
    let mut early = Watcher::start(&client, SERVICE).await;
    let mut other_service = Watcher::start(&client, "other.example").await;
    let mut leases = Vec::new();
    for i in 0..10 {
        leases.push(register(&mut client, request(SERVICE, &addr(i))).await);
    }
    // A change elsewhere must not disturb this service's sequence.
    register(&mut client, request("other.example", &addr(0))).await;
    let mut late = Watcher::start(&client, SERVICE).await;
    for lease in &leases[..3] {
        drain(&mut client, &lease.lease_id).await.expect("drain");
    }
    for lease in &leases[3..7] {
        deregister(&mut client, &lease.lease_id)
            .await
            .expect("deregister");
    }
    for i in [0, 1] {
        let mut req = request(SERVICE, &addr(i));
        req.metadata.insert("generation".into(), "2".into());
        register(&mut client, req).await;
    }
    let changes = 10 + 3 + 4 + 2;

    let resolved = resolve_full(&mut client, SERVICE).await;
    let expected = addresses_of(&resolved);
    assert_eq!(expected.len(), 6);
    for (who, watcher) in [("early", &mut early), ("late", &mut late)] {
        watcher
            .wait_until("the resolved version", GENEROUS, |v| {
                v.version == Some(resolved.version)
            })
            .await;
        let view = watcher.view.borrow();
        view.assert_clean(who);
        assert_eq!(view.addresses(), expected, "{who}");
        assert_eq!(view.epoch, Some(resolved.epoch), "{who}");
        assert_eq!(view.resets, 1, "{who}: {}", view.summary());
    }
    {
        let early = early.view.borrow();
        assert_eq!(
            early.messages,
            1 + changes,
            "one reset and one delta per change: {}",
            early.summary()
        );
        // Both watchers see the same versioned deltas after the late one's
        // reset.
        let late = late.view.borrow();
        let late_reset = late.log[0].1.version;
        let tail = |view: &View| -> Vec<WatchResponse> {
            view.log
                .iter()
                .map(|(_, m)| m.clone())
                .filter(|m| m.version > late_reset && matches!(m.event, Some(Event::Delta(_))))
                .collect()
        };
        assert_eq!(tail(&early), tail(&late));
        assert_eq!(late.messages, 1 + tail(&late).len());
    }
    // One epoch everywhere in this instance.
    other_service
        .wait_until("the other service's registration", GENEROUS, |v| {
            v.endpoints.len() == 1
        })
        .await;
    assert_eq!(other_service.view.borrow().epoch, Some(resolved.epoch));
    assert_eq!(leases[0].epoch, resolved.epoch);
    assert_ne!(resolved.epoch, 0);
    let other = resolve_full(&mut client, "other.example").await;
    assert_eq!(other.epoch, resolved.epoch);
    other_service.view.borrow().assert_clean("other watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_registry_holds_back_first_snapshots_until_its_warm_up_ends() {
    const WARMUP: Duration = Duration::from_millis(1500);
    let started = Instant::now();
    let registry = Registry::start(RegistryConfig {
        warmup: WARMUP,
        ..config()
    })
    .await;
    let mut client = registry.client().await;
    let mut early = Watcher::start(&client, SERVICE).await;
    // Backends re-register during the warm-up; Register and Resolve are
    // not held back.
    register(&mut client, request(SERVICE, &addr(1))).await;
    register(&mut client, request(SERVICE, &addr(2))).await;
    assert_eq!(
        resolve(&mut client, SERVICE).await,
        Some(vec![addr(1), addr(2)])
    );
    early
        .wait_until("first message", GENEROUS, |v| v.messages >= 1)
        .await;
    {
        let view = early.view.borrow();
        let (first_at, first) = &view.log[0];
        let held = first_at.saturating_duration_since(started);
        eprintln!("warm-up {WARMUP:?}: first snapshot sent {held:?} after the start");
        assert!(
            held >= WARMUP - Duration::from_millis(50),
            "the first snapshot came {held:?} after the start, inside the {WARMUP:?} warm-up"
        );
        let Some(Event::Reset(snapshot)) = &first.event else {
            panic!("first message {first:?} is not a reset");
        };
        let addresses: Vec<&str> = snapshot
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(
            addresses,
            vec![addr(1), addr(2)],
            "the held-back snapshot holds what registered meanwhile"
        );
    }
    // Once warm, a Watch is answered at once and changes flow as deltas.
    let asked = Instant::now();
    let mut late = Watcher::start(&client, SERVICE).await;
    late.wait_for_set(&[addr(1), addr(2)], GENEROUS).await;
    eprintln!(
        "after the warm-up a new watcher got its snapshot in {:?}",
        late.view.borrow().log[0].0.saturating_duration_since(asked)
    );
    register(&mut client, request(SERVICE, &addr(3))).await;
    early
        .wait_for_set(&[addr(1), addr(2), addr(3)], GENEROUS)
        .await;
    let view = early.view.borrow();
    assert_eq!(view.resets, 1, "{}", view.summary());
    view.assert_clean("early watcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_registry_reports_a_new_epoch() {
    let port = free_port().expect("free port");
    let target = local(port);
    let mut first = start_registry(port).await;
    let mut client = registry_client(&target, STARTUP).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    let before = resolve_full(&mut client, SERVICE).await;
    assert_eq!(lease.epoch, before.epoch);
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;
    assert_eq!(watcher.view.borrow().epoch, Some(before.epoch));

    first.kill();
    watcher
        .wait_until("end of the stream", GENEROUS, |v| v.ended.is_some())
        .await;

    let _second = start_registry(port).await;
    let mut client = registry_client(&target, STARTUP).await;
    let after = resolve_full(&mut client, SERVICE).await;
    assert_ne!(
        after.epoch, before.epoch,
        "a restarted registry kept its epoch"
    );
    assert!(
        after.endpoints.is_empty(),
        "registrations survived: {after:?}"
    );
    let status = drain(&mut client, &lease.lease_id)
        .await
        .expect_err("a lease from the old instance worked");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher
        .wait_until("first message", STARTUP, |v| v.messages >= 1)
        .await;
    assert_eq!(watcher.view.borrow().epoch, Some(after.epoch));
}
