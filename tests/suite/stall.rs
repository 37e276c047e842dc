//! A registry that could not run (SIGSTOP here; a VM pause or a long GC-like
//! pause elsewhere) must not take its own stall for its backends' death:
//! after SIGCONT no lease expires because of the pause, while a backend
//! that really died meanwhile still goes within a TTL.

use std::time::Duration;

use crate::common::*;
use tokio::time::Instant;

/// The short lease TTL the backends ask for, so a stall of 2×TTL is quick;
/// not so short that a heartbeat delayed on a loaded machine ends a lease.
const TTL: Duration = Duration::from_secs(2);
/// How long the registry is stopped: twice the TTL.
const STALL: Duration = Duration::from_secs(4);

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
    let port = free_port().expect("free port");
    let registry = start_registry(port).await;
    let registry_addr = local(port);
    let ttl_ms = TTL.as_millis().to_string();
    let backends = start_backends(&registry_addr, 2, &["--ttl-ms", &ttl_ms]).await;
    let addresses = addresses_of(&backends);
    wait_registered(&registry_addr, SERVICE, &addresses, STARTUP).await;
    let client = registry_client(&registry_addr, STARTUP).await;
    let mut watcher = Watcher::start(&client, SERVICE).await;
    watcher.wait_for_set(&addresses, STARTUP).await;
    let (_, load) = load_through(&registry_addr, &addresses).await;
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
    assert_no_failed_rpc(s.load, "stall").await;
    s.watcher
        .view
        .borrow()
        .assert_untouched("watcher after the stall", &s.addresses);
    for (_, backend) in &s.backends {
        assert!(
            !backend.has_line("registration lost") && !backend.has_line("registry stream lost"),
            "a backend lost its registration: {}",
            backend.dump()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_during_a_stall_is_removed_for_its_broken_stream() {
    let mut s = setup().await;
    let (victim, mut victim_proc) = s.backends.remove(0);
    stall(&s.registry, || victim_proc.kill()).await;
    let survivors = all_but(&s.addresses, &victim);
    s.watcher.wait_for_set(&survivors, STARTUP).await;
    let removed = s.watcher.view.borrow().removed_at[&victim];
    // The registry, once running, saw the broken stream and removed it for
    // that; it did not keep it to its extended deadline.
    let line = s
        .registry
        .wait_line("keepalive stream ended; endpoint removed", STARTUP)
        .await;
    assert!(line.contains(&victim), "{line}");
    assert!(
        !s.registry.has_line("lease expired"),
        "a lease expired:\n{}",
        s.registry.dump()
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
