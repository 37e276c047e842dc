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
//! A connection counts as Ready only once the server has spoken (its HTTP/2
//! SETTINGS), so a hung process whose kernel still accepts TCP connections
//! is never picked.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, Notify};

use super::backoff::{Backoff, BackoffConfig};
use super::error::source_chain;
use super::transport::{self, Stream};
use crate::tls::{self, ClientTls};

/// The aggregate or per-subchannel connectivity state, as in gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectivityState {
    /// Not connected and not trying to.
    Idle,
    /// A connection attempt is under way.
    Connecting,
    /// Connected; RPCs can be sent.
    Ready,
    /// The last attempt failed; waiting out the backoff.
    TransientFailure,
}

/// Settings shared by every subchannel of a channel.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Delays between failed connection attempts, and the connect timeout.
    pub backoff: BackoffConfig,
    /// How often to ping a connection that has been quiet.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// TLS settings for backend connections; plaintext if `None`.
    pub tls: Option<ClientTls>,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            backoff: BackoffConfig::default(),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// A subchannel's state, carrying what exists in that state.
#[derive(Debug, Clone)]
pub enum SubchannelState {
    /// Not connected; `last_error` says why a previous connection ended.
    Idle {
        /// Why the last connection ended, if it failed.
        last_error: Option<String>,
    },
    /// Connecting.
    Connecting,
    /// Connected.
    Ready(Arc<ReadyConnection>),
    /// The last attempt failed with `error`; retrying after a backoff.
    TransientFailure {
        /// Why the attempt failed.
        error: String,
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

    /// The error behind the current state, if any.
    pub fn last_error(&self) -> Option<&str> {
        match &self.state {
            SubchannelState::Idle { last_error } => last_error.as_deref(),
            SubchannelState::TransientFailure { error } => Some(error),
            _ => None,
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
    // Idle: wait to be asked.
    while requests.recv().await.is_some() {
        // Connecting, retrying after each failure until a connection is up.
        let (authority, sender, mut connection) = loop {
            emit(SubchannelState::Connecting);
            let attempt = tokio::select! {
                attempt = connect(&address, &config) => attempt,
                _ = closed(&mut requests) => return,
            };
            match attempt {
                Ok(connected) => break connected,
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(%address, %error, retry_in = ?delay, "connect failed");
                    emit(SubchannelState::TransientFailure { error });
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = closed(&mut requests) => return,
                    }
                }
            }
        };
        backoff.reset();
        tracing::debug!(%address, "connected");
        emit(SubchannelState::Ready(Arc::new(ReadyConnection {
            address: address.clone(),
            authority,
            scheme: tls::scheme(config.tls.is_some()),
            sender,
            in_flight: in_flight.clone(),
        })));
        // Ready until the connection ends or the balancer lets go.
        tokio::select! {
            ended = &mut connection => {
                let last_error = ended.err().map(|e| format!("connection to {address} lost: {}", source_chain(&e)));
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

/// Resolves when the balancer has dropped the handle; consumes (and
/// ignores) connect requests meanwhile.
async fn closed(requests: &mut mpsc::UnboundedReceiver<()>) {
    while requests.recv().await.is_some() {}
}

type Connection = http2::Connection<TokioIo<FirstRead<Stream>>, tonic::body::Body, TokioExecutor>;

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
async fn connect(address: &str, config: &ConnectConfig) -> Result<Connected, String> {
    let authority: http::uri::Authority = address
        .parse()
        .map_err(|e| format!("invalid backend address {address:?}: {e}"))?;
    let timeout = config.backoff.min_connect_timeout;
    let attempt = async {
        let stream = transport::dial(address, config.tls.as_ref()).await?;
        let (spoke_tx, spoke) = oneshot::channel();
        let io = TokioIo::new(FirstRead {
            inner: stream,
            spoke: Some(spoke_tx),
        });
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(config.keepalive_interval)
            .keep_alive_timeout(config.keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(|e| {
                format!(
                    "HTTP/2 handshake with {address} failed: {}",
                    source_chain(&e)
                )
            })?;
        let mut connection = Box::pin(connection);
        tokio::select! {
            _ = spoke => Ok((authority, sender, connection)),
            ended = &mut connection => Err(match ended {
                Ok(()) => format!("{address} closed the connection during the handshake"),
                Err(e) => format!("connection to {address} failed: {}", source_chain(&e)),
            }),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("connect to {address} timed out after {timeout:?}")))
}

/// Passes I/O through and signals the first bytes read: an HTTP/2 server's
/// first bytes are its SETTINGS frame, proof that the process is serving.
struct FirstRead<T> {
    inner: T,
    spoke: Option<oneshot::Sender<()>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstRead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(spoke) = self.spoke.take() {
                let _ = spoke.send(());
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstRead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
