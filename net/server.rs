//! The transport settings every switchboard server shares, set in one
//! place: the registry's and each registered service's (echo's, the
//! greeter's) differ only in the services they add.

use std::time::Duration;

use futures_util::Stream;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use super::authority_repair::{repair_authorities, AuthorityRepair};
use super::tls::ServerTls;

/// How often a server pings a connection that has been silent: finds
/// peers that vanished without a FIN (power loss, a partition), so their
/// streams (a Watch, a KeepAlive, a call a drain waits for) are freed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A tonic server builder with TLS (when given) and HTTP/2 keepalive.
pub fn builder(tls: Option<&ServerTls>) -> Result<Server, tonic::transport::Error> {
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.tonic_config())?;
    }
    Ok(server
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT)))
}

/// The connections `listener` accepts, with TCP_NODELAY (small gRPC
/// messages must not wait for Nagle) and, in plaintext, the `:authority`
/// repair that lets grpcio's multi-address targets in (TLS bytes are
/// opaque to it).
pub fn incoming(
    listener: TcpListener,
    tls: bool,
) -> impl Stream<Item = Result<AuthorityRepair<TcpStream>, std::io::Error>> {
    repair_authorities(TcpIncoming::from(listener).with_nodelay(Some(true)), !tls)
}
