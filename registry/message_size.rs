//! The cap on the size of one request message. tonic's own decode limit
//! answers OUT_OF_RANGE after buffering; this layer reads each gRPC frame's
//! length prefix as it arrives and refuses an oversized message with
//! RESOURCE_EXHAUSTED naming the cap, before any of it is buffered.
//!
//! The refusal is the request body's error, which tonic hands on rebuilt
//! (the cap only deep in its sources), so the layer also records
//! [`Cap::MessageSize`] in the call's [`EndCause`] for the metrics layer
//! (see `rpc_metrics`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use super::cap::Cap;
use crate::metrics::rpc::EndCause;

/// Bytes of the gRPC length prefix: one flag byte, four length bytes.
const PREFIX_LEN: usize = 5;

/// Wraps every request body so a message longer than the cap ends the call.
#[derive(Debug, Clone, Copy)]
pub struct MessageSizeLayer {
    /// Largest message accepted, in bytes.
    max_bytes: usize,
}

impl MessageSizeLayer {
    /// Caps request messages at `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes }
    }
}

impl<S> tower::Layer<S> for MessageSizeLayer {
    type Service = MessageSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageSize {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

/// The service [`MessageSizeLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct MessageSize<S> {
    inner: S,
    max_bytes: usize,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for MessageSize<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let max_bytes = self.max_bytes;
        let cause = EndCause::of(request.extensions());
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(CappedBody {
                inner: body,
                frames: FrameSizes::new(max_bytes),
                refused: None,
                cause,
            })
        }))
    }
}

/// A request body that fails with RESOURCE_EXHAUSTED once a frame header
/// announces a message over the cap.
struct CappedBody {
    inner: tonic::body::Body,
    frames: FrameSizes,
    /// The refusal to report once the messages before it are handed on.
    refused: Option<Status>,
    /// Where the call's end is explained, once the refusal is reported.
    cause: Option<EndCause>,
}

impl CappedBody {
    /// Fails the body with the refusal waiting in `refused`.
    fn refuse(&mut self) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let refused = self.refused.take();
        if let (Some(cause), Some(_)) = (&self.cause, &refused) {
            cause.set(Cap::MessageSize);
        }
        Poll::Ready(refused.map(Err))
    }
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.refused.is_some() {
            return this.refuse();
        }
        let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        if let Some(data) = frame.data_ref() {
            if let Err((complete, status)) = this.frames.scan(data.clone()) {
                // The messages before the oversized one are whole: hand them
                // on (a heartbeat in the same chunk is still answered), and
                // the error after them.
                this.refused = Some(status);
                if complete > 0 {
                    return Poll::Ready(Some(Ok(Frame::data(data.slice(..complete)))));
                }
                return this.refuse();
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Follows the gRPC framing of a byte stream to find each message's length.
#[derive(Debug)]
struct FrameSizes {
    max_bytes: usize,
    /// The length prefix read so far.
    prefix: [u8; PREFIX_LEN],
    /// How many bytes of `prefix` have arrived.
    prefix_filled: usize,
    /// Bytes of the current message still to come; 0 between messages.
    remaining: usize,
}

impl FrameSizes {
    fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            prefix: [0; PREFIX_LEN],
            prefix_filled: 0,
            remaining: 0,
        }
    }

    /// Reads the next chunk of the body; once a message announces more
    /// bytes than the cap, an error with how many leading bytes of the chunk
    /// came before that message's length prefix.
    fn scan(&mut self, mut chunk: Bytes) -> Result<(), (usize, Status)> {
        let len = chunk.len();
        let mut prefix_start = 0;
        while chunk.has_remaining() {
            if self.remaining > 0 {
                let skip = self.remaining.min(chunk.remaining());
                chunk.advance(skip);
                self.remaining -= skip;
                continue;
            }
            if self.prefix_filled == 0 {
                prefix_start = len - chunk.remaining();
            }
            let take = (PREFIX_LEN - self.prefix_filled).min(chunk.remaining());
            chunk.copy_to_slice(&mut self.prefix[self.prefix_filled..self.prefix_filled + take]);
            self.prefix_filled += take;
            if self.prefix_filled < PREFIX_LEN {
                continue;
            }
            self.prefix_filled = 0;
            let len = u32::from_be_bytes([
                self.prefix[1],
                self.prefix[2],
                self.prefix[3],
                self.prefix[4],
            ]) as usize;
            if len > self.max_bytes {
                return Err((
                    prefix_start,
                    Cap::MessageSize.refusal(format!(
                        "{} limit of {} bytes reached: the request carries a {len}-byte \
                     message; send smaller requests (metadata is capped far below this)",
                        Cap::MessageSize,
                        self.max_bytes
                    )),
                ));
            }
            self.remaining = len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn framed(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len as usize));
        bytes
    }

    #[test]
    fn messages_up_to_the_cap_pass_in_any_chunking() {
        let mut stream = framed(10);
        stream.extend(framed(0));
        stream.extend(framed(10));
        for chunk_len in 1..stream.len() {
            let mut sizes = FrameSizes::new(10);
            for chunk in stream.chunks(chunk_len) {
                sizes.scan(Bytes::copy_from_slice(chunk)).unwrap();
            }
        }
    }

    #[test]
    fn a_prefix_over_the_cap_fails_before_its_body_arrives() {
        let stream = [framed(3), framed(11)].concat();
        for chunk_len in 1..stream.len() {
            let mut sizes = FrameSizes::new(10);
            let failed = stream
                .chunks(chunk_len)
                .position(|chunk| sizes.scan(Bytes::copy_from_slice(chunk)).is_err())
                .expect("the second message is over the cap");
            // The failure comes with the chunk that completes the prefix.
            assert_eq!(failed, (3 + 2 * PREFIX_LEN - 1) / chunk_len);
        }
        let (complete, status) = FrameSizes::new(10)
            .scan(Bytes::from(stream.clone()))
            .unwrap_err();
        assert_eq!(
            complete,
            3 + PREFIX_LEN,
            "the whole first message comes before"
        );
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "message size limit of 10 bytes reached: the request carries a 11-byte message; \
             send smaller requests (metadata is capped far below this)"
        );
    }

    #[test]
    fn a_refused_body_records_its_cap_for_the_call() {
        let stream = [framed(3), framed(11)].concat();
        let cause = EndCause::default();
        let mut body = CappedBody {
            inner: tonic::body::Body::new(String::from_utf8(stream).unwrap()),
            frames: FrameSizes::new(10),
            refused: None,
            cause: Some(cause.clone()),
        };
        let mut next = || {
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .now_or_never()
                .expect("the body is in memory")
                .expect("the body has not ended")
        };
        let first = next().expect("the whole first message");
        assert_eq!(first.data_ref().map(Bytes::len), Some(3 + PREFIX_LEN));
        assert!(cause.get().is_none(), "recorded before it is reported");
        let status = next().expect_err("the refusal");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let recorded = cause.get().and_then(|cause| cause.downcast_ref::<Cap>());
        assert_eq!(recorded, Some(&Cap::MessageSize));
    }
}
