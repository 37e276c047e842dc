//! ring_hash (gRFC A42, with A76's `requestHashHeader`): consistent
//! hashing. Each call's hash key lands on a ring of the serving endpoints,
//! so calls with the same key reach the same backend, and a backend that
//! leaves takes only its own keys with it.
//!
//! - The key: a per-call [`RequestHash`] in the request's extensions, else
//!   the value of the config's `requestHashHeader` (several values joined
//!   with `,`, as A76 says), hashed with XXH64. A call with neither gets a
//!   random hash.
//! - The ring: [`ring::Ring`], weighted by each endpoint's `weight`
//!   metadata, placed by its `hash_key` metadata or else its address.
//! - Connections are made lazily (A42): subchannels start Idle and a pick
//!   that lands on an Idle one asks it to connect and queues. A pick whose
//!   endpoint is in TransientFailure walks the ring to the next endpoint;
//!   see [`RingHashPicker`].
//! - A42's sticky failure: a subchannel that failed counts as
//!   TransientFailure until it is Ready again, even while it reports
//!   Connecting on later attempts, so that the walk does not wait on a
//!   backend that is down. A Ready connection that is lost counts as Idle
//!   and is redialled only when a pick asks.

mod ring;
pub mod xxhash;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::client::error::ConnectError;
use crate::client::policy::{
    Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, StateCounts, SubchannelId,
};
use crate::client::subchannel::{ConnectivityState, Connector, ReadyConnection, SubchannelState};
use crate::discovery::{Applied, EndpointSet};
pub use crate::service_config::ring_hash::{HashHeader, HashHeaderError, RingHashConfig};
use ring::{Ring, Sizing};

/// A call's ring_hash key, already hashed: put it in a `tonic::Request`'s
/// extensions to send the call where that hash lands, whatever header it
/// carries (gRPC Go's `SetXDSRequestHash` does the same through the
/// context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHash(pub u64);

impl RequestHash {
    /// The hash of `key` as ring_hash hashes a header's value, so a call
    /// keyed here lands where a call with `key` in the header would.
    pub fn of_key(key: impl AsRef<[u8]>) -> Self {
        Self(xxhash::xxh64(key.as_ref()))
    }
}

/// The ring_hash policy.
#[derive(Debug)]
pub struct RingHash {
    /// The ring's sizes and the header keys come from.
    config: RingHashConfig,
    /// The serving endpoints in the ring's index order: by hash key, so
    /// the ring does not depend on the order updates came in.
    endpoints: Vec<RingEndpoint>,
    /// The ring over `endpoints`; shared with the pickers, rebuilt only
    /// when the endpoints or their weights change.
    ring: Arc<Ring>,
    /// Subchannels by their state as A42 sees it (sticky failure).
    counts: StateCounts,
    /// What a picker needs of each serving endpoint's subchannel, by
    /// address.
    views: HashMap<Arc<str>, View>,
    /// Subchannels that failed and have not been Ready since.
    failed: HashSet<SubchannelId>,
    /// The most recent connection error, for failing RPCs' status.
    last_error: Option<Arc<ConnectError>>,
    /// Whether the picker is out of date.
    dirty: bool,
}

/// One endpoint on the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RingEndpoint {
    /// Where its subchannel connects.
    address: Arc<str>,
    /// What its points are hashed from: `hash_key` metadata (A76) or the
    /// address.
    key: String,
    /// Its `weight` metadata, 1 when absent or invalid.
    weight: u32,
}

/// A subchannel as the policy's pickers see it.
#[derive(Debug, Clone)]
struct View {
    /// Its subchannel.
    id: SubchannelId,
    /// As A42 sees it.
    state: ConnectivityState,
    /// The connection, when Ready.
    connection: Option<Arc<ReadyConnection>>,
    /// Asks it to connect from a pick.
    connector: Connector,
}

impl RingHash {
    /// A ring_hash policy with `config`.
    pub fn new(config: RingHashConfig) -> Self {
        Self {
            config,
            endpoints: Vec::new(),
            ring: Arc::default(),
            counts: StateCounts::default(),
            views: HashMap::new(),
            failed: HashSet::new(),
            last_error: None,
            dirty: true,
        }
    }

    /// Records subchannel `id`'s reported `state` as A42 sees it.
    fn record(
        &mut self,
        id: SubchannelId,
        address: &Arc<str>,
        state: &SubchannelState,
        connector: Connector,
    ) {
        let seen = self.seen_state(id, state);
        self.counts.set(id, Some(seen));
        let connection = match state {
            SubchannelState::Ready(connection) => Some(connection.clone()),
            _ => None,
        };
        self.views.insert(
            address.clone(),
            View {
                id,
                state: seen,
                connection,
                connector,
            },
        );
    }

    /// The state A42 has subchannel `id` in, given the state it reports.
    fn seen_state(&mut self, id: SubchannelId, state: &SubchannelState) -> ConnectivityState {
        match state {
            SubchannelState::Ready(_) => {
                self.failed.remove(&id);
                ConnectivityState::Ready
            }
            SubchannelState::TransientFailure { .. } => {
                self.failed.insert(id);
                ConnectivityState::TransientFailure
            }
            _ if self.failed.contains(&id) => ConnectivityState::TransientFailure,
            other => other.connectivity(),
        }
    }

    /// A42's aggregate: Ready if any is; TransientFailure once two have
    /// failed (one failure among many is one bad backend, not a down
    /// service); Connecting while any connects, or one has failed among
    /// others; Idle while nothing was asked of the rest.
    fn connectivity(&self) -> ConnectivityState {
        use ConnectivityState::*;
        let failing = self.counts.count(TransientFailure);
        if self.counts.count(Ready) > 0 {
            Ready
        } else if failing >= 2 {
            TransientFailure
        } else if self.counts.count(Connecting) > 0 || (failing == 1 && self.counts.len() > 1) {
            Connecting
        } else if self.counts.count(Idle) > 0 {
            Idle
        } else {
            TransientFailure
        }
    }
}

impl Policy for RingHash {
    fn name(&self) -> &'static str {
        "ring_hash"
    }

    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        _changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) {
        let mut serving: Vec<RingEndpoint> = endpoints
            .iter()
            .filter(|e| !e.is_draining())
            .map(|e| RingEndpoint {
                address: Arc::from(e.address.as_str()),
                key: e
                    .metadata
                    .get("hash_key")
                    .filter(|k| !k.is_empty())
                    .unwrap_or(&e.address)
                    .clone(),
                weight: e.weight().unwrap_or(1),
            })
            .collect();
        serving.sort_by(|a, b| a.key.cmp(&b.key).then(a.address.cmp(&b.address)));
        // Subchannels of endpoints that left are shut down; the others
        // keep theirs (and their connections) across the rebuild.
        let keep: HashSet<&str> = serving.iter().map(|e| &*e.address).collect();
        let gone: Vec<Arc<str>> = self
            .views
            .keys()
            .filter(|a| !keep.contains(&***a))
            .cloned()
            .collect();
        for address in gone {
            if let Some(view) = self.views.remove(&address) {
                cx.subchannels().remove(view.id);
                self.counts.set(view.id, None);
                self.failed.remove(&view.id);
            }
        }
        for endpoint in &serving {
            if self.views.contains_key(&endpoint.address) {
                continue;
            }
            // Idle, and left so: a pick asks it to connect (A42).
            let id = cx.subchannels().get_or_create(&endpoint.address);
            let Some(subchannel) = cx.subchannels().get(id) else {
                continue;
            };
            let (state, connector) = (subchannel.state().clone(), subchannel.connector());
            self.record(id, &endpoint.address, &state, connector);
        }
        if serving != self.endpoints {
            let points: Vec<(&str, u32)> =
                serving.iter().map(|e| (e.key.as_str(), e.weight)).collect();
            self.ring = Arc::new(Ring::new(&points, Sizing::of(&self.config)));
            self.endpoints = serving;
        }
        self.dirty = true;
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        let Some(subchannel) = cx.subchannels().get(id) else {
            return;
        };
        // A subchannel this policy already let go of is none of its
        // business.
        if self.counts.get(id).is_none() {
            return;
        }
        if let Some(error) = subchannel.last_error() {
            self.last_error = Some(error.clone());
        }
        let address = subchannel.address().clone();
        let (state, connector) = (subchannel.state().clone(), subchannel.connector());
        self.record(id, &address, &state, connector);
        // Even an unchanged aggregate may hide a changed endpoint, and the
        // picker carries every endpoint's state.
        self.dirty = true;
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let mut slots = Vec::with_capacity(self.endpoints.len());
        let mut ready = Vec::new();
        for endpoint in &self.endpoints {
            // Every serving endpoint has a subchannel (made above), but a
            // picker is no place to panic: a missing one reads as failing.
            let slot = match self.views.get(&endpoint.address) {
                Some(view) => {
                    if let Some(connection) = &view.connection {
                        ready.push(connection.clone());
                    }
                    Slot {
                        state: view.state,
                        connection: view.connection.clone(),
                        connector: Some(view.connector.clone()),
                        asked: AtomicBool::new(false),
                    }
                }
                None => Slot {
                    state: ConnectivityState::TransientFailure,
                    connection: None,
                    connector: None,
                    asked: AtomicBool::new(false),
                },
            };
            slots.push(slot);
        }
        Some(PolicyPicker {
            picker: Arc::new(RingHashPicker {
                ring: self.ring.clone(),
                slots,
                ready,
                header: self.config.hash_header,
                last_error: self.last_error.clone(),
            }),
            connectivity: self.connectivity(),
            last_error: self.last_error.clone(),
        })
    }
}

/// One endpoint as a picker sees it.
#[derive(Debug)]
struct Slot {
    /// As A42 sees it, when the picker was built.
    state: ConnectivityState,
    /// The connection, when Ready.
    connection: Option<Arc<ReadyConnection>>,
    /// Asks it to connect; `None` only for an endpoint with no subchannel.
    connector: Option<Connector>,
    /// Whether a pick of this picker already asked it to connect: one
    /// request is enough, the next picker will show it Connecting.
    asked: AtomicBool,
}

impl Slot {
    /// Asks the subchannel to connect, once per picker.
    fn connect(&self) {
        if let Some(connector) = &self.connector {
            if !self.asked.swap(true, Ordering::Relaxed) {
                connector.connect();
            }
        }
    }

    /// The connection, if Ready and still open (it may close before the
    /// balancer hears of it).
    fn usable(&self) -> Option<&Arc<ReadyConnection>> {
        self.connection.as_ref().filter(|c| !c.sender.is_closed())
    }
}

/// Picks by the call's hash on an immutable ring, with every endpoint's
/// state as of when it was built (A42 lets a policy publish a new picker
/// on each state change instead of sharing live state with it).
pub struct RingHashPicker {
    /// The points, shared with the policy and its other pickers.
    ring: Arc<Ring>,
    /// By endpoint index, as the ring's points refer to them.
    slots: Vec<Slot>,
    /// The Ready connections, for observers.
    ready: Vec<Arc<ReadyConnection>>,
    /// The header a call's key is read from, if the config names one.
    header: Option<HashHeader>,
    /// For the status of a pick that finds nothing reachable.
    last_error: Option<Arc<ConnectError>>,
}

/// The call's hash: its own [`RequestHash`], else the value of `header`
/// (A76), else none.
fn hash_of(header: Option<HashHeader>, info: &PickInfo<'_>) -> Option<u64> {
    if info.hash.is_some() {
        return info.hash;
    }
    let name = header?;
    let mut values = info.headers.get_all(name.as_str()).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        // A76: an empty value is no key.
        return (!first.is_empty()).then(|| xxhash::xxh64(first.as_bytes()));
    };
    // A76: several values are hashed joined with commas.
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(value.as_bytes());
    }
    Some(xxhash::xxh64(&joined))
}

impl RingHashPicker {
    fn slot(&self, point: usize) -> (usize, &Slot) {
        let endpoint = self.ring.points()[point].endpoint;
        (endpoint, &self.slots[endpoint])
    }

    fn connection(connection: &Arc<ReadyConnection>) -> Pick {
        Pick::Connection {
            connection: connection.clone(),
            done: None,
        }
    }

    /// A42's pick for `hash`, starting at point `first`.
    fn keyed(&self, first: usize) -> Pick {
        use ConnectivityState::*;
        let (first_endpoint, slot) = self.slot(first);
        match (slot.state, slot.usable()) {
            (Ready, Some(connection)) => return Self::connection(connection),
            // Closed before the balancer heard: it is about to say Idle.
            (Ready, None) | (Connecting, _) => return Pick::Queue,
            (Idle, _) => {
                slot.connect();
                return Pick::Queue;
            }
            (TransientFailure, _) => slot.connect(),
        }
        let len = self.ring.len();
        let mut found_second = false;
        let mut found_first_non_failed = false;
        for step in 1..len {
            let (endpoint, slot) = self.slot((first + step) % len);
            if endpoint == first_endpoint {
                continue;
            }
            if let (Ready, Some(connection)) = (slot.state, slot.usable()) {
                return Self::connection(connection);
            }
            if !found_second {
                match slot.state {
                    Connecting | Ready => return Pick::Queue,
                    Idle => {
                        slot.connect();
                        return Pick::Queue;
                    }
                    TransientFailure => found_second = true,
                }
            }
            if !found_first_non_failed {
                // Keeps one more backend trying, so that the ring recovers
                // even with no Ready endpoint for picks to land on.
                match slot.state {
                    TransientFailure => slot.connect(),
                    Idle => {
                        slot.connect();
                        found_first_non_failed = true;
                    }
                    Connecting | Ready => found_first_non_failed = true,
                }
            }
        }
        Pick::Fail(tonic::Status::unavailable(match &self.last_error {
            Some(error) => format!("ring_hash: no endpoint on the ring is reachable: {error}"),
            None => "ring_hash: no endpoint on the ring is reachable".to_owned(),
        }))
    }
}

impl Picker for RingHashPicker {
    fn pick(&self, info: &PickInfo<'_>) -> Pick {
        let hash = hash_of(self.header, info);
        let Some(first) = self.ring.find(hash.unwrap_or_else(rand::random)) else {
            return Pick::Queue;
        };
        if hash.is_none() {
            // A call with no key may go anywhere: the first Ready endpoint
            // from a random point, rather than wait for the one it landed
            // on to connect.
            let len = self.ring.len();
            for step in 0..len {
                let (_, slot) = self.slot((first + step) % len);
                if let Some(connection) = slot.usable() {
                    return Self::connection(connection);
                }
            }
        }
        self.keyed(first)
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        &self.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::policy::test_utils::FakeController;
    use crate::discovery::{Delta, Endpoint, Update};

    const FIVE: [&str; 5] = ["a:1", "b:1", "c:1", "d:1", "e:1"];

    fn started(config: RingHashConfig, endpoints: &[&str]) -> FakeController<RingHash> {
        let mut fake = FakeController::new(RingHash::new(config));
        fake.reset(endpoints);
        fake
    }

    /// Where a call with `hash` went (`None`: queued).
    fn pick(fake: &FakeController<RingHash>, hash: u64) -> Option<String> {
        match fake.pick_with(&http::HeaderMap::new(), Some(hash)) {
            Pick::Connection { connection, .. } => Some(connection.address.to_string()),
            Pick::Queue => None,
            Pick::Fail(status) => panic!("pick failed: {status:?}"),
        }
    }

    /// The distinct endpoints a walk from `hash` meets, in order.
    fn walk(fake: &FakeController<RingHash>, hash: u64) -> Vec<String> {
        let policy = &fake.policy;
        let ring = &policy.ring;
        let first = ring.find(hash).unwrap();
        let mut order: Vec<String> = Vec::new();
        for step in 0..ring.len() {
            let point = ring.points()[(first + step) % ring.len()];
            let address = policy.endpoints[point.endpoint].address.to_string();
            if !order.contains(&address) {
                order.push(address);
            }
        }
        order
    }

    fn all_ready(fake: &mut FakeController<RingHash>, endpoints: &[&str]) {
        for address in endpoints {
            fake.ready(address);
        }
        fake.take_actions();
    }

    #[test]
    fn builds_its_ring_within_the_sizes_weighted_by_metadata() {
        let mut fake = FakeController::new(RingHash::new(RingHashConfig {
            min_ring_size: 100,
            max_ring_size: 1000,
            ..RingHashConfig::default()
        }));
        fake.update(Update::Reset(vec![
            Endpoint::new("a:1").with_metadata("weight", "1"),
            Endpoint::new("b:1").with_metadata("weight", "3"),
            Endpoint::new("c:1"),
        ]));
        let ring = &fake.policy.ring;
        // The lightest (1 of 5) gets ceil(0.2 * 100) = 20 points.
        assert_eq!(ring.len(), 100);
        let mut shares = [0; 3];
        for point in ring.points() {
            shares[point.endpoint] += 1;
        }
        assert_eq!(shares, [20, 60, 20]);
        // Capped by the maximum.
        let fake = started(
            RingHashConfig {
                min_ring_size: 8,
                max_ring_size: 8,
                ..RingHashConfig::default()
            },
            &FIVE,
        );
        assert_eq!(fake.policy.ring.len(), 8);
        assert_eq!(fake.connectivity(), ConnectivityState::Idle);
    }

    #[test]
    fn the_same_key_reaches_the_same_endpoint() {
        let config = RingHashConfig::default().with_hash_header("x-key").unwrap();
        let mut fake = started(config, &FIVE);
        all_ready(&mut fake, &FIVE);
        let mut owners = HashSet::new();
        for key in 0..200u64 {
            let hash = xxhash::xxh64(key.to_string().as_bytes());
            let owner = pick(&fake, hash).expect("every endpoint is Ready");
            assert_eq!(pick(&fake, hash).as_deref(), Some(owner.as_str()));
            assert_eq!(walk(&fake, hash)[0], owner);
            // The header's value and RequestHash::of_key land together.
            let mut headers = http::HeaderMap::new();
            headers.insert("x-key", key.to_string().parse().unwrap());
            let by_header = match fake.pick_with(&headers, None) {
                Pick::Connection { connection, .. } => connection.address.to_string(),
                other => panic!("{other:?}"),
            };
            assert_eq!(by_header, owner);
            assert_eq!(RequestHash::of_key(key.to_string()).0, hash);
            owners.insert(owner);
        }
        // 200 keys spread over all five.
        assert_eq!(owners.len(), 5);
    }

    #[test]
    fn a_per_call_hash_wins_over_the_header_and_values_join_with_commas() {
        let config = RingHashConfig::default().with_hash_header("x-key").unwrap();
        let mut fake = started(config, &FIVE);
        all_ready(&mut fake, &FIVE);
        let mut headers = http::HeaderMap::new();
        headers.append("x-key", "a".parse().unwrap());
        headers.append("x-key", "b".parse().unwrap());
        let header = config.hash_header;
        let info = |hash| PickInfo {
            method: "/test.Service/Call",
            headers: &headers,
            hash,
        };
        assert_eq!(hash_of(header, &info(None)), Some(xxhash::xxh64(b"a,b")));
        assert_eq!(hash_of(header, &info(Some(7))), Some(7));
        assert_eq!(hash_of(None, &info(None)), None);
        let mut empty = http::HeaderMap::new();
        empty.insert("x-key", "".parse().unwrap());
        let none = PickInfo {
            method: "/test.Service/Call",
            headers: &empty,
            hash: None,
        };
        assert_eq!(hash_of(header, &none), None);
        // And a pick goes where the hash says.
        let joined = xxhash::xxh64(b"a,b");
        let by_header = match fake.pick_with(&headers, None) {
            Pick::Connection { connection, .. } => connection.address.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(Some(by_header), pick(&fake, joined));
    }

    #[test]
    fn connects_lazily_where_picks_land() {
        let mut fake = started(RingHashConfig::default(), &FIVE);
        let created = fake.take_actions();
        assert!(
            created.iter().all(|a| a.starts_with("create")),
            "{created:?}"
        );
        let hash = 42;
        let owner = walk(&fake, hash)[0].clone();
        assert_eq!(pick(&fake, hash), None);
        assert_eq!(fake.take_actions(), [format!("connect {owner}")]);
        // Asked once per picker, however many calls queue on it.
        assert_eq!(pick(&fake, hash), None);
        assert!(fake.take_actions().is_empty());
        fake.connecting(&owner);
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert_eq!(pick(&fake, hash), None);
        assert!(fake.take_actions().is_empty());
        fake.ready(&owner);
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        assert_eq!(pick(&fake, hash).as_deref(), Some(owner.as_str()));
        // A lost connection is Idle and waits for the next pick to redial.
        fake.lost(&owner);
        assert!(fake.take_actions().is_empty());
        assert_eq!(fake.connectivity(), ConnectivityState::Idle);
        assert_eq!(pick(&fake, hash), None);
        assert_eq!(fake.take_actions(), [format!("connect {owner}")]);
    }

    #[test]
    fn a_pick_on_a_failing_endpoint_walks_to_the_next_ready_one() {
        let mut fake = started(RingHashConfig::default(), &FIVE);
        all_ready(&mut fake, &FIVE);
        let hash = 7;
        let order = walk(&fake, hash);
        fake.lost(&order[0]);
        fake.connecting(&order[0]);
        fake.fail(&order[0]);
        fake.take_actions();
        assert_eq!(pick(&fake, hash).as_deref(), Some(order[1].as_str()));
        // Sticky failure: its next attempt (Connecting) still counts as
        // failing, so picks keep walking instead of queueing on it.
        fake.connecting(&order[0]);
        assert_eq!(pick(&fake, hash).as_deref(), Some(order[1].as_str()));
        // The second failing too: on to the first Ready one after them.
        fake.lost(&order[1]);
        fake.fail(&order[1]);
        assert_eq!(pick(&fake, hash).as_deref(), Some(order[2].as_str()));
        // Back once it connects.
        fake.ready(&order[0]);
        assert_eq!(pick(&fake, hash).as_deref(), Some(order[0].as_str()));
    }

    #[test]
    fn a_failing_first_connects_the_next_idle_one_and_queues() {
        let mut fake = started(RingHashConfig::default(), &FIVE);
        let hash = 99;
        let order = walk(&fake, hash);
        assert_eq!(pick(&fake, hash), None);
        fake.connecting(&order[0]);
        fake.fail(&order[0]);
        fake.take_actions();
        assert_eq!(pick(&fake, hash), None);
        let actions = fake.take_actions();
        assert!(
            actions.contains(&format!("connect {}", order[1])),
            "{actions:?}"
        );
        // One failure among five is one bad backend: still Connecting.
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        fake.ready(&order[1]);
        assert_eq!(pick(&fake, hash).as_deref(), Some(order[1].as_str()));
    }

    #[test]
    fn fails_a_pick_only_when_every_endpoint_fails() {
        let mut fake = started(RingHashConfig::default(), &["a:1", "b:1"]);
        fake.fail("a:1");
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        let last = fake.fail("b:1");
        assert_eq!(fake.connectivity(), ConnectivityState::TransientFailure);
        assert_eq!(fake.picker().last_error, Some(last));
        assert!(matches!(
            fake.pick_with(&http::HeaderMap::new(), Some(1)),
            Pick::Fail(status) if status.code() == tonic::Code::Unavailable
        ));
    }

    #[test]
    fn a_call_with_no_key_takes_any_ready_endpoint() {
        let mut fake = started(RingHashConfig::default(), &FIVE);
        fake.take_actions();
        // Nothing Ready: it connects where its random hash landed.
        assert!(matches!(fake.pick(), Pick::Queue));
        let actions = fake.take_actions();
        assert_eq!(actions.len(), 1, "{actions:?}");
        fake.ready("c:1");
        for _ in 0..50 {
            assert_eq!(fake.call(tonic::Code::Ok).as_deref(), Some("c:1"));
        }
        all_ready(&mut fake, &FIVE);
        let spread: HashSet<String> = (0..200)
            .filter_map(|_| fake.call(tonic::Code::Ok))
            .collect();
        assert!(spread.len() > 1, "{spread:?}");
    }

    fn owners(fake: &FakeController<RingHash>, keys: &[u64]) -> Vec<String> {
        keys.iter()
            .map(|&h| pick(fake, h).expect("a Ready endpoint"))
            .collect()
    }

    #[test]
    fn a_failing_endpoint_of_five_moves_only_its_keys_to_the_next_on_the_ring() {
        let mut fake = started(RingHashConfig::default(), &FIVE);
        all_ready(&mut fake, &FIVE);
        let keys: Vec<u64> = (0..1000u64)
            .map(|k| xxhash::xxh64(&k.to_le_bytes()))
            .collect();
        let before = owners(&fake, &keys);
        fake.lost("c:1");
        fake.fail("c:1");
        let during = owners(&fake, &keys);
        for ((hash, was), is) in keys.iter().zip(&before).zip(&during) {
            match was == "c:1" {
                // Where the ring without c:1 would have put it.
                true => assert_eq!(is, &walk(&fake, *hash)[1]),
                false => assert_eq!(was, is, "a key of {was} moved to {is}"),
            }
        }
        fake.ready("c:1");
        assert_eq!(owners(&fake, &keys), before);
    }

    /// A42 sizes the ring from the endpoint count (the lightest endpoint
    /// gets `ceil(share * minRingSize)` points), so removing one of five
    /// gives each survivor more points: besides the removed endpoint's
    /// keys, the keys that fall on those new points move too. Measured
    /// here so that a change to the construction shows.
    #[test]
    fn removing_one_of_five_moves_its_keys_and_a_few_more_and_back_returns_them_all() {
        let mut fake = started(RingHashConfig::default(), &FIVE);
        all_ready(&mut fake, &FIVE);
        let keys: Vec<u64> = (0..1000u64)
            .map(|k| xxhash::xxh64(&k.to_le_bytes()))
            .collect();
        let before = owners(&fake, &keys);
        fake.update(Update::Delta(Delta {
            removed: vec!["c:1".into()],
            ..Delta::default()
        }));
        assert_eq!(fake.take_actions(), ["remove c:1"]);
        let after = owners(&fake, &keys);
        let of_c = before.iter().filter(|a| *a == "c:1").count();
        let others_moved = before
            .iter()
            .zip(&after)
            .filter(|(was, is)| *was != "c:1" && was != is)
            .count();
        assert!(after.iter().all(|a| a != "c:1"));
        // About a fifth of the keys were c:1's.
        assert!((150..=250).contains(&of_c), "{of_c}");
        // 205 points each become 256: about an eighth of the others move.
        assert_eq!((of_c, others_moved), (186, 117));
        // Back again: every key returns where it was.
        fake.update(Update::Delta(Delta {
            added: vec![Endpoint::new("c:1")],
            ..Delta::default()
        }));
        fake.ready("c:1");
        assert_eq!(owners(&fake, &keys), before);
    }
}
