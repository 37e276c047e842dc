//! A tower layer that tells an [`RpcObserver`] how each gRPC call a server
//! answers ended: its method, final status code and message, and how long
//! it ran. Shared by the registry and echo.
//!
//! A call ends when its response body does, not when its headers go out,
//! so a stream (Watch, KeepAlive, ADS, a server-streaming Echo) is counted
//! with the status of its trailers when it finishes, and timed to then.
//! The status is read from the trailers, or from the headers for a
//! trailers-only response (refusals, most unary errors). A body dropped
//! before its status was sent is a call the client cancelled (or whose
//! connection went): CANCELLED.
//!
//! [`RpcCounts`] is what both servers' observers keep: calls by method and
//! code, and their duration by method.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{code_name, Labels};

/// Builds RPC duration histograms: 0.1 ms to about 3 s.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// A server's RPCs by method and final status code, and their duration by
/// method, as an [`RpcObserver`] hears them end. Cheap to clone: clones
/// count into the same series.
#[derive(Clone, Debug)]
pub struct RpcCounts {
    /// RPCs by `method` and `code`, counted when they end.
    pub ended: Family<Labels, Counter>,
    /// RPC duration in seconds by `method`, until the call ends.
    pub duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for RpcCounts {
    fn default() -> Self {
        Self {
            ended: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl RpcCounts {
    /// Registers the two families in `registry` (the server's prefixed
    /// sub-registry) as `rpcs` and `rpc_duration_seconds`; each server
    /// words their help its own way.
    pub fn register(&self, registry: &mut Registry, rpcs_help: &str, duration_help: &str) {
        registry.register("rpcs", rpcs_help, self.ended.clone());
        registry.register("rpc_duration_seconds", duration_help, self.duration.clone());
    }

    /// Counts one call of `method` that ended with `code` after `elapsed`.
    pub fn observe(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.duration
            .get_or_create(&vec![("method", method.to_owned())])
            .observe(elapsed.as_secs_f64());
        self.ended
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("code", code_name(code).to_owned()),
            ])
            .inc();
    }
}

/// Hears how each call ended.
pub trait RpcObserver: Clone + Send + Sync + Unpin + 'static {
    /// Call `method` (the last segment of its path, e.g. `Watch`) ended
    /// with `code` and `message` after `elapsed`.
    fn rpc_ended(&self, method: &str, code: tonic::Code, message: &str, elapsed: Duration);
}

/// Adds [`RpcEnd`] around a service.
#[derive(Clone, Debug)]
pub struct RpcEndLayer<O> {
    observer: O,
}

impl<O> RpcEndLayer<O> {
    /// Reports to `observer`.
    pub fn new(observer: O) -> Self {
        Self { observer }
    }
}

impl<S, O: Clone> Layer<S> for RpcEndLayer<O> {
    type Service = RpcEnd<S, O>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcEnd::new(inner, self.observer.clone())
    }
}

/// Reports how each call `inner` answers ended.
#[derive(Clone, Debug)]
pub struct RpcEnd<S, O> {
    inner: S,
    observer: O,
}

impl<S, O> RpcEnd<S, O> {
    /// Wraps `inner`, reporting to `observer`.
    pub fn new(inner: S, observer: O) -> Self {
        Self { inner, observer }
    }
}

impl<S, O, B, R> Service<http::Request<B>> for RpcEnd<S, O>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    O: RpcObserver,
{
    type Response = http::Response<RpcBody<R, O>>;
    type Error = S::Error;
    type Future = RpcEndFuture<S::Future, O>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        RpcEndFuture {
            inner: Box::pin(self.inner.call(request)),
            call: Some(Call {
                observer: self.observer.clone(),
                method,
                started: Instant::now(),
            }),
        }
    }
}

/// One call being followed; reports once, then is gone.
struct Call<O: RpcObserver> {
    observer: O,
    method: String,
    started: Instant,
}

impl<O: RpcObserver> Call<O> {
    fn end(self, code: tonic::Code, message: &str) {
        self.observer
            .rpc_ended(&self.method, code, message, self.started.elapsed());
    }
}

/// The response future of [`RpcEnd`].
pub struct RpcEndFuture<F, O: RpcObserver> {
    inner: Pin<Box<F>>,
    call: Option<Call<O>>,
}

impl<F, R, E, O> Future for RpcEndFuture<F, O>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    O: RpcObserver,
{
    type Output = Result<http::Response<RpcBody<R, O>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let output = match self.inner.as_mut().poll(cx) {
            Poll::Ready(output) => output,
            Poll::Pending => return Poll::Pending,
        };
        let call = self.call.take();
        Poll::Ready(match output {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let status = status_of(&parts.headers);
                Ok(http::Response::from_parts(
                    parts,
                    RpcBody {
                        inner: Box::pin(body),
                        call,
                        status,
                    },
                ))
            }
            Err(error) => {
                if let Some(call) = call {
                    call.end(tonic::Code::Unknown, "");
                }
                Err(error)
            }
        })
    }
}

/// A response body that reports its call when it ends.
pub struct RpcBody<B, O: RpcObserver> {
    inner: Pin<Box<B>>,
    /// Until reported.
    call: Option<Call<O>>,
    /// The status from the headers, for a trailers-only response.
    status: Option<(tonic::Code, String)>,
}

impl<B, O: RpcObserver> RpcBody<B, O> {
    fn end(&mut self, code: tonic::Code, message: &str) {
        if let Some(call) = self.call.take() {
            call.end(code, message);
        }
    }

    /// The body ended without trailers: the headers' status, if any.
    fn end_from_headers(&mut self, otherwise: tonic::Code) {
        let (code, message) = self.status.take().unwrap_or((otherwise, String::new()));
        self.end(code, &message);
    }
}

impl<B, O> Body for RpcBody<B, O>
where
    B: Body,
    O: RpcObserver,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((code, message)) = frame.trailers_ref().and_then(status_of) {
                    self.end(code, &message);
                }
            }
            Poll::Ready(None) => self.end_from_headers(tonic::Code::Ok),
            Poll::Ready(Some(Err(_))) => self.end(tonic::Code::Internal, ""),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, O: RpcObserver> Drop for RpcBody<B, O> {
    fn drop(&mut self) {
        // A trailers-only response may be sent without its (empty) body
        // ever being polled: its status is in the headers. Anything else
        // dropped unfinished was cut short.
        if self.status.is_some() {
            self.end_from_headers(tonic::Code::Ok);
        } else {
            self.end(tonic::Code::Cancelled, "");
        }
    }
}

/// The `grpc-status` and `grpc-message` in `headers`, if a status is there.
fn status_of(headers: &http::HeaderMap) -> Option<(tonic::Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((tonic::Code::from_i32(code), message))
}

/// Undoes the percent-encoding gRPC applies to `grpc-message`.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn messages_are_percent_decoded() {
        assert_eq!(
            percent_decode("services%20limit%20of 3%"),
            "services limit of 3%"
        );
    }
}
