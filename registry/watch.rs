//! One watcher's stream: a reset snapshot, then deltas, and a fresh reset
//! whenever the watcher has fallen so far behind that deltas were lost.

use std::sync::Arc;

use futures_util::future::{self, Either};
use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;
use tonic::Status;

use super::store::{SharedUpdate, Store};
use crate::proto::registry::WatchResponse;

/// The messages of one Watch call, in order. During the registry's warm-up
/// the first snapshot waits until warm-up ends, so it holds the backends
/// that re-registered meanwhile instead of an empty set.
pub fn watch_stream(
    store: Arc<Store>,
    service: String,
) -> impl Stream<Item = Result<WatchResponse, Status>> + Send + 'static {
    let start = if Instant::now() >= store.warm_until() {
        // Subscribe before Watch answers, not when the body is first polled:
        // then every change made after the answer arrives as a delta.
        Either::Left(future::ready(Watcher::subscribe(store, service)))
    } else {
        Either::Right(async move {
            tokio::time::sleep_until(store.warm_until()).await;
            Watcher::subscribe(store, service)
        })
    };
    futures_util::stream::once(start).flat_map(|watcher| {
        futures_util::stream::unfold(watcher, |mut watcher| async move {
            let message = watcher.next().await?;
            Some((Ok(message), watcher))
        })
    })
}

/// The state of one watch stream.
struct Watcher {
    /// Deltas from the service. Declared before `release` so it is dropped
    /// first: the entry is only released once nobody listens.
    updates: broadcast::Receiver<SharedUpdate>,
    /// A message to send before reading further deltas.
    pending: Option<WatchResponse>,
    /// Releases the service entry when the stream goes away.
    release: Release,
}

impl Watcher {
    /// Takes the snapshot of `service` and starts listening for its changes.
    fn subscribe(store: Arc<Store>, service: String) -> Self {
        let (reset, updates) = store.subscribe(&service);
        Self {
            updates,
            pending: Some(reset),
            release: Release { store, service },
        }
    }

    async fn next(&mut self) -> Option<WatchResponse> {
        if let Some(message) = self.pending.take() {
            return Some(message);
        }
        match self.updates.recv().await {
            Ok(update) => Some(WatchResponse::clone(&update)),
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(
                    service = %self.release.service,
                    missed,
                    "watcher fell behind; sending a fresh snapshot"
                );
                let (reset, updates) = self.release.store.subscribe(&self.release.service);
                self.updates = updates;
                Some(reset)
            }
            Err(RecvError::Closed) => None,
        }
    }
}

/// Drops the service's entry, if unused, when its watch stream ends.
struct Release {
    store: Arc<Store>,
    service: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.store.release(&self.service);
    }
}
