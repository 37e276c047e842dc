//! Client-side health checking, as grpc-go's `healthCheckConfig` does it.
//!
//! With a [`HealthCheck`] configured, a subchannel whose connection is up
//! opens `grpc.health.v1.Health/Watch` on that same connection and reports
//! Ready only while the backend says SERVING. Any other status, or a broken
//! Watch stream, makes it TransientFailure: the policy stops picking it
//! while the connection stays open, so it comes back the moment the backend
//! says SERVING again, with no reconnect.
//!
//! A backend that does not implement the health service (UNIMPLEMENTED) is
//! taken as SERVING, as grpc-go does: turning health checking on must not
//! take down a fleet that never offered it. This is logged once per channel.
//!
//! A Watch stream that fails is opened again after a backoff, unless it had
//! delivered a status, in which case at once (the server restarted the
//! stream, not the backend failing).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::client::backoff::{Backoff, BackoffConfig};
use crate::client::error::{status_chain, ConnectError};
use crate::client::subchannel::{ReadyConnection, SubchannelState};

/// Health checking settings of one channel (see the module docs).
#[derive(Debug)]
pub struct HealthCheck {
    /// The service name asked about; `""` is the server as a whole.
    service: String,
    /// Whether a backend without the health service has been logged yet:
    /// once per channel is enough to tell the operator.
    unimplemented_logged: AtomicBool,
}

impl HealthCheck {
    /// Watches the health of `service` (`""` for the whole server) on every
    /// backend.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            unimplemented_logged: AtomicBool::new(false),
        }
    }

    /// The service name asked about.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Takes a backend without the health service as SERVING, saying so once.
    fn unimplemented(&self, address: &str) {
        if !self.unimplemented_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(%address, service = %self.service, "backend does not implement grpc.health.v1.Health; treating it as SERVING (logged once per channel)");
        } else {
            tracing::debug!(%address, "no health service; treating it as SERVING");
        }
    }
}

/// Follows the backend's health over `connection` and reports the state the
/// policy should see through `report`, until dropped (when the connection
/// ends or the subchannel goes).
pub(crate) async fn watch(
    check: &HealthCheck,
    connection: Arc<ReadyConnection>,
    backoff: BackoffConfig,
    report: &impl Fn(SubchannelState),
) {
    let address = connection.address.clone();
    // Sends on the subchannel's own HTTP/2 connection, so the health seen
    // is that of the connection RPCs use.
    let sender = connection.sender.clone();
    let on_connection = tower::service_fn(move |request: http::Request<tonic::body::Body>| {
        let mut sender = sender.clone();
        async move { sender.send_request(request).await }
    });
    let origin = http::Uri::builder()
        .scheme(connection.scheme.clone())
        .authority(connection.authority.clone())
        .path_and_query("/")
        .build()
        .expect("a scheme and an authority make a URI");
    let mut client = HealthClient::with_origin(on_connection, origin);
    let mut backoff = Backoff::new(backoff);
    // Whether the last report was Ready; `None` before the first.
    let mut last_ready: Option<bool> = None;
    let mut set = |ready: bool, error: Option<ConnectError>| {
        // A TransientFailure with a new reason is reported again, so the
        // channel's last error says why now.
        if last_ready == Some(true) && ready {
            return;
        }
        last_ready = Some(ready);
        match (ready, error) {
            (true, _) => report(SubchannelState::Ready(connection.clone())),
            (false, error) => report(SubchannelState::TransientFailure {
                error: Arc::new(error.unwrap_or_else(|| ConnectError::Unhealthy {
                    address: address.clone(),
                    status: "UNKNOWN",
                })),
            }),
        }
    };
    loop {
        let mut heard = false;
        let request = HealthCheckRequest {
            service: check.service.clone(),
        };
        let ended = match client.watch(request).await {
            Err(status) => status,
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(reply)) => {
                            heard = true;
                            backoff.reset();
                            let status = ServingStatus::try_from(reply.status)
                                .unwrap_or(ServingStatus::Unknown);
                            if status == ServingStatus::Serving {
                                set(true, None);
                            } else {
                                set(
                                    false,
                                    Some(ConnectError::Unhealthy {
                                        address: address.clone(),
                                        status: status.as_str_name(),
                                    }),
                                );
                            }
                        }
                        Ok(None) => {
                            break tonic::Status::unavailable("the health Watch stream ended")
                        }
                        Err(status) => break status,
                    }
                }
            }
        };
        if ended.code() == Code::Unimplemented {
            check.unimplemented(&address);
            set(true, None);
            return std::future::pending().await;
        }
        let error = ConnectError::HealthCheckFailed {
            address: address.clone(),
            code: ended.code(),
            detail: status_chain(&ended),
        };
        tracing::debug!(%address, %error, "health Watch ended");
        set(false, Some(error));
        if !heard {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}
