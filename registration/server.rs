//! One registered server's life: serve any tonic services on a bound
//! listener with `grpc.health.v1` added, register, and on shutdown drain
//! without failing an RPC (the order and its reasons are in the
//! [module docs](super)).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::kill_switch::KillSwitch;
use super::lease_keeper::{LeaseKeeper, LeaseState, Registration};
use super::{
    registry_backoff, RegistrationError, DEFAULT_DRAIN_GRACE, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_TTL,
};
use crate::net::backoff::BackoffConfig;
use crate::net::error_chain::source_chain;
use crate::net::server as transport;
use crate::registry::auth::Token;
use crate::registry::validate;
use crate::tls::{ClientTls, ServerTls};

/// How long cut connections get to wind down before their tasks are
/// abandoned.
const SEVER_WAIT: Duration = Duration::from_secs(1);

/// Binds `addr`, saying which port when it is taken. Bind every listener
/// before starting any server, so a busy port stops the process before
/// anything is registered.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, RegistrationError> {
    TcpListener::bind(addr).await.map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            RegistrationError::PortInUse { addr }
        } else {
            RegistrationError::Bind { addr, error }
        }
    })
}

/// The address to register for a server listening on `local`: `advertise`
/// when given, else the listener's own address, which must not be a
/// wildcard (clients cannot connect to 0.0.0.0).
pub fn advertised(advertise: Option<&str>, local: SocketAddr) -> Result<String, RegistrationError> {
    match advertise {
        Some(advertise) => Ok(advertise.to_owned()),
        None if local.ip().is_unspecified() => {
            Err(RegistrationError::WildcardWithoutAdvertise(local))
        }
        None => Ok(local.to_string()),
    }
}

/// How a graceful shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The registry confirmed the deregistration. False without a registry,
    /// or when it was unreachable (the lease then ends with its stream).
    pub deregistered: bool,
    /// Every in-flight RPC finished before the shutdown timeout; false when
    /// some connections had to be cut.
    pub in_flight_finished: bool,
}

/// Adds one gRPC service to the routes; deferred so that
/// [`Builder::routes`] and [`Builder::add_service`] combine in any order.
type AddService = Box<dyn FnOnce(Routes) -> Routes + Send>;

/// Settings and services of a [`Server`], set builder style as with
/// tonic's own `Server`. Every setting has a default; without
/// [`Builder::registry`] the server serves without registering.
pub struct Builder {
    /// The registry's `host:port`; `None` serves without registering.
    registry: Option<String>,
    /// The service to register under; `None` takes the first added
    /// service's name.
    service_name: Option<String>,
    /// The `host:port` clients use; `None` for the listener's own address.
    advertise: Option<String>,
    /// Labels registered with the endpoint.
    metadata: HashMap<String, String>,
    /// Lease TTL asked of the registry.
    ttl: Duration,
    /// Time between leaving the registry and refusing new connections.
    drain_grace: Duration,
    /// Time in-flight RPCs get to finish before their connections are cut.
    shutdown_timeout: Duration,
    /// Backoff between attempts to reach the registry.
    registry_backoff: BackoffConfig,
    /// The registry's write token, when it demands one.
    token: Option<Token>,
    /// TLS for the registry connection; plaintext if `None`.
    registry_tls: Option<ClientTls>,
    /// TLS (mutual TLS if it names a client CA) to serve; plaintext if
    /// `None`.
    tls: Option<ServerTls>,
    /// Routes served as they are, without a health status of their own.
    routes: Routes,
    /// The services added one by one, added to `routes` at serve time.
    services: Vec<AddService>,
    /// Names of the added services, reported on `grpc.health.v1`.
    health_checked: Vec<&'static str>,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("registry", &self.registry)
            .field("service_name", &self.registered_service())
            .field("advertise", &self.advertise)
            .field("metadata", &self.metadata)
            .field("ttl", &self.ttl)
            .field("drain_grace", &self.drain_grace)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("token", &self.token)
            .field("registry_tls", &self.registry_tls)
            .field("tls", &self.tls)
            .field("services", &self.health_checked)
            .finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            registry: None,
            service_name: None,
            advertise: None,
            metadata: HashMap::new(),
            ttl: DEFAULT_TTL,
            drain_grace: DEFAULT_DRAIN_GRACE,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            registry_backoff: registry_backoff(),
            token: None,
            registry_tls: None,
            tls: None,
            routes: Routes::default(),
            services: Vec::new(),
            health_checked: Vec::new(),
        }
    }
}

impl Builder {
    /// Registers with the registry at `host:port`, or with any of several
    /// replicas given as `host:port,host:port` (on a broken stream the
    /// keeper moves to the next one, keeping its lease).
    pub fn registry(mut self, registry: impl Into<String>) -> Self {
        self.registry = Some(registry.into());
        self
    }

    /// The service name to register under, what clients put in
    /// `registry://HOST:PORT/<name>`. Defaults to the name of the first
    /// service given to [`Builder::add_service`].
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Registers `host:port` instead of the listener's address, for clients
    /// that reach the server at another address than it listens on.
    pub fn advertise(mut self, address: impl Into<String>) -> Self {
        self.advertise = Some(address.into());
        self
    }

    /// Adds a label registered with the endpoint (a zone, a version).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Registers the endpoint in `zone` (the `zone` label): zone-aware
    /// clients in that zone prefer it.
    pub fn zone(self, zone: impl Into<String>) -> Self {
        self.metadata(crate::client::zone_aware::ZONE_KEY, zone)
    }

    /// Lease TTL to ask for [default: the registry's, 5 s]. A crashed
    /// process leaves at once (its keepalive stream breaks); the TTL bounds
    /// how long a hung one stays listed.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to keep accepting RPCs after leaving the registry, so
    /// clients have moved away before GOAWAY [default: 1 s].
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    /// How long in-flight RPCs get to finish before their connections are
    /// cut [default: 10 s].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Backoff between attempts to reach the registry [default:
    /// [`registry_backoff`]].
    pub fn registry_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.registry_backoff = backoff;
        self
    }

    /// The registry's write token, for a registry that demands one.
    pub fn token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// Reaches the registry over TLS with these settings.
    pub fn registry_tls(mut self, tls: ClientTls) -> Self {
        self.registry_tls = Some(tls);
        self
    }

    /// Serves TLS, or mutual TLS when `tls` names a client CA.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Serves a gRPC service (any tonic-generated `*Server`). Its name is
    /// reported SERVING on `grpc.health.v1` until the drain starts.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.health_checked.push(S::NAME);
        self.services
            .push(Box::new(move |routes: Routes| routes.add_service(service)));
        self
    }

    /// Serves `routes` as well, e.g. reflection, or services assembled
    /// elsewhere. Only the server as a whole (the empty service name) has a
    /// health status for them; replaces routes given before.
    pub fn routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    /// The service name the server registers under, if it has one.
    pub fn registered_service(&self) -> Option<&str> {
        self.service_name
            .as_deref()
            .or_else(|| self.health_checked.first().copied())
    }

    /// Checks everything the registry would check at Register time, so a
    /// mistake stops the server before it starts rather than being retried
    /// forever.
    pub fn validate(&self) -> Result<(), RegistrationError> {
        let invalid = |setting| move |error| RegistrationError::Invalid { setting, error };
        if let Some(advertise) = &self.advertise {
            validate::address(advertise).map_err(invalid("advertise address"))?;
        }
        if let Some(registry) = &self.registry {
            validate::registry_addresses(registry).map_err(invalid("registry address"))?;
        }
        match self.registered_service() {
            Some(service) => validate::service_name(service).map_err(invalid("service"))?,
            None if self.registry.is_some() => return Err(RegistrationError::NoServiceName),
            None => {}
        }
        validate::metadata(&self.metadata).map_err(invalid("metadata"))?;
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        validate::ttl(ttl_ms).map_err(invalid("lease TTL"))?;
        Ok(())
    }

    /// Starts serving on `listener` and, with a registry, registering. The
    /// listener is already accepting when this returns, so the endpoint is
    /// never registered before it can serve. Must be called inside a tokio
    /// runtime; the server's tasks run on it.
    pub async fn serve(self, listener: TcpListener) -> Result<Server, RegistrationError> {
        self.validate()?;
        let local_addr = listener
            .local_addr()
            .map_err(RegistrationError::LocalAddr)?;
        let address = advertised(self.advertise.as_deref(), local_addr)?;
        let service = self.registered_service().map(str::to_owned);

        let mut server = transport::builder(self.tls.as_ref())
            .map_err(|e| RegistrationError::Tls(source_chain(&e)))?;
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in &self.health_checked {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        let routes = self
            .services
            .into_iter()
            .fold(self.routes, |routes, add| add(routes));
        let router = server.add_routes(routes).add_service(health_service);
        let kill_switch = KillSwitch::new();
        let incoming = kill_switch.guard(transport::incoming(listener, self.tls.is_some()));
        let (stop_accepting, stop_rx) = oneshot::channel::<()>();
        let serving = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            // A dropped sender (the handle is gone) stops accepting too.
            let _ = stop_rx.await;
        }));

        let keeper = match (self.registry, service) {
            (Some(registry), Some(service)) => Some(LeaseKeeper::spawn(
                Registration {
                    registry,
                    service,
                    address: address.clone(),
                    metadata: self.metadata,
                    ttl: self.ttl,
                    token: self.token,
                    tls: self.registry_tls,
                },
                self.registry_backoff,
            )),
            _ => None,
        };
        let tls = self.tls.as_ref().map(|tls| {
            if tls.requires_client_certificate() {
                "mutual TLS"
            } else {
                "TLS"
            }
        });
        tracing::info!(%address, %local_addr, tls = tls.unwrap_or("off"), "serving");
        Ok(Server {
            address,
            local_addr,
            health,
            health_checked: self.health_checked,
            keeper,
            no_registry: watch::channel(LeaseState::NoRegistry).1,
            stop_accepting: Some(stop_accepting),
            serving: Some(serving),
            kill_switch,
            drain_grace: self.drain_grace,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Serves on `listener` until `signal` resolves, then drains: the whole
    /// life of a backend process in one call. Pass
    /// [`crate::process::shutdown_signal`] to drain on SIGTERM or SIGINT.
    pub async fn run(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()>,
    ) -> Result<ShutdownReport, RegistrationError> {
        let server = self.serve(listener).await?;
        signal.await;
        Ok(server.shutdown().await)
    }
}

/// A running server. [`Server::shutdown`] drains it; dropping it instead
/// stops it at once, like a crash: connections are cut and the registry
/// drops the endpoint when the keepalive stream goes.
#[derive(Debug)]
pub struct Server {
    /// The advertised address.
    address: String,
    /// The address the listener is bound to.
    local_addr: SocketAddr,
    /// Health statuses served on `grpc.health.v1`.
    health: HealthReporter,
    /// The services whose health turns NOT_SERVING when the drain starts.
    health_checked: Vec<&'static str>,
    /// The registration, if there is a registry.
    keeper: Option<LeaseKeeper>,
    /// The lease state when there is no keeper.
    no_registry: watch::Receiver<LeaseState>,
    /// Starts tonic's graceful shutdown: stop accepting, GOAWAY, wait.
    stop_accepting: Option<oneshot::Sender<()>>,
    /// The serve task; it ends once every connection has closed.
    serving: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// Cuts the connections a drain could not finish.
    kill_switch: KillSwitch,
    /// See [`Builder::drain_grace`].
    drain_grace: Duration,
    /// See [`Builder::shutdown_timeout`].
    shutdown_timeout: Duration,
}

impl Server {
    /// A builder with every setting at its default.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The advertised address, as registered.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Follows the endpoint's lease, e.g. to wait until it is registered.
    pub fn lease_state(&self) -> watch::Receiver<LeaseState> {
        match &self.keeper {
            Some(keeper) => keeper.state(),
            None => self.no_registry.clone(),
        }
    }

    /// The health statuses the server reports, for a service that wants to
    /// say NOT_SERVING itself (a lost database, say) while staying up.
    pub fn health_reporter(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Drains the server (see the [module docs](super) for the order) and
    /// stops it.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let address = self.address.clone();
        tracing::info!(%address, "draining");
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in &self.health_checked {
            self.health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        let deregistered = match self.keeper.take() {
            Some(keeper) => keeper.leave().await,
            None => false,
        };
        tokio::time::sleep(self.drain_grace).await;

        tracing::info!(%address, timeout = ?self.shutdown_timeout, "no longer accepting; waiting for in-flight RPCs");
        if let Some(stop) = self.stop_accepting.take() {
            let _ = stop.send(());
        }
        let Some(mut serving) = self.serving.take() else {
            return ShutdownReport {
                deregistered,
                in_flight_finished: true,
            };
        };
        let in_flight_finished = match tokio::time::timeout(self.shutdown_timeout, &mut serving)
            .await
        {
            Ok(result) => {
                log_serve_result(&address, result);
                true
            }
            Err(_) => {
                tracing::warn!(%address, timeout = ?self.shutdown_timeout, "in-flight RPCs outlived the shutdown timeout; cutting their connections");
                self.kill_switch.trip();
                match tokio::time::timeout(SEVER_WAIT, &mut serving).await {
                    Ok(result) => log_serve_result(&address, result),
                    Err(_) => serving.abort(),
                }
                false
            }
        };
        tracing::info!(%address, "stopped");
        ShutdownReport {
            deregistered,
            in_flight_finished,
        }
    }

    /// Stops at once, like a crash: no drain, no deregistration (the
    /// registry drops the endpoint when the keepalive stream goes). Same as
    /// dropping the server.
    pub fn abort(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_switch.trip();
        if let Some(serving) = &self.serving {
            serving.abort();
        }
    }
}

fn log_serve_result(
    address: &str,
    result: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) {
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%address, %error, "server ended with an error"),
        Err(error) => tracing::warn!(%address, %error, "server task failed"),
    }
}
