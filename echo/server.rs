//! One echo server's life: serve on a bound listener with health and
//! reflection, register, and on shutdown drain without failing an RPC.
//!
//! The drain runs in this order, each step for a reason:
//!
//! 1. health turns NOT_SERVING, for health-checking clients;
//! 2. the endpoint turns DRAINING in the registry, then is deregistered:
//!    watchers stop picking it while it still serves;
//! 3. the server keeps accepting for the drain grace, so clients that have
//!    not yet seen the change do not fail;
//! 4. tonic stops accepting and sends GOAWAY; in-flight RPCs, long streams
//!    included, run to completion;
//! 5. past the shutdown timeout the remaining connections are cut.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::kill_switch::KillSwitch;
use super::lease_keeper::{LeaseKeeper, LeaseState, Registration};
use super::{EchoError, EchoService, ServerConfig};
use crate::authority_repair::repair_authorities;
use crate::client::error::source_chain;
use crate::proto::echo::echo_server::EchoServer;

/// How long cut connections get to wind down before their tasks are
/// abandoned.
const SEVER_WAIT: Duration = Duration::from_secs(1);

/// Binds `addr`, saying which port when it is taken. Bind every listener
/// before starting any server, so a busy port stops the process before
/// anything is registered.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, EchoError> {
    TcpListener::bind(addr).await.map_err(|error| {
        if error.kind() == std::io::ErrorKind::AddrInUse {
            EchoError::PortInUse { addr }
        } else {
            EchoError::Bind { addr, error }
        }
    })
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

/// A running echo server. [`EchoServerHandle::shutdown`] drains it; dropping
/// it instead stops it at once, like a crash: connections are cut and the
/// registry drops the endpoint when the keepalive stream goes.
#[derive(Debug)]
pub struct EchoServerHandle {
    /// The advertised address.
    address: String,
    /// The address the listener is bound to.
    local_addr: SocketAddr,
    /// Health statuses served on `grpc.health.v1`.
    health: HealthReporter,
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
    /// See [`ServerConfig::drain_grace`].
    drain_grace: Duration,
    /// See [`ServerConfig::shutdown_timeout`].
    shutdown_timeout: Duration,
}

impl EchoServerHandle {
    /// Starts serving on `listener` and, if `config.registry` is set,
    /// registering. The listener is already accepting when this returns, so
    /// the endpoint is never registered before it can serve. Must be called
    /// inside a tokio runtime; the server's tasks run on it.
    pub async fn start(listener: TcpListener, config: ServerConfig) -> Result<Self, EchoError> {
        config.validate()?;
        let local_addr = listener.local_addr().map_err(EchoError::LocalAddr)?;
        let address = config.advertised(local_addr)?;

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoService>>().await;
        let kill_switch = KillSwitch::new();
        let incoming = kill_switch.guard(repair_authorities(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            config.tls.is_none(),
        ));
        let (stop_accepting, stop_rx) = oneshot::channel::<()>();
        let mut server = Server::builder();
        if let Some(tls) = &config.tls {
            server = server
                .tls_config(tls.tonic_config())
                .map_err(|e| EchoError::Tls(source_chain(&e)))?;
        }
        let router = server
            // Frees streams whose client vanished without a FIN, so they do
            // not hold a drain up until its deadline.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(health_service)
            .add_service(reflection_v1())
            .add_service(reflection_v1alpha())
            .add_service(EchoServer::new(
                EchoService::new(address.as_str()).with_faults(config.faults),
            ));
        let serving = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            // A dropped sender (the handle is gone) stops accepting too.
            let _ = stop_rx.await;
        }));

        let keeper = config.registry.as_ref().map(|registry| {
            LeaseKeeper::spawn(
                Registration {
                    registry: registry.clone(),
                    service: config.service.clone(),
                    address: address.clone(),
                    metadata: config.metadata.clone(),
                    ttl: config.ttl,
                    token: config.registry_token.clone(),
                    tls: config.registry_tls.clone(),
                },
                config.registry_backoff,
            )
        });
        let tls = config.tls.as_ref().map(|tls| {
            if tls.requires_client_certificate() {
                "mutual TLS"
            } else {
                "TLS"
            }
        });
        tracing::info!(%address, %local_addr, tls = tls.unwrap_or("off"), "serving");
        Ok(Self {
            address,
            local_addr,
            health,
            keeper,
            no_registry: watch::channel(LeaseState::NoRegistry).1,
            stop_accepting: Some(stop_accepting),
            serving: Some(serving),
            kill_switch,
            drain_grace: config.drain_grace,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// Binds `listen` and starts a server on it; see [`bind`] and
    /// [`EchoServerHandle::start`].
    pub async fn bind_and_start(
        listen: SocketAddr,
        config: ServerConfig,
    ) -> Result<Self, EchoError> {
        Self::start(bind(listen).await?, config).await
    }

    /// The advertised address, as registered and named in replies.
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

    /// Sets what `grpc.health.v1` answers for the server (`""`) and the Echo
    /// service, for failure drills; the process stays up and keeps serving
    /// RPCs. A drain sets NOT_SERVING by itself.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        let echo = <EchoServer<EchoService> as NamedService>::NAME;
        self.health.set_service_status(echo, status).await;
    }

    /// Drains the server (see the module docs for the order) and stops it.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let address = self.address.clone();
        tracing::info!(%address, "draining");
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.health
            .set_not_serving::<EchoServer<EchoService>>()
            .await;
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
    /// dropping the handle.
    pub fn abort(self) {}
}

impl Drop for EchoServerHandle {
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

/// The services reflection lists: those this server really serves, not every
/// service in the compiled-in descriptors (the registry's is there too).
fn advertised_services() -> [&'static str; 2] {
    [
        <EchoServer<EchoService> as NamedService>::NAME,
        "grpc.health.v1.Health",
    ]
}

/// A reflection builder listing the echo services and the reflection
/// service `own_name` itself.
fn reflection_builder(own_name: &'static str) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(own_name);
    for name in advertised_services() {
        builder = builder.with_service_name(name);
    }
    builder
}

fn reflection_v1() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    reflection_builder("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .expect("the compiled-in descriptor sets are valid")
}

/// v1alpha too, because older grpcurl and grpc_cli only speak it.
fn reflection_v1alpha() -> tonic_reflection::server::v1alpha::ServerReflectionServer<
    impl tonic_reflection::server::v1alpha::ServerReflection,
> {
    reflection_builder("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .expect("the compiled-in descriptor sets are valid")
}
