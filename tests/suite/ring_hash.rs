//! ring_hash against real processes: a config pushed by the registry
//! (`ring_hash_experimental` with `requestHashHeader`) makes a running
//! client hash each call's header onto the ring of five echo backends.
//! Keys stay on their backend; a backend killed with SIGKILL takes its
//! keys with it (and A42's rescaled ring a few more, measured; the stable
//! ring, `pointsPerEndpoint`, none); started again on the same address,
//! every key is back where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};

use crate::common::*;
use crate::policy::{cli_set, config_file};
use switchboard::client::{BalancedChannel, RequestHash};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use switchboard::service_config::ServiceConfig;

const RING_HASH: &str = r#"{
  "loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": "x-user"}}]
}"#;

/// How many keys each test spreads over the ring.
const KEYS: usize = 1000;

/// `RING_HASH`'s header on a call with key `key`, if any.
fn request(key: Option<&str>) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(EchoRequest {
        message: "hi".into(),
    });
    request.set_timeout(Duration::from_secs(10));
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("x-user", key.parse().expect("an ASCII key"));
    }
    request
}

/// The backend that served one call.
async fn call(
    client: &EchoClient<BalancedChannel>,
    request: tonic::Request<EchoRequest>,
) -> String {
    let reply = client
        .clone()
        .unary_echo(request)
        .await
        .unwrap_or_else(|status| panic!("call failed: {status:?}"));
    backend_of(&reply.into_inner().message)
}

/// Where each of the keys `user-0`... goes, every key called twice (50
/// calls at a time); panics if a key's two calls went to different
/// backends.
async fn owners(client: &EchoClient<BalancedChannel>) -> Vec<String> {
    stream::iter(0..KEYS)
        .map(|i| async move {
            let key = format!("user-{i}");
            let first = call(client, request(Some(&key))).await;
            let second = call(client, request(Some(&key))).await;
            assert_eq!(first, second, "{key} went to two backends");
            first
        })
        .buffered(50)
        .collect()
        .await
}

/// Waits until the channel knows exactly `expected` as its endpoints.
async fn wait_endpoints(channel: &BalancedChannel, expected: &[String]) {
    let expected: BTreeSet<String> = expected.iter().cloned().collect();
    let mut state = channel.watch_state();
    let known = state.wait_for(|s| {
        s.endpoints
            .iter()
            .map(|e| e.address.clone())
            .collect::<BTreeSet<_>>()
            == expected
    });
    tokio::time::timeout(STARTUP, known)
        .await
        .unwrap_or_else(|_| panic!("the channel never listed {expected:?}"))
        .unwrap();
}

/// `RING_HASH` with the stable ring: a fixed 160 points per endpoint.
const STABLE_RING_HASH: &str = r#"{
  "loadBalancingConfig": [{"ring_hash_experimental":
    {"requestHashHeader": "x-user", "pointsPerEndpoint": 160}}]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_ring_hash_keeps_keys_on_their_backend_moves_a_killed_ones_keys_and_returns_them()
{
    // A42 sizes the ring by the endpoint count, so the survivors gain
    // points and some of their keys move to one another too (about half
    // as many again as the victim's in the unit test): bounded, measured.
    let others_moved = kill_and_return(RING_HASH).await;
    assert!(
        others_moved * 100 <= KEYS * 25,
        "{others_moved} of the survivors' keys moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stable_ring_moves_only_the_killed_backends_keys() {
    assert_eq!(kill_and_return(STABLE_RING_HASH).await, 0);
}

/// Pushes `config` to a client of five backends, checks that every key
/// is sticky, kills one backend and checks that its keys (at most a fifth
/// and 5 %) all left it, then restarts it and checks that every key is
/// back where it was. Returns how many of the survivors' keys moved
/// while it was gone.
async fn kill_and_return(config: &str) -> usize {
    let mut cluster = Cluster::start(5).await;
    let addresses = cluster.addresses();
    let channel = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .build();
    channel.wait_ready(STARTUP).await;
    assert_eq!(channel.policy(), "pick_first");
    // Pushed to the running client: ring_hash is Idle until calls reach
    // it, and takes over at once rather than wait to be Ready.
    let file = config_file("ring_hash.json", config);
    cli_set(&cluster.registry, file.to_str().unwrap()).await;
    let mut state = channel.watch_state();
    tokio::time::timeout(STARTUP, state.wait_for(|s| s.policy == "ring_hash"))
        .await
        .expect("the channel switches to ring_hash")
        .unwrap();
    let client = EchoClient::new(channel.clone());

    let before = owners(&client).await;
    let mut shares: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in &before {
        *shares.entry(owner.as_str()).or_default() += 1;
    }
    assert_eq!(
        shares.keys().copied().collect::<Vec<_>>(),
        addresses,
        "every backend owns keys: {shares:?}"
    );
    // Connected lazily, and by now to every backend.
    wait_ready_set(&channel, &addresses, STARTUP).await;

    // The backend with the median share: how many keys one backend owns
    // depends on where the ports' hashes fall, which is no part of what
    // is tested here.
    let mut by_share: Vec<(usize, &str)> = shares.iter().map(|(a, n)| (*n, *a)).collect();
    by_share.sort();
    let victim = by_share[2].1.to_owned();
    let of_victim = shares[victim.as_str()];
    assert!(
        of_victim * 100 <= KEYS * 25,
        "{victim} owns {of_victim} of {KEYS} keys: more than a fifth and 5%"
    );
    let mut killed = cluster.kill(&victim);
    let survivors: Vec<String> = addresses
        .iter()
        .filter(|a| **a != victim)
        .cloned()
        .collect();
    wait_ready_set(&channel, &survivors, STARTUP).await;
    // The registry drops it too (its lease stream broke), so the ring is
    // rebuilt without it.
    wait_endpoints(&channel, &survivors).await;

    let during = owners(&client).await;
    let mut others_moved = 0;
    for ((i, was), is) in before.iter().enumerate().zip(&during) {
        assert_ne!(is, &victim, "user-{i} still reached the killed backend");
        if was != &victim && was != is {
            others_moved += 1;
        }
    }
    eprintln!(
        "ring_hash stickiness: {of_victim} of {KEYS} keys were on {victim} (ideal move), \
         {} moved in all ({others_moved} from survivors)",
        of_victim + others_moved
    );

    // Back on the same address: every key returns where it was.
    killed.wait_exit(STARTUP).await;
    let port: u16 = victim.rsplit(':').next().unwrap().parse().unwrap();
    let restarted = start_echo(&cluster.registry, SERVICE, &[port], &[]).await;
    wait_endpoints(&channel, &addresses).await;
    let after = owners(&client).await;
    for (i, (was, is)) in before.iter().zip(&after).enumerate() {
        assert_eq!(was, is, "user-{i} did not return");
    }
    drop(restarted);
    others_moved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_key_reaches_some_backend_and_a_request_hash_picks_like_the_header() {
    let cluster = Cluster::start(3).await;
    let addresses = cluster.addresses();
    // Given to the builder, not pushed.
    let channel = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .service_config(ServiceConfig::from_json(RING_HASH).unwrap())
        .disable_service_config_lookup()
        .build();
    let client = EchoClient::new(channel.clone());
    // Idle before the first call: nothing connects until a call lands.
    let served: BTreeSet<String> = stream::iter(0..60)
        .map(|_| call(&client, request(None)))
        .buffered(10)
        .collect()
        .await;
    assert!(served.iter().all(|s| addresses.contains(s)), "{served:?}");
    assert_eq!(channel.policy(), "ring_hash");

    // A per-call RequestHash of a key lands where the header with it does.
    for i in 0..50 {
        let key = format!("user-{i}");
        let by_header = call(&client, request(Some(&key))).await;
        let mut keyed = request(None);
        keyed.extensions_mut().insert(RequestHash::of_key(&key));
        assert_eq!(call(&client, keyed).await, by_header, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_cli_sends_keyed_traffic_that_ring_hash_keeps_sticky() {
    let cluster = Cluster::start(3).await;
    let target = registry_target(&cluster.registry);
    let lines = run_ok(&[
        "client",
        "--target",
        &target,
        "--policy",
        "ring_hash",
        "--hash-header",
        "x-user",
        "--key-from",
        "seq",
        "--keys",
        "4",
        "--count",
        "12",
        "--timeout",
        "10s",
    ])
    .await;
    let mut backends: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in lines.iter().filter(|l| l.starts_with("key ")) {
        let (key, reply) = line.split_once(": ").expect("key N: reply");
        backends
            .entry(key.to_owned())
            .or_default()
            .insert(backend_of(reply));
    }
    assert_eq!(backends.len(), 4, "{lines:#?}");
    for (key, served) in &backends {
        assert_eq!(served.len(), 1, "{key} reached {served:?}");
    }
}
