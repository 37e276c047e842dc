//! The etcd store in process, against a real etcd started by the test
//! (`LocalEtcd`): two `EtcdStore`s on one prefix play two replicas. What is
//! checked here is store behaviour that the process-level suite
//! (`tests/etcd.rs`) cannot see directly: a watcher resuming at a replica
//! that never watched its service gets the difference from etcd's history
//! (a reset only once that history is compacted), the caps, an operator's
//! removal reaching the replica that holds the lease, and a replica's
//! shutdown leaving its leases for another replica.
//! Skipped, saying so, when there is no `etcd` on PATH.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use switchboard::discovery::{Update, Versioned};
use switchboard::registry::etcd::local::{etcd_binary, LocalEtcd};
use switchboard::registry::etcd::EtcdStore;
use switchboard::registry::lease::LeaseId;
use switchboard::registry::store::{NewEndpoint, Position, Store, UpdateStream};
use switchboard::registry::{Cap, RegistryConfig, RegistryError};

const SERVICE: &str = "svc.test";
const TTL: Duration = Duration::from_secs(2);

/// A fresh etcd, or `None` (with a note) when there is none to run.
async fn etcd() -> Option<LocalEtcd> {
    if etcd_binary().is_none() {
        eprintln!("skipped: no `etcd` on PATH (apt-get install etcd-server)");
        return None;
    }
    Some(LocalEtcd::start().await.expect("start etcd"))
}

async fn replica(etcd: &LocalEtcd, config: &RegistryConfig) -> EtcdStore {
    EtcdStore::connect(&[etcd.url()], "/test/", config)
        .await
        .expect("connect to etcd")
}

fn endpoint(service: &str, address: &str) -> NewEndpoint {
    NewEndpoint {
        service: service.into(),
        address: address.into(),
        metadata: HashMap::new(),
        ttl: TTL,
    }
}

async fn next(stream: &mut UpdateStream) -> Arc<Versioned> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an update within 10 s")
        .expect("the stream goes on")
}

/// A watcher at A's version, moved to B after changes B never watched.
async fn resumed_at_fresh_replica(compact: bool) -> Option<Arc<Versioned>> {
    let etcd = etcd().await?;
    let config = RegistryConfig::default();
    let a = replica(&etcd, &config).await;
    let mut first = a.watch(SERVICE, None).await.unwrap();
    a.register(endpoint(SERVICE, "10.0.0.1:1")).await.unwrap();
    a.register(endpoint(SERVICE, "10.0.0.2:1")).await.unwrap();
    // The watcher's position once both are in.
    let mut held = next(&mut first).await;
    while held.version < a.resolve(SERVICE).await.unwrap().version {
        held = next(&mut first).await;
    }
    let from = Position {
        epoch: held.epoch,
        version: held.version,
    };
    a.register(endpoint(SERVICE, "10.0.0.3:1")).await.unwrap();
    a.deregister_address(SERVICE, "10.0.0.1:1").await.unwrap();
    if compact {
        let mut client = etcd_client::Client::connect([etcd.url()], None)
            .await
            .unwrap();
        let now = client.status().await.unwrap().header().unwrap().revision();
        client.compact(now, None).await.unwrap();
    }
    let b = replica(&etcd, &config).await;
    let mut resumed = b.watch(SERVICE, Some(from)).await.unwrap();
    Some(next(&mut resumed).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resumed_at_a_replica_without_history_gets_only_the_difference() {
    let Some(update) = resumed_at_fresh_replica(false).await else {
        return;
    };
    let Update::Delta(delta) = &update.update else {
        panic!("expected the missed changes as a delta, got {update:?}");
    };
    let added: Vec<&str> = delta.added.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(added, ["10.0.0.3:1"]);
    assert_eq!(delta.removed, ["10.0.0.1:1"]);
    assert!(delta.updated.is_empty(), "{delta:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_etcd_compacted_the_version_the_watcher_gets_the_full_set() {
    let Some(update) = resumed_at_fresh_replica(true).await else {
        return;
    };
    let Update::Reset(endpoints) = &update.update else {
        panic!("expected a reset, got {update:?}");
    };
    let addresses: HashSet<&str> = endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addresses, HashSet::from(["10.0.0.2:1", "10.0.0.3:1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_count_what_etcd_holds_and_takeovers_add_nothing() {
    let Some(etcd) = etcd().await else { return };
    let config = RegistryConfig {
        max_endpoints_per_service: 2,
        max_services: 2,
        ..RegistryConfig::default()
    };
    let a = replica(&etcd, &config).await;
    let b = replica(&etcd, &config).await;
    a.register(endpoint(SERVICE, "10.0.0.1:1")).await.unwrap();
    b.register(endpoint(SERVICE, "10.0.0.2:1")).await.unwrap();
    let full = a
        .register(endpoint(SERVICE, "10.0.0.3:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&full, RegistryError::ResourceExhausted { cap: Cap::EndpointsPerService, limit: 2, service: Some(service) } if service == SERVICE),
        "{full:?}"
    );
    // Taking an address over is not a new endpoint.
    b.register(endpoint(SERVICE, "10.0.0.1:1")).await.unwrap();
    a.register(endpoint("other.test", "10.0.0.1:1"))
        .await
        .unwrap();
    let services = b
        .register(endpoint("third.test", "10.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &services,
            RegistryError::ResourceExhausted {
                cap: Cap::Services,
                limit: 2,
                service: None
            }
        ),
        "{services:?}"
    );
    assert_eq!(a.resolve(SERVICE).await.unwrap().endpoints.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_removal_reaches_the_replica_holding_the_lease() {
    let Some(etcd) = etcd().await else { return };
    let config = RegistryConfig::default();
    let a = replica(&etcd, &config).await;
    let b = replica(&etcd, &config).await;
    let grant = a.register(endpoint(SERVICE, "10.0.0.1:1")).await.unwrap();
    // The backend's stream is at B now.
    b.keep_alive(grant.lease, 1).await.unwrap();
    a.deregister_address(SERVICE, "10.0.0.1:1").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match b.keep_alive(grant.lease, 1).await {
            Err(RegistryError::RemovedByOperator(id)) => {
                assert_eq!(id, grant.lease.to_string());
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "B still answers {other:?} 10 s after the removal"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(b.resolve(SERVICE).await.unwrap().endpoints.is_empty());
    // A lease nobody ever granted is still just unknown.
    let unknown = b.keep_alive(LeaseId::random(), 2).await.unwrap_err();
    assert!(
        matches!(unknown, RegistryError::LeaseNotFound(_)),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_shutting_down_leaves_its_leases_to_the_others() {
    let Some(etcd) = etcd().await else { return };
    let config = RegistryConfig::default();
    let a = replica(&etcd, &config).await;
    let b = replica(&etcd, &config).await;
    let grant = a.register(endpoint(SERVICE, "10.0.0.1:1")).await.unwrap();
    a.keep_alive(grant.lease, 1).await.unwrap();
    let lost = a.register(endpoint(SERVICE, "10.0.0.2:1")).await.unwrap();
    a.keep_alive(lost.lease, 2).await.unwrap();
    // A broken stream ends its lease everywhere at once...
    a.stream_ended(2, &HashSet::from([lost.lease]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.resolve(SERVICE).await.unwrap().endpoints.len() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "not removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...but streams a shutting-down replica ends keep theirs.
    a.closing();
    a.stream_ended(1, &HashSet::from([grant.lease]));
    drop(a);
    assert_eq!(b.keep_alive(grant.lease, 7).await.unwrap(), TTL);
    let endpoints = b.resolve(SERVICE).await.unwrap().endpoints;
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].address, "10.0.0.1:1");
}
