//! An in-process echo server whose faults a test turns on and off: every
//! unary call can fail with UNAVAILABLE or wait an extra delay, or follow a
//! script of answers one call at a time. It records what each call's
//! headers said and which calls were cancelled. It checks policies on
//! their own, without depending on the echo binary's fault flags; the
//! real-process tests use those flags.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
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
    /// Calls received, of every method.
    pub calls: AtomicUsize,
    /// Answers for the next calls, unary or client-streaming, in order;
    /// once empty, `fail` and `delay_ms` decide.
    pub script: Mutex<VecDeque<Step>>,
    /// What each call's headers said, in arrival order.
    pub seen: Mutex<Vec<Seen>>,
    /// Calls whose handler was dropped before it answered.
    pub cancelled: AtomicUsize,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// Answer normally.
    Answer,
    /// Fail with this code.
    Fail(tonic::Code),
    /// Fail with this code and `grpc-retry-pushback-ms: <value>`.
    Pushback(tonic::Code, &'static str),
    /// Never answer.
    Hang,
}

/// What one call's request said.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Its `grpc-previous-rpc-attempts` header.
    pub previous: Option<String>,
    /// Its `grpc-timeout` header.
    pub timeout: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// Counts a call as cancelled unless it answered.
struct Answering<'a>(&'a Faults, bool);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
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

    /// Calls received so far, of every method.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    /// Queues `steps` as the answers of the next calls.
    pub fn script(&self, steps: impl IntoIterator<Item = Step>) {
        self.script.lock().unwrap().extend(steps);
    }

    /// What the calls so far said.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Calls dropped before they answered.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Records `metadata` and plays the next step: `Ok` to answer.
    async fn play(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let header = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.seen.lock().unwrap().push(Seen {
            previous: header("grpc-previous-rpc-attempts"),
            timeout: header("grpc-timeout"),
            at: Instant::now(),
        });
        let step = self.script.lock().unwrap().pop_front();
        let mut answering = Answering(self, false);
        let outcome = match step {
            Some(Step::Answer) => Ok(()),
            Some(Step::Fail(code)) => Err(Status::new(code, "scripted failure")),
            Some(Step::Pushback(code, value)) => {
                let mut trailers = tonic::metadata::MetadataMap::new();
                trailers.insert("grpc-retry-pushback-ms", value.parse().unwrap());
                Err(Status::with_metadata(code, "scripted pushback", trailers))
            }
            Some(Step::Hang) => std::future::pending().await,
            None => {
                let delay = self.delay_ms.load(Ordering::Relaxed);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                match self.fail.load(Ordering::Relaxed) {
                    true => Err(Status::unavailable("injected failure")),
                    false => Ok(()),
                }
            }
        };
        answering.1 = true;
        outcome
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
        self.faults.play(request.metadata()).await?;
        self.inner.unary_echo(request).await
    }

    type ServerStreamingEchoStream = ReplyStream;

    /// Answers with headers and one reply, then plays its step: a failing
    /// step fails the stream after that reply, once the call committed.
    async fn server_streaming_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.faults.calls.fetch_add(1, Ordering::Relaxed);
        let faults = self.faults.clone();
        let metadata = request.metadata().clone();
        let first = EchoResponse {
            message: request.into_inner().message,
        };
        let rest =
            futures_util::stream::once(async move { faults.play(&metadata).await.err().map(Err) })
                .filter_map(|end| async move { end });
        Ok(Response::new(Box::pin(
            futures_util::stream::once(async move { Ok(first) }).chain(rest),
        )))
    }

    /// Reads every message, then plays its step: the answer joins the
    /// messages with `,`, so a test sees what a replay delivered.
    async fn client_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        self.faults.calls.fetch_add(1, Ordering::Relaxed);
        let metadata = request.metadata().clone();
        let mut stream = request.into_inner();
        let mut messages = Vec::new();
        while let Some(message) = stream.message().await? {
            messages.push(message.message);
        }
        self.faults.play(&metadata).await?;
        Ok(Response::new(EchoResponse {
            message: messages.join(","),
        }))
    }

    type BidirectionalStreamingEchoStream = ReplyStream;

    /// Plays its step before it reads anything, then echoes each message.
    async fn bidirectional_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.faults.calls.fetch_add(1, Ordering::Relaxed);
        self.faults.play(request.metadata()).await?;
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
