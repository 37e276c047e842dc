//! Dialling a server: a TCP connection, inside TLS when there are TLS
//! settings. The subchannels run their own HTTP/2 over [`dial`]; connections
//! to the registry (the resolver's, the echo lease keeper's) are tonic
//! channels over it ([`channel`]), so every TLS connection is made, checked
//! and explained the same way.
//!
//! Over TLS the client waits for the server's first bytes before it writes
//! anything. With TLS 1.3 a server checks the client's certificate only
//! after the client has finished its handshake; a refusal then arrives as an
//! alert saying why. Bytes written meanwhile would race that alert and turn
//! it into a bare "broken pipe". gRPC servers send their HTTP/2 SETTINGS
//! without waiting for the client, so nothing is lost by waiting.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use super::error::{source_chain, ConnectError};
use crate::tls::{self, ClientTls};

/// A connection to a backend, plaintext or TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, with HTTP/2 agreed by ALPN.
    Tls {
        /// The session; boxed, as it is far larger than a bare socket.
        stream: Box<TlsStream<TcpStream>>,
        /// The server's first bytes, read while dialling and handed out
        /// before anything else.
        unread: Bytes,
    },
}

/// Connects to `address` (`host:port`) and, with `tls`, runs the TLS
/// handshake. Errors name the address.
pub async fn dial(address: &str, tls: Option<&ClientTls>) -> Result<Stream, ConnectError> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| ConnectError::Dial {
            address: address.into(),
            kind: e.kind(),
            detail: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let stream = tls
        .handshake(address, tcp)
        .await
        .map_err(|detail| ConnectError::Tls {
            address: address.into(),
            detail,
        })?;
    let mut stream = Box::new(stream);
    let mut first = vec![0; 4096];
    let read = stream
        .read(&mut first)
        .await
        .map_err(|e| ConnectError::TlsRefused {
            address: address.into(),
            detail: e.to_string(),
            presented_certificate: tls.presents_certificate(),
        })?;
    if read == 0 {
        return Err(ConnectError::ClosedAfterTls {
            address: address.into(),
        });
    }
    first.truncate(read);
    Ok(Stream::Tls {
        stream,
        unread: Bytes::from(first),
    })
}

/// A tonic channel to `address` (`host:port`), over TLS with `tls`;
/// connecting, TLS included, bounded by `connect_timeout`. Errors are one
/// line.
pub async fn channel(
    address: &str,
    tls: Option<&ClientTls>,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("invalid address {address:?}: {}", source_chain(&e)))?
        .connect_timeout(connect_timeout);
    let connected = match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            // The URI only says where to dial; the origin gives requests the
            // scheme they really travel over.
            let origin = format!("{}://{address}", tls::scheme(true))
                .parse()
                .map_err(|e| format!("invalid address {address:?}: {e}"))?;
            let tls = tls.clone();
            let connector = tower::service_fn(move |uri: http::Uri| {
                let tls = tls.clone();
                async move {
                    let address = uri.authority().map_or_else(String::new, |a| a.to_string());
                    dial(&address, Some(&tls))
                        .await
                        .map(TokioIo::new)
                        .map_err(io::Error::other)
                }
            });
            endpoint
                .origin(origin)
                .connect_with_connector(connector)
                .await
        }
    };
    connected.map_err(|e| source_chain(&e))
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls { unread, .. } if unread.has_remaining() => {
                let n = unread.len().min(buf.remaining());
                buf.put_slice(&unread[..n]);
                unread.advance(n);
                Poll::Ready(Ok(()))
            }
            Stream::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls { stream, .. } => stream.is_write_vectored(),
        }
    }
}
