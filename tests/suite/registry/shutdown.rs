//! Shutdown with open streams.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_registry_even_with_open_watch_and_keepalive_streams() {
    let port = free_port().expect("free port");
    let mut registry = start_registry(port).await;
    let mut client = registry_client(&local(port), STARTUP).await;
    let lease = register(&mut client, request(SERVICE, &addr(1))).await;
    let mut keepalive = KeepAlive::open(&client).await;
    keepalive.beat(&lease.lease_id).await.expect("heartbeat");
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher.wait_for_set(&[addr(1)], GENEROUS).await;

    registry.signal(libc::SIGTERM);
    let code = registry.wait_exit(STARTUP).await;
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    // The registry ended the streams itself; it did not wait out its grace.
    assert!(
        !registry.has_line("connections still open after the grace period"),
        "the streams were not ended, the grace period ran out:\n{}",
        registry.dump()
    );
    watcher
        .wait_until("end of the watch stream", GENEROUS, |v| v.ended.is_some())
        .await;
    let ended = watcher
        .view
        .borrow()
        .ended
        .as_ref()
        .map(|end| end.as_ref().map(drop).map_err(|status| status.code()));
    assert_eq!(
        ended,
        Some(Err(Code::Unavailable)),
        "the watch must end with UNAVAILABLE"
    );
    let status = keepalive
        .beat(&lease.lease_id)
        .await
        .expect_err("keepalive stream outlived the registry");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_registry_even_when_a_watcher_never_reads() {
    let port = free_port().expect("free port");
    // No warm-up: the watcher must be subscribed before the changes.
    let mut registry = start_registry_with(port, &["--warmup-ms", "0"]).await;
    let mut client = registry_client(&local(port), STARTUP).await;
    // A watcher with a tiny window that never reads: its stream cannot
    // finish, since the end of a stream queues behind its unsent data.
    let stuck = tonic::transport::Endpoint::from_shared(format!("http://{}", local(port)))
        .expect("uri")
        .initial_stream_window_size(1024)
        .connect()
        .await
        .expect("connect");
    let _unread = RegistryClient::new(stuck)
        .watch(WatchRequest {
            service: SERVICE.into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    for i in 0..100 {
        let mut req = request(SERVICE, &addr(i));
        req.metadata.insert("padding".into(), "x".repeat(64));
        register(&mut client, req).await;
    }
    let signalled = Instant::now();
    registry.signal(libc::SIGTERM);
    let code = registry.wait_exit(Duration::from_secs(20)).await;
    eprintln!(
        "registry exited {:?} after SIGTERM with a stuck watcher",
        signalled.elapsed()
    );
    assert_eq!(code, Some(0), "exit code after SIGTERM");
}
