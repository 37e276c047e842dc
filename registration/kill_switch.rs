//! Cutting every connection of a server at once: at the end of a drain
//! whose deadline passed, and when a server is dropped without a drain.
//!
//! tonic's graceful shutdown waits for its connections without bound, and
//! the tasks serving them outlive the serve future, so stopping them takes a
//! hook inside the connection itself. Each accepted socket is wrapped in a
//! [`Severable`] that fails its next read or write once the switch trips;
//! hyper then drops the connection and every stream on it, which also closes
//! the socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, TryStreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tonic::transport::server::Connected;

/// Severs every connection accepted through [`KillSwitch::guard`] when
/// tripped or dropped.
#[derive(Debug)]
pub struct KillSwitch {
    /// Becomes true when tripped; dropping it severs too.
    tripped: watch::Sender<bool>,
}

impl Default for KillSwitch {
    fn default() -> Self {
        Self::new()
    }
}

impl KillSwitch {
    /// An untripped switch.
    pub fn new() -> Self {
        Self {
            tripped: watch::channel(false).0,
        }
    }

    /// Wraps every connection `incoming` accepts so that tripping this
    /// switch severs it.
    pub fn guard<S, IO, E>(&self, incoming: S) -> impl Stream<Item = Result<Severable<IO>, E>>
    where
        S: Stream<Item = Result<IO, E>>,
    {
        let tripped = self.tripped.subscribe();
        incoming.map_ok(move |io| Severable::new(io, tripped.clone()))
    }

    /// Severs every guarded connection, now and in future.
    pub fn trip(&self) {
        self.tripped.send_replace(true);
    }
}

/// A connection that fails with `ConnectionAborted` once its switch trips.
pub struct Severable<IO> {
    /// The socket.
    io: IO,
    /// Resolves when the switch trips; `None` once it has.
    trip: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<IO> Severable<IO> {
    fn new(io: IO, mut tripped: watch::Receiver<bool>) -> Self {
        Self {
            io,
            trip: Some(Box::pin(async move {
                // An error means the switch was dropped: sever as well.
                let _ = tripped.wait_for(|tripped| *tripped).await;
            })),
        }
    }

    /// Whether the switch has tripped; registers for its wake-up otherwise,
    /// so a connection idle in a read is severed too.
    fn severed(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.trip {
            None => true,
            Some(trip) => {
                if trip.as_mut().poll(cx).is_ready() {
                    self.trip = None;
                    true
                } else {
                    false
                }
            }
        }
    }
}

fn severed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection severed: the server stopped",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for Severable<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.severed(cx) {
            return Poll::Ready(Err(severed_error()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Severable<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.severed(cx) {
            return Poll::Ready(Err(severed_error()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.severed(cx) {
            return Poll::Ready(Err(severed_error()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.severed(cx) {
            return Poll::Ready(Err(severed_error()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Severable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn tripping_fails_a_pending_read_and_later_writes() {
        let (near, mut far) = tokio::io::duplex(64);
        let switch = KillSwitch::new();
        let mut incoming = Box::pin(switch.guard(futures_util::stream::iter([Ok::<_, ()>(near)])));
        let mut conn = incoming.next().await.unwrap().unwrap();
        far.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).await.unwrap();

        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let read = conn.read(&mut buf).await;
            (read.map_err(|e| e.kind()), conn)
        });
        tokio::task::yield_now().await;
        switch.trip();
        let (read, mut conn) = reader.await.unwrap();
        assert_eq!(read, Err(io::ErrorKind::ConnectionAborted));
        assert_eq!(
            conn.write_all(b"x").await.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionAborted)
        );
    }
}
