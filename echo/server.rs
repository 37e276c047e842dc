//! One echo server's life: the Echo service and reflection, served,
//! registered and drained by [`crate::registration`] (see its docs for the
//! drain order).

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use super::metrics::Observed;
use super::{EchoError, EchoService, LeaseState, ServerConfig, ShutdownReport};
use crate::proto::echo::echo_server::EchoServer;
use crate::registration::{self, RegistrationError};

/// A running echo server. [`EchoServerHandle::shutdown`] drains it; dropping
/// it instead stops it at once, like a crash: connections are cut and the
/// registry drops the endpoint when the keepalive stream goes.
#[derive(Debug)]
pub struct EchoServerHandle {
    /// The server, its registration and its drain.
    server: registration::Server,
}

impl EchoServerHandle {
    /// Starts serving on `listener` and, if `config.registry` is set,
    /// registering. The listener is already accepting when this returns, so
    /// the endpoint is never registered before it can serve. Must be called
    /// inside a tokio runtime; the server's tasks run on it.
    pub async fn start(listener: TcpListener, config: ServerConfig) -> Result<Self, EchoError> {
        config.validate()?;
        let local_addr = listener
            .local_addr()
            .map_err(RegistrationError::LocalAddr)?;
        // Every reply names the advertised address, so it is needed before
        // the service exists.
        let address = config.advertised(local_addr)?;
        let builder = config
            .builder()
            .routes(Routes::new(reflection_v1()).add_service(reflection_v1alpha()));
        let echo = EchoServer::new(EchoService::new(address.as_str()).with_faults(config.faults));
        let builder = match &config.metrics {
            Some(metrics) => builder.add_service(Observed::new(echo, metrics.clone())),
            None => builder.add_service(echo),
        };
        let server = builder.serve(listener).await?;
        Ok(Self { server })
    }

    /// Binds `listen` and starts a server on it; see [`registration::bind`]
    /// and [`EchoServerHandle::start`].
    pub async fn bind_and_start(
        listen: SocketAddr,
        config: ServerConfig,
    ) -> Result<Self, EchoError> {
        Self::start(registration::bind(listen).await?, config).await
    }

    /// The advertised address, as registered and named in replies.
    pub fn address(&self) -> &str {
        self.server.address()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Follows the endpoint's lease, e.g. to wait until it is registered.
    pub fn lease_state(&self) -> watch::Receiver<LeaseState> {
        self.server.lease_state()
    }

    /// Sets what `grpc.health.v1` answers for the server (`""`) and the Echo
    /// service, for failure drills; the process stays up and keeps serving
    /// RPCs. A drain sets NOT_SERVING by itself.
    pub async fn set_serving(&self, serving: bool) {
        let health = self.server.health_reporter();
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        let echo = <EchoServer<EchoService> as NamedService>::NAME;
        health.set_service_status(echo, status).await;
    }

    /// Drains the server (see [`crate::registration`] for the order) and
    /// stops it.
    pub async fn shutdown(self) -> ShutdownReport {
        self.server.shutdown().await
    }

    /// Stops at once, like a crash: no drain, no deregistration (the
    /// registry drops the endpoint when the keepalive stream goes). Same as
    /// dropping the handle.
    pub fn abort(self) {}
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
