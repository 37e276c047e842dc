//! Resources built once and shared by every ADS stream.
//!
//! A thousand streams subscribed to one service all send the same
//! ClusterLoadAssignment at the same version. Building and encoding it per
//! stream made the registry's work grow with streams × endpoints on every
//! change; here the first stream to need a resource at a version builds
//! it, and the others take the same encoded `Any`. That also makes the
//! bytes of one version identical on every stream, whatever order each
//! stream's own endpoint set happens to hold them in.
//!
//! What a resource is built from, its [`Basis`], is what identifies it:
//! for EDS the endpoints' epoch and version, for LDS, RDS and CDS the
//! service config (those resources depend on nothing else; whether they
//! exist at all is decided by the caller before asking).
//!
//! Memory stays bounded two ways: a service keeps its last few builds of
//! each kind (streams briefly disagree on the latest version while a
//! change fans out), and past a byte budget the services used least
//! recently are dropped whole.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use envoy_types::pb::google::protobuf::Any;

use super::resources::Kind;
use crate::service_config::ZonePreference;

/// Builds kept per service and kind. Two would cover a change fanning out
/// while the next one lands; a third absorbs a burst.
const KEPT_PER_KIND: usize = 3;

/// Bytes of encoded resources the cache holds before it drops the services
/// used least recently: generous for thousands of services of a few
/// hundred endpoints each, small beside the streams that send them.
pub const DEFAULT_BUDGET_BYTES: usize = 64 << 20;

/// Bookkeeping counted per build beside its bytes (names, queue slots), so
/// many tiny resources still add up against the budget.
const OVERHEAD_BYTES: usize = 128;

/// What a resource was built from: a resource of the same kind and service
/// with the same basis is the same resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// EDS: the endpoints at this version of this epoch (versions repeat
    /// across epochs, so the epoch is part of it).
    /// The subscriber's zone is part of it too: priorities are relative
    /// to it.
    Endpoints {
        epoch: Option<u64>,
        version: u64,
        zone: Option<Arc<str>>,
        /// The service config's zone preference, which sets the
        /// priorities and the overprovisioning factor.
        preference: Option<ZonePreference>,
    },
    /// LDS, RDS, CDS: the service config of this version and text, or
    /// none. The text is kept too: config versions carry no epoch, and two
    /// store histories could number different configs alike.
    Config(Option<(u64, Arc<str>)>),
}

/// The shared resources of one registry's ADS streams. A std mutex: it is
/// never held across an `.await` nor while a resource is built, only for a
/// map look-up or insert.
pub struct ResourceCache {
    /// The services' builds and the recency clock.
    state: Mutex<State>,
    /// Bytes of builds held before services are evicted.
    budget: usize,
}

/// The cache's contents.
#[derive(Default)]
struct State {
    /// By service name.
    services: HashMap<String, ServiceBuilds>,
    /// Bytes held over all services, as [`cost`] counts them.
    bytes: usize,
    /// Advances on every look-up; orders services by last use.
    clock: u64,
}

/// The builds of one kind of one service, newest first, each with what it
/// was built from.
type Builds = VecDeque<(Basis, Arc<Any>)>;

/// What one service has built.
#[derive(Default)]
struct ServiceBuilds {
    /// The clock at the service's latest look-up.
    used: u64,
    /// Per kind, newest first, at most [`KEPT_PER_KIND`].
    builds: Vec<(Kind, Builds)>,
    /// Bytes of `builds`.
    bytes: usize,
}

impl ResourceCache {
    /// An empty cache holding up to about `budget` bytes of resources.
    pub fn new(budget: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            budget,
        }
    }

    /// The resource of `kind` for `service` built from `basis`: the one
    /// already built if any, else what `build` returns, kept for the next
    /// stream (a `None`, no resource, is not kept). `build` runs without
    /// the lock held; when two streams miss at once, both build and the
    /// first insert is the one both return.
    pub fn get_or_build(
        &self,
        kind: Kind,
        service: &str,
        basis: Basis,
        build: impl FnOnce() -> Option<Any>,
    ) -> Option<Arc<Any>> {
        if let Some(found) = self.lock().find(kind, service, &basis) {
            return Some(found);
        }
        let built = Arc::new(build()?);
        let mut state = self.lock();
        if let Some(found) = state.find(kind, service, &basis) {
            return Some(found);
        }
        state.insert(kind, service, basis, built.clone());
        state.evict_over(self.budget);
        Some(built)
    }

    /// Bytes held, as counted against the budget.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Services held.
    #[cfg(test)]
    fn services(&self) -> usize {
        self.lock().services.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves only whole entries.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// The build of `kind` for `service` from `basis`, marking the service
    /// used.
    fn find(&mut self, kind: Kind, service: &str, basis: &Basis) -> Option<Arc<Any>> {
        self.clock += 1;
        let clock = self.clock;
        let builds = self.services.get_mut(service)?;
        builds.used = clock;
        builds
            .builds
            .iter()
            .find(|(k, _)| *k == kind)?
            .1
            .iter()
            .find(|(b, _)| b == basis)
            .map(|(_, any)| any.clone())
    }

    /// Keeps `any` as the newest build of `kind` for `service`, dropping
    /// the oldest past [`KEPT_PER_KIND`].
    fn insert(&mut self, kind: Kind, service: &str, basis: Basis, any: Arc<Any>) {
        let clock = self.clock;
        let builds = self.services.entry(service.to_owned()).or_default();
        builds.used = clock;
        let position = match builds.builds.iter().position(|(k, _)| *k == kind) {
            Some(position) => position,
            None => {
                builds.builds.push((kind, VecDeque::new()));
                builds.builds.len() - 1
            }
        };
        let queue = &mut builds.builds[position].1;
        let added = cost(&any);
        queue.push_front((basis, any));
        let mut removed = 0;
        while queue.len() > KEPT_PER_KIND {
            if let Some((_, old)) = queue.pop_back() {
                removed += cost(&old);
            }
        }
        builds.bytes = builds.bytes + added - removed;
        self.bytes = self.bytes + added - removed;
    }

    /// Drops the services used least recently until the cache is back
    /// under three quarters of `budget`, so one eviction pass pays for
    /// many inserts. The service just used is kept even if it alone is
    /// over: the stream that built it is about to send it anyway.
    fn evict_over(&mut self, budget: usize) {
        if self.bytes <= budget {
            return;
        }
        let mut by_age: Vec<(u64, String)> = self
            .services
            .iter()
            .map(|(name, builds)| (builds.used, name.clone()))
            .collect();
        by_age.sort_unstable();
        let target = budget / 4 * 3;
        let newest = self.clock;
        for (used, name) in by_age {
            if self.bytes <= target || used == newest {
                break;
            }
            if let Some(builds) = self.services.remove(&name) {
                self.bytes -= builds.bytes;
            }
        }
    }
}

/// What a build counts against the budget.
fn cost(any: &Any) -> usize {
    any.value.len() + any.type_url.len() + OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(bytes: usize) -> Any {
        Any {
            type_url: "t".into(),
            value: vec![7; bytes],
        }
    }

    fn at(version: u64) -> Basis {
        Basis::Endpoints {
            epoch: Some(1),
            version,
            zone: None,
            preference: None,
        }
    }

    /// The resource for `basis`, built of `bytes` bytes on a miss, and
    /// whether it was built.
    fn get(
        cache: &ResourceCache,
        kind: Kind,
        service: &str,
        basis: Basis,
        bytes: usize,
    ) -> (Arc<Any>, bool) {
        let mut built = false;
        let any = cache
            .get_or_build(kind, service, basis, || {
                built = true;
                Some(any(bytes))
            })
            .expect("a resource");
        (any, built)
    }

    #[test]
    fn the_same_basis_is_built_once_and_shared() {
        let cache = ResourceCache::new(DEFAULT_BUDGET_BYTES);
        let (first, built) = get(&cache, Kind::Endpoints, "svc", at(3), 10);
        assert!(built);
        let (second, built) = get(&cache, Kind::Endpoints, "svc", at(3), 99);
        assert!(!built);
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn no_resource_is_not_kept() {
        let cache = ResourceCache::new(DEFAULT_BUDGET_BYTES);
        assert!(cache
            .get_or_build(Kind::Listener, "svc", Basis::Config(None), || None)
            .is_none());
        assert_eq!(cache.services(), 0);
        let (_, built) = get(&cache, Kind::Listener, "svc", Basis::Config(None), 1);
        assert!(built);
    }

    #[test]
    fn a_new_version_kind_epoch_or_config_is_built_anew() {
        let cache = ResourceCache::new(DEFAULT_BUDGET_BYTES);
        let (v3, _) = get(&cache, Kind::Endpoints, "svc", at(3), 1);
        let (v4, built) = get(&cache, Kind::Endpoints, "svc", at(4), 2);
        assert!(built && !Arc::ptr_eq(&v3, &v4));
        let other_epoch = Basis::Endpoints {
            epoch: Some(2),
            version: 3,
            zone: None,
            preference: None,
        };

        assert!(get(&cache, Kind::Endpoints, "svc", other_epoch, 3).1);
        // The older version is still there for a stream that lags.
        let (again, built) = get(&cache, Kind::Endpoints, "svc", at(3), 4);
        assert!(!built && Arc::ptr_eq(&v3, &again));

        assert!(get(&cache, Kind::Cluster, "svc", Basis::Config(None), 5).1);
        let configured = Basis::Config(Some((1, Arc::from("{}"))));
        assert!(get(&cache, Kind::Cluster, "svc", configured.clone(), 6).1);
        assert!(!get(&cache, Kind::Cluster, "svc", configured.clone(), 6).1);
        // Same config version, other text: another store history.
        let renumbered = Basis::Config(Some((1, Arc::from(r#"{"x":1}"#))));
        assert!(get(&cache, Kind::Cluster, "svc", renumbered, 7).1);
        // Another kind or service with the same basis is its own resource.
        assert!(get(&cache, Kind::Listener, "svc", configured.clone(), 8).1);
        assert!(get(&cache, Kind::Cluster, "other", configured, 9).1);
    }

    #[test]
    fn each_subscriber_zone_has_its_own_build() {
        let cache = ResourceCache::new(DEFAULT_BUDGET_BYTES);
        let zone = |zone: Option<&str>| Basis::Endpoints {
            epoch: Some(1),
            version: 3,
            zone: zone.map(Arc::from),
            preference: None,
        };
        assert!(get(&cache, Kind::Endpoints, "svc", zone(None), 1).1);
        assert!(get(&cache, Kind::Endpoints, "svc", zone(Some("a")), 1).1);
        assert!(!get(&cache, Kind::Endpoints, "svc", zone(Some("a")), 1).1);
    }

    #[test]
    fn each_kind_keeps_its_last_few_builds() {
        let cache = ResourceCache::new(DEFAULT_BUDGET_BYTES);
        for version in 0..10 {
            get(&cache, Kind::Endpoints, "svc", at(version), 100);
        }
        assert_eq!(cache.bytes(), KEPT_PER_KIND * cost(&any(100)));
        assert!(
            !get(&cache, Kind::Endpoints, "svc", at(9), 100).1,
            "the newest is kept"
        );
        assert!(
            get(&cache, Kind::Endpoints, "svc", at(0), 100).1,
            "the oldest builds are dropped"
        );
    }

    #[test]
    fn past_the_budget_the_least_recently_used_services_go() {
        let one = cost(&any(1000));
        let cache = ResourceCache::new(10 * one);
        for service in 0..10 {
            get(&cache, Kind::Endpoints, &format!("s{service}"), at(1), 1000);
        }
        assert_eq!(cache.services(), 10);
        // s0 is used again, so s1 is now the oldest.
        get(&cache, Kind::Endpoints, "s0", at(1), 1000);
        get(&cache, Kind::Endpoints, "s10", at(1), 1000);
        assert!(cache.bytes() <= 10 * one);
        assert!(cache.services() < 10);
        assert!(
            !get(&cache, Kind::Endpoints, "s0", at(1), 1000).1,
            "a service used recently stays"
        );
        assert!(
            get(&cache, Kind::Endpoints, "s1", at(1), 1000).1,
            "the least recently used went first"
        );
    }

    #[test]
    fn one_service_over_the_whole_budget_is_still_served() {
        let cache = ResourceCache::new(10);
        let (built, _) = get(&cache, Kind::Endpoints, "big", at(1), 1000);
        assert_eq!(built.value.len(), 1000);
        assert_eq!(cache.services(), 1);
    }
}
