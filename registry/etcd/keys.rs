//! The key layout under the prefix (see the module doc of the parent) and
//! the records stored under `leases/` and `holders/`.

use super::*;

/// A lease record as stored under `leases/`.
pub(super) struct Record {
    pub(super) etcd: i64,
    pub(super) ttl: Duration,
    pub(super) service: String,
    pub(super) address: String,
}

/// A holder record as stored under `holders/`.
pub(super) struct Holder {
    pub(super) lease: LeaseId,
    pub(super) ttl: Duration,
    pub(super) granted_unix_ms: u64,
}

impl Holder {
    pub(super) fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let mut parts = text.split(' ');
        Some(Self {
            lease: parts.next()?.parse().ok()?,
            ttl: Duration::from_millis(parts.next()?.parse().ok()?),
            granted_unix_ms: parts.next()?.parse().ok()?,
        })
    }
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Inner {
    pub(super) fn endpoint_key(&self, service: &str, address: &str) -> String {
        format!("{}services/{service}/{address}", self.prefix)
    }

    pub(super) fn service_prefix(&self, service: &str) -> String {
        format!("{}services/{service}/", self.prefix)
    }

    pub(super) fn holder_key(&self, service: &str, address: &str) -> String {
        format!("{}holders/{service}/{address}", self.prefix)
    }

    pub(super) fn lease_key(&self, id: LeaseId) -> String {
        format!("{}leases/{id}", self.prefix)
    }

    pub(super) fn config_key(&self, service: &str) -> String {
        format!("{}configs/{service}", self.prefix)
    }

    pub(super) fn removed_key(&self, id: LeaseId) -> String {
        format!("{}removed/{id}", self.prefix)
    }

    /// The lease `id`'s record, or why there is none: removed by an
    /// operator, or not found.
    pub(super) async fn record(&self, id: LeaseId) -> Result<Record, RegistryError> {
        let reply = self
            .client
            .clone()
            .txn(Txn::new().and_then(vec![
                TxnOp::get(self.lease_key(id), None),
                TxnOp::get(
                    self.removed_key(id),
                    Some(GetOptions::new().with_count_only()),
                ),
            ]))
            .await
            .map_err(unreachable)?;
        let mut replies = reply.op_responses().into_iter();
        let (Some(TxnOpResponse::Get(record)), Some(TxnOpResponse::Get(removed))) =
            (replies.next(), replies.next())
        else {
            return Err(RegistryError::Unavailable(
                "etcd unreachable: unexpected transaction reply".into(),
            ));
        };
        let missing = || {
            if removed.count() > 0 {
                RegistryError::RemovedByOperator(id.to_string())
            } else {
                RegistryError::LeaseNotFound(id.to_string())
            }
        };
        let kv = record.kvs().first().ok_or_else(missing)?;
        let text = std::str::from_utf8(kv.value()).map_err(|_| missing())?;
        let mut parts = text.splitn(4, ' ');
        let mut next = || parts.next().ok_or_else(missing);
        Ok(Record {
            etcd: next()?.parse().map_err(|_| missing())?,
            ttl: Duration::from_millis(next()?.parse().map_err(|_| missing())?),
            service: next()?.to_owned(),
            address: next()?.to_owned(),
        })
    }
}
