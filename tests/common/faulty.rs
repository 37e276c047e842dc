//! An in-process echo server whose faults a test turns on and off: every
//! unary call can fail with UNAVAILABLE or wait an extra delay. It checks
//! policies on their own, without depending on the echo binary's fault
//! flags; the real-process tests use those flags.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard::echo::service::ReplyStream;
use switchboard::echo::EchoService;
use switchboard::proto::echo::echo_server::{Echo, EchoServer};
use switchboard::proto::echo::{EchoRequest, EchoResponse};
use tonic::{Request, Response, Status, Streaming};

/// The faults of one [`FaultyEcho`], shared with the test.
#[derive(Debug, Default)]
pub struct Faults {
    /// Answer every unary call with UNAVAILABLE.
    pub fail: AtomicBool,
    /// Added to every unary call, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Unary calls received.
    pub calls: AtomicUsize,
}

impl Faults {
    /// Turns failing on or off.
    pub fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::Relaxed);
    }

    /// Sets the added latency.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Unary calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }
}

/// An echo service with [`Faults`].
#[derive(Debug, Clone)]
struct FaultyService {
    inner: EchoService,
    faults: Arc<Faults>,
}

#[tonic::async_trait]
impl Echo for FaultyService {
    async fn unary_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<EchoResponse>, Status> {
        self.faults.calls.fetch_add(1, Ordering::Relaxed);
        let delay = self.faults.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.faults.fail.load(Ordering::Relaxed) {
            return Err(Status::unavailable("injected failure"));
        }
        self.inner.unary_echo(request).await
    }

    type ServerStreamingEchoStream = ReplyStream;

    async fn server_streaming_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.inner.server_streaming_echo(request).await
    }

    async fn client_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        self.inner.client_streaming_echo(request).await
    }

    type BidirectionalStreamingEchoStream = ReplyStream;

    async fn bidirectional_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.inner.bidirectional_streaming_echo(request).await
    }
}

/// A running in-process echo server on a free 127.0.0.1 port; it stops
/// accepting when dropped.
pub struct FaultyEcho {
    /// `127.0.0.1:<port>`.
    pub address: String,
    /// Its faults, live.
    pub faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyEcho {
    /// Starts a server; it serves once this returns.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("local addr").to_string();
        let faults = Arc::new(Faults::default());
        let service = FaultyService {
            inner: EchoService::new(address.clone()),
            faults: faults.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(EchoServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self {
            address,
            faults,
            task,
        }
    }
}

impl Drop for FaultyEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}
