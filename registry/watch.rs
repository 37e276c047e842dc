//! One Watch call on the wire: the store's updates, shared by every watcher
//! of a service, and the service's config, turned into this watcher's
//! `WatchResponse` messages.

use futures_util::{FutureExt, Stream, StreamExt};
use tonic::Status;

use super::store::{ConfigWatch, Position, StoredConfig, UpdateStream};
use crate::proto::registry::{ServiceConfigUpdate, WatchResponse};

/// The messages of one Watch call, in the store's order: a reset, then
/// deltas (and a fresh reset whenever the store had to send one).
///
/// The service config rides along: on the first message (a config-only one
/// when the store has nothing to send yet, as for a resumed watcher that
/// missed nothing, or a new one while the registry warms up), then on the
/// next message after each change, or on a config-only message when no
/// endpoint change is due. Config-only messages repeat the watcher's
/// position: `from` (where it resumed) or version 0 of the store's `epoch`,
/// until an endpoint message moves it.
pub fn watch_stream(
    updates: UpdateStream,
    config: ConfigWatch,
    epoch: u64,
    from: Option<Position>,
) -> impl Stream<Item = Result<WatchResponse, Status>> + Send + 'static {
    let state = State {
        updates,
        config,
        config_open: true,
        first: true,
        position: from.map_or((epoch, 0), |p| (p.epoch, p.version)),
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let message = state.next().await?;
        Some((Ok(message), state))
    })
}

struct State {
    updates: UpdateStream,
    config: ConfigWatch,
    /// False once the store dropped the config's sender (it is going away).
    config_open: bool,
    first: bool,
    /// The epoch and version of the last endpoint message sent.
    position: (u64, u64),
}

impl State {
    async fn next(&mut self) -> Option<WatchResponse> {
        if self.first {
            self.first = false;
            let config = Some(self.take_config());
            return Some(match self.updates.next().now_or_never() {
                Some(Some(update)) => self.endpoints(&update, config),
                Some(None) => return None,
                None => self.config_only(config),
            });
        }
        loop {
            tokio::select! {
                biased;
                update = self.updates.next() => {
                    let update = update?;
                    let config = self.config_changed().then(|| self.take_config());
                    return Some(self.endpoints(&update, config));
                }
                changed = self.config.changed(), if self.config_open => {
                    if changed.is_err() {
                        self.config_open = false;
                        continue;
                    }
                    let config = Some(self.take_config());
                    return Some(self.config_only(config));
                }
            }
        }
    }

    fn config_changed(&self) -> bool {
        self.config_open && self.config.has_changed().unwrap_or(false)
    }

    fn take_config(&mut self) -> ServiceConfigUpdate {
        config_update(self.config.borrow_and_update().as_ref())
    }

    fn endpoints(
        &mut self,
        update: &crate::discovery::Versioned,
        config: Option<ServiceConfigUpdate>,
    ) -> WatchResponse {
        self.position = (update.epoch, update.version);
        WatchResponse {
            service_config: config,
            ..WatchResponse::from(update)
        }
    }

    fn config_only(&self, config: Option<ServiceConfigUpdate>) -> WatchResponse {
        WatchResponse {
            epoch: self.position.0,
            version: self.position.1,
            event: None,
            service_config: config,
        }
    }
}

/// A config as Watch sends it: empty JSON for none.
pub fn config_update(config: Option<&StoredConfig>) -> ServiceConfigUpdate {
    match config {
        Some(config) => ServiceConfigUpdate {
            version: config.version,
            json: config.json.to_string(),
        },
        None => ServiceConfigUpdate::default(),
    }
}
