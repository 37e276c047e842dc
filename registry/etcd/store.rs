//! The [`Store`] API on etcd: each request as one etcd transaction or
//! read, with the replica's lease table in front for heartbeats.

use super::*;

#[tonic::async_trait]
impl Store for EtcdStore {
    fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    async fn register(&self, new: NewEndpoint) -> Result<Grant, RegistryError> {
        let inner = &self.inner;
        inner.check_caps(&new.service, &new.address).await?;
        let mut client = inner.client.clone();
        let etcd_ttl = (new.ttl * ETCD_TTL_FACTOR).as_secs().max(5) as i64;
        let etcd = client
            .lease_grant(etcd_ttl, None)
            .await
            .map_err(unreachable)?
            .id();
        let id = LeaseId::random();
        let on_lease = || Some(PutOptions::new().with_lease(etcd));
        let endpoint = pb::Endpoint::from(&Endpoint {
            address: new.address.to_string(),
            metadata: new.metadata,
            state: EndpointState::Serving,
        });
        let txn = Txn::new().and_then(vec![
            TxnOp::put(
                inner.lease_key(id),
                format!(
                    "{etcd} {} {} {}",
                    new.ttl.as_millis(),
                    new.service,
                    new.address
                ),
                on_lease(),
            ),
            TxnOp::put(
                inner.holder_key(&new.service, &new.address),
                format!("{id} {} {}", new.ttl.as_millis(), unix_ms()),
                on_lease(),
            ),
            TxnOp::put(
                inner.endpoint_key(&new.service, &new.address),
                endpoint.encode_to_vec(),
                Some(PutOptions::new().with_lease(etcd).with_prev_key()),
            ),
        ]);
        let reply = match client.txn(txn).await {
            Ok(reply) => reply,
            Err(err) => {
                let _ = client.lease_revoke(etcd).await;
                return Err(unreachable(err));
            }
        };
        // A takeover: the old holder's etcd lease ends (its record with it).
        let previous = reply.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Put(put) => put.prev_key().map(|kv| kv.lease()),
            _ => None,
        });
        if let Some(previous) = previous.filter(|&p| p != etcd && p != 0) {
            let _ = client.lease_revoke(previous).await;
            tracing::info!(service = %new.service, address = %new.address, "endpoint re-registered under a new lease");
        } else {
            tracing::info!(service = %new.service, address = %new.address, ttl = ?new.ttl, "endpoint registered");
        }
        inner
            .leases
            .grant(id, new.service.clone(), new.address.clone(), new.ttl);
        inner
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Bound {
                    etcd,
                    ttl: new.ttl,
                    refreshed: Instant::now(),
                    refreshing: false,
                },
            );
        inner.metrics.registrations.inc();
        Ok(Grant {
            lease: id,
            ttl: new.ttl,
            epoch: inner.epoch,
        })
    }

    async fn keep_alive(
        &self,
        lease: LeaseId,
        stream: StreamId,
    ) -> Result<Duration, RegistryError> {
        let inner = &self.inner;
        if inner.removed.contains(lease) {
            return Err(RegistryError::RemovedByOperator(lease.to_string()));
        }
        let local = inner
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&lease);
        if !local {
            // A lease granted (or kept) by another replica moves here; or
            // one this replica let go, which etcd explains.
            let record = inner.record(lease).await?;
            inner.leases.grant(
                lease,
                record.service.into(),
                record.address.into(),
                record.ttl,
            );
            inner
                .bound
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    lease,
                    Bound {
                        etcd: record.etcd,
                        ttl: record.ttl,
                        // Due at once: the last replica may not have refreshed
                        // it for a while.
                        refreshed: Instant::now() - record.ttl,
                        refreshing: false,
                    },
                );
        }
        let ttl = match inner.leases.refresh(lease, stream) {
            Ok(ttl) => ttl,
            // Expired here meanwhile: etcd says whether it still exists.
            Err(_) => {
                return Err(inner
                    .record(lease)
                    .await
                    .err()
                    .unwrap_or_else(|| RegistryError::LeaseNotFound(lease.to_string())))
            }
        };
        inner.refresh_if_due(lease);
        Ok(ttl)
    }

    fn stream_ended(&self, stream: StreamId, leases: &HashSet<LeaseId>) {
        if self
            .inner
            .closing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Their backends move to another replica with the same leases.
            for &id in leases {
                self.inner.leases.revoke_if_bound(id, stream);
                self.inner
                    .bound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            return;
        }
        for &id in leases {
            if let Some(lease) = self.inner.leases.revoke_if_bound(id, stream) {
                tracing::info!(service = %lease.service, address = %lease.address, "keepalive stream ended; endpoint removed");
                self.inner.metrics.stream_breaks.inc();
                self.inner.revoke_in_background(id);
            }
        }
    }

    async fn drain(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let record = inner.record(lease).await?;
        let key = inner.endpoint_key(&record.service, &record.address);
        if !inner
            .set_state(&key, Some(record.etcd), pb::EndpointState::Draining)
            .await?
        {
            return Err(RegistryError::LeaseNotFound(lease.to_string()));
        }
        inner.metrics.drains.inc();
        Ok(())
    }

    /// The config is one key, its version the key's etcd revision, so
    /// every replica reads the same version for the same config.
    async fn set_config(
        &self,
        service: &str,
        config: &ServiceConfig,
    ) -> Result<u64, RegistryError> {
        let inner = &self.inner;
        let reply = inner
            .client
            .clone()
            .put(inner.config_key(service), config.to_json(), None)
            .await
            .map_err(unreachable)?;
        Ok(reply.header().map_or(0, |h| h.revision() as u64))
    }

    async fn config(&self, service: &str) -> Result<Option<StoredConfig>, RegistryError> {
        let inner = &self.inner;
        let reply = inner
            .client
            .clone()
            .get(inner.config_key(service), None)
            .await
            .map_err(unreachable)?;
        let Some(kv) = reply.kvs().first() else {
            return Ok(None);
        };
        let json = std::str::from_utf8(kv.value())
            .map_err(|_| RegistryError::Unavailable("stored service config is not UTF-8".into()))?;
        StoredConfig::from_json(kv.mod_revision() as u64, json).map(Some)
    }

    async fn delete_config(&self, service: &str) -> Result<bool, RegistryError> {
        let inner = &self.inner;
        let reply = inner
            .client
            .clone()
            .delete(inner.config_key(service), None)
            .await
            .map_err(unreachable)?;
        Ok(reply.deleted() > 0)
    }

    /// From the replica's feed, which the configs prefix watch keeps
    /// current: the config as of the first listing, then every change.
    async fn watch_config(&self, service: &str) -> Result<ConfigWatch, RegistryError> {
        let inner = &self.inner;
        let mut listed = inner.configs_listed.subscribe();
        let ready = tokio::time::timeout(ETCD_CALL_TIMEOUT * 2, listed.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok());
        match ready {
            true => Ok(inner.configs.watch(service)),
            false => Err(RegistryError::Unavailable(
                "etcd unreachable: service configs not listed yet".into(),
            )),
        }
    }

    async fn deregister(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let record = inner.record(lease).await?;
        inner
            .client
            .clone()
            .lease_revoke(record.etcd)
            .await
            .map_err(unreachable)?;
        inner.leases.revoke(lease);
        inner
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease);
        inner.metrics.deregistrations.inc();
        Ok(())
    }

    async fn watch(
        &self,
        service: &str,
        from: Option<Position>,
    ) -> Result<UpdateStream, RegistryError> {
        let (subscription, hub) = self.inner.subscribe(service, from).await?;
        let resets = self.inner.metrics.watcher_resets.clone();
        Ok(crate::registry::fanout::follow(
            Arc::from(service),
            subscription,
            resets,
            move || hub.subscribe(None),
        ))
    }

    async fn resolve(&self, service: &str) -> Result<ServiceSnapshot, RegistryError> {
        let (endpoints, version) = self.inner.list_service(service).await?;
        Ok(ServiceSnapshot {
            epoch: self.inner.epoch,
            version,
            endpoints,
        })
    }

    async fn list(&self) -> Result<Vec<ServiceCount>, RegistryError> {
        Ok(self
            .inner
            .service_counts()
            .await?
            .into_iter()
            .map(|(service, endpoints)| ServiceCount { service, endpoints })
            .collect())
    }

    fn lease_count(&self) -> usize {
        self.inner.leases.len()
    }

    async fn leased_endpoints(&self, service: &str) -> Result<LeasedSnapshot, RegistryError> {
        let inner = &self.inner;
        let holders_prefix = format!("{}holders/{service}/", inner.prefix);
        let prefix = || Some(GetOptions::new().with_prefix());
        // One transaction: both ranges at the same revision.
        let reply = inner
            .client
            .clone()
            .txn(Txn::new().and_then(vec![
                TxnOp::get(inner.service_prefix(service), prefix()),
                TxnOp::get(holders_prefix.clone(), prefix()),
            ]))
            .await
            .map_err(unreachable)?;
        let version = reply.header().map_or(0, |h| h.revision()) as u64;
        let mut ranges = reply.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (endpoints, holders) = (ranges.next(), ranges.next());
        let holders: HashMap<&str, Holder> = holders
            .iter()
            .flat_map(|h| h.kvs())
            .filter_map(|kv| {
                let address = kv.key_str().ok()?.strip_prefix(holders_prefix.as_str())?;
                Some((address, Holder::parse(kv.value())?))
            })
            .collect();
        let now = unix_ms();
        let endpoints = endpoints
            .iter()
            .flat_map(|e| e.kvs())
            .filter_map(|kv| pb::Endpoint::decode(kv.value()).ok().map(Endpoint::from))
            .map(|endpoint| {
                let holder = holders.get(endpoint.address.as_str());
                LeasedEndpoint {
                    lease_age: holder.map_or(Duration::ZERO, |h| {
                        Duration::from_millis(now.saturating_sub(h.granted_unix_ms))
                    }),
                    ttl: holder.map_or(Duration::ZERO, |h| h.ttl),
                    endpoint,
                }
            })
            .collect();
        Ok(LeasedSnapshot {
            epoch: inner.epoch,
            version,
            endpoints,
        })
    }

    async fn drain_address(&self, service: &str, address: &str) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let key = inner.endpoint_key(service, address);
        if !inner
            .set_state(&key, None, pb::EndpointState::Draining)
            .await?
        {
            return Err(endpoint_not_found(service, address));
        }
        inner.metrics.drains.inc();
        Ok(())
    }

    async fn deregister_address(&self, service: &str, address: &str) -> Result<(), RegistryError> {
        let inner = &self.inner;
        let mut client = inner.client.clone();
        let reply = client
            .get(inner.holder_key(service, address), None)
            .await
            .map_err(unreachable)?;
        let (lease, etcd) = reply
            .kvs()
            .first()
            .and_then(|kv| Some((Holder::parse(kv.value())?.lease, kv.lease())))
            .ok_or_else(|| endpoint_not_found(service, address))?;
        // Remembered before the lease ends, so no heartbeat in between can
        // be told "not found" and re-register.
        let memory = client
            .lease_grant(REMOVED_MEMORY.as_secs() as i64, None)
            .await
            .map_err(unreachable)?
            .id();
        client
            .put(
                inner.removed_key(lease),
                "",
                Some(PutOptions::new().with_lease(memory)),
            )
            .await
            .map_err(unreachable)?;
        inner.note_removed(lease);
        match client.lease_revoke(etcd).await {
            Ok(_) => {}
            Err(etcd_client::Error::GRpcStatus(status))
                if status.code() == tonic::Code::NotFound =>
            {
                return Err(endpoint_not_found(service, address))
            }
            Err(err) => return Err(unreachable(err)),
        }
        inner.metrics.deregistrations.inc();
        Ok(())
    }

    fn closing(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn serving(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.inner.reachable.subscribe())
    }

    fn register_metrics(&self, registry: &mut PromRegistry) {
        let r = registry.sub_registry_with_prefix("switchboard_registry_etcd");
        let m = &self.inner.etcd_metrics;
        r.register(
            "reachable",
            "Whether etcd answered the last probe (1) or not (0)",
            m.reachable.clone(),
        );
        r.register(
            "watch_resyncs",
            "Service watches re-listed after a broken or compacted etcd watch",
            m.watch_resyncs.clone(),
        );
        r.register(
            "lease_refreshes",
            "etcd leases refreshed (once per TTL per endpoint)",
            m.lease_refreshes.clone(),
        );
        r.register(
            "lease_refresh_failures",
            "etcd lease refreshes that failed (retried at the next heartbeat)",
            m.lease_refresh_failures.clone(),
        );
    }
}
