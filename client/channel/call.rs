//! The send path: one RPC from its pick to the end of its response body.
//! Deadlines (the call's `grpc-timeout` or the channel's default) bound the
//! wait for a backend and the call; wait-for-ready RPCs queue instead of
//! failing fast; each call's outcome reaches its picker's `OnDone` and the
//! endpoint's metrics exactly once.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use tokio::time::Instant;
use tonic::Status;

use super::Shared;
use crate::client::error::{source_chain, Error};
use crate::client::metrics::EndpointMetrics;
use crate::client::policy::{CallOutcome, OnDone, Pick, PickInfo};
use crate::client::subchannel::{ConnectivityState, InFlightGuard};

/// Marks a request as wait-for-ready: instead of failing fast when no
/// backend is Ready, it waits for one until its deadline. Insert it into a
/// `tonic::Request`'s extensions.
#[derive(Debug, Clone, Copy)]
pub struct WaitForReady;

impl Shared {
    pub(super) async fn send(
        &self,
        mut request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<ResponseBody>, Status> {
        let timeout = match grpc_timeout(request.headers()) {
            Some(timeout) => Some(timeout),
            None => self.default_timeout.inspect(|timeout| {
                // Tell the server too, so it can stop working on it in time.
                let millis = timeout.as_millis().clamp(1, 99_999_999);
                if let Ok(value) = http::HeaderValue::from_str(&format!("{millis}m")) {
                    request.headers_mut().insert("grpc-timeout", value);
                }
            }),
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        let wait_for_ready =
            self.wait_for_ready || request.extensions().get::<WaitForReady>().is_some();
        let picked = AtomicBool::new(false);
        let attempt = self.send_to_ready(request, wait_for_ready, deadline, &picked);
        let sent = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or_else(|_| Err(self.deadline_exceeded().into())),
            None => attempt.await,
        };
        if let (Err(status), Some(metrics)) = (&sent, &self.metrics) {
            if !picked.load(Ordering::Relaxed) {
                metrics.unpicked(status.code());
            }
        }
        sent
    }

    /// Picks a connection and sends; waits while connecting, fails fast in
    /// TransientFailure unless `wait_for_ready`.
    async fn send_to_ready(
        &self,
        mut request: http::Request<tonic::body::Body>,
        wait_for_ready: bool,
        deadline: Option<Instant>,
        picked: &AtomicBool,
    ) -> Result<http::Response<ResponseBody>, Status> {
        let mut waiter = None;
        loop {
            let published = self.picker.load();
            let pick = published.picker.pick(&PickInfo {
                method: request.uri().path(),
            });
            let (connection, done) = match pick {
                Pick::Connection { connection, done } => (connection, done),
                Pick::Fail(status) if !wait_for_ready => return Err(status),
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
                        return Err(error.into_status());
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
                        return Err(Error::BalancerStopped.into());
                    }
                    continue;
                }
            };
            drop(published);
            picked.store(true, Ordering::Relaxed);
            if let Some(metrics) = &connection.metrics {
                metrics.picked();
            }
            set_origin(&mut request, &connection.scheme, &connection.authority)?;
            let outcome = Outcome::new(
                connection.in_flight.start(),
                done,
                connection.metrics.clone(),
                deadline,
            );
            let mut sender = connection.sender.clone();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    // A trailers-only response carries its status in the
                    // headers.
                    let code = grpc_status(&parts.headers);
                    return Ok(http::Response::from_parts(
                        parts,
                        ResponseBody {
                            inner: body,
                            code,
                            outcome,
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
                        return Err(Error::RpcFailed {
                            address: connection.address.clone(),
                            detail: source_chain(error.error()),
                        }
                        .into());
                    }
                },
            }
        }
    }

    /// What an RPC whose deadline passed gets: the state it was waiting in.
    fn deadline_exceeded(&self) -> Error {
        let state = self.state.borrow();
        Error::DeadlineExceeded {
            service: self.service.clone(),
            connectivity: state.connectivity,
            waiting_on: state.last_error.clone(),
        }
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
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
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
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
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
}

impl Outcome {
    fn new(
        in_flight: InFlightGuard,
        done: Option<OnDone>,
        metrics: Option<Arc<EndpointMetrics>>,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            _in_flight: in_flight,
            done,
            metrics,
            started: Instant::now(),
            deadline,
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
                }
            }
            Poll::Ready(None) => {
                let code = self.code.unwrap_or(tonic::Code::Unknown);
                self.outcome.report(code);
            }
            Poll::Ready(Some(Err(_))) => self.outcome.report(tonic::Code::Unavailable),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut headers = http::HeaderMap::new();
        for (value, expected) in [
            ("100m", Duration::from_millis(100)),
            ("2S", Duration::from_secs(2)),
            ("5u", Duration::from_micros(5)),
        ] {
            headers.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(grpc_timeout(&headers), Some(expected));
        }
        headers.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&headers), None);
    }
}
