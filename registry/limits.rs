//! Caps on what one client can hold open, so a flood from one client cannot
//! take the registry from everyone else. Past a cap the request gets
//! RESOURCE_EXHAUSTED naming the cap, and everyone else is served as before.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::{Cap, RegistryError};

/// Counts open Watch streams, in all and per client connection.
#[derive(Debug)]
pub struct WatchSlots {
    /// Open streams in all.
    total: AtomicUsize,
    /// Open streams per peer address (one address is one TCP connection).
    per_connection: DashMap<SocketAddr, usize>,
    /// Cap on `total`.
    max_total: usize,
    /// Cap on each entry of `per_connection`.
    max_per_connection: usize,
}

impl WatchSlots {
    /// Slots for at most `max_total` streams, `max_per_connection` each.
    pub fn new(max_total: usize, max_per_connection: usize) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicUsize::new(0),
            per_connection: DashMap::new(),
            max_total,
            max_per_connection,
        })
    }

    /// Takes a slot for a stream from `peer` (unknown peers only count
    /// towards the total), held until the returned guard drops.
    pub fn acquire(self: &Arc<Self>, peer: Option<SocketAddr>) -> Result<WatchSlot, RegistryError> {
        if let Some(peer) = peer {
            let mut open = self.per_connection.entry(peer).or_insert(0);
            if *open >= self.max_per_connection {
                return Err(RegistryError::exhausted(
                    Cap::WatchStreamsPerConnection,
                    self.max_per_connection,
                ));
            }
            *open += 1;
        }
        let reserved = self.total.fetch_add(1, Ordering::AcqRel);
        let slot = WatchSlot {
            slots: self.clone(),
            peer,
        };
        if reserved >= self.max_total {
            // Dropping the slot gives back both counts taken above.
            drop(slot);
            return Err(RegistryError::exhausted(Cap::WatchStreams, self.max_total));
        }
        Ok(slot)
    }

    /// Open streams in all.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One open Watch stream's slot; given back on drop.
#[derive(Debug)]
pub struct WatchSlot {
    slots: Arc<WatchSlots>,
    peer: Option<SocketAddr>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.slots.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(peer) = self.peer {
            self.slots.per_connection.remove_if_mut(&peer, |_, open| {
                *open = open.saturating_sub(1);
                *open == 0
            });
        }
    }
}

/// Connections tracked before idle ones are swept out of [`RegistrationRate`].
const SWEEP_ABOVE: usize = 1024;

/// Caps how fast one client connection may call Register: a token bucket per
/// connection holding one second's worth of registrations, so a burst as
/// large as the rate passes and a sustained flood is refused.
#[derive(Debug)]
pub struct RegistrationRate {
    /// Registrations per second per connection; `None` turns the cap off.
    per_second: Option<NonZeroU32>,
    /// One bucket per peer address (one address is one TCP connection).
    buckets: DashMap<SocketAddr, Bucket>,
    /// When idle buckets were last swept out.
    last_sweep: Mutex<Instant>,
}

/// What one connection may still register right now.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Registrations allowed now; refills at the rate, up to one second's worth.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl RegistrationRate {
    /// A cap of `per_second` registrations per connection, or none.
    pub fn new(per_second: Option<NonZeroU32>) -> Self {
        Self {
            per_second,
            buckets: DashMap::new(),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Takes one registration from `peer`'s budget, or refuses with
    /// RESOURCE_EXHAUSTED naming the cap. Unknown peers are not capped.
    pub fn admit(&self, peer: Option<SocketAddr>) -> Result<(), RegistryError> {
        self.admit_at(peer, Instant::now())
    }

    /// [`RegistrationRate::admit`] at `now`; tests step the clock with it.
    fn admit_at(&self, peer: Option<SocketAddr>, now: Instant) -> Result<(), RegistryError> {
        let (Some(rate), Some(peer)) = (self.per_second, peer) else {
            return Ok(());
        };
        let rate = f64::from(rate.get());
        let admitted = {
            let mut bucket = self.buckets.entry(peer).or_insert(Bucket {
                tokens: rate,
                updated: now,
            });
            let refill = now.duration_since(bucket.updated).as_secs_f64() * rate;
            bucket.tokens = (bucket.tokens + refill).min(rate);
            bucket.updated = now;
            let admitted = bucket.tokens >= 1.0;
            if admitted {
                bucket.tokens -= 1.0;
            }
            admitted
        };
        self.sweep(now);
        if admitted {
            Ok(())
        } else {
            Err(RegistryError::exhausted(
                Cap::RegistrationsPerSecondPerConnection,
                rate as usize,
            ))
        }
    }

    /// Forgets connections idle for a second: their buckets are full again,
    /// so forgetting them changes nothing but the memory they hold.
    fn sweep(&self, now: Instant) {
        const IDLE: Duration = Duration::from_secs(1);
        if self.buckets.len() <= SWEEP_ABOVE {
            return;
        }
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if now.duration_since(*last) < IDLE {
                return;
            }
            *last = now;
        }
        self.buckets
            .retain(|_, bucket| now.duration_since(bucket.updated) < IDLE);
    }

    /// Connections with a bucket right now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_capped_per_connection_and_refill_with_time() {
        let rate = RegistrationRate::new(NonZeroU32::new(3));
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let start = Instant::now();
        for _ in 0..3 {
            rate.admit_at(Some(a), start).unwrap();
        }
        let refused = rate.admit_at(Some(a), start).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "registrations per second per connection limit of 3 reached"
        );
        rate.admit_at(Some(b), start)
            .expect("another connection has its own budget");
        rate.admit_at(None, start)
            .expect("unknown peers are not capped");
        let later = start + Duration::from_millis(340);
        rate.admit_at(Some(a), later)
            .expect("a third of a second refills one");
        assert!(rate.admit_at(Some(a), later).is_err());
        let much_later = later + Duration::from_secs(10);
        for _ in 0..3 {
            rate.admit_at(Some(a), much_later).unwrap();
        }
        assert!(
            rate.admit_at(Some(a), much_later).is_err(),
            "the burst is one second's worth"
        );
    }

    #[test]
    fn idle_connections_are_forgotten() {
        let rate = RegistrationRate::new(NonZeroU32::new(10));
        let start = Instant::now();
        for port in 0..=SWEEP_ABOVE as u16 {
            rate.admit_at(Some(SocketAddr::from(([127, 0, 0, 1], port))), start)
                .unwrap();
        }
        let later = start + Duration::from_secs(2);
        rate.admit_at(Some("127.0.0.2:1".parse().unwrap()), later)
            .unwrap();
        assert_eq!(rate.tracked(), 1);
    }

    #[test]
    fn without_a_rate_nothing_is_capped() {
        let rate = RegistrationRate::new(None);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for _ in 0..10_000 {
            rate.admit(Some(a)).unwrap();
        }
        assert_eq!(rate.tracked(), 0);
    }

    #[test]
    fn caps_per_connection_and_in_all_and_gives_slots_back() {
        let slots = WatchSlots::new(3, 2);
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let a1 = slots.acquire(Some(a)).unwrap();
        let _a2 = slots.acquire(Some(a)).unwrap();
        assert!(slots.acquire(Some(a)).is_err(), "third on one connection");
        let _b1 = slots.acquire(Some(b)).unwrap();
        assert!(slots.acquire(Some(b)).is_err(), "fourth in all");
        assert_eq!(slots.open(), 3);
        drop(a1);
        assert_eq!(slots.open(), 2);
        let _b2 = slots.acquire(Some(b)).unwrap();
        assert_eq!(slots.open(), 3);
    }
}
