//! A subchannel: the connection to one backend address and its state
//! machine, as in gRPC:
//!
//! ```text
//!   Idle --connect--> Connecting --ok--> Ready --connection lost--> Idle
//!                         |  ^
//!                    fail v  | backoff elapsed
//!                   TransientFailure
//! ```
//!
//! Each subchannel is one task that owns its HTTP/2 connection and polls it,
//! so it learns that the backend died from the connection itself (closed,
//! reset, or HTTP/2 keepalive pings unanswered), not only from the registry.
//! A connection counts as Ready only once the server's first HTTP/2 frame, a
//! SETTINGS frame, has really arrived. A hung process whose kernel still
//! accepts TCP connections, or a dying one whose listening socket accepts
//! and then closes or resets, is therefore never picked, and such an attempt
//! counts as a failure: the backoff keeps growing instead of being reset.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::client::backoff::{Backoff, BackoffConfig};
use crate::client::error::{source_chain, ConnectError};
use crate::client::metrics::{ChannelMetrics, EndpointMetrics};
use crate::client::transport::{self, Stream};
use crate::tls::{self, ClientTls};
use first_frame::FirstFrame;
use health::HealthCheck;

mod first_frame;
pub mod health;

// Kept at its old path.
pub use crate::client::connectivity::ConnectivityState;

/// Settings shared by every subchannel of a channel.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Delays between failed connection attempts, and the connect timeout.
    pub backoff: BackoffConfig,
    /// HTTP/2 keepalive pings while RPCs are in flight.
    pub keepalive: Arc<Keepalive>,
    /// TLS settings for backend connections; plaintext if `None`.
    pub tls: Option<ClientTls>,
    /// Connection counters, shared with the channel.
    pub stats: Arc<ConnectionStats>,
    /// Client-side health checking; off if `None`.
    pub health_check: Option<Arc<HealthCheck>>,
    /// Per-endpoint metrics; off if `None`.
    pub metrics: Option<ChannelMetrics>,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            backoff: BackoffConfig::default(),
            keepalive: Arc::new(Keepalive::new(
                Keepalive::DEFAULT_INTERVAL,
                Keepalive::DEFAULT_TIMEOUT,
            )),
            tls: None,
            stats: Arc::default(),
            health_check: None,
            metrics: None,
        }
    }
}

/// HTTP/2 keepalive as gRPC's own clients do it: a ping only after `interval`
/// of silence while RPCs are in flight, never on an idle connection, since
/// stock grpc-go, grpc-java and grpcio servers allow no pings without
/// streams and answer them with GOAWAY `too_many_pings`. A server that still
/// says so (ENHANCE_YOUR_CALM) doubles the interval for every later
/// connection of the channel, as grpc-go's client does.
#[derive(Debug)]
pub struct Keepalive {
    /// The interval in milliseconds; doubled on each `too_many_pings`.
    interval_ms: AtomicU64,
    /// How long a ping may go unanswered before the connection is dropped.
    timeout: Duration,
}

impl Keepalive {
    /// Ping after this much silence on a connection with RPCs in flight:
    /// grpc-go's smallest allowed client keepalive time.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    /// Drop the connection when a ping goes unanswered this long.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Pings after `interval` of silence, waiting `timeout` for the answer.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval_ms: AtomicU64::new(interval.as_millis().max(1) as u64),
            timeout,
        }
    }

    /// The interval in force now.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }

    /// The ping timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A server said `too_many_pings`: doubles the interval and returns it.
    fn back_off(&self) -> Duration {
        let doubled = self
            .interval_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ms| {
                Some(ms.saturating_mul(2))
            })
            .map_or(u64::MAX, |ms| ms.saturating_mul(2));
        Duration::from_millis(doubled)
    }
}

/// Counters of one channel's connections, for tests, metrics and operators.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connection attempts started.
    pub attempts: AtomicU64,
    /// Attempts that reached Ready (the server's SETTINGS arrived).
    pub succeeded: AtomicU64,
    /// Attempts that failed, including those closed before SETTINGS.
    pub failed: AtomicU64,
    /// Ready connections that ended.
    pub disconnections: AtomicU64,
    /// Connections a server ended with GOAWAY `too_many_pings`.
    pub too_many_pings: AtomicU64,
    /// Ready connections closed because a keepalive ping went unanswered
    /// within the keepalive timeout: a hung backend or a vanished network,
    /// found by the client itself rather than by the registry's TTL.
    pub keepalive_timeouts: AtomicU64,
}

impl ConnectionStats {
    /// Ready connections open now.
    pub fn open(&self) -> u64 {
        let up = self.succeeded.load(Ordering::Relaxed);
        up.saturating_sub(self.disconnections.load(Ordering::Relaxed))
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A subchannel's state, carrying what exists in that state.
#[derive(Debug, Clone)]
pub enum SubchannelState {
    /// Not connected; `last_error` says why a previous connection ended.
    Idle {
        /// Why the last connection ended, if it failed.
        last_error: Option<Arc<ConnectError>>,
    },
    /// Connecting.
    Connecting,
    /// Connected.
    Ready(Arc<ReadyConnection>),
    /// The last attempt failed with `error`; retrying after a backoff.
    TransientFailure {
        /// Why the attempt failed.
        error: Arc<ConnectError>,
    },
}

impl SubchannelState {
    /// The state without its data.
    pub fn connectivity(&self) -> ConnectivityState {
        match self {
            SubchannelState::Idle { .. } => ConnectivityState::Idle,
            SubchannelState::Connecting => ConnectivityState::Connecting,
            SubchannelState::Ready(_) => ConnectivityState::Ready,
            SubchannelState::TransientFailure { .. } => ConnectivityState::TransientFailure,
        }
    }
}

/// A connection RPCs can be sent on.
#[derive(Debug)]
pub struct ReadyConnection {
    /// The backend address.
    pub address: Arc<str>,
    /// The address as a URI authority, parsed once rather than per RPC.
    pub authority: http::uri::Authority,
    /// `https` over TLS, `http` otherwise: what requests carry as `:scheme`.
    pub scheme: http::uri::Scheme,
    /// Sends requests over the HTTP/2 connection.
    pub sender: http2::SendRequest<tonic::body::Body>,
    /// RPCs started on this subchannel and not yet finished.
    pub in_flight: Arc<InFlight>,
    /// This endpoint's metrics, if the channel has any.
    pub metrics: Option<Arc<EndpointMetrics>>,
}

/// Counts RPCs in flight on a subchannel so a removed one can close its
/// connection once they have finished, and not before.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    /// Counts one more RPC until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }

    /// RPCs in flight now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves when no RPC is in flight.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Marks one RPC in flight; dropped when its response has been read.
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A state change of subchannel `id`.
#[derive(Debug)]
pub struct SubchannelEvent {
    /// Which subchannel (ids are never reused, so stale events are ignored).
    pub id: u64,
    /// Its new state.
    pub state: SubchannelState,
}

/// The balancer's handle on a subchannel task. Dropping it shuts the
/// subchannel down: it stops reconnecting, lets in-flight RPCs finish, then
/// closes its connection.
#[derive(Debug)]
pub struct Subchannel {
    id: u64,
    address: Arc<str>,
    connect: mpsc::UnboundedSender<()>,
    state: SubchannelState,
}

impl Subchannel {
    /// Starts an Idle subchannel for `address`; state changes are sent to
    /// `events`.
    pub fn spawn(
        id: u64,
        address: Arc<str>,
        config: Arc<ConnectConfig>,
        events: mpsc::UnboundedSender<SubchannelEvent>,
    ) -> Self {
        let (connect, requests) = mpsc::unbounded_channel();
        tokio::spawn(run(id, address.clone(), config, requests, events));
        Self::new(id, address, connect)
    }

    /// An Idle handle whose connect requests go to `connect`, with no task
    /// behind it: [`spawn`](Self::spawn) puts its task there, policy tests
    /// their fake, which reads the requests and sees the handle dropped
    /// when the receiver closes, as the task would.
    pub(crate) fn new(id: u64, address: Arc<str>, connect: mpsc::UnboundedSender<()>) -> Self {
        Self {
            id,
            address,
            connect,
            state: SubchannelState::Idle { last_error: None },
        }
    }

    /// Asks an Idle subchannel to connect; other states ignore it.
    pub fn connect(&self) {
        let _ = self.connect.send(());
    }

    /// A handle that asks this subchannel to connect, for a picker that
    /// connects lazily from the RPC path (ring_hash) and so cannot reach
    /// the balancer's subchannels.
    pub fn connector(&self) -> Connector {
        Connector(self.connect.downgrade())
    }

    /// The subchannel's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The backend address.
    pub fn address(&self) -> &Arc<str> {
        &self.address
    }

    /// The last state the task reported.
    pub fn state(&self) -> &SubchannelState {
        &self.state
    }

    /// Records a state the task reported.
    pub fn set_state(&mut self, state: SubchannelState) {
        self.state = state;
    }

    /// The connection, when Ready.
    pub fn ready(&self) -> Option<&Arc<ReadyConnection>> {
        match &self.state {
            SubchannelState::Ready(connection) => Some(connection),
            _ => None,
        }
    }

    /// The error behind the current state, if any; its `Display` is the
    /// one-line message.
    pub fn last_error(&self) -> Option<&Arc<ConnectError>> {
        match &self.state {
            SubchannelState::Idle { last_error } => last_error.as_ref(),
            SubchannelState::TransientFailure { error } => Some(error),
            _ => None,
        }
    }
}

/// Asks one subchannel to connect; see [`Subchannel::connector`].
///
/// Weak: the subchannel shuts down when the balancer drops its handle, and
/// a picker still holding a connector must not keep it alive; a request
/// after that goes nowhere.
#[derive(Debug, Clone)]
pub struct Connector(mpsc::WeakUnboundedSender<()>);

impl Connector {
    /// Asks the subchannel to connect if it is Idle.
    pub fn connect(&self) {
        if let Some(sender) = self.0.upgrade() {
            let _ = sender.send(());
        }
    }
}

/// The subchannel task: the state machine above.
async fn run(
    id: u64,
    address: Arc<str>,
    config: Arc<ConnectConfig>,
    mut requests: mpsc::UnboundedReceiver<()>,
    events: mpsc::UnboundedSender<SubchannelEvent>,
) {
    let emit = |state| {
        let _ = events.send(SubchannelEvent { id, state });
    };
    let mut backoff = Backoff::new(config.backoff);
    let in_flight = Arc::new(InFlight::default());
    let metrics = config
        .metrics
        .as_ref()
        .map(|m| Arc::new(m.endpoint(&address)));
    // Idle: wait to be asked.
    while requests.recv().await.is_some() {
        // Connecting, retrying after each failure until a connection is up.
        let (authority, sender, mut connection) = loop {
            emit(SubchannelState::Connecting);
            ConnectionStats::count(&config.stats.attempts);
            let attempt = tokio::select! {
                attempt = connect(&address, &config) => attempt,
                _ = closed(&mut requests) => return,
            };
            match attempt {
                Ok(connected) => break connected,
                Err(error) => {
                    ConnectionStats::count(&config.stats.failed);
                    if let Some(metrics) = &metrics {
                        metrics.attempt_failed();
                    }
                    let delay = backoff.next_delay();
                    tracing::debug!(%address, %error, retry_in = ?delay, "connect failed");
                    emit(SubchannelState::TransientFailure {
                        error: Arc::new(error),
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = closed(&mut requests) => return,
                    }
                }
            }
        };
        // Only now, with the server's SETTINGS in hand: an attempt that
        // ended before them was a failure and must not shorten the backoff.
        backoff.reset();
        ConnectionStats::count(&config.stats.succeeded);
        // Counts the connection as open until this iteration ends, however
        // it ends.
        let _open = metrics.as_ref().map(EndpointMetrics::connected);
        tracing::debug!(%address, "connected");
        let ready = Arc::new(ReadyConnection {
            address: address.clone(),
            authority,
            scheme: tls::scheme(config.tls.is_some()),
            sender,
            in_flight: in_flight.clone(),
            metrics: metrics.clone(),
        });
        // Ready (or, with health checking, as healthy as the backend says)
        // until the connection ends or the balancer lets go.
        let serving = async {
            match &config.health_check {
                Some(check) => health::watch(check, ready, config.backoff, &emit).await,
                None => emit(SubchannelState::Ready(ready)),
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = serving => {}
            ended = &mut connection => {
                ConnectionStats::count(&config.stats.disconnections);
                if let Some(metrics) = &metrics {
                    metrics.disconnected();
                }
                if let Err(error) = &ended {
                    // The only timer on a client connection is keepalive's.
                    if error.is_timeout() {
                        ConnectionStats::count(&config.stats.keepalive_timeouts);
                    }
                    if is_too_many_pings(error) {
                        ConnectionStats::count(&config.stats.too_many_pings);
                        let interval = config.keepalive.back_off();
                        tracing::warn!(%address, ?interval, "server sent GOAWAY too_many_pings; keepalive interval doubled");
                    }
                }
                let last_error = ended.err().map(|e| {
                    Arc::new(ConnectError::Lost {
                        address: address.clone(),
                        detail: source_chain(&e),
                    })
                });
                tracing::debug!(%address, error = ?last_error, "connection ended");
                emit(SubchannelState::Idle { last_error });
            }
            _ = closed(&mut requests) => {
                // Removed while connected: finish what is in flight first.
                tokio::select! {
                    _ = connection => {}
                    _ = in_flight.idle() => {}
                }
                return;
            }
        }
        // Connect requests that arrived while Ready are stale.
        while requests.try_recv().is_ok() {}
    }
}

/// Whether a connection ended because the server refused our pings: gRPC
/// servers send GOAWAY ENHANCE_YOUR_CALM (debug data `too_many_pings`).
fn is_too_many_pings(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = cause.source();
    }
    false
}

/// Resolves when the balancer has dropped the handle; consumes (and
/// ignores) connect requests meanwhile.
async fn closed(requests: &mut mpsc::UnboundedReceiver<()>) {
    while requests.recv().await.is_some() {}
}

type Connection = http2::Connection<TokioIo<FirstFrame<Stream>>, tonic::body::Body, TokioExecutor>;

/// A live connection: where RPCs go, how to send them, and the connection
/// future that must be polled for them to move.
type Connected = (
    http::uri::Authority,
    http2::SendRequest<tonic::body::Body>,
    Pin<Box<Connection>>,
);

/// One connection attempt: TCP (and TLS, if configured), the HTTP/2
/// handshake, then the server's first frame, all within the connect timeout.
/// Over TLS the first frame is read inside the encryption, so a server that
/// finishes a handshake and then refuses the client's certificate never
/// counts as Ready.
async fn connect(address: &Arc<str>, config: &ConnectConfig) -> Result<Connected, ConnectError> {
    let authority: http::uri::Authority =
        address
            .parse()
            .map_err(|e: http::uri::InvalidUri| ConnectError::InvalidAddress {
                address: address.clone(),
                detail: e.to_string(),
            })?;
    let timeout = config.backoff.min_connect_timeout;
    let attempt = async {
        let stream = transport::dial(address, config.tls.as_ref()).await?;
        let (heard_tx, mut heard) = oneshot::channel();
        let io = TokioIo::new(FirstFrame::new(stream, heard_tx));
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(config.keepalive.interval())
            .keep_alive_timeout(config.keepalive.timeout())
            .keep_alive_while_idle(false)
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Handshake {
                address: address.clone(),
                detail: source_chain(&e),
            })?;
        let mut connection = Box::pin(connection);
        let failed = |ended: Result<(), hyper::Error>| match ended {
            Ok(()) => ConnectError::ClosedBeforeSettings {
                address: address.clone(),
            },
            Err(e) => ConnectError::FailedBeforeSettings {
                address: address.clone(),
                detail: source_chain(&e),
            },
        };
        tokio::select! {
            // A connection that ends in the same poll that read its first
            // frame is no connection at all.
            biased;
            ended = &mut connection => Err(failed(ended)),
            first = &mut heard => match first {
                Ok(Ok(())) => Ok((authority, sender, connection)),
                Ok(Err(frame_type)) => Err(ConnectError::NotHttp2 {
                    address: address.clone(),
                    frame_type,
                }),
                // The reader went away with the connection.
                Err(_) => Err(failed((&mut connection).await)),
            },
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                address: address.clone(),
                timeout,
            })
        })
}
