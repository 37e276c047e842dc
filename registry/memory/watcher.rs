//! One Watch call on the memory store: the service's snapshot, then its
//! changes from the service's broadcast, with a fresh snapshot for a
//! watcher that fell behind.

use super::*;

/// The updates of one Watch call, in order. During warm-up the first
/// snapshot waits until warm-up ends, so it holds the backends that
/// re-registered meanwhile instead of an empty set.
pub(super) fn watch_stream(
    inner: Arc<Inner>,
    service: String,
    from: Option<Position>,
) -> UpdateStream {
    let watcher = if Instant::now() >= inner.warm_until {
        // Subscribe before Watch answers, not when the body is first polled:
        // then every change made after the answer arrives as a delta.
        futures_util::future::Either::Left(futures_util::future::ready(Watcher::subscribe(
            inner, service, from,
        )))
    } else {
        futures_util::future::Either::Right(async move {
            tokio::time::sleep_until(inner.warm_until).await;
            Watcher::subscribe(inner, service, from)
        })
    };
    Box::pin(futures_util::stream::once(watcher).flat_map(|watcher| {
        futures_util::stream::unfold(watcher, |mut watcher| async move {
            let update = watcher.next().await?;
            Some((update, watcher))
        })
    }))
}

/// The state of one watch stream.
struct Watcher {
    /// Updates from the service. Declared before `release` so it is dropped
    /// first: the entry is only released once nobody listens.
    updates: broadcast::Receiver<Arc<Versioned>>,
    /// An update to send before reading further ones.
    pending: Option<Arc<Versioned>>,
    /// Releases the service entry when the stream goes away.
    release: Release,
}

impl Watcher {
    /// Takes the snapshot of `service` and starts listening for its changes;
    /// the snapshot is not sent to a watcher that already holds it.
    fn subscribe(inner: Arc<Inner>, service: String, from: Option<Position>) -> Self {
        let (reset, updates) = inner.subscribe(&service);
        let holds_it = from
            == Some(Position {
                epoch: reset.epoch,
                version: reset.version,
            });
        Self {
            updates,
            pending: (!holds_it).then_some(reset),
            release: Release { inner, service },
        }
    }

    async fn next(&mut self) -> Option<Arc<Versioned>> {
        if let Some(update) = self.pending.take() {
            return Some(update);
        }
        match self.updates.recv().await {
            Ok(update) => Some(update),
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(
                    service = %self.release.service,
                    missed,
                    "watcher fell behind; sending a fresh snapshot"
                );
                self.release.inner.metrics.watcher_resets.inc();
                let (reset, updates) = self.release.inner.subscribe(&self.release.service);
                self.updates = updates;
                Some(reset)
            }
            Err(RecvError::Closed) => None,
        }
    }
}

/// Drops the service's entry, if unused, when its watch stream ends.
struct Release {
    inner: Arc<Inner>,
    service: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.inner.release(&self.service);
    }
}
