//! Keeping one endpoint in the registry for as long as its server serves.
//!
//! One task per server. Its life is a loop of *sessions*: connect to a
//! registry replica, bind the lease to one KeepAlive stream and heartbeat on
//! it every TTL/3. The first session Registers; later ones resume the lease
//! they hold (KeepAlive with its id first), so a backend that moves to
//! another replica of a shared store keeps its endpoint without a removal
//! and re-add, and Register again only when the registry answers NOT_FOUND
//! (a restarted in-memory registry, or a pause longer than the TTL).
//!
//! A session ends when the stream breaks or ends (the replica died or is
//! unreachable) or the registry no longer knows the lease. The next session
//! goes to the next replica of the list, after a short jittered backoff.
//! A stream that merely goes silent is kept: closing it is what ends the
//! lease, and a silent registry is most likely stalled, which it makes up
//! for itself when it runs again (see `registry::lease`).
//!
//! An operator may remove the endpoint (`switchboard deregister`): the
//! registry then refuses its heartbeat with FAILED_PRECONDITION, and the
//! keeper stops, serving on unregistered, until the process restarts. An
//! operator's removal stands; it is not undone behind their back.
//!
//! Leaving is the first step of a drain: Drain (watchers stop picking the
//! endpoint), Deregister (it leaves their sets), and only then the stream
//! closes, so the endpoint never vanishes without first being DRAINING.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::client::transport;
use crate::net::backoff::{Backoff, BackoffConfig};
use crate::net::error_chain::status_chain;
use crate::proto::registry::registry_client::RegistryClient;
use crate::registry::auth::{Bearer, Token};
use crate::registry::validate;
use crate::tls::ClientTls;

/// A registry client that presents the write token, if any.
type Client = RegistryClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;
use crate::proto::registry::{
    DeregisterRequest, DrainRequest, KeepAliveRequest, KeepAliveResponse, RegisterRequest,
};

/// How long one Register, Drain or Deregister call, or the opening of the
/// KeepAlive stream, may take before the registry counts as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the endpoint stands in the registry, as far as its keeper knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// The server runs without a registry.
    NoRegistry,
    /// Not registered yet, or the lease was lost and the keeper is
    /// registering again.
    Unregistered,
    /// Registered, and the lease is bound to this keeper's KeepAlive stream
    /// (so it ends at once if the process dies).
    Registered {
        /// The lease, as granted.
        lease_id: String,
        /// The registry instance that granted it.
        epoch: u64,
    },
    /// An operator removed the endpoint; the keeper does not register it
    /// again until the process restarts.
    RemovedByOperator,
    /// The keeper stopped; it drained and deregistered the endpoint first if
    /// it held a lease.
    Stopped,
}

impl LeaseState {
    /// Whether the endpoint is registered right now.
    pub fn is_registered(&self) -> bool {
        matches!(self, Self::Registered { .. })
    }
}

/// What to register, and where.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The registry's `host:port`, or several replicas' as
    /// `host:port,host:port`, tried in turn.
    pub registry: String,
    /// The service to register under.
    pub service: String,
    /// The endpoint's advertised `host:port`.
    pub address: String,
    /// The endpoint's labels.
    pub metadata: HashMap<String, String>,
    /// Lease TTL to ask for.
    pub ttl: Duration,
    /// The registry's write token, when it demands one.
    pub token: Option<Token>,
    /// TLS settings for the registry connection; plaintext if `None`.
    pub tls: Option<ClientTls>,
}

/// The task keeping one endpoint registered. Dropping it aborts the task;
/// the registry then ends the lease with its stream.
#[derive(Debug)]
pub struct LeaseKeeper {
    /// Set to true to have the task leave the registry and end.
    leave: watch::Sender<bool>,
    /// What the task last knew about the lease.
    state: watch::Receiver<LeaseState>,
    /// The task; it returns whether the registry confirmed Deregister.
    task: Option<JoinHandle<bool>>,
}

impl LeaseKeeper {
    /// Starts registering `registration`, retrying with `backoff` until it
    /// is told to leave. Must be called inside a tokio runtime.
    pub fn spawn(registration: Registration, backoff: BackoffConfig) -> Self {
        let (leave, leave_rx) = watch::channel(false);
        let (state_tx, state) = watch::channel(LeaseState::Unregistered);
        let task = tokio::spawn(keep(registration, backoff, state_tx, leave_rx));
        Self {
            leave,
            state,
            task: Some(task),
        }
    }

    /// Follows the lease's state.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Drains and deregisters the endpoint if it is registered, and stops
    /// retrying if it is not. Returns whether the registry confirmed the
    /// deregistration. Takes at most a few [`CALL_TIMEOUT`]s.
    pub async fn leave(mut self) -> bool {
        self.leave.send_replace(true);
        match self.task.take() {
            Some(task) => task.await.unwrap_or(false),
            None => false,
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("Register failed: {} {}", .0.code(), status_chain(.0))]
    Register(Status),
    #[error("the registry no longer knows the lease: {}", .0.message())]
    LeaseLost(Status),
    #[error("{}", .0.message())]
    RemovedByOperator(Status),
    #[error("keepalive stream failed: {} {}", .0.code(), status_chain(.0))]
    KeepAlive(Status),
    #[error("the registry closed the keepalive stream")]
    StreamEnded,
    #[error("no answer from the registry for {0:?}")]
    Silent(Duration),
}

/// The lease a keeper holds, kept across sessions so that the next one
/// resumes it instead of registering again.
#[derive(Debug, Clone)]
struct Held {
    lease_id: String,
    ttl: Duration,
    epoch: u64,
}

/// The two halves of one KeepAlive stream: heartbeats to send, replies.
type Bound = (
    mpsc::Sender<KeepAliveRequest>,
    tonic::Streaming<KeepAliveResponse>,
);

impl SessionError {
    /// Whether the registry answered and said no (a full service, a
    /// registry with other rules), rather than not answering at all.
    fn is_refusal(&self) -> bool {
        match self {
            Self::Register(status) => !matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ),
            _ => false,
        }
    }
}

/// The keeper task: sessions until told to leave.
async fn keep(
    registration: Registration,
    backoff: BackoffConfig,
    state: watch::Sender<LeaseState>,
    mut leave: watch::Receiver<bool>,
) -> bool {
    let mut backoff = Backoff::new(backoff);
    // Whether the failures since the last registration were already logged
    // as a warning; the retries after that are only debug noise.
    let mut reported = false;
    // Checked when the server was built; a bad list is tried as one address
    // and its error reported like an unreachable registry.
    let replicas: Vec<String> = validate::registry_addresses(&registration.registry)
        .map(|list| list.into_iter().map(str::to_owned).collect())
        .unwrap_or_else(|_| vec![registration.registry.clone()]);
    let mut replica = 0;
    let mut held: Option<Held> = None;
    loop {
        let outcome = session(
            &replicas[replica % replicas.len()],
            &registration,
            &mut held,
            &state,
            &mut leave,
            backoff.config().min_connect_timeout,
        )
        .await;
        if let Err(SessionError::LeaseLost(_)) = &outcome {
            held = None;
        }
        // A failed replica's turn is over; the next session tries another.
        replica = (replica + 1) % replicas.len();
        match outcome {
            Ok(deregistered) => {
                state.send_replace(LeaseState::Stopped);
                return deregistered;
            }
            Err(SessionError::RemovedByOperator(status)) => {
                state.send_replace(LeaseState::RemovedByOperator);
                tracing::warn!(
                    address = %registration.address,
                    reason = status.message(),
                    "an operator removed this endpoint; serving unregistered until restarted"
                );
                told_to_leave(&mut leave).await;
                state.send_replace(LeaseState::Stopped);
                return false;
            }
            Err(error) => {
                let previous = state.send_replace(LeaseState::Unregistered);
                if previous.is_registered() {
                    backoff.reset();
                    match &held {
                        // The lease still lives (a replica died, the
                        // connection broke): the next session resumes it.
                        Some(_) => tracing::warn!(
                            registry = %replicas[(replica + replicas.len() - 1) % replicas.len()],
                            address = %registration.address,
                            %error,
                            "registry stream lost; resuming the lease"
                        ),
                        None => {
                            tracing::warn!(address = %registration.address, %error, "registration lost; registering again")
                        }
                    }
                } else if !reported && error.is_refusal() {
                    tracing::warn!(
                        registry = %registration.registry,
                        address = %registration.address,
                        %error,
                        "the registry refused the registration; serving anyway and retrying"
                    );
                } else if !reported {
                    tracing::warn!(
                        registry = %registration.registry,
                        address = %registration.address,
                        %error,
                        "registry unreachable; serving anyway and retrying registration"
                    );
                } else {
                    tracing::debug!(address = %registration.address, %error, "registration attempt failed; retrying");
                }
                reported = true;
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = told_to_leave(&mut leave) => {
                state.send_replace(LeaseState::Stopped);
                return false;
            }
        }
    }
}

/// Resolves once the keeper is told to leave (or its owner is gone).
async fn told_to_leave(leave: &mut watch::Receiver<bool>) {
    let _ = leave.wait_for(|leave| *leave).await;
}

/// One connection's worth of registration at `registry`: resume the `held`
/// lease or register, heartbeat until something breaks, or leave when told.
/// `Ok` says whether it deregistered.
async fn session(
    registry: &str,
    registration: &Registration,
    held: &mut Option<Held>,
    state: &watch::Sender<LeaseState>,
    leave: &mut watch::Receiver<bool>,
    connect_timeout: Duration,
) -> Result<bool, SessionError> {
    let connecting = transport::channel(registry, registration.tls.as_ref(), connect_timeout);
    let channel = tokio::select! {
        channel = connecting => channel.map_err(SessionError::Connect)?,
        _ = told_to_leave(leave) => return Ok(false),
    };
    let mut client = RegistryClient::with_interceptor(channel, Bearer(registration.token.clone()));

    let mut resumed = None;
    if let Some(lease) = held.clone() {
        match bind(&mut client, &lease.lease_id).await {
            Ok(bound) => resumed = Some((lease, bound)),
            // Gone (a restarted registry, or a pause past the TTL):
            // register afresh below.
            Err(SessionError::LeaseLost(_)) => *held = None,
            Err(other) => return Err(other),
        }
    }
    let was_resumed = resumed.is_some();
    let (granted, (heartbeats, mut replies)) = match resumed {
        Some(resumed) => resumed,
        None => {
            // Not interrupted by a leave: a Register cut short could still
            // create a lease nobody deregisters, so let it finish and leave
            // properly below.
            let reply = client
                .register(timed(RegisterRequest {
                    service: registration.service.clone(),
                    address: registration.address.clone(),
                    metadata: registration.metadata.clone(),
                    ttl_ms: u64::try_from(registration.ttl.as_millis()).unwrap_or(u64::MAX),
                }))
                .await
                .map_err(SessionError::Register)?
                .into_inner();
            let lease = Held {
                ttl: match reply.ttl_ms {
                    0 => registration.ttl,
                    ms => Duration::from_millis(ms),
                },
                lease_id: reply.lease_id,
                epoch: reply.epoch,
            };
            *held = Some(lease.clone());
            let bound = bind(&mut client, &lease.lease_id).await?;
            (lease, bound)
        }
    };
    let ttl = granted.ttl;
    let heartbeat = KeepAliveRequest {
        lease_id: granted.lease_id.clone(),
    };

    state.send_replace(LeaseState::Registered {
        lease_id: granted.lease_id.clone(),
        epoch: granted.epoch,
    });
    tracing::info!(
        address = %registration.address,
        service = %registration.service,
        %registry,
        epoch = granted.epoch,
        ttl = ?ttl,
        resumed = was_resumed,
        "registered"
    );

    let period = ttl / 3;
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reply = Instant::now();
    let mut silent_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let _ = heartbeats.try_send(heartbeat.clone());
            }
            reply = replies.message() => {
                answered(reply)?;
                last_reply = Instant::now();
                if let Some(since) = silent_since.take() {
                    tracing::info!(%registry, silent_for = ?since.elapsed() + ttl, "the registry answers again");
                }
            }
            // Closing the stream would end the lease, so a silent registry
            // (most likely stalled) is waited for, not left.
            _ = tokio::time::sleep_until(last_reply + ttl), if silent_since.is_none() => {
                tracing::warn!(%registry, silent = ?ttl, "no heartbeat answered; keeping the stream, which holds the lease");
                silent_since = Some(Instant::now());
            }
            _ = told_to_leave(leave) => break,
        }
    }
    // The stream stays open until Deregister is done: closing it first would
    // remove the endpoint without it ever being DRAINING.
    let deregistered = leave_registry(&mut client, &granted.lease_id, registration).await;
    drop(heartbeats);
    drop(replies);
    Ok(deregistered)
}

/// Opens a KeepAlive stream and binds `lease_id` to it: the first
/// heartbeat's answer proves the lease is bound (until then a crash would
/// leave it to expire by TTL instead of ending at once).
async fn bind(client: &mut Client, lease_id: &str) -> Result<Bound, SessionError> {
    // Capacity 1: when a heartbeat is still queued the connection is stuck.
    let (heartbeats, outgoing) = mpsc::channel(1);
    let _ = heartbeats.try_send(KeepAliveRequest {
        lease_id: lease_id.to_owned(),
    });
    let mut replies = tokio::time::timeout(
        CALL_TIMEOUT,
        client.keep_alive(ReceiverStream::new(outgoing)),
    )
    .await
    .map_err(|_| SessionError::Silent(CALL_TIMEOUT))?
    .map_err(SessionError::KeepAlive)?
    .into_inner();
    let first = tokio::time::timeout(CALL_TIMEOUT, replies.message())
        .await
        .map_err(|_| SessionError::Silent(CALL_TIMEOUT))?;
    answered(first)?;
    Ok((heartbeats, replies))
}

/// Whether a KeepAlive read was an answer, or why the session is over.
fn answered(reply: Result<Option<KeepAliveResponse>, Status>) -> Result<(), SessionError> {
    match reply {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(SessionError::StreamEnded),
        Err(status) if status.code() == Code::NotFound => Err(SessionError::LeaseLost(status)),
        Err(status) if status.code() == Code::FailedPrecondition => {
            Err(SessionError::RemovedByOperator(status))
        }
        Err(status) => Err(SessionError::KeepAlive(status)),
    }
}

/// Drain, then Deregister. Returns whether Deregister was confirmed.
async fn leave_registry(client: &mut Client, lease_id: &str, registration: &Registration) -> bool {
    let address = &registration.address;
    match client
        .drain(timed(DrainRequest {
            lease_id: lease_id.to_owned(),
        }))
        .await
    {
        Ok(_) => tracing::info!(%address, "draining"),
        Err(status) => {
            tracing::warn!(%address, code = ?status.code(), message = status.message(), "Drain failed; deregistering anyway")
        }
    }
    match client
        .deregister(timed(DeregisterRequest {
            lease_id: lease_id.to_owned(),
        }))
        .await
    {
        Ok(_) => {
            tracing::info!(%address, "deregistered");
            true
        }
        Err(status) => {
            tracing::warn!(%address, code = ?status.code(), message = status.message(), "Deregister failed; the lease ends with its stream");
            false
        }
    }
}

/// A request bounded by [`CALL_TIMEOUT`].
fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}
