//! Letting stock gRPC clients with a multi-address target in.
//!
//! grpcio (gRPC core) given `ipv4:127.0.0.1:50051,127.0.0.1:50052` sends
//! `127.0.0.1:50051,127.0.0.1:50052` as the `:authority` of every request.
//! h2, underneath tonic, refuses such a request with RST_STREAM
//! PROTOCOL_ERROR before any service sees it (hyperium/h2#525), logging only
//! at debug level; it has no setting to relax the check, and no release
//! accepts it. grpc-go and grpcio servers accept the same requests.
//!
//! So the fix sits below h2. [`AuthorityRepair`] wraps an accepted plaintext
//! connection and follows the client's HPACK state through the header
//! blocks it sends. If the first request carries an `:authority` h2 would
//! refuse, that block and every later one are re-encoded as plain literals,
//! with the bad authority replaced by the address the connection reached:
//! once one block is rewritten, h2's HPACK table no longer matches the
//! client's, so later blocks must not refer to it. If the first request's
//! authority is valid, the wrapper steps aside and every later byte passes
//! straight through: a gRPC client sends its channel's one authority on
//! every call of a connection, and decoding every request (loona-hpack
//! builds a Huffman table per string) doubled a plaintext server's CPU per
//! RPC. Anything this module does not understand (a malformed frame or
//! header block) also makes it step aside, for h2 to judge.
//!
//! The cost is one HPACK decode per connection, or per request on a repaired
//! one. Over TLS the bytes are ciphertext at this layer, so
//! [`repair_authorities`] leaves TLS connections alone; clients then need
//! the workaround in `docs/interop.md` (`grpc.default_authority`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, TryStreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

mod repairer;
use repairer::*;

/// Wraps every connection of a plaintext `incoming` in an
/// [`AuthorityRepair`]; with `enabled` false (a TLS server, whose bytes are
/// ciphertext here) the wrapper passes everything through untouched.
pub fn repair_authorities<S, E>(
    incoming: S,
    enabled: bool,
) -> impl Stream<Item = Result<AuthorityRepair<TcpStream>, E>>
where
    S: Stream<Item = Result<TcpStream, E>>,
{
    incoming.map_ok(move |io| {
        if !enabled {
            return AuthorityRepair::transparent(io);
        }
        let peer = io.peer_addr().ok();
        match io.local_addr() {
            Ok(local) => AuthorityRepair::new(io, local.to_string(), peer),
            Err(_) => AuthorityRepair::transparent(io),
        }
    })
}

/// A server-side connection whose inbound requests never carry an
/// `:authority` h2 would refuse; see the module docs.
pub struct AuthorityRepair<IO> {
    /// The accepted socket.
    io: IO,
    /// Follows the inbound HTTP/2 frames and fixes header blocks.
    repairer: Repairer,
    /// Inbound bytes read from `io`, not yet parsed.
    raw: BytesMut,
    /// Inbound bytes parsed and ready for h2.
    ready: BytesMut,
    /// Where reads from `io` land before they join `raw`.
    scratch: Box<[u8]>,
    /// `io` reached end of file.
    eof: bool,
}

impl<IO> AuthorityRepair<IO> {
    /// Repairs requests on `io`, naming `replacement` (the address the
    /// connection reached) as their authority; `peer` is for the log.
    pub fn new(io: IO, replacement: String, peer: Option<SocketAddr>) -> Self {
        Self::with(io, Repairer::new(Bytes::from(replacement), peer))
    }

    /// Passes every byte through, for connections this layer cannot read.
    pub fn transparent(io: IO) -> Self {
        let mut repairer = Repairer::new(Bytes::new(), None);
        repairer.mode = Mode::Transparent;
        Self::with(io, repairer)
    }

    fn with(io: IO, repairer: Repairer) -> Self {
        Self {
            io,
            repairer,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            eof: false,
        }
    }

    /// How many requests had their authority replaced.
    pub fn repaired(&self) -> u64 {
        self.repairer.repaired
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityRepair<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A transparent connection with nothing buffered reads straight into
        // the caller's buffer: TLS connections pay nothing.
        if this.repairer.mode == Mode::Transparent && this.ready.is_empty() && this.raw.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                this.eof = true;
                this.repairer.finish(&mut this.raw, &mut this.ready);
            } else {
                this.raw.extend_from_slice(chunk.filled());
                this.repairer.feed(&mut this.raw, &mut this.ready);
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityRepair<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for AuthorityRepair<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use loona_hpack::Decoder;

    use super::*;
    use loona_hpack::Encoder;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8((payload.len() >> 16) as u8);
        out.put_u16(payload.len() as u16);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream_id);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn request(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.examples.echo.Echo/UnaryEcho"),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    /// A request that names no authority (HTTP/2 allows it; h2 takes it).
    fn request_without_authority() -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut fields = request("");
        fields.retain(|(n, _)| n != b":authority");
        fields
    }

    fn encode(encoder: &mut Encoder<'_>, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// Splits `out` into frames: (kind, flags, stream, payload).
    fn frames(mut out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        while !out.is_empty() {
            let length = usize::from(out[0]) << 16 | usize::from(out[1]) << 8 | usize::from(out[2]);
            let stream = u32::from_be_bytes([out[5], out[6], out[7], out[8]]);
            frames.push((out[3], out[4], stream, out[9..9 + length].to_vec()));
            out = &out[9 + length..];
        }
        frames
    }

    /// Feeds `input` one byte at a time, as the slowest socket would.
    fn feed_bytewise(repairer: &mut Repairer, input: &[u8]) -> BytesMut {
        let mut raw = BytesMut::new();
        let mut out = BytesMut::new();
        for byte in input {
            raw.put_u8(*byte);
            repairer.feed(&mut raw, &mut out);
        }
        out
    }

    #[test]
    fn valid_requests_pass_through_unchanged() {
        let mut encoder = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        for stream in [1, 3] {
            let block = encode(&mut encoder, &request("127.0.0.1:50051"));
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\x04abcd"));
        }
        let mut repairer = Repairer::new(Bytes::from_static(b"127.0.0.1:1"), None);
        let out = feed_bytewise(&mut repairer, &input);
        assert_eq!(&out[..], &input[..]);
        assert_eq!(repairer.repaired, 0);
    }

    #[test]
    fn a_multi_address_authority_is_replaced_and_later_blocks_stay_decodable() {
        let multi = "127.0.0.1:50051,127.0.0.1:50052";
        let mut encoder = Encoder::new();
        let mut input = PREFACE.to_vec();
        // A request without an authority first (judged no further), so
        // h2's table holds entries of its own.
        let ok = encode(&mut encoder, &request_without_authority());
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &ok));
        // Then the bad one split over HEADERS (padded) and CONTINUATION.
        let bad = encode(&mut encoder, &request(multi));
        let (head, tail) = bad.split_at(bad.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(head);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, tail));
        input.extend(frame(0x0, END_STREAM, 3, b"data"));
        // And a third that refers to the client's table.
        let again = encode(&mut encoder, &request(multi));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &again));

        let mut repairer = Repairer::new(Bytes::from_static(b"127.0.0.1:50051"), None);
        let out = feed_bytewise(&mut repairer, &input);
        assert_eq!(repairer.repaired, 2);
        assert_eq!(&out[..PREFACE_LEN], PREFACE);

        // Decode as h2 would: one table, fed every block in order.
        let mut h2 = Decoder::new();
        let frames = frames(&out[PREFACE_LEN..]);
        let kinds: Vec<(u8, u8, u32)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (HEADERS, END_HEADERS | END_STREAM, 1),
                (HEADERS, END_HEADERS, 3),
                (0x0, END_STREAM, 3),
                (HEADERS, END_HEADERS | END_STREAM, 5),
            ]
        );
        for (kind, _, stream, payload) in &frames {
            if *kind != HEADERS {
                continue;
            }
            let fields = h2.decode(payload).expect("decodes");
            let authority = fields
                .iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| v.clone());
            if *stream == 1 {
                assert_eq!(fields, request_without_authority());
                continue;
            }
            assert_eq!(authority.as_deref(), Some(&b"127.0.0.1:50051"[..]));
            assert_eq!(fields.len(), 6);
        }
    }

    #[test]
    fn after_a_valid_authority_every_byte_passes_straight_through() {
        let mut encoder = Encoder::new();
        let mut input = PREFACE.to_vec();
        let ok = encode(&mut encoder, &request("127.0.0.1:50051"));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &ok));
        // Not a gRPC client (its channel has one authority), so left to h2.
        let bad = encode(&mut encoder, &request("a,b"));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &bad));
        let mut repairer = Repairer::new(Bytes::from_static(b"127.0.0.1:50051"), None);
        let out = feed_bytewise(&mut repairer, &input);
        assert_eq!(&out[..], &input[..]);
        assert_eq!(repairer.repaired, 0);
        assert_eq!(repairer.mode, Mode::Transparent);
    }

    #[test]
    fn large_rewritten_blocks_are_cut_into_continuations() {
        let mut fields = request("a,b");
        fields.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
        let mut out = BytesMut::new();
        encode_block(&fields, 7, true, &mut out);
        let frames = frames(&out);
        let kinds: Vec<(u8, u8)> = frames.iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(
            kinds,
            [
                (HEADERS, END_STREAM),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
        let block: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        let decoded = Decoder::new().decode(&block).expect("decodes");
        assert_eq!(decoded, fields);
    }

    #[test]
    fn garbage_is_passed_on_for_h2_to_judge() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        input.extend(frame(0x0, 0, 1, b"after"));
        let mut repairer = Repairer::new(Bytes::from_static(b"x:1"), None);
        let out = feed_bytewise(&mut repairer, &input);
        assert_eq!(&out[..], &input[..]);
        assert_eq!(repairer.mode, Mode::Transparent);
    }
}
