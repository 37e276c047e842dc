//! One attempt of a call: its pick, its request on the chosen connection,
//! and the bookkeeping that follows its response to the end. An attempt
//! is counted in flight on its subchannel until it ends, and its outcome
//! reaches its picker's `OnDone` and the endpoint's metrics exactly once.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use tokio::time::Instant;
use tonic::Status;

use super::Shared;
use crate::client::error::{source_chain, Error};
use crate::client::metrics::{EndpointMetrics, MethodMetrics};
use crate::client::policy::{CallOutcome, OnDone, Pick, PickInfo};
use crate::client::retry::throttle::Throttle;
use crate::client::subchannel::{ConnectivityState, InFlightGuard};

/// How one attempt ended, as far as the call is concerned.
// Nearly every attempt is Answered: boxing it would cost an allocation per
// call to save stack on the rare failure.
#[allow(clippy::large_enum_variant)]
pub(super) enum Attempt {
    /// Response headers arrived: a real response, or a trailers-only one
    /// whose status is in them.
    Answered(http::Response<ResponseBody>),
    /// No response came.
    Failed {
        /// What the caller gets if this is the last attempt.
        status: Status,
        /// The server refused the stream before its application saw it
        /// (REFUSED_STREAM, or above a graceful GOAWAY's last stream id):
        /// safe to send again once, whatever the policy.
        refused: bool,
    },
}

impl Attempt {
    fn failed(status: Status) -> Self {
        Self::Failed {
            status,
            refused: false,
        }
    }
}

/// Whether `error` says the server's application never saw the stream:
/// reset with REFUSED_STREAM, or cut by a graceful GOAWAY (NO_ERROR) whose
/// last stream id is below it. A GOAWAY with an error code also ends the
/// streams below its last id, so only the graceful one proves it.
fn refused_unseen(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) => h2.is_remote(),
                Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
                _ => false,
            };
        }
        source = err.source();
    }
    false
}

/// What every attempt of one call shares.
pub(super) struct CallContext<'a> {
    /// Queue rather than fail fast in TransientFailure.
    pub wait_for_ready: bool,
    /// The call's deadline.
    pub deadline: Option<Instant>,
    /// The backends its attempts went to, when it has a policy.
    pub tried: Option<&'a Tried>,
    /// The method's series, if the channel has metrics.
    pub method: Option<&'a Arc<MethodMetrics>>,
    /// The retry token bucket of the config the call follows.
    pub throttle: Option<&'a Arc<Throttle>>,
    /// The caller's [`RequestHash`](crate::client::RequestHash), read
    /// before the first attempt takes the extensions it came in.
    pub hash: Option<u64>,
}

impl Shared {
    /// One attempt: picks a connection and sends; waits while connecting,
    /// fails fast in TransientFailure unless `wait_for_ready`. A request
    /// that never left this process (its connection closed first) is
    /// picked again, as often as it takes: it is the same attempt.
    pub(super) async fn attempt(
        &self,
        mut request: http::Request<tonic::body::Body>,
        call: &CallContext<'_>,
        picked: &AtomicBool,
    ) -> Attempt {
        let CallContext {
            wait_for_ready,
            deadline,
            tried,
            method,
            throttle,
            hash: _,
        } = *call;
        let mut waiter = None;
        let mut repicks = 0;
        loop {
            let published = self.picker.load();
            let pick = published.picker.pick(&PickInfo {
                method: request.uri().path(),
                headers: request.headers(),
                hash: call.hash,
            });
            let (connection, done) = match pick {
                Pick::Connection { connection, done } => (connection, done),
                Pick::Fail(status) if !wait_for_ready => return Attempt::failed(status),
                Pick::Fail(_) | Pick::Queue => {
                    if published.connectivity == ConnectivityState::TransientFailure
                        && !wait_for_ready
                    {
                        let error = published.error.clone().unwrap_or_else(|| {
                            Arc::new(Error::NoReadyEndpoint {
                                service: self.service.clone(),
                                last: None,
                            })
                        });
                        return Attempt::failed(error.into_status());
                    }
                    // Subscribe, then look again, so a picker published in
                    // between is not missed.
                    let waiter = match &mut waiter {
                        Some(waiter) => waiter,
                        None => {
                            let mut fresh = self.picker_waiter.clone();
                            fresh.mark_unchanged();
                            waiter.insert(fresh)
                        }
                    };
                    if !Arc::ptr_eq(&published, &self.picker.load()) {
                        continue;
                    }
                    drop(published);
                    if waiter.changed().await.is_err() {
                        return Attempt::failed(Error::BalancerStopped.into());
                    }
                    continue;
                }
            };
            drop(published);
            if let Some(tried) = tried {
                if !tried.first_visit(&connection.address) && repicks < AVOID_REPICKS {
                    // Dropping the pick unreported: it carried no call.
                    repicks += 1;
                    continue;
                }
            }
            picked.store(true, Ordering::Relaxed);
            if let Some(metrics) = &connection.metrics {
                metrics.picked();
            }
            if let Err(status) = set_origin(&mut request, &connection.scheme, &connection.authority)
            {
                return Attempt::failed(status);
            }
            let outcome = Outcome::new(
                connection.in_flight.start(),
                done,
                connection.metrics.clone(),
                deadline,
                throttle.cloned(),
                method.cloned(),
            );
            let mut sender = connection.sender.clone();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    // A trailers-only response carries its status in the
                    // headers.
                    let code = grpc_status(&parts.headers);
                    return Attempt::Answered(http::Response::from_parts(
                        parts,
                        ResponseBody {
                            inner: body,
                            code,
                            outcome,
                            slot: None,
                        },
                    ));
                }
                Err(mut error) => match error.take_message() {
                    // Never left this process (the connection closed just
                    // before): safe to send elsewhere.
                    Some(unsent) => {
                        outcome.forget();
                        picked.store(false, Ordering::Relaxed);
                        request = unsent;
                        // Let the balancer hear of the closed connection.
                        tokio::task::yield_now().await;
                    }
                    None => {
                        outcome.finish(tonic::Code::Unavailable);
                        return Attempt::Failed {
                            refused: refused_unseen(error.error()),
                            status: Error::RpcFailed {
                                address: connection.address.clone(),
                                detail: source_chain(error.error()),
                            }
                            .into(),
                        };
                    }
                },
            }
        }
    }
}

/// Extra picks an attempt makes to avoid a backend its call already
/// tried, before it takes that one anyway (Envoy's `previous_hosts` retry
/// predicate with three host selections). Round robin needs one; a random
/// policy usually does.
const AVOID_REPICKS: u32 = 2;

/// The backends one call's attempts were sent to.
#[derive(Default)]
pub(super) struct Tried(std::sync::Mutex<Vec<Arc<str>>>);

impl Tried {
    /// Notes `address` as tried; false if it already was.
    fn first_visit(&self, address: &Arc<str>) -> bool {
        let mut tried = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if tried.iter().any(|a| a == address) {
            return false;
        }
        tried.push(address.clone());
        true
    }
}

/// Points the request at the chosen backend: HTTP/2 needs a scheme and an
/// authority, which tonic leaves to the channel.
fn set_origin(
    request: &mut http::Request<tonic::body::Body>,
    scheme: &Scheme,
    authority: &Authority,
) -> Result<(), Status> {
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = Uri::from_parts(parts).map_err(|e| Error::InvalidUri {
        authority: authority.to_string(),
        detail: e.to_string(),
    })?;
    Ok(())
}

/// The `grpc-timeout` header, which tonic sets from `Request::set_timeout`.
pub(super) fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The `grpc-status` header or trailer, if present.
pub(super) fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(tonic::Code::from_i32(value.parse().ok()?))
}

/// One RPC's bookkeeping: counted in flight on its subchannel until it ends,
/// and its outcome reported to the picker's [`OnDone`] and the endpoint's
/// metrics, exactly once.
struct Outcome {
    _in_flight: InFlightGuard,
    done: Option<OnDone>,
    /// Until the outcome is reported.
    metrics: Option<Arc<EndpointMetrics>>,
    started: Instant,
    /// The call's deadline: a call dropped after it timed out, which
    /// policies must tell from one the caller abandoned.
    deadline: Option<Instant>,
    /// The channel's retry tokens, refilled by every call that ends OK.
    throttle: Option<Arc<Throttle>>,
    /// The method's series: this attempt's duration and status.
    method: Option<Arc<MethodMetrics>>,
    /// When this attempt answers its call: the call's series and start.
    call: Option<(Arc<MethodMetrics>, Instant)>,
}

impl Outcome {
    fn new(
        in_flight: InFlightGuard,
        done: Option<OnDone>,
        metrics: Option<Arc<EndpointMetrics>>,
        deadline: Option<Instant>,
        throttle: Option<Arc<Throttle>>,
        method: Option<Arc<MethodMetrics>>,
    ) -> Self {
        Self {
            _in_flight: in_flight,
            done,
            metrics,
            started: Instant::now(),
            deadline,
            throttle,
            method,
            call: None,
        }
    }

    /// Reports `code` (once; later calls do nothing).
    fn finish(mut self, code: tonic::Code) {
        self.report(code);
    }

    fn report(&mut self, code: tonic::Code) {
        if let Some(metrics) = self.metrics.take() {
            metrics.rpc_ended(code);
        }
        if let Some(throttle) = self.throttle.take().filter(|_| code == tonic::Code::Ok) {
            throttle.success();
        }
        if let Some(method) = self.method.take() {
            method.attempt_ended(code, self.started.elapsed());
        }
        if let Some((method, started)) = self.call.take() {
            method.call_ended(code, started.elapsed());
        }
        if let Some(done) = self.done.take() {
            done(&CallOutcome {
                code,
                latency: self.started.elapsed(),
            });
        }
    }

    /// The RPC never left: nothing to report.
    fn forget(mut self) {
        self.done = None;
        self.metrics = None;
        self.throttle = None;
        self.method = None;
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // Dropped before the status arrived: the deadline passed, or the
        // caller gave up.
        let code = match self.deadline {
            Some(deadline) if Instant::now() >= deadline => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Cancelled,
        };
        self.report(code);
    }
}

/// A response body that keeps its RPC counted as in flight on its
/// subchannel until it is read to the end or dropped, and tells the
/// picker's [`OnDone`] how the call ended.
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    /// The status, once the headers or trailers have said it.
    code: Option<tonic::Code>,
    outcome: Outcome,
    /// The call's place under the circuit breaker, held until the body ends.
    slot: Option<CallSlot>,
}

/// One call counted against the config's `circuitBreakers.maxRequests`
/// until dropped.
pub(super) struct CallSlot(Arc<AtomicUsize>);

impl CallSlot {
    /// A place if fewer than `max` calls hold one in `count`.
    pub(super) fn take(count: &Arc<AtomicUsize>, max: u32) -> Option<Self> {
        let max = max as usize;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Self(count.clone()))
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ResponseBody {
    /// Keeps the call counted under the circuit breaker until the body ends.
    pub(super) fn hold(&mut self, slot: Option<CallSlot>) {
        self.slot = slot;
    }

    /// Makes this attempt's end the end of its call, `started` then.
    pub(super) fn ends_call(&mut self, method: Arc<MethodMetrics>, started: Instant) {
        self.outcome.call = Some((method, started));
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // tonic drops a trailers-only response's body unread: its status,
        // from the headers, is the call's outcome, not a cancellation.
        if let Some(code) = self.code {
            self.outcome.report(code);
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // The trailers end the call: tonic may never poll again.
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.code = Some(code);
                    self.outcome.report(code);
                    self.slot = None;
                }
            }
            Poll::Ready(None) => {
                let code = self.code.unwrap_or(tonic::Code::Unknown);
                self.outcome.report(code);
                self.slot = None;
            }
            Poll::Ready(Some(Err(_))) => {
                self.outcome.report(tonic::Code::Unavailable);
                self.slot = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
