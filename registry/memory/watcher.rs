//! One Watch call on the memory store: the service's snapshot, then its
//! changes through the service's [`Fanout`](crate::registry::fanout).

use super::*;
use crate::registry::fanout;

/// The updates of one Watch call, in order. During warm-up the first
/// snapshot waits until warm-up ends, so it holds the backends that
/// re-registered meanwhile instead of an empty set.
pub(super) fn watch_stream(
    inner: Arc<Inner>,
    service: String,
    from: Option<Position>,
) -> UpdateStream {
    let warm_until = inner.warm_until;
    let start = move || {
        let subscription = inner.subscribe(&service, from);
        let resets = inner.metrics.watcher_resets.clone();
        let name: Arc<str> = Arc::from(service.as_str());
        let release = Release { inner, service };
        fanout::follow(name, subscription, resets, move || {
            release.inner.subscribe(&release.service, None)
        })
    };
    if Instant::now() >= warm_until {
        // Subscribe before Watch answers, not when the body is first polled:
        // then every change made after the answer arrives as a delta.
        start()
    } else {
        Box::pin(
            futures_util::stream::once(async move {
                tokio::time::sleep_until(warm_until).await;
                start()
            })
            .flatten(),
        )
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
