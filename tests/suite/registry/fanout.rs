//! Fan-out: many watchers, many changes, slow watchers.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_watchers_converge_after_a_burst_of_registrations_and_removals() {
    const CHANNELS: usize = 4;
    const WATCHERS: usize = 200;
    const REGISTRATIONS: usize = 500;
    let registry = Registry::start(config()).await;
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        clients.push(registry.client().await);
    }
    let mut watchers = Vec::new();
    for i in 0..WATCHERS {
        watchers.push(Watcher::start(&clients[i % CHANNELS], SERVICE).await);
    }
    for watcher in &mut watchers {
        watcher
            .wait_until("first message", GENEROUS, |v| v.messages >= 1)
            .await;
    }

    // 500 concurrent registrations; two in five are deregistered as soon as
    // they are granted, concurrently with the rest.
    let removed = |i: usize| i % 5 < 2;
    let started = Instant::now();
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..REGISTRATIONS {
        let mut client = clients[i % CHANNELS].clone();
        burst.spawn(async move {
            let lease = register(&mut client, request(SERVICE, &addr(i))).await;
            if removed(i) {
                deregister(&mut client, &lease.lease_id)
                    .await
                    .expect("deregister");
            }
        });
    }
    while let Some(done) = burst.join_next().await {
        done.expect("burst task");
    }
    let burst_took = started.elapsed();

    let resolved = resolve_full(&mut clients[0], SERVICE).await;
    let mut expected: Vec<String> = (0..REGISTRATIONS)
        .filter(|&i| !removed(i))
        .map(addr)
        .collect();
    expected.sort();
    assert_eq!(addresses_of(&resolved), expected, "resolve after the burst");

    for (i, watcher) in watchers.iter_mut().enumerate() {
        watcher
            .wait_until(
                &format!("watcher {i} to converge"),
                Duration::from_secs(60),
                |v| v.version == Some(resolved.version),
            )
            .await;
        let view = watcher.view.borrow();
        view.assert_clean(&format!("watcher {i}"));
        assert_eq!(view.addresses(), expected, "watcher {i}");
        assert_eq!(
            view.endpoints.values().cloned().collect::<Vec<_>>(),
            {
                let mut endpoints = resolved.endpoints.clone();
                endpoints.sort_by(|a, b| a.address.cmp(&b.address));
                endpoints
            },
            "watcher {i} endpoints differ from Resolve"
        );
    }
    let converged = started.elapsed();
    let resets: usize = watchers.iter().map(|w| w.view.borrow().resets).sum();
    eprintln!(
        "{WATCHERS} watchers: burst of {REGISTRATIONS} registrations + {} removals took \
         {burst_took:?}; all watchers converged {converged:?} after the burst started \
         ({} resets in all)",
        (0..REGISTRATIONS).filter(|&i| removed(i)).count(),
        resets
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_blocks_nobody_and_then_gets_a_current_reset() {
    const REGISTRATIONS: usize = 200;
    let config = RegistryConfig {
        watch_buffer: 4,
        ..config()
    };
    let registry = Registry::start(config).await;
    let mut client = registry.client().await;

    // The slow watcher's connection offers a tiny HTTP/2 window, so the
    // registry cannot park its backlog in socket and HTTP/2 buffers: what it
    // does not read piles up in the registry.
    let slow_channel = tonic::transport::Endpoint::from_shared(format!("http://{}", registry.addr))
        .expect("uri")
        .initial_stream_window_size(1024)
        .connect()
        .await
        .expect("slow watcher connects");
    let mut slow = RegistryClient::new(slow_channel)
        .watch(WatchRequest {
            service: SERVICE.into(),
            ..Default::default()
        })
        .await
        .expect("slow watch")
        .into_inner();
    let mut fast = Watcher::start(&client, SERVICE).await;

    let started = Instant::now();
    let mut leases = Vec::new();
    for i in 0..REGISTRATIONS {
        let mut req = request(SERVICE, &addr(i));
        req.metadata.insert("padding".into(), "x".repeat(64));
        leases.push(register(&mut client, req).await);
    }
    for lease in leases.iter().step_by(4) {
        deregister(&mut client, &lease.lease_id)
            .await
            .expect("deregister");
    }
    let resolved = resolve_full(&mut client, SERVICE).await;
    let expected = addresses_of(&resolved);
    fast.wait_until("the final version", GENEROUS, |v| {
        v.version == Some(resolved.version)
    })
    .await;
    let fast_took = started.elapsed();
    assert_eq!(fast.view.borrow().addresses(), expected);
    fast.view.borrow().assert_clean("fast watcher");
    // With a buffer of 4 even this watcher may lag on a loaded machine; it
    // then converges through a reset, as checked above.
    let fast_resets = fast.view.borrow().resets;

    // Now the slow watcher reads: a few stale messages that were already in
    // flight, then a reset with the current set, and nothing is lost.
    let mut view = View::default();
    let deadline = Instant::now() + GENEROUS;
    while view.version != Some(resolved.version) {
        let message = tokio::time::timeout_at(deadline, slow.message())
            .await
            .unwrap_or_else(|_| panic!("slow watcher stuck: {}", view.summary()))
            .expect("slow watch stream")
            .expect("slow watch stream ended");
        view.apply(Instant::now(), message);
    }
    view.assert_clean("slow watcher");
    assert!(
        view.resets >= 2,
        "the slow watcher never got a fresh reset: {}",
        view.summary()
    );
    let (_, last) = view.log.last().unwrap();
    let Some(Event::Reset(snapshot)) = &last.event else {
        panic!(
            "the slow watcher caught up through deltas, not a reset: {}",
            view.summary()
        );
    };
    let mut current = snapshot.endpoints.clone();
    current.sort_by(|a, b| a.address.cmp(&b.address));
    let mut resolved_endpoints = resolved.endpoints.clone();
    resolved_endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    assert_eq!(current, resolved_endpoints, "the reset is the current set");
    assert_eq!(view.addresses(), expected);
    let changes = REGISTRATIONS + REGISTRATIONS.div_ceil(4);
    assert!(
        view.messages < changes / 4,
        "the slow watcher got {} messages for {changes} changes: its backlog was not dropped",
        view.messages
    );
    eprintln!(
        "slow watcher: fast watcher converged in {fast_took:?} ({fast_resets} resets) with the \
         slow one unread; the slow one then read {} messages ({} resets) for {changes} changes",
        view.messages, view.resets
    );
}
