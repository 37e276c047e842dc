//! The registry over real gRPC on 127.0.0.1: registrations and watches, the
//! ways a lease ends (stream break, TTL, drain, deregister, takeover),
//! versions and epochs, fan-out to many and to slow watchers, health and
//! reflection, and every refused input.
//!
//! Most tests serve a registry in-process on the test runtime so they can
//! choose its limits; the restart test runs the real binary. Nothing is
//! mocked: every call crosses a real HTTP/2 connection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::cases::{self, case, expect_status, Case};
use crate::common::*;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::watch_response::Event;
use switchboard::proto::registry::{
    DeregisterRequest, DrainRequest, EndpointState, KeepAliveRequest, KeepAliveResponse,
    ListServicesRequest, ListServicesResponse, RegisterRequest, RegisterResponse, ResolveRequest,
    ResolveResponse, ServiceSummary, WatchRequest, WatchResponse,
};
use switchboard::registry::{RegistryConfig, RegistryMetrics};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A TTL long enough that no lease expires during a test unless it means to.
const LONG_TTL_MS: u64 = 300_000;
/// How long to wait for anything the issue sets no bound on.
const GENEROUS: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// The registry's defaults without the warm-up, so a Watch answers at once
/// (the warm-up has its own test).
fn config() -> RegistryConfig {
    RegistryConfig {
        warmup: Duration::ZERO,
        ..RegistryConfig::default()
    }
}

/// [`config`], and the registry's counters, read in process to learn why
/// each endpoint left.
fn counted() -> (RegistryConfig, RegistryMetrics) {
    let metrics = RegistryMetrics::default();
    let config = RegistryConfig {
        metrics: metrics.clone(),
        ..config()
    };
    (config, metrics)
}

/// Asserts how many endpoints left because their KeepAlive stream broke
/// and how many because their lease ran out its TTL.
fn assert_removed_by(metrics: &RegistryMetrics, stream_breaks: u64, expiries: u64) {
    assert_eq!(
        (metrics.stream_breaks.get(), metrics.expiries.get()),
        (stream_breaks, expiries),
        "(stream-break removals, TTL expiries)"
    );
}

/// Starts the registry binary on `port` with `args` and waits until it
/// listens.
async fn start_registry_with(port: u16, args: &[&str]) -> Proc {
    let listen = local(port);
    let mut all = vec!["--listen", listen.as_str()];
    all.extend_from_slice(args);
    let proc = Proc::sub("registry", &all);
    proc.wait_line("registry listening on", STARTUP).await;
    proc
}

/// A registry served on the test runtime; stopped when dropped.
struct Registry {
    /// `127.0.0.1:<port>` it listens on.
    addr: String,
    /// The serving task.
    task: JoinHandle<()>,
    /// Ends the serve future gracefully.
    stop: Option<oneshot::Sender<()>>,
}

impl Registry {
    async fn start(config: RegistryConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr").to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            switchboard::registry::serve(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("registry serves");
        });
        Self {
            addr,
            task,
            stop: Some(stop),
        }
    }

    async fn client(&self) -> RegistryClient<Channel> {
        registry_client(&self.addr, STARTUP).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// Address number `i`, distinct for every `i` below 45 000.
fn addr(i: usize) -> String {
    format!("10.0.0.1:{}", 20_000 + i)
}

/// A plain channel to `addr`, for clients of other services.
async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A valid registration of `address` in `service` with a long TTL.
fn request(service: &str, address: &str) -> RegisterRequest {
    RegisterRequest {
        service: service.into(),
        address: address.into(),
        metadata: HashMap::new(),
        ttl_ms: LONG_TTL_MS,
    }
}

async fn register(client: &mut RegistryClient<Channel>, req: RegisterRequest) -> RegisterResponse {
    let what = format!("register {} in {}", req.address, req.service);
    client
        .register(req)
        .await
        .unwrap_or_else(|status| panic!("{what}: {status:?}"))
        .into_inner()
}

async fn drain(client: &mut RegistryClient<Channel>, lease: &str) -> Result<(), Status> {
    client
        .drain(DrainRequest {
            lease_id: lease.into(),
        })
        .await
        .map(drop)
}

async fn deregister(client: &mut RegistryClient<Channel>, lease: &str) -> Result<(), Status> {
    client
        .deregister(DeregisterRequest {
            lease_id: lease.into(),
        })
        .await
        .map(drop)
}

async fn resolve_full(client: &mut RegistryClient<Channel>, service: &str) -> ResolveResponse {
    client
        .resolve(ResolveRequest {
            service: service.into(),
        })
        .await
        .expect("resolve")
        .into_inner()
}

async fn list_services(client: &mut RegistryClient<Channel>) -> Vec<ServiceSummary> {
    client
        .list_services(ListServicesRequest {})
        .await
        .expect("list services")
        .into_inner()
        .services
}

/// A well-formed lease id that the registry never granted.
fn random_lease_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// One KeepAlive stream held open by the test, as a backend holds it.
struct KeepAlive {
    /// Heartbeats to send; dropping it ends the request stream.
    requests: mpsc::Sender<KeepAliveRequest>,
    /// The registry's answers.
    replies: tonic::Streaming<KeepAliveResponse>,
}

impl KeepAlive {
    async fn open(client: &RegistryClient<Channel>) -> Self {
        let (requests, outbound) = mpsc::channel(16);
        let replies = client
            .clone()
            .keep_alive(ReceiverStream::new(outbound))
            .await
            .expect("keepalive stream opens")
            .into_inner();
        Self { requests, replies }
    }

    /// Sends one heartbeat for `lease` and waits for its answer.
    async fn beat(&mut self, lease: &str) -> Result<KeepAliveResponse, Status> {
        self.requests
            .send(KeepAliveRequest {
                lease_id: lease.into(),
            })
            .await
            .map_err(|_| Status::unavailable("keepalive request stream closed"))?;
        match tokio::time::timeout(GENEROUS, self.replies.message()).await {
            Ok(Ok(Some(reply))) => Ok(reply),
            Ok(Ok(None)) => Err(Status::unavailable("keepalive stream ended")),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no heartbeat answer within {GENEROUS:?}"),
        }
    }
}

/// Opens a KeepAlive stream and sends one heartbeat for `lease`.
async fn keep_alive_once(
    client: &RegistryClient<Channel>,
    lease: &str,
) -> Result<KeepAliveResponse, Status> {
    KeepAlive::open(client).await.beat(lease).await
}

/// The sorted addresses of a resolve answer.
fn addresses_of(resolved: &ResolveResponse) -> Vec<String> {
    let mut addresses: Vec<String> = resolved
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect();
    addresses.sort();
    addresses
}

/// A TCP relay in front of the registry whose connections can all be cut at
/// once. To the registry that is the backend's host dying: the socket just
/// closes, with no HTTP/2 GOAWAY, RST_STREAM or end of stream first.
struct Relay {
    /// `127.0.0.1:<port>` to dial instead of the registry.
    addr: String,
    /// The accept loop.
    accept: JoinHandle<()>,
    /// One copying task per relayed connection.
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr").to_string();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let target = target.to_owned();
        let accept = tokio::spawn({
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let target = target.clone();
                    let relay = tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    connections.lock().unwrap().push(relay.abort_handle());
                }
            }
        });
        Self {
            addr,
            accept,
            connections,
        }
    }

    /// Closes every relayed connection on both sides and stops accepting.
    fn cut(&self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

mod fanout;
mod health;
mod lease_ends;
mod refused;
mod register;
mod shutdown;
mod versions;
