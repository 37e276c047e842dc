//! A fake balancer for driving one policy without sockets, tasks or a
//! runtime, as grpc-go tests its balancers against a fake ClientConn.
//!
//! [`FakeController`] owns the policy and plays the balancer's part: it
//! applies endpoint updates to an [`EndpointSet`], records each subchannel
//! state the test scripts and tells the policy, fires its timer on a clock
//! the test steps, and keeps the picker the policy last published (asked
//! for after every event, as the balancer asks once per batch). Its
//! subchannels come from a factory that starts no task: each connect
//! request lands in a channel the controller reads, and a subchannel the
//! policy shut down shows as that channel closing, which is exactly what the
//! real subchannel task would see.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::time::Instant;

use crate::client::error::ConnectError;
use crate::client::policy::{
    CallOutcome, Pick, PickInfo, Policy, PolicyContext, PolicyPicker, SubchannelFactory,
    SubchannelId, Subchannels,
};
use crate::client::subchannel::{
    ConnectivityState, InFlight, ReadyConnection, Subchannel, SubchannelState,
};
use crate::discovery::{Applied, Endpoint, EndpointSet, Update};

/// A subchannel the policy created, as the factory hands it over.
struct Created {
    id: SubchannelId,
    address: Arc<str>,
    requests: mpsc::UnboundedReceiver<()>,
}

/// Makes subchannels with no task behind them.
struct Recorder(Arc<Mutex<Vec<Created>>>);

impl SubchannelFactory for Recorder {
    fn create(&mut self, id: SubchannelId, address: Arc<str>) -> Subchannel {
        let (connect, requests) = mpsc::unbounded_channel();
        self.0.lock().unwrap().push(Created {
            id,
            address: address.clone(),
            requests,
        });
        Subchannel::new(id, address, connect)
    }
}

/// What the controller knows of a live subchannel.
struct Live {
    address: Arc<str>,
    requests: mpsc::UnboundedReceiver<()>,
    /// Shared by all its connections, as the real task shares one.
    in_flight: Arc<InFlight>,
}

/// Plays the balancer for one policy; see the module docs.
pub(crate) struct FakeController<P> {
    /// The policy under test.
    pub(crate) policy: P,
    subchannels: Subchannels,
    created: Arc<Mutex<Vec<Created>>>,
    live: BTreeMap<SubchannelId, Live>,
    endpoints: EndpointSet,
    timer: Option<Instant>,
    now: Instant,
    /// What the policy did, as `create a`, `connect a` and `remove a`.
    actions: Vec<String>,
    /// The other halves of the connections handed out, by address:
    /// dropping one closes its connection.
    links: BTreeMap<String, Vec<Link>>,
    published: Option<PolicyPicker>,
    pickers: usize,
}

impl<P: Policy> FakeController<P> {
    /// A controller around `policy`, with no endpoints known yet.
    pub(crate) fn new(policy: P) -> Self {
        let created = Arc::default();
        Self {
            policy,
            subchannels: Subchannels::with_factory(Box::new(Recorder(Arc::clone(&created)))),
            created,
            live: BTreeMap::new(),
            endpoints: EndpointSet::new(),
            timer: None,
            now: Instant::now(),
            actions: Vec::new(),
            links: BTreeMap::new(),
            published: None,
            pickers: 0,
        }
    }

    /// Applies `update` and tells the policy what changed, unless nothing
    /// did (the balancer does not bother it then either).
    pub(crate) fn update(&mut self, update: Update) -> Applied {
        let changes = self.endpoints.apply(update);
        if !changes.is_empty() {
            let (policy, endpoints) = (&mut self.policy, &self.endpoints);
            let mut cx = PolicyContext::new(&mut self.subchannels, &mut self.timer).at(self.now);
            policy.endpoints_changed(endpoints, &changes, &mut cx);
            self.settle();
        }
        changes
    }

    /// Resets the set to serving endpoints at `addresses`.
    pub(crate) fn reset(&mut self, addresses: &[&str]) -> Applied {
        self.update(Update::Reset(
            addresses.iter().map(|a| Endpoint::new(*a)).collect(),
        ))
    }

    /// Records `state` for `address`'s subchannel and tells the policy, as
    /// the balancer does with a subchannel event.
    pub(crate) fn set_state(&mut self, address: &str, state: SubchannelState) {
        let id = self.id(address);
        self.subchannels
            .get_mut(id)
            .expect("live subchannel")
            .set_state(state);
        let mut cx = PolicyContext::new(&mut self.subchannels, &mut self.timer).at(self.now);
        self.policy.subchannel_changed(id, &mut cx);
        self.settle();
    }

    /// `address` starts connecting.
    pub(crate) fn connecting(&mut self, address: &str) {
        self.set_state(address, SubchannelState::Connecting);
    }

    /// `address` connects; returns its connection.
    pub(crate) fn ready(&mut self, address: &str) -> Arc<ReadyConnection> {
        let in_flight = self.live[&self.id(address)].in_flight.clone();
        let (connection, link) = connection(address, in_flight);
        self.links.entry(address.to_owned()).or_default().push(link);
        self.set_state(address, SubchannelState::Ready(connection.clone()));
        connection
    }

    /// An attempt to `address` fails (it waits out its backoff); returns
    /// the error.
    pub(crate) fn fail(&mut self, address: &str) -> Arc<ConnectError> {
        let error = Arc::new(ConnectError::ClosedBeforeSettings {
            address: Arc::from(address),
        });
        let state = SubchannelState::TransientFailure {
            error: error.clone(),
        };
        self.set_state(address, state);
        error
    }

    /// `address`'s Ready connection ends (the subchannel goes Idle).
    pub(crate) fn lost(&mut self, address: &str) {
        let error = Arc::new(ConnectError::Lost {
            address: Arc::from(address),
            detail: "connection reset".into(),
        });
        self.close(address);
        let state = SubchannelState::Idle {
            last_error: Some(error),
        };
        self.set_state(address, state);
    }

    /// Closes `address`'s connections without telling the policy, as when
    /// a connection dies before the balancer hears of it.
    pub(crate) fn close(&mut self, address: &str) {
        self.links.remove(address);
    }

    /// Moves the clock on by `by`.
    pub(crate) fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// How long until the policy's timer is due, if it asked for one.
    pub(crate) fn timer(&self) -> Option<Duration> {
        self.timer
            .map(|due| due.saturating_duration_since(self.now))
    }

    /// Moves the clock to the timer's due time (if it is later) and fires
    /// it; false if no timer was pending.
    pub(crate) fn fire_timer(&mut self) -> bool {
        let Some(due) = self.timer.take() else {
            return false;
        };
        self.now = self.now.max(due);
        let mut cx = PolicyContext::new(&mut self.subchannels, &mut self.timer).at(self.now);
        self.policy.timer_fired(&mut cx);
        self.settle();
        true
    }

    /// The state `address`'s subchannel shows the policy, if it has one.
    pub(crate) fn state(&self, address: &str) -> Option<&SubchannelState> {
        let id = self.subchannels.id_of(address)?;
        self.subchannels.get(id).map(|s| s.state())
    }

    /// The picker the policy published last.
    pub(crate) fn picker(&self) -> &PolicyPicker {
        self.published.as_ref().expect("no picker published yet")
    }

    /// The aggregate state the policy published last.
    pub(crate) fn connectivity(&self) -> ConnectivityState {
        self.picker().connectivity
    }

    /// How many pickers the policy has published.
    pub(crate) fn pickers(&self) -> usize {
        self.pickers
    }

    /// One pick from the last picker.
    pub(crate) fn pick(&self) -> Pick {
        self.pick_with(&http::HeaderMap::new(), None)
    }

    /// One pick from the last picker for a call with `headers` and, if
    /// `Some`, its own hash.
    pub(crate) fn pick_with(&self, headers: &http::HeaderMap, hash: Option<u64>) -> Pick {
        let info = PickInfo {
            method: "/test.Service/Call",
            headers,
            hash,
        };
        self.picker().picker.pick(&info)
    }

    /// The address one pick chose (`None`: Queue), finishing the call
    /// with `code` if the pick wants to hear the outcome.
    pub(crate) fn call(&self, code: tonic::Code) -> Option<String> {
        self.call_with(|_| (code, Duration::from_millis(1)))
    }

    /// Like [`call`](Self::call), with the outcome chosen by address.
    pub(crate) fn call_with(
        &self,
        outcome: impl FnOnce(&str) -> (tonic::Code, Duration),
    ) -> Option<String> {
        match self.pick() {
            Pick::Connection { connection, done } => {
                let (code, latency) = outcome(&connection.address);
                if let Some(done) = done {
                    done(&CallOutcome { code, latency });
                }
                Some(connection.address.to_string())
            }
            Pick::Queue => None,
            Pick::Fail(status) => panic!("pick failed: {status:?}"),
        }
    }

    /// The addresses `n` successful calls went to.
    pub(crate) fn calls(&self, n: usize) -> Vec<Option<String>> {
        (0..n).map(|_| self.call(tonic::Code::Ok)).collect()
    }

    /// What the policy did since the last call, in the order: subchannels
    /// created (in creation order), connect requests, subchannels shut down
    /// (by id).
    /// Connect requests a picker made (ring_hash connects from the RPC
    /// path) are read here too, in the order the subchannels were made.
    pub(crate) fn take_actions(&mut self) -> Vec<String> {
        self.record_requests();
        std::mem::take(&mut self.actions)
    }

    fn id(&self, address: &str) -> SubchannelId {
        self.subchannels
            .id_of(address)
            .unwrap_or_else(|| panic!("the policy has no subchannel for {address}"))
    }

    /// Notes what the policy just did and takes its new picker, if any.
    fn settle(&mut self) {
        for created in self.created.lock().unwrap().drain(..) {
            self.actions.push(format!("create {}", created.address));
            let live = Live {
                address: created.address,
                requests: created.requests,
                in_flight: Arc::default(),
            };
            self.live.insert(created.id, live);
        }
        self.record_requests();
        if let Some(fresh) = self.policy.take_picker() {
            self.published = Some(fresh);
            self.pickers += 1;
        }
    }

    /// Notes each connect request and each subchannel shut down since the
    /// last look.
    fn record_requests(&mut self) {
        let mut removed = Vec::new();
        for (id, live) in &mut self.live {
            loop {
                match live.requests.try_recv() {
                    Ok(()) => self.actions.push(format!("connect {}", live.address)),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        removed.push(*id);
                        break;
                    }
                }
            }
        }
        for id in removed {
            let live = self.live.remove(&id).expect("listed");
            self.actions.push(format!("remove {}", live.address));
        }
    }
}

/// The other half of a fake connection; dropping it closes the connection
/// (its sender's `is_closed` turns true).
pub(crate) struct Link {
    _connection: http2::Connection<TokioIo<DuplexStream>, tonic::body::Body, Inert>,
    _server: DuplexStream,
}

/// An executor that runs nothing: the HTTP/2 connection task of a fake
/// connection is never needed, since no request is ever sent on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inert;

impl<F> hyper::rt::Executor<F> for Inert {
    fn execute(&self, _future: F) {}
}

/// A Ready connection to `address` with no socket behind it.
///
/// [`ReadyConnection::sender`] is a real HTTP/2 sender, and policies look
/// at it (`is_closed`) to skip a connection that died unreported, so a
/// fake needs one rather than an optional field in production code. It is
/// built over an in-memory pipe: the client handshake only writes the
/// preface into the pipe's buffer, so it completes in one poll, with no
/// runtime and no server. Nothing is ever sent on it. It stays open while
/// the returned [`Link`] lives.
pub(crate) fn connection(address: &str, in_flight: Arc<InFlight>) -> (Arc<ReadyConnection>, Link) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let handshake = http2::Builder::new(Inert).handshake(TokioIo::new(client));
    let mut handshake = std::pin::pin!(handshake);
    let Poll::Ready(done) = handshake
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    else {
        panic!("an in-memory HTTP/2 handshake completes in one poll");
    };
    let (sender, connection) = done.expect("in-memory HTTP/2 handshake");
    let ready = ReadyConnection {
        address: Arc::from(address),
        authority: address.parse().expect("an address is an authority"),
        scheme: http::uri::Scheme::HTTP,
        sender,
        in_flight,
        metrics: None,
    };
    let link = Link {
        _connection: connection,
        _server: server,
    };
    (Arc::new(ready), link)
}

/// Addresses of `picks`, for comparing with a list of `&str`.
pub(crate) fn addresses(picks: &[Option<String>]) -> Vec<&str> {
    picks
        .iter()
        .map(|p| p.as_deref().unwrap_or("queue"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_connection_is_open_until_its_link_drops() {
        let (connection, link) = connection("a:1", Arc::default());
        assert!(!connection.sender.is_closed());
        drop(link);
        assert!(connection.sender.is_closed());
    }
}
