//! Every service's config as this process last heard of it, with a
//! `watch` channel per service for the streams that follow it (Watch and
//! xDS). Configs change rarely and are small, so a watcher gets the latest
//! value, not every intermediate one: what it must never miss is the last.
//!
//! The memory store keeps its configs here and nowhere else; the etcd store
//! feeds it from one prefix watch per replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::store::{ConfigWatch, StoredConfig};

/// The configs of every service, each behind its own `watch` channel.
#[derive(Default)]
pub(crate) struct ConfigFeed {
    services: Mutex<HashMap<Arc<str>, watch::Sender<Option<StoredConfig>>>>,
}

impl ConfigFeed {
    fn services(&self) -> MutexGuard<'_, HashMap<Arc<str>, watch::Sender<Option<StoredConfig>>>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The config of `service` now.
    pub(crate) fn get(&self, service: &str) -> Option<StoredConfig> {
        self.services()
            .get(service)
            .and_then(|sender| sender.borrow().clone())
    }

    /// Sets the config of `service` (`None`: removed) and tells its
    /// watchers; true if it had one before. A value older than the one held
    /// is ignored (an etcd relist may race a watch event).
    pub(crate) fn put(&self, service: &str, config: Option<StoredConfig>) -> bool {
        let mut services = self.services();
        let Some(sender) = services.get(service) else {
            if let Some(config) = config {
                services.insert(service.into(), watch::channel(Some(config)).0);
            }
            return false;
        };
        let had = sender.borrow().is_some();
        sender.send_if_modified(|held| match (&*held, config) {
            (Some(old), Some(new)) if new.version <= old.version => false,
            (None, None) => false,
            (_, new) => {
                *held = new;
                true
            }
        });
        // An entry nobody watches and that holds nothing is dropped.
        if sender.borrow().is_none() && sender.receiver_count() == 0 {
            services.remove(service);
        }
        had
    }

    /// Replaces every config with `all` (a relist), telling the watchers
    /// of each one that changed.
    // Only the etcd store relists.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn put_all(&self, all: HashMap<String, StoredConfig>) {
        let known: Vec<Arc<str>> = self.services().keys().cloned().collect();
        for service in known {
            if !all.contains_key(&*service) {
                self.put(&service, None);
            }
        }
        for (service, config) in all {
            self.put(&service, Some(config));
        }
    }

    /// Follows the config of `service`: the current value first, then
    /// every change.
    pub(crate) fn watch(&self, service: &str) -> ConfigWatch {
        self.services()
            .entry(service.into())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(version: u64) -> StoredConfig {
        StoredConfig::from_json(version, r#"{"loadBalancingConfig":[{"round_robin":{}}]}"#).unwrap()
    }

    #[test]
    fn a_watcher_sees_the_current_config_then_each_change() {
        let feed = ConfigFeed::default();
        assert!(!feed.put("s", Some(config(3))));
        let mut watch = feed.watch("s");
        assert_eq!(
            watch.borrow_and_update().as_ref().map(|c| c.version),
            Some(3)
        );
        assert!(feed.put("s", Some(config(5))));
        assert!(watch.has_changed().unwrap());
        assert_eq!(
            watch.borrow_and_update().as_ref().map(|c| c.version),
            Some(5)
        );
        assert!(feed.put("s", None));
        assert!(watch.has_changed().unwrap());
        assert!(watch.borrow_and_update().is_none());
        assert!(!feed.put("s", None), "nothing to remove twice");
    }

    #[test]
    fn an_older_version_does_not_replace_a_newer_one() {
        let feed = ConfigFeed::default();
        feed.put("s", Some(config(5)));
        let mut watch = feed.watch("s");
        watch.borrow_and_update();
        feed.put("s", Some(config(4)));
        assert!(!watch.has_changed().unwrap());
        assert_eq!(feed.get("s").map(|c| c.version), Some(5));
    }

    #[test]
    fn a_relist_removes_what_it_does_not_list() {
        let feed = ConfigFeed::default();
        feed.put("gone", Some(config(1)));
        feed.put("kept", Some(config(2)));
        let mut gone = feed.watch("gone");
        gone.borrow_and_update();
        feed.put_all(HashMap::from([("kept".to_string(), config(2))]));
        assert!(gone.has_changed().unwrap());
        assert!(gone.borrow().is_none());
        assert_eq!(feed.get("kept").map(|c| c.version), Some(2));
    }
}
