//! Listing a service and subscribing to its changes through the replica's
//! hub for it (one etcd watch per watched service).

use super::*;

impl Inner {
    /// The endpoints under `service` and the revision they were read at.
    pub(super) async fn list_service(
        &self,
        service: &str,
    ) -> Result<(Vec<Endpoint>, u64), RegistryError> {
        self.list_service_at(service, None).await
    }

    /// The endpoints under `service` as of `revision` (now if `None`; an
    /// error once etcd compacted it away), and the revision read.
    pub(super) async fn list_service_at(
        &self,
        service: &str,
        revision: Option<u64>,
    ) -> Result<(Vec<Endpoint>, u64), RegistryError> {
        let mut options = GetOptions::new().with_prefix();
        if let Some(revision) = revision {
            options = options.with_revision(revision as i64);
        }
        let reply = self
            .client
            .clone()
            .get(self.service_prefix(service), Some(options))
            .await
            .map_err(unreachable)?;
        let revision = reply.header().map_or(0, |h| h.revision()) as u64;
        let endpoints = reply
            .kvs()
            .iter()
            .filter_map(|kv| pb::Endpoint::decode(kv.value()).ok().map(Endpoint::from))
            .collect();
        Ok((endpoints, revision))
    }

    /// Subscribes to `service`'s hub, starting the hub if there is none. A
    /// watcher older than the hub's history (it resumed at a replica that
    /// started watching after it) gets the difference from its version, read
    /// from etcd's history, rather than a reset; a reset only once etcd
    /// compacted that version away.
    pub(super) async fn subscribe(
        self: &Arc<Self>,
        service: &str,
        from: Option<Position>,
    ) -> Result<(Subscription, Arc<Hub>), RegistryError> {
        let (mut subscription, hub) = self.hub_subscription(service, from).await?;
        if let (Some(version), Some(reset)) =
            (subscription.older_than_history, subscription.first.first())
        {
            if let (Update::Reset(now), Ok((then, _))) = (
                &reset.update,
                self.list_service_at(service, Some(version)).await,
            ) {
                let mut old = EndpointSet::new();
                old.apply(Update::Reset(then));
                let applied = old.apply(Update::Reset(now.clone()));
                subscription.first = match applied.is_empty() {
                    true => Vec::new(),
                    false => vec![Arc::new(Versioned {
                        epoch: reset.epoch,
                        version: reset.version,
                        update: Update::Delta(old.delta_of(&applied)),
                    })],
                };
            }
        }
        Ok((subscription, hub))
    }

    /// Subscribes to `service`'s hub, starting the hub if there is none.
    /// Under the hubs lock, so a hub cannot retire between the two.
    pub(super) async fn hub_subscription(
        self: &Arc<Self>,
        service: &str,
        from: Option<Position>,
    ) -> Result<(Subscription, Arc<Hub>), RegistryError> {
        let mut hubs = self.hubs.lock().await;
        if let Some(hub) = hubs.get(service) {
            return Ok((hub.subscribe(from), hub.clone()));
        }
        let (endpoints, revision) = self.list_service(service).await?;
        let hub = Arc::new(Hub::new(self.epoch, endpoints, revision));
        let subscription = hub.subscribe(from);
        tokio::spawn(follow(self.clone(), service.to_owned(), hub.clone()));
        hubs.insert(service.to_owned(), hub.clone());
        Ok((subscription, hub))
    }

    /// Removes `hub` if still nobody watches it; true if it was removed.
    pub(super) async fn retire_hub(&self, service: &str, hub: &Arc<Hub>) -> bool {
        let mut hubs = self.hubs.lock().await;
        if !hub.idle() || !hubs.get(service).is_some_and(|h| Arc::ptr_eq(h, hub)) {
            return false;
        }
        hubs.remove(service);
        true
    }
}
