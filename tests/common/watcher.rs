//! A watch stream read the way a client would: every message applied to a
//! [`View`] of the endpoint set, with each protocol violation noted.

use std::collections::BTreeMap;
use std::time::Duration;

use switchboard::discovery::{EndpointSet, Update, Versioned};
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{
    Endpoint, EndpointState, ServiceConfigUpdate, WatchRequest, WatchResponse,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Status;

/// What one watch stream has told its reader so far, with every protocol
/// violation it noticed on the way.
#[derive(Default)]
pub struct View {
    /// Epoch of the first message.
    pub epoch: Option<u64>,
    /// Version of the last message.
    pub version: Option<u64>,
    /// The endpoint set as the messages built it.
    pub set: EndpointSet,
    /// `set` in wire form, sorted by address.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Messages received.
    pub messages: usize,
    /// How many of them were resets.
    pub resets: usize,
    /// When each address last left the set.
    pub removed_at: BTreeMap<String, Instant>,
    /// Versions or epochs out of order, deltas that do not fit the set.
    pub violations: Vec<String>,
    /// Every message with an event, with the instant it arrived.
    pub log: Vec<(Instant, WatchResponse)>,
    /// Every service config the stream carried, in order (config-only
    /// messages are counted here, not in `messages` or `log`).
    pub configs: Vec<(Instant, ServiceConfigUpdate)>,
    /// How the stream ended, once it has.
    pub ended: Option<Result<(), Status>>,
}

impl View {
    /// Applies one message with the library's own [`EndpointSet::apply`]
    /// (the one every consumer uses), noting each anomaly it reports and
    /// keeping `endpoints` as a sorted projection of the set.
    pub fn apply(&mut self, at: Instant, message: WatchResponse) {
        if let Some(config) = &message.service_config {
            self.configs.push((at, config.clone()));
        }
        if message.event.is_none() && message.service_config.is_some() {
            return;
        }
        self.log.push((at, message.clone()));
        self.messages += 1;
        match self.epoch {
            None => self.epoch = Some(message.epoch),
            Some(epoch) if epoch != message.epoch => self.violations.push(format!(
                "message {}: epoch {} after {epoch}",
                self.messages, message.epoch
            )),
            Some(_) => {}
        }
        if let Some(previous) = self.version {
            if message.version <= previous {
                self.violations.push(format!(
                    "message {}: version {} after {previous}",
                    self.messages, message.version
                ));
            }
        }
        self.version = Some(message.version);
        let Ok(versioned) = Versioned::try_from(message) else {
            self.violations
                .push(format!("message {}: no event", self.messages));
            return;
        };
        if matches!(versioned.update, Update::Reset(_)) {
            self.resets += 1;
        }
        let changes = self.set.apply(versioned.update);
        for anomaly in changes.anomalies {
            self.violations
                .push(format!("message {}: {anomaly}", self.messages));
        }
        for address in changes.added.iter().chain(&changes.updated) {
            if let Some(endpoint) = self.set.get(address) {
                self.endpoints
                    .insert(address.clone(), Endpoint::from(&**endpoint));
            }
        }
        for address in changes.removed {
            self.endpoints.remove(&address);
            self.removed_at.insert(address, at);
        }
    }

    pub fn addresses(&self) -> Vec<String> {
        self.endpoints.keys().cloned().collect()
    }

    pub fn state_of(&self, address: &str) -> Option<EndpointState> {
        self.endpoints.get(address).map(|e| e.state())
    }

    /// A short description for failure messages.
    pub fn summary(&self) -> String {
        let mut addresses = self.addresses();
        if addresses.len() > 8 {
            let more = addresses.len() - 8;
            addresses.truncate(8);
            addresses.push(format!("... {more} more"));
        }
        format!(
            "{} endpoints {addresses:?}, version {:?}, {} messages ({} resets), violations {:?}, ended {:?}",
            self.endpoints.len(),
            self.version,
            self.messages,
            self.resets,
            self.violations,
            self.ended,
        )
    }

    pub fn assert_clean(&self, who: &str) {
        assert!(
            self.violations.is_empty(),
            "{who} saw protocol violations: {}",
            self.summary()
        );
    }

    /// A watch nothing disturbed: a clean protocol, one reset (the first),
    /// no removal, the stream still open, and exactly `expected`.
    pub fn assert_untouched(&self, who: &str, expected: &[String]) {
        self.assert_clean(who);
        assert!(
            self.removed_at.is_empty(),
            "{who}: endpoints removed: {}",
            self.summary()
        );
        assert_eq!(
            self.resets,
            1,
            "{who}: a reset besides the first: {}",
            self.summary()
        );
        assert!(
            self.ended.is_none(),
            "{who}: the watch ended: {}",
            self.summary()
        );
        assert_eq!(self.addresses(), expected, "{who}: {}", self.summary());
    }
}

/// A watch stream read by its own task into a [`View`] the test can wait on.
pub struct Watcher {
    pub view: watch::Receiver<View>,
    pub task: JoinHandle<()>,
}

impl Watcher {
    pub async fn start(client: &RegistryClient<Channel>, service: &str) -> Self {
        let mut stream = client
            .clone()
            .watch(WatchRequest {
                service: service.into(),
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        let (publish, view) = watch::channel(View::default());
        let task = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(message)) => {
                        let at = Instant::now();
                        publish.send_modify(|view| view.apply(at, message));
                    }
                    Ok(None) => {
                        publish.send_modify(|view| view.ended = Some(Ok(())));
                        return;
                    }
                    Err(status) => {
                        publish.send_modify(|view| view.ended = Some(Err(status)));
                        return;
                    }
                }
            }
        });
        Self { view, task }
    }

    /// Waits until `done` holds for the view, failing after `timeout`.
    pub async fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&View) -> bool,
    ) {
        let reached = matches!(
            tokio::time::timeout(timeout, self.view.wait_for(|view| done(view))).await,
            Ok(Ok(_))
        );
        if !reached {
            panic!(
                "watcher: no {what} within {timeout:?}; it saw {}",
                self.view.borrow().summary()
            );
        }
    }

    /// Waits until the view holds exactly `expected` (sorted addresses).
    pub async fn wait_for_set(&mut self, expected: &[String], timeout: Duration) {
        let what = format!("set of {} endpoints", expected.len());
        self.wait_until(&what, timeout, |view| {
            view.endpoints.len() == expected.len()
                && view.endpoints.keys().zip(expected).all(|(a, b)| a == b)
        })
        .await;
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
