//! The replica's background work on etcd: expiring the leases of its own
//! KeepAlive streams, probing etcd's reachability, following operators'
//! removals, and revoking or refreshing etcd leases without making a
//! heartbeat wait.

use super::*;

/// Revokes the etcd leases whose local heartbeats stopped.
pub(super) async fn expire_leases(inner: Arc<Inner>) {
    inner
        .leases
        .run_expiry(|id, lease| {
            tracing::info!(service = %lease.service, address = %lease.address, "lease expired");
            inner.metrics.expiries.inc();
            inner.revoke_in_background(id);
        })
        .await
}

/// Keeps `reachable` (the replica's health) and its gauge up to date.
pub(super) async fn probe(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let ok = matches!(
            tokio::time::timeout(ETCD_CALL_TIMEOUT, inner.client.clone().status()).await,
            Ok(Ok(_))
        );
        inner.etcd_metrics.reachable.set(i64::from(ok));
        let changed = inner.reachable.send_if_modified(|was| {
            let changed = *was != ok;
            *was = ok;
            changed
        });
        if changed {
            match ok {
                true => tracing::info!("etcd reachable again; serving"),
                false => tracing::warn!("etcd unreachable; NOT_SERVING, watchers keep their sets"),
            }
        }
    }
}

/// Hears of operators' removals made through any replica.
pub(super) async fn follow_removals(inner: Arc<Inner>) {
    let prefix = format!("{}removed/", inner.prefix);
    loop {
        if let Ok(mut stream) = inner
            .client
            .clone()
            .watch(
                prefix.clone(),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
        {
            while let Ok(Some(reply)) = stream.message().await {
                for event in reply.events() {
                    if event.event_type() != etcd_client::EventType::Put {
                        continue;
                    }
                    let id = event
                        .kv()
                        .and_then(|kv| kv.key_str().ok())
                        .and_then(|k| k.strip_prefix(prefix.as_str()))
                        .and_then(|id| id.parse::<LeaseId>().ok());
                    if let Some(id) = id {
                        inner.note_removed(id);
                    }
                }
            }
        }
        // A removal missed while the watch was down is still found through
        // the `removed/` key once the holder's etcd lease is gone.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Keeps the replica's config feed equal to the `configs/` keys: a listing,
/// then a watch from the revision after it; a listing again whenever the
/// watch breaks or is compacted.
pub(super) async fn follow_configs(inner: Arc<Inner>) {
    let prefix = format!("{}configs/", inner.prefix);
    loop {
        if inner.is_stopped() {
            return;
        }
        let listed = inner
            .client
            .clone()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await;
        let reply = match listed {
            Ok(reply) => reply,
            Err(err) => {
                tracing::debug!(%err, "cannot list service configs; streams keep theirs");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let revision = reply.header().map_or(0, |h| h.revision());
        let all = reply
            .kvs()
            .iter()
            .filter_map(|kv| stored_config(&prefix, kv))
            .collect();
        inner.configs.put_all(all);
        inner.configs_listed.send_replace(true);
        let options = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        if let Ok(mut stream) = inner
            .client
            .clone()
            .watch(prefix.clone(), Some(options))
            .await
        {
            loop {
                let reply = tokio::select! {
                    reply = stream.message() => reply,
                    () = inner.stopped() => return,
                };
                let Ok(Some(reply)) = reply else { break };
                if reply.compact_revision() > 0 || reply.canceled() {
                    break;
                }
                for event in reply.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        etcd_client::EventType::Put => {
                            if let Some((service, config)) = stored_config(&prefix, kv) {
                                inner.configs.put(&service, Some(config));
                            }
                        }
                        etcd_client::EventType::Delete => {
                            if let Some(service) =
                                kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix))
                            {
                                inner.configs.put(service, None);
                            }
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The service and config of one `configs/` key; `None` (logged) for one
/// that does not parse, which only a hand-edited etcd holds.
fn stored_config(prefix: &str, kv: &etcd_client::KeyValue) -> Option<(String, StoredConfig)> {
    let service = kv.key_str().ok()?.strip_prefix(prefix)?;
    let parsed = std::str::from_utf8(kv.value())
        .map_err(|_| RegistryError::Unavailable("not UTF-8".into()))
        .and_then(|json| StoredConfig::from_json(kv.mod_revision() as u64, json));
    match parsed {
        Ok(config) => Some((service.to_owned(), config)),
        Err(err) => {
            tracing::warn!(%service, %err, "ignoring a service config in etcd");
            None
        }
    }
}

impl Inner {
    /// Ends a lease of this replica, locally at once and in etcd in the
    /// background (callers may not await), retrying while etcd is away.
    pub(super) fn revoke_in_background(self: &Arc<Self>, id: LeaseId) {
        let Some(bound) = self
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
        else {
            return;
        };
        let inner = self.clone();
        tokio::spawn(async move {
            // Past the etcd lease's own TTL there is nothing left to end.
            let give_up = Instant::now() + bound.ttl * ETCD_TTL_FACTOR;
            let mut pause = Duration::from_millis(100);
            loop {
                match inner.client.clone().lease_revoke(bound.etcd).await {
                    Ok(_) => return,
                    // Already gone (expired, or revoked by another replica).
                    Err(etcd_client::Error::GRpcStatus(status))
                        if status.code() == tonic::Code::NotFound =>
                    {
                        return
                    }
                    Err(err) if Instant::now() >= give_up || inner.is_stopped() => {
                        tracing::warn!(%err, "could not revoke an etcd lease; it ends with its TTL");
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// Refreshes the etcd lease behind local lease `id` in the background,
    /// unless a refresh is already under way or not due.
    pub(super) fn refresh_if_due(self: &Arc<Self>, id: LeaseId) {
        let etcd = {
            let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b) = bound.get_mut(&id) else { return };
            if b.refreshing || b.refreshed.elapsed() < b.ttl {
                return;
            }
            b.refreshing = true;
            b.etcd
        };
        let inner = self.clone();
        tokio::spawn(async move {
            // Opening the keepalive stream sends one keepalive and reads its
            // answer: that is the whole refresh.
            let refreshed = tokio::time::timeout(
                ETCD_CALL_TIMEOUT,
                inner.client.clone().lease_keep_alive(etcd),
            )
            .await;
            let mut bound = inner.bound.lock().unwrap_or_else(|p| p.into_inner());
            let Some(b) = bound.get_mut(&id) else { return };
            b.refreshing = false;
            match refreshed {
                Ok(Ok(_)) => {
                    b.refreshed = Instant::now();
                    inner.etcd_metrics.lease_refreshes.inc();
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                    // etcd no longer has it (answered TTL 0): revoked
                    // elsewhere, or expired while nobody refreshed it. The
                    // next heartbeat is told.
                    bound.remove(&id);
                    drop(bound);
                    if let Some(lease) = inner.leases.revoke(id) {
                        tracing::info!(service = %lease.service, address = %lease.address, "etcd lease gone; endpoint no longer held here");
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    // Retried at the next heartbeat; the etcd lease has
                    // three more TTLs to live.
                    inner.etcd_metrics.lease_refresh_failures.inc();
                }
            }
        });
    }

    /// Notes an operator's removal of `id` heard from etcd: a holder bound
    /// here stops being kept alive and is told at its next heartbeat.
    pub(super) fn note_removed(&self, id: LeaseId) {
        self.removed.remember(id);
        self.bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.leases.revoke(id);
    }
}
