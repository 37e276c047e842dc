//! A registry that could not run (SIGSTOP here; a VM pause or a long GC-like
//! pause elsewhere) must not take its own stall for its backends' death:
//! after SIGCONT no lease expires because of the pause, while a backend
//! that really died meanwhile still goes within a TTL.

// These suites drive the binaries and servers: the default build only.
#![cfg(feature = "cli")]

mod common;

use std::time::Duration;

use common::*;
use switchboard::client::PolicyKind;
use tokio::time::Instant;

/// The short lease TTL the backends ask for, so a stall of 2×TTL is quick.
const TTL: Duration = Duration::from_secs(1);
/// How long the registry is stopped: twice the TTL.
const STALL: Duration = Duration::from_secs(2);

/// A registry, two backends on a short TTL, a watcher and a round_robin
/// client under load.
struct Setup {
    registry: Proc,
    backends: Vec<(String, Proc)>,
    addresses: Vec<String>,
    watcher: Watcher,
    load: Load,
}

async fn setup() -> Setup {
    let port = free_port();
    let registry = start_registry(port).await;
    let registry_addr = local(port);
    let ttl_ms = TTL.as_millis().to_string();
    let mut backends = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let proc = start_echo(&registry_addr, SERVICE, &[port], &["--ttl-ms", &ttl_ms]).await;
        backends.push((local(port), proc));
    }
    let mut addresses: Vec<String> = backends.iter().map(|(a, _)| a.clone()).collect();
    addresses.sort();
    wait_registered(&registry_addr, SERVICE, &addresses, STARTUP).await;
    let client = registry_client(&registry_addr, STARTUP).await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher.wait_for_set(&addresses, STARTUP).await;
    let channel = channel(&registry_target(&registry_addr), PolicyKind::RoundRobin);
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let load = Load::start(
        channel,
        4,
        Duration::from_millis(10),
        Duration::from_secs(2),
    );
    load.wait_more(100, STARTUP).await;
    Setup {
        registry,
        backends,
        addresses,
        watcher,
        load,
    }
}

/// Stops the registry for [`STALL`], running `during` while it is stopped,
/// and returns when it was continued.
async fn stall(registry: &Proc, during: impl FnOnce()) -> Instant {
    registry.signal(libc::SIGSTOP);
    during();
    // The stall's length is the input of the test, not a wait for a result.
    tokio::time::sleep(STALL).await;
    registry.signal(libc::SIGCONT);
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_registry_expires_no_lease() {
    let s = setup().await;
    let resumed = stall(&s.registry, || {}).await;
    s.registry
        .wait_line("registry stalled; extending every lease", STARTUP)
        .await;
    // Any expiry caused by the stall would happen within the extension
    // (the stall plus a 1 s grace) after the resume; watch well past it,
    // while the backends' heartbeats go on.
    let watch_until = resumed + STALL + TTL * 3;
    s.load.wait_more(100, STARTUP).await;
    while Instant::now() < watch_until {
        s.load.wait_more(10, STARTUP).await;
    }
    let shots = s.load.stop().await;
    let view = s.watcher.view.borrow();
    view.assert_clean("watcher");
    assert!(
        view.removed_at.is_empty(),
        "endpoints removed after the stall: {}",
        view.summary()
    );
    assert_eq!(
        view.resets,
        1,
        "a reset besides the first: {}",
        view.summary()
    );
    assert!(view.ended.is_none(), "watch ended: {}", view.summary());
    assert_eq!(view.addresses(), s.addresses);
    let failed = failures(&shots);
    assert!(
        failed.is_empty(),
        "{} of {} RPCs failed: {:?}",
        failed.len(),
        shots.len(),
        failed.first()
    );
    for (_, backend) in &s.backends {
        assert!(
            !backend.has_line("registration lost") && !backend.has_line("registry stream lost"),
            "a backend lost its registration: {}",
            backend.dump()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_during_a_stall_is_removed_within_a_ttl() {
    let mut s = setup().await;
    let (victim, mut victim_proc) = s.backends.remove(0);
    let resumed = stall(&s.registry, || victim_proc.kill()).await;
    let survivors = all_but(&s.addresses, &victim);
    s.watcher.wait_for_set(&survivors, STARTUP).await;
    let removed = s.watcher.view.borrow().removed_at[&victim];
    assert!(
        removed.saturating_duration_since(resumed) < TTL,
        "the dead backend left {:?} after the resume, TTL is {TTL:?}",
        removed.saturating_duration_since(resumed)
    );
    // The survivor stays, and RPCs after the removal all succeed.
    let shots_before = s.load.count();
    s.load.wait_more(200, STARTUP).await;
    let shots = s.load.stop().await;
    let late_failures: Vec<_> = shots[shots_before..]
        .iter()
        .filter(|shot| shot.sent > removed && shot.result.is_err())
        .collect();
    assert!(
        late_failures.is_empty(),
        "RPCs failed after the removal: {:?}",
        late_failures.first()
    );
    let view = s.watcher.view.borrow();
    view.assert_clean("watcher");
    assert_eq!(view.addresses(), survivors);
    assert_eq!(view.removed_at.len(), 1, "{}", view.summary());
}
