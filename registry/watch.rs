//! One Watch call on the wire: the store's updates, shared by every watcher
//! of a service, turned into this watcher's `WatchResponse` messages.

use futures_util::{Stream, StreamExt};
use tonic::Status;

use super::store::UpdateStream;
use crate::proto::registry::WatchResponse;

/// The messages of one Watch call, in the store's order: a reset, then
/// deltas (and a fresh reset whenever the store had to send one).
pub fn watch_stream(
    updates: UpdateStream,
) -> impl Stream<Item = Result<WatchResponse, Status>> + Send + 'static {
    updates.map(|update| Ok(WatchResponse::from(&*update)))
}
