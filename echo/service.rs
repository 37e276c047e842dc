//! The `grpc.examples.echo.Echo` RPCs. Every reply is
//! `"<message> (from <addr>)"`, where addr is the address the server
//! advertises, so a client can tell which backend the balancer picked.
//! Every call first goes through the server's [`Faults`]: added latency,
//! then a failure at the configured rate.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::config::Faults;
use crate::proto::echo::echo_server::Echo;
use crate::proto::echo::{EchoRequest, EchoResponse};

/// Request header: how many replies ServerStreamingEcho sends.
pub const COUNT_HEADER: &str = "x-echo-count";
/// Request header: milliseconds between two ServerStreamingEcho replies, so
/// tests can hold a stream open for as long as they need.
pub const INTERVAL_HEADER: &str = "x-echo-interval-ms";
/// Replies per ServerStreamingEcho call when [`COUNT_HEADER`] is absent.
pub const DEFAULT_STREAM_COUNT: u64 = 10;
/// Most replies one ServerStreamingEcho call may ask for; a typo should not
/// pin a stream open for days.
pub const MAX_STREAM_COUNT: u64 = 1_000_000;
/// Longest pause [`INTERVAL_HEADER`] may ask for, for the same reason.
pub const MAX_STREAM_INTERVAL_MS: u64 = 60_000;

/// The Echo service of one server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EchoService {
    /// The advertised address every reply names.
    address: Arc<str>,
    /// What to inject into each call.
    faults: Faults,
}

impl EchoService {
    /// A service whose replies say they come from `address`.
    pub fn new(address: impl Into<Arc<str>>) -> Self {
        Self {
            address: address.into(),
            faults: Faults::default(),
        }
    }

    /// The same service, injecting `faults` into every call.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Applies the faults to one call: the delay, then maybe a failure.
    async fn inject(&self) -> Result<(), Status> {
        if !self.faults.delay.is_zero() {
            tokio::time::sleep(self.faults.delay).await;
        }
        if self.faults.should_fail() {
            return Err(Status::new(
                self.faults.fail_code,
                format!("injected failure (from {})", self.address),
            ));
        }
        Ok(())
    }

    /// The reply to `message`.
    pub fn reply(&self, message: &str) -> EchoResponse {
        EchoResponse {
            message: format!("{message} (from {})", self.address),
        }
    }
}

/// A stream of replies as the generated trait wants it.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<EchoResponse>, Status> {
        self.inject().await?;
        Ok(Response::new(self.reply(&request.into_inner().message)))
    }

    type ServerStreamingEchoStream = ReplyStream;

    async fn server_streaming_echo(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamingEchoStream>, Status> {
        self.inject().await?;
        let count = header(
            request.metadata(),
            COUNT_HEADER,
            DEFAULT_STREAM_COUNT,
            MAX_STREAM_COUNT,
        )?;
        let interval = Duration::from_millis(header(
            request.metadata(),
            INTERVAL_HEADER,
            0,
            MAX_STREAM_INTERVAL_MS,
        )?);
        let reply = self.reply(&request.into_inner().message);
        // The first reply goes out at once and the pause comes between
        // replies, so a caller knows the stream is live after one message.
        let replies = futures_util::stream::unfold(0u64, move |sent| {
            let reply = reply.clone();
            async move {
                if sent >= count {
                    return None;
                }
                if sent > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Some((Ok(reply), sent + 1))
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn client_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        self.inject().await?;
        let mut inbound = request.into_inner();
        let mut messages = Vec::new();
        while let Some(request) = inbound.message().await? {
            messages.push(request.message);
        }
        Ok(Response::new(self.reply(&messages.join(", "))))
    }

    type BidirectionalStreamingEchoStream = ReplyStream;

    async fn bidirectional_streaming_echo(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidirectionalStreamingEchoStream>, Status> {
        self.inject().await?;
        let service = self.clone();
        let replies = request
            .into_inner()
            .map(move |request| request.map(|r| service.reply(&r.message)));
        Ok(Response::new(Box::pin(replies)))
    }
}

/// Reads a numeric request header, `default` when absent; a malformed or
/// too large value is the caller's mistake, so INVALID_ARGUMENT.
fn header<T>(metadata: &MetadataMap, name: &str, default: T, max: T) -> Result<T, Status>
where
    T: FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(raw) = metadata.get(name) else {
        return Ok(default);
    };
    let bad = || Status::invalid_argument(format!("{name} must be an integer from 0 to {max}"));
    let value: T = raw
        .to_str()
        .map_err(|_| bad())?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if value > max {
        return Err(bad());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn replies_name_the_backend() {
        let service = EchoService::new("127.0.0.1:50051");
        assert_eq!(
            service.reply("hello").message,
            "hello (from 127.0.0.1:50051)"
        );
    }

    #[test]
    fn stream_headers_default_parse_and_refuse_garbage() {
        let mut metadata = MetadataMap::new();
        assert_eq!(header(&metadata, COUNT_HEADER, 10u64, 100).unwrap(), 10);
        metadata.insert(COUNT_HEADER, " 3 ".parse().unwrap());
        assert_eq!(header(&metadata, COUNT_HEADER, 10u64, 100).unwrap(), 3);
        for bad in ["-1", "x", "101", ""] {
            metadata.insert(COUNT_HEADER, bad.parse().unwrap());
            let err = header(&metadata, COUNT_HEADER, 10u64, 100).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
            assert!(err.message().contains(COUNT_HEADER));
        }
    }

    #[tokio::test]
    async fn server_stream_sends_the_requested_count() {
        let service = EchoService::new("h:1");
        let mut request = Request::new(EchoRequest {
            message: "m".into(),
        });
        request
            .metadata_mut()
            .insert(COUNT_HEADER, "3".parse().unwrap());
        let replies: Vec<_> = service
            .server_streaming_echo(request)
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        assert_eq!(replies.len(), 3);
        for reply in replies {
            assert_eq!(reply.unwrap().message, "m (from h:1)");
        }
    }

    #[tokio::test]
    async fn injected_failures_carry_the_configured_code() {
        let service = EchoService::new("h:1").with_faults(Faults {
            fail_rate: 1.0,
            fail_code: Code::Internal,
            delay: Duration::ZERO,
        });
        let request = Request::new(EchoRequest {
            message: "m".into(),
        });
        let err = service.unary_echo(request).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("injected"), "{err}");
    }
}
