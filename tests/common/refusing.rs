//! A bare HTTP/2 server that refuses streams: the first `refuse` streams
//! it gets are reset with REFUSED_STREAM before anything reads them, and
//! the rest are answered as `Echo/UnaryEcho` would answer them. It is the
//! server side of transparent retry, which tonic's server cannot be made
//! to play.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use switchboard::proto::echo::{EchoRequest, EchoResponse};

/// A running refusing server on a free 127.0.0.1 port.
pub struct Refusing {
    /// `127.0.0.1:<port>`.
    pub address: String,
    /// Streams received, refused or not.
    pub streams: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Refusing {
    /// Refuses the first `refuse` streams, then answers.
    pub async fn start(refuse: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let streams = Arc::new(AtomicUsize::new(0));
        let counted = streams.clone();
        let from = address.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let counted = counted.clone();
                let from = from.clone();
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        if counted.fetch_add(1, Ordering::Relaxed) < refuse {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let from = from.clone();
                        tokio::spawn(async move {
                            let _ = answer(request, respond, &from).await;
                        });
                    }
                });
            }
        });
        Self {
            address,
            streams,
            task,
        }
    }

    /// Streams received so far.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
}

impl Drop for Refusing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one gRPC message and answers it as the echo service does.
async fn answer(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    from: &str,
) -> Result<(), h2::Error> {
    let mut body = request.into_body();
    let mut received = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        received.extend_from_slice(&chunk);
    }
    let mut frame = received.freeze();
    let message = if frame.len() >= 5 {
        frame.advance(5);
        EchoRequest::decode(frame)
            .map(|r| r.message)
            .unwrap_or_default()
    } else {
        String::new()
    };
    let reply = EchoResponse {
        message: format!("{message} (from {from})"),
    }
    .encode_to_vec();
    let mut data = BytesMut::with_capacity(5 + reply.len());
    data.put_u8(0);
    data.put_u32(reply.len() as u32);
    data.put_slice(&reply);
    let response = http::Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let mut stream = respond.send_response(response, false)?;
    stream.send_data(data.freeze(), false)?;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    stream.send_trailers(trailers)
}
