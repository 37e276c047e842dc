//! Leases: who may keep an endpoint registered, and until when.
//!
//! The table is one `std::sync::Mutex` around a map of leases and a set of
//! `(deadline, lease)` pairs ordered by deadline, the shape mini-redis uses
//! for key expiry: one timer task asks for everything past its deadline and
//! sleeps until the next one. A std mutex suffices because nothing awaits
//! while holding it and every critical section is a few map operations.
//!
//! # Stalls
//!
//! A registry that could not run (SIGSTOP, a VM pause, a long GC-like
//! pause) read no heartbeat meanwhile, through no fault of its backends. So
//! the table notes when the registry was last seen running
//! ([`LeaseTable::observe`], called by a 100 ms ticker and by the expiry
//! task itself, on the monotonic clock); a gap longer than
//! [`STALL_THRESHOLD`] is a stall, and every deadline moves forward by the
//! gap plus [`STALL_GRACE`], time to read the heartbeats queued in the
//! sockets meanwhile. A backend that really died still goes: its stream
//! was closed (that ends its lease at once), or its heartbeats stay missing
//! past the moved deadline.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::RegistryError;

/// An unguessable 128-bit lease id, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(u128);

impl LeaseId {
    /// Draws a fresh id from a cryptographically secure generator.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

impl FromStr for LeaseId {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegistryError::invalid(
                "lease_id",
                "must be the 32 hex digits returned by Register",
            ));
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| RegistryError::invalid("lease_id", "is not hexadecimal"))
    }
}

/// A gap in the registry's own running longer than this is a stall, not
/// scheduling noise: 5 ticks of the 100 ms ticker missed.
pub const STALL_THRESHOLD: Duration = Duration::from_millis(500);

/// Time given after a stall, on top of its length, for the heartbeats that
/// queued up in the sockets to be read before anything expires.
pub const STALL_GRACE: Duration = Duration::from_secs(1);

/// How often the registry notes that it runs; see [`LeaseTable::observe`].
pub const STALL_TICK: Duration = Duration::from_millis(100);

/// Identifies one KeepAlive stream, so that a stream which ends only revokes
/// the leases it still carries (a lease may move to a newer stream).
pub type StreamId = u64;

/// What a lease keeps registered.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The service the endpoint belongs to.
    pub service: Arc<str>,
    /// The endpoint address.
    pub address: Arc<str>,
    /// Time to live after each heartbeat.
    pub ttl: Duration,
    /// When the lease was granted, so operators can see its age.
    pub granted: Instant,
    /// When the lease ends unless refreshed.
    deadline: Instant,
    /// The KeepAlive stream the lease is bound to, once it has heartbeated.
    stream: Option<StreamId>,
}

/// Every live lease, ordered by deadline for the expiry task.
pub struct LeaseTable {
    /// The leases and their deadline index.
    state: Mutex<State>,
    /// Wakes the expiry task when a deadline earlier than the one it sleeps
    /// towards appears.
    earlier_deadline: Notify,
}

struct State {
    leases: HashMap<LeaseId, Lease>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
    /// When the registry was last seen running, for stall detection.
    awake_at: Instant,
}

impl Default for LeaseTable {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                leases: HashMap::new(),
                deadlines: BTreeSet::new(),
                awake_at: Instant::now(),
            }),
            earlier_deadline: Notify::new(),
        }
    }
}

/// A stall of the registry that [`LeaseTable::observe`] made up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// How long the registry did not run.
    pub length: Duration,
    /// How far every deadline moved.
    pub extended_by: Duration,
    /// How many leases were extended.
    pub leases: usize,
}

impl LeaseTable {
    /// Grants a lease for `service`/`address` that ends after `ttl`.
    pub fn grant(&self, id: LeaseId, service: Arc<str>, address: Arc<str>, ttl: Duration) {
        self.grant_at(id, service, address, ttl, Instant::now());
    }

    /// [`LeaseTable::grant`] at `now`; tests step the clock with it.
    fn grant_at(
        &self,
        id: LeaseId,
        service: Arc<str>,
        address: Arc<str>,
        ttl: Duration,
        now: Instant,
    ) {
        let deadline = now + ttl;
        let mut state = self.lock();
        let earliest = state.deadlines.first().map(|(at, _)| *at);
        state.deadlines.insert((deadline, id));
        state.leases.insert(
            id,
            Lease {
                service,
                address,
                ttl,
                granted: now,
                deadline,
                stream: None,
            },
        );
        drop(state);
        if earliest.is_none_or(|at| deadline < at) {
            self.earlier_deadline.notify_one();
        }
    }

    /// Pushes a lease's deadline one TTL ahead and binds it to `stream`.
    pub fn refresh(&self, id: LeaseId, stream: StreamId) -> Result<Duration, RegistryError> {
        self.refresh_at(id, stream, Instant::now())
    }

    /// [`LeaseTable::refresh`] at `now`.
    fn refresh_at(
        &self,
        id: LeaseId,
        stream: StreamId,
        now: Instant,
    ) -> Result<Duration, RegistryError> {
        let mut state = self.lock();
        let State {
            leases, deadlines, ..
        } = &mut *state;
        let lease = leases
            .get_mut(&id)
            .ok_or_else(|| RegistryError::LeaseNotFound(id.to_string()))?;
        deadlines.remove(&(lease.deadline, id));
        lease.deadline = now + lease.ttl;
        lease.stream = Some(stream);
        deadlines.insert((lease.deadline, id));
        Ok(lease.ttl)
    }

    /// Looks a lease up without changing it.
    pub fn get(&self, id: LeaseId) -> Result<Lease, RegistryError> {
        self.lock()
            .leases
            .get(&id)
            .cloned()
            .ok_or_else(|| RegistryError::LeaseNotFound(id.to_string()))
    }

    /// Ends a lease, returning what it held.
    pub fn revoke(&self, id: LeaseId) -> Option<Lease> {
        let mut state = self.lock();
        let lease = state.leases.remove(&id)?;
        state.deadlines.remove(&(lease.deadline, id));
        Some(lease)
    }

    /// Ends the lease only if it is still bound to `stream`.
    pub fn revoke_if_bound(&self, id: LeaseId, stream: StreamId) -> Option<Lease> {
        let mut state = self.lock();
        if state.leases.get(&id)?.stream != Some(stream) {
            return None;
        }
        let lease = state.leases.remove(&id)?;
        state.deadlines.remove(&(lease.deadline, id));
        Some(lease)
    }

    /// Notes that the registry runs at `now`. If it was last seen running
    /// more than [`STALL_THRESHOLD`] ago it was stalled: every deadline
    /// moves forward by the stall plus [`STALL_GRACE`], and the stall is
    /// returned.
    pub fn observe(&self, now: Instant) -> Option<Stall> {
        let mut state = self.lock();
        state.observe(now)
    }

    /// Notes every [`STALL_TICK`] that the registry runs, so a stall is
    /// seen (and made up for) as soon as it ends, even with no lease due.
    /// Runs until dropped.
    pub async fn watch_for_stalls(&self) {
        let mut ticks = tokio::time::interval(STALL_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Some(stall) = self.observe(Instant::now()) {
                log_stall(stall);
            }
        }
    }

    /// Removes every lease whose deadline has passed and returns them, with
    /// the next deadline still pending. A stall noticed here (the expiry
    /// task may be the first to run after one) is made up for first.
    pub fn take_expired(&self, now: Instant) -> (Vec<(LeaseId, Lease)>, Option<Instant>) {
        let mut state = self.lock();
        if let Some(stall) = state.observe(now) {
            log_stall(stall);
        }
        let mut expired = Vec::new();
        while let Some(&(deadline, id)) = state.deadlines.first() {
            if deadline > now {
                return (expired, Some(deadline));
            }
            state.deadlines.pop_first();
            if let Some(lease) = state.leases.remove(&id) {
                expired.push((id, lease));
            }
        }
        (expired, None)
    }

    /// Resolves when a lease with an earlier deadline than any before it was
    /// granted.
    pub async fn earlier_deadline(&self) {
        self.earlier_deadline.notified().await
    }

    /// The table's one timer, for the task that owns it (each store runs
    /// one): hands every lease whose deadline passed to `expired`, then
    /// sleeps until the next deadline or until an earlier one appears. It
    /// never ends; its owner aborts the task.
    pub async fn run_expiry(&self, mut expired: impl FnMut(LeaseId, Lease)) {
        loop {
            let (due, next) = self.take_expired(Instant::now());
            for (id, lease) in due {
                expired(id, lease);
            }
            match next {
                Some(deadline) => tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = self.earlier_deadline() => {}
                },
                None => self.earlier_deadline().await,
            }
        }
    }

    /// How many leases are live.
    pub fn len(&self) -> usize {
        self.lock().leases.len()
    }

    /// Whether no lease is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the registry, so keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How long an operator's removal of a lease is remembered: far longer than
/// any TTL, so its holder has heartbeated (and been told) long before it is
/// forgotten. The etcd store keeps its shared record of a removal as long.
pub const REMOVED_MEMORY: Duration = Duration::from_secs(3600);

/// Most removals remembered at once; past it the oldest are forgotten
/// first, so an operator's script cannot grow the registry without bound.
const REMOVED_CAP: usize = 100_000;

/// Leases an operator removed: their holders' heartbeats are refused as
/// removed rather than unknown, so they do not register again. One rule for
/// both stores: a removal is remembered for [`REMOVED_MEMORY`], and at most
/// the last `REMOVED_CAP` of them.
#[derive(Debug, Default)]
pub struct RemovedLeases {
    state: Mutex<Removed>,
}

#[derive(Debug, Default)]
struct Removed {
    /// When each lease was last removed.
    at: HashMap<LeaseId, Instant>,
    /// The same, oldest first, to forget in order.
    order: VecDeque<(Instant, LeaseId)>,
}

impl RemovedLeases {
    /// Remembers that an operator removed `id`.
    pub fn remember(&self, id: LeaseId) {
        self.remember_at(id, Instant::now());
    }

    /// [`RemovedLeases::remember`] as of `now`.
    pub fn remember_at(&self, id: LeaseId, now: Instant) {
        let mut state = self.lock();
        state.forget_before(now);
        state.at.insert(id, now);
        state.order.push_back((now, id));
        while state.at.len() > REMOVED_CAP {
            state.pop_oldest();
        }
    }

    /// Whether an operator removed `id` within [`REMOVED_MEMORY`].
    pub fn contains(&self, id: LeaseId) -> bool {
        self.contains_at(id, Instant::now())
    }

    /// [`RemovedLeases::contains`] as of `now`.
    pub fn contains_at(&self, id: LeaseId, now: Instant) -> bool {
        self.lock()
            .at
            .get(&id)
            .is_some_and(|at| now.saturating_duration_since(*at) < REMOVED_MEMORY)
    }

    fn lock(&self) -> MutexGuard<'_, Removed> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Removed {
    fn forget_before(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= REMOVED_MEMORY)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((at, id)) = self.order.pop_front() {
            // A lease removed again later is remembered from then.
            if self.at.get(&id) == Some(&at) {
                self.at.remove(&id);
            }
        }
    }
}

impl State {
    fn observe(&mut self, now: Instant) -> Option<Stall> {
        let gap = now.saturating_duration_since(self.awake_at);
        self.awake_at = self.awake_at.max(now);
        if gap <= STALL_THRESHOLD {
            return None;
        }
        let extended_by = gap + STALL_GRACE;
        let deadlines = std::mem::take(&mut self.deadlines);
        self.deadlines = deadlines
            .into_iter()
            .map(|(deadline, id)| {
                let deadline = deadline + extended_by;
                if let Some(lease) = self.leases.get_mut(&id) {
                    lease.deadline = deadline;
                }
                (deadline, id)
            })
            .collect();
        Some(Stall {
            length: gap,
            extended_by,
            leases: self.leases.len(),
        })
    }
}

/// Says, once per stall, that the registry made up for it.
pub fn log_stall(stall: Stall) {
    tracing::warn!(
        stalled = ?stall.length,
        extended_by = ?stall.extended_by,
        leases = stall.leases,
        "registry stalled; extending every lease instead of expiring it"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn removals_are_remembered_for_an_hour_and_capped() {
        let removed = RemovedLeases::default();
        let start = Instant::now();
        let first = LeaseId::random();
        removed.remember_at(first, start);
        assert!(removed.contains_at(first, start + REMOVED_MEMORY - Duration::from_secs(1)));
        assert!(!removed.contains_at(first, start + REMOVED_MEMORY));
        // Removed again later: remembered from then, not forgotten early.
        let later = start + Duration::from_secs(60);
        removed.remember_at(first, later);
        removed.remember_at(LeaseId::random(), start + REMOVED_MEMORY);
        assert!(removed.contains_at(first, start + REMOVED_MEMORY));
        let now = start + REMOVED_MEMORY * 3;
        let ids: Vec<LeaseId> = (0..REMOVED_CAP + 1).map(|_| LeaseId::random()).collect();
        for &id in &ids {
            removed.remember_at(id, now);
        }
        assert!(
            !removed.contains_at(ids[0], now),
            "the oldest goes past the cap"
        );
        assert!(removed.contains_at(ids[REMOVED_CAP], now));
        assert_eq!(removed.lock().at.len(), REMOVED_CAP);
    }

    use super::*;

    /// A clock the test moves by hand.
    struct Clock(Instant);

    impl Clock {
        fn start() -> Self {
            Self(Instant::now())
        }

        /// Jumps `span` ahead without the registry noticing: a stall.
        fn advance(&mut self, span: Duration) {
            self.0 += span;
        }

        /// Lets `span` pass the way a running registry lives it: in ticks
        /// of [`STALL_TICK`], each noticed, so none looks like a stall.
        fn run_for(&mut self, table: &LeaseTable, span: Duration) {
            let end = self.0 + span;
            while self.0 < end {
                self.0 += STALL_TICK.min(end - self.0);
                assert_eq!(table.observe(self.0), None);
            }
        }
    }

    #[test]
    fn lease_ids_round_trip_and_reject_garbage() {
        let id = LeaseId::random();
        assert_eq!(id.to_string().parse::<LeaseId>().unwrap(), id);
        for bad in ["", "xyz", &"g".repeat(32), &"a".repeat(33)] {
            assert!(bad.parse::<LeaseId>().is_err());
        }
    }

    #[test]
    fn expiry_orders_by_deadline_and_refresh_postpones() {
        let table = LeaseTable::default();
        let mut clock = Clock::start();
        let start = clock.0;
        let (a, b) = (LeaseId::random(), LeaseId::random());
        table.grant_at(a, "s".into(), "h:1".into(), Duration::from_secs(1), start);
        table.grant_at(b, "s".into(), "h:2".into(), Duration::from_secs(2), start);
        clock.run_for(&table, Duration::from_millis(900));
        // Refreshed at 0.9 s, `a` now ends at 1.9 s instead of 1 s.
        table.refresh_at(a, 7, clock.0).unwrap();
        clock.run_for(&table, Duration::from_millis(200));
        let (expired, next) = table.take_expired(clock.0);
        assert!(expired.is_empty(), "refresh did not postpone: {expired:?}");
        assert_eq!(next, Some(start + Duration::from_millis(1900)));
        // At 1.95 s `a` is past its deadline and `b` (2 s) is not.
        clock.run_for(&table, Duration::from_millis(850));
        let (expired, next) = table.take_expired(clock.0);
        assert_eq!(
            expired.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            vec![a]
        );
        assert_eq!(next, Some(start + Duration::from_secs(2)));
        table.refresh_at(b, 7, clock.0).unwrap();
        assert!(
            table.revoke_if_bound(b, 8).is_none(),
            "foreign stream revoked"
        );
        assert!(table.revoke_if_bound(b, 7).is_some());
        assert!(table.is_empty());
    }

    #[test]
    fn a_stall_extends_every_lease_instead_of_expiring_it() {
        let table = LeaseTable::default();
        let mut clock = Clock::start();
        let ttl = Duration::from_secs(1);
        let id = LeaseId::random();
        table.grant_at(id, "s".into(), "h:1".into(), ttl, clock.0);
        // Scheduling noise below the threshold is no stall.
        clock.advance(STALL_THRESHOLD / 2);
        assert_eq!(table.observe(clock.0), None);
        // The registry does not run for two TTLs: on its first look after,
        // the lease is extended rather than expired.
        let stalled = 2 * ttl;
        clock.advance(stalled);
        let (expired, next) = table.take_expired(clock.0);
        assert!(expired.is_empty(), "expired after a stall: {expired:?}");
        let left = next.unwrap() - clock.0;
        assert_eq!(left, ttl - STALL_THRESHOLD / 2 + STALL_GRACE);
        // Without a heartbeat it still ends once the grace is over.
        clock.run_for(&table, left);
        let (expired, _) = table.take_expired(clock.0);
        assert_eq!(expired.len(), 1);
    }
}
