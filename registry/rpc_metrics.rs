//! A tower layer that counts every registry RPC by method and status code,
//! times it, and counts refusals by cap and by token. It sits outermost, so
//! it also sees what the token and message-size layers refuse.
//!
//! The code is read from the response headers: refusals and unary errors
//! arrive trailers-only, so their `grpc-status` is there. A response
//! without one is a call that got under way; it is counted as `OK` when its
//! headers go out (for Watch and KeepAlive: when the stream opens).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::{Layer, Service};

use super::metrics::RegistryMetrics;

/// Adds [`RpcMetrics`] around a service.
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer {
    metrics: RegistryMetrics,
}

impl RpcMetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: RegistryMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Counts and times the RPCs `inner` answers.
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: RegistryMetrics,
}

impl<S, B, R> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = RpcMetricsFuture<S::Future>;

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
        RpcMetricsFuture {
            inner: Box::pin(self.inner.call(request)),
            metrics: self.metrics.clone(),
            method,
            started: Instant::now(),
        }
    }
}

/// The response future of [`RpcMetrics`].
pub struct RpcMetricsFuture<F> {
    inner: Pin<Box<F>>,
    metrics: RegistryMetrics,
    method: String,
    started: Instant,
}

impl<F, R, E> Future for RpcMetricsFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let output = match self.inner.as_mut().poll(cx) {
            Poll::Ready(output) => output,
            Poll::Pending => return Poll::Pending,
        };
        let (code, message) = match &output {
            Ok(response) => {
                let headers = response.headers();
                let code = headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                let message = headers
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .map(|m| m.replace("%20", " "))
                    .unwrap_or_default();
                (code, message)
            }
            Err(_) => (tonic::Code::Unknown, String::new()),
        };
        let metrics = &self.metrics;
        let method = vec![("method", self.method.clone())];
        metrics
            .rpc_duration
            .get_or_create(&method)
            .observe(self.started.elapsed().as_secs_f64());
        metrics
            .rpcs
            .get_or_create(&vec![
                ("method", self.method.clone()),
                ("code", code_name(code)),
            ])
            .inc();
        match code {
            tonic::Code::ResourceExhausted => metrics.refused_by_cap(cap_of(&message)),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                metrics.refused_by_auth()
            }
            _ => {}
        }
        Poll::Ready(output)
    }
}

/// gRPC's canonical name of `code`, e.g. `RESOURCE_EXHAUSTED`.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The cap a RESOURCE_EXHAUSTED message names: every cap's message starts
/// with `<cap> limit of ...`; a service name in parentheses is dropped.
fn cap_of(message: &str) -> &str {
    let name = message.split(" limit of").next().unwrap_or_default();
    let name = name.split(" (").next().unwrap_or_default().trim();
    if name.is_empty() || name.len() > 64 {
        "other"
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::{cap_of, code_name};

    #[test]
    fn codes_have_their_grpc_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
    }

    #[test]
    fn caps_are_named_by_their_message() {
        assert_eq!(cap_of("services limit of 3 reached"), "services");
        assert_eq!(
            cap_of("endpoints per service (a.b) limit of 2 reached"),
            "endpoints per service"
        );
        assert_eq!(
            cap_of("message size limit of 10 bytes reached: x"),
            "message size"
        );
        assert_eq!(cap_of(""), "other");
    }
}
