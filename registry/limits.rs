//! Caps on what one client can hold open, so a flood from one client cannot
//! take the registry from everyone else. Past a cap the request gets
//! RESOURCE_EXHAUSTED naming the cap, and everyone else is served as before.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use super::RegistryError;

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
                return Err(RegistryError::ResourceExhausted {
                    what: "watch streams per connection".into(),
                    limit: self.max_per_connection,
                });
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
            return Err(RegistryError::ResourceExhausted {
                what: "watch streams".into(),
                limit: self.max_total,
            });
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

#[cfg(test)]
mod tests {
    use super::*;

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
