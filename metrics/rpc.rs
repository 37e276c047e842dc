//! A tower layer that tells an [`RpcObserver`] how each gRPC call a server
//! answers ended ([`CallEnd`]): its method, final status code, the typed
//! error behind that status when the server's code gave one, and how long
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
//! The error behind a status travels two ways. A status tonic turns into
//! a trailers-only response (a handler's error, a request that could not
//! be decoded) is left in the response's extensions, source and all, and
//! read there. A stream's last status is written as trailers and the value
//! dropped. For that, and for code that knows why a call ends better than
//! the status it causes says (a request body's error reaches the handler
//! rebuilt by tonic, the original only deep in its chain of sources), the
//! layer puts an [`EndCause`] in each request's extensions, a slot that
//! code fills ([`keep_end_cause`] fills it from a response stream). What
//! the slot holds comes first. The message is not passed on: what an
//! observer branches on travels typed, never as text.
//!
//! [`RpcCounts`] is what both servers' observers keep: calls by method and
//! code, and their duration by method.

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
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

/// How one call ended, as an [`RpcObserver`] hears it.
#[derive(Debug, Clone, Copy)]
pub struct CallEnd<'a> {
    /// The last segment of the call's path, e.g. `Watch`.
    pub method: &'a str,
    /// Its final status code.
    pub code: tonic::Code,
    /// The typed error behind `code`, if the server's code gave one: the
    /// source of the status a handler returned, or what was put in the
    /// call's [`EndCause`].
    pub cause: Option<&'a (dyn Error + 'static)>,
    /// How long it ran.
    pub elapsed: Duration,
}

impl CallEnd<'_> {
    /// The first `T` in the cause's chain of sources (the cause included),
    /// so an observer finds its own error type however it was wrapped.
    pub fn find_cause<T: Error + 'static>(&self) -> Option<&T> {
        let mut next = self.cause;
        while let Some(error) = next {
            if let Some(found) = error.downcast_ref::<T>() {
                return Some(found);
            }
            next = error.source();
        }
        None
    }
}

/// Hears how each call ended.
pub trait RpcObserver: Clone + Send + Sync + Unpin + 'static {
    /// One call ended.
    fn rpc_ended(&self, call: &CallEnd<'_>);
}

/// One call's slot for the error it ends with, when its response cannot
/// carry that error to the layer (see the module comment). [`RpcEnd`] puts
/// one in every request's extensions; the first error put in stays.
#[derive(Clone, Debug, Default)]
pub struct EndCause(Arc<OnceLock<Arc<dyn Error + Send + Sync>>>);

impl EndCause {
    /// The slot of the call whose request carries `extensions`; `None`
    /// when no [`RpcEnd`] follows the call.
    pub fn of(extensions: &http::Extensions) -> Option<Self> {
        extensions.get::<Self>().cloned()
    }

    /// Records why the call ends, unless something already did.
    pub fn set(&self, cause: impl Error + Send + Sync + 'static) {
        let _ = self.0.set(Arc::new(cause));
    }

    /// What was recorded, if anything.
    pub fn get(&self) -> Option<&(dyn Error + 'static)> {
        self.0.get().map(|cause| &**cause as &(dyn Error + 'static))
    }
}

/// Passes a response stream on, recording in `slot` the status it fails
/// with when that status has a source: tonic sends it as trailers and
/// drops it, source and all.
pub fn keep_end_cause<T>(
    slot: Option<EndCause>,
    stream: impl Stream<Item = Result<T, tonic::Status>>,
) -> impl Stream<Item = Result<T, tonic::Status>> {
    stream.inspect(move |item| {
        if let (Some(slot), Err(status)) = (&slot, item) {
            if status.source().is_some() {
                slot.set(status.clone());
            }
        }
    })
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let cause = EndCause::default();
        request.extensions_mut().insert(cause.clone());
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
                cause,
            }),
        }
    }
}

/// One call being followed; reports once, then is gone.
struct Call<O: RpcObserver> {
    observer: O,
    method: String,
    started: Instant,
    /// What the call's code recorded about its end.
    cause: EndCause,
}

impl<O: RpcObserver> Call<O> {
    /// Reports the call ended with `code`; `returned` is the status tonic
    /// left in a trailers-only response. What the call's code recorded
    /// comes first: it was put there on purpose, while a returned status
    /// may have a source that explains nothing (an error wrapping another).
    fn end(self, code: tonic::Code, returned: Option<&tonic::Status>) {
        let cause = self
            .cause
            .get()
            .or_else(|| returned.and_then(|status| status.source()));
        self.observer.rpc_ended(&CallEnd {
            method: &self.method,
            code,
            cause,
            elapsed: self.started.elapsed(),
        });
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
                let status = code_of(&parts.headers).map(|code| HeaderStatus {
                    code,
                    returned: parts.extensions.get::<tonic::Status>().cloned(),
                });
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
                    call.end(tonic::Code::Unknown, None);
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
    status: Option<HeaderStatus>,
}

/// A trailers-only response's status.
struct HeaderStatus {
    code: tonic::Code,
    /// The status value tonic made the response from, if it left it in
    /// the extensions (it does for a handler's error).
    returned: Option<tonic::Status>,
}

impl<B, O: RpcObserver> RpcBody<B, O> {
    fn end(&mut self, code: tonic::Code) {
        if let Some(call) = self.call.take() {
            call.end(code, None);
        }
    }

    /// The body ended without trailers: the headers' status, if any.
    fn end_from_headers(&mut self, otherwise: tonic::Code) {
        let Some(call) = self.call.take() else {
            return;
        };
        match self.status.take() {
            Some(status) => call.end(status.code, status.returned.as_ref()),
            None => call.end(otherwise, None),
        }
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
                if let Some(code) = frame.trailers_ref().and_then(code_of) {
                    self.end(code);
                }
            }
            Poll::Ready(None) => self.end_from_headers(tonic::Code::Ok),
            Poll::Ready(Some(Err(_))) => self.end(tonic::Code::Internal),
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

impl<F, O: RpcObserver> Drop for RpcEndFuture<F, O> {
    fn drop(&mut self) {
        // Dropped before it answered: the client cancelled (a reset stream,
        // a lost hedge) or the connection went. Counted, not forgotten.
        if let Some(call) = self.call.take() {
            call.end(tonic::Code::Cancelled, None);
        }
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
            self.end(tonic::Code::Cancelled);
        }
    }
}

/// The `grpc-status` in `headers`, if a status is there.
fn code_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(code))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures_util::FutureExt;

    use super::*;

    /// An error of the server's own, as a cap is the registry's.
    #[derive(Debug)]
    struct Refused;

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("refused")
        }
    }

    impl Error for Refused {}

    /// A refusal whose source is [`Refused`].
    fn refusal() -> tonic::Status {
        let mut status = tonic::Status::resource_exhausted("refused");
        status.set_source(Arc::new(Refused));
        status
    }

    /// Each call heard: its code, and whether [`Refused`] was behind it.
    #[derive(Clone, Default)]
    struct Heard(Arc<Mutex<Vec<(tonic::Code, bool)>>>);

    impl RpcObserver for Heard {
        fn rpc_ended(&self, call: &CallEnd<'_>) {
            let refused = call.find_cause::<Refused>().is_some();
            self.0.lock().unwrap().push((call.code, refused));
        }
    }

    /// A response body of no data and, if given, trailers.
    #[derive(Default)]
    struct Trailers(Option<http::HeaderMap>);

    impl Body for Trailers {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.take().map(|trailers| Ok(Frame::trailers(trailers))))
        }
    }

    /// What `respond` makes of one call through [`RpcEnd`], its body read
    /// to the end.
    fn heard(
        respond: impl Fn(http::Request<()>) -> http::Response<Trailers>,
    ) -> Vec<(tonic::Code, bool)> {
        let heard = Heard::default();
        let inner =
            tower::service_fn(|request| std::future::ready(Ok::<_, Infallible>(respond(request))));
        let mut service = RpcEnd::new(inner, heard.clone());
        let request = http::Request::builder()
            .uri("/pkg.Service/Method")
            .body(())
            .unwrap();
        let response = service.call(request).now_or_never().unwrap().unwrap();
        let mut body = Box::pin(response.into_body());
        while std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
            .now_or_never()
            .unwrap()
            .is_some()
        {}
        drop(body);
        let heard = heard.0.lock().unwrap().clone();
        heard
    }

    #[test]
    fn a_handlers_status_brings_its_source_in_the_extensions() {
        assert_eq!(
            heard(|_| refusal().into_http()),
            [(tonic::Code::ResourceExhausted, true)]
        );
        assert_eq!(
            heard(|_| tonic::Status::resource_exhausted("text only").into_http()),
            [(tonic::Code::ResourceExhausted, false)]
        );
    }

    #[test]
    fn a_stream_ending_in_trailers_brings_what_its_slot_holds() {
        let ended = heard(|request| {
            let slot = EndCause::of(request.extensions()).expect("the layer's slot");
            let stream = keep_end_cause(
                Some(slot),
                futures_util::stream::iter([Ok(1), Err(refusal())]),
            );
            // Read as tonic reads a response stream; the status goes out as
            // trailers, without its source.
            let items: Vec<_> = stream.collect::<Vec<_>>().now_or_never().unwrap();
            assert_eq!(items.len(), 2);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("8"));
            http::Response::new(Trailers(Some(trailers)))
        });
        assert_eq!(ended, [(tonic::Code::ResourceExhausted, true)]);
    }

    #[test]
    fn what_the_slot_holds_comes_before_a_returned_status() {
        let ended = heard(|request| {
            EndCause::of(request.extensions()).unwrap().set(Refused);
            // tonic's rebuild of a body's error: a source, but no Refused.
            let mut status = tonic::Status::resource_exhausted("rebuilt");
            status.set_source(Arc::new(tonic::Status::internal("wrapper")));
            status.into_http()
        });
        assert_eq!(ended, [(tonic::Code::ResourceExhausted, true)]);
    }
}
