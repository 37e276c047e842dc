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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, TryStreamExt};
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

/// The client connection preface, `PRI * HTTP/2.0...`, in bytes.
const PREFACE_LEN: usize = 24;
/// Length, type, flags and stream id.
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (RFC 9113 §4.2), so
/// re-encoded blocks are cut to it whatever h2 advertised.
const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The HPACK table size a client may use while the server advertises none
/// (h2's default, under hyper and tonic).
const DEFAULT_HEADER_TABLE_SIZE: usize = 4_096;
/// Header blocks larger than this are not inspected: h2's own header list
/// limit refuses them long before.
const MAX_BLOCK: usize = 1 << 20;
/// How much one read from the socket asks for.
const READ_CHUNK: usize = 16 * 1024;

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

/// What the repairer does with header blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Decode to follow the client's HPACK table, pass the bytes on as sent.
    Forward,
    /// Decode and re-encode every block as plain literals, because one was
    /// rewritten and h2's table no longer matches the client's.
    Reencode,
    /// Pass everything through: TLS, or input this module does not
    /// understand and leaves to h2.
    Transparent,
}

/// A header block still waiting for its END_HEADERS frame.
struct Pending {
    /// The stream the block opens (or ends, for trailers).
    stream_id: u32,
    /// The HEADERS frame also ended the stream.
    end_stream: bool,
    /// The frames as received, passed on unchanged in [`Mode::Forward`].
    frames: BytesMut,
    /// The HPACK bytes, without padding and priority.
    block: BytesMut,
}

/// The inbound half of an HTTP/2 server connection, frame by frame.
struct Repairer {
    /// The authority that replaces a malformed one.
    replacement: Bytes,
    /// The client, for the log line.
    peer: Option<SocketAddr>,
    mode: Mode,
    /// Mirrors the client's HPACK encoder.
    decoder: Decoder<'static>,
    /// Preface bytes still to pass on.
    preface_left: usize,
    /// Payload bytes of the current non-header frame still to pass on.
    payload_left: usize,
    pending: Option<Pending>,
    /// Requests whose authority was replaced.
    repaired: u64,
}

impl Repairer {
    fn new(replacement: Bytes, peer: Option<SocketAddr>) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(DEFAULT_HEADER_TABLE_SIZE);
        Self {
            replacement,
            peer,
            mode: Mode::Forward,
            decoder,
            preface_left: PREFACE_LEN,
            payload_left: 0,
            pending: None,
            repaired: 0,
        }
    }

    /// Moves what can be judged from `raw` to `out`, keeping incomplete
    /// header frames in `raw` until the rest arrives.
    fn feed(&mut self, raw: &mut BytesMut, out: &mut BytesMut) {
        loop {
            if self.mode == Mode::Transparent {
                out.extend_from_slice(&raw.split());
                return;
            }
            let left = if self.preface_left > 0 {
                &mut self.preface_left
            } else {
                &mut self.payload_left
            };
            if *left > 0 {
                let n = (*left).min(raw.len());
                if n == 0 {
                    return;
                }
                out.extend_from_slice(&raw.split_to(n));
                *left -= n;
                continue;
            }
            if raw.len() < FRAME_HEADER_LEN {
                return;
            }
            let length = usize::from(raw[0]) << 16 | usize::from(raw[1]) << 8 | usize::from(raw[2]);
            let kind = raw[3];
            let flags = raw[4];
            let stream_id = u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff;
            let in_block = self.pending.is_some();
            let header_frame = match kind {
                HEADERS => !in_block,
                CONTINUATION => in_block,
                _ => false,
            };
            if !header_frame {
                if in_block || kind == HEADERS {
                    // A frame inside a header block, or a block opened twice:
                    // a protocol error h2 reports better than we could.
                    self.step_aside(out);
                    continue;
                }
                out.extend_from_slice(&raw.split_to(FRAME_HEADER_LEN));
                self.payload_left = length;
                continue;
            }
            let buffered = self.pending.as_ref().map_or(0, |p| p.frames.len());
            if buffered + length > MAX_BLOCK
                || self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.stream_id != stream_id)
            {
                self.step_aside(out);
                continue;
            }
            if raw.len() < FRAME_HEADER_LEN + length {
                return;
            }
            let frame = raw.split_to(FRAME_HEADER_LEN + length);
            self.header_frame(frame, kind, flags, stream_id, out);
        }
    }

    /// At end of input: passes on whatever is left, for h2 to judge.
    fn finish(&mut self, raw: &mut BytesMut, out: &mut BytesMut) {
        self.mode = Mode::Transparent;
        if let Some(pending) = self.pending.take() {
            out.extend_from_slice(&pending.frames);
        }
        out.extend_from_slice(&raw.split());
    }

    /// Gives up on this connection: bytes from here on pass through.
    fn step_aside(&mut self, out: &mut BytesMut) {
        if self.mode != Mode::Transparent {
            tracing::debug!(peer = ?self.peer, "unexpected HTTP/2 input; no longer inspecting this connection");
        }
        self.mode = Mode::Transparent;
        if let Some(pending) = self.pending.take() {
            out.extend_from_slice(&pending.frames);
        }
    }

    fn header_frame(
        &mut self,
        frame: BytesMut,
        kind: u8,
        flags: u8,
        stream_id: u32,
        out: &mut BytesMut,
    ) {
        let payload = &frame[FRAME_HEADER_LEN..];
        let fragment = if kind == HEADERS {
            headers_fragment(payload, flags)
        } else {
            Some(payload)
        };
        let Some(fragment) = fragment else {
            out.extend_from_slice(&frame);
            self.step_aside(out);
            return;
        };
        let pending = self.pending.get_or_insert_with(|| Pending {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            frames: BytesMut::new(),
            block: BytesMut::new(),
        });
        pending.block.extend_from_slice(fragment);
        pending.frames.extend_from_slice(&frame);
        if flags & END_HEADERS != 0 {
            if let Some(pending) = self.pending.take() {
                self.header_block(pending, out);
            }
        }
    }

    /// Decodes one complete header block and passes it on, repaired if
    /// need be.
    fn header_block(&mut self, pending: Pending, out: &mut BytesMut) {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut malformed: Option<Vec<u8>> = None;
        let mut valid_authority = false;
        let replacement = &self.replacement;
        let decoded = self.decoder.decode_with_cb(&pending.block, |name, value| {
            if &*name == b":authority" && http::uri::Authority::try_from(&*value).is_err() {
                malformed = Some(value.into_owned());
                fields.push((name.into_owned(), replacement.to_vec()));
            } else {
                valid_authority |= &*name == b":authority";
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        if decoded.is_err() {
            self.pending = Some(pending);
            self.step_aside(out);
            return;
        }
        if let Some(bad) = malformed {
            self.repaired += 1;
            if self.mode == Mode::Forward {
                self.mode = Mode::Reencode;
                tracing::debug!(
                    peer = ?self.peer,
                    authority = %String::from_utf8_lossy(&bad),
                    replacement = %String::from_utf8_lossy(&self.replacement),
                    "malformed :authority (a multi-address target?); serving it as this server's address"
                );
            }
        }
        match self.mode {
            Mode::Forward | Mode::Transparent => out.extend_from_slice(&pending.frames),
            Mode::Reencode => encode_block(&fields, pending.stream_id, pending.end_stream, out),
        }
        if self.mode == Mode::Forward && valid_authority {
            // The client's authority is fine; see the module docs.
            self.mode = Mode::Transparent;
        }
    }
}

/// The HPACK bytes of a HEADERS frame's payload, or `None` when its padding
/// or priority fields do not fit.
fn headers_fragment(payload: &[u8], flags: u8) -> Option<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = usize::from(*payload.first()?);
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end)
}

/// Writes `fields` as a header block of plain literals (no table, no
/// Huffman), in HEADERS and CONTINUATION frames no larger than any peer
/// accepts. Priority information is dropped: RFC 9113 deprecates it and h2
/// ignores it.
fn encode_block(
    fields: &[(Vec<u8>, Vec<u8>)],
    stream_id: u32,
    end_stream: bool,
    out: &mut BytesMut,
) {
    let mut block = BytesMut::new();
    for (name, value) in fields {
        // "Literal Header Field without Indexing — New Name" (RFC 7541 §6.2.2).
        block.put_u8(0);
        encode_string(name, &mut block);
        encode_string(value, &mut block);
    }
    let mut chunks = block.chunks(MIN_MAX_FRAME_SIZE).peekable();
    let mut first = true;
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        let mut flags = if last { END_HEADERS } else { 0 };
        let kind = if first {
            if end_stream {
                flags |= END_STREAM;
            }
            HEADERS
        } else {
            CONTINUATION
        };
        let length = chunk.len();
        out.put_u8((length >> 16) as u8);
        out.put_u16(length as u16);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream_id);
        out.extend_from_slice(chunk);
        first = false;
        if last {
            return;
        }
    }
}

/// An HPACK string literal without Huffman coding (RFC 7541 §5.2).
fn encode_string(bytes: &[u8], out: &mut BytesMut) {
    encode_integer(bytes.len(), 7, 0, out);
    out.extend_from_slice(bytes);
}

/// An HPACK integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1).
fn encode_integer(mut value: usize, prefix_bits: u32, high_bits: u8, out: &mut BytesMut) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.put_u8(high_bits | value as u8);
        return;
    }
    out.put_u8(high_bits | max_prefix as u8);
    value -= max_prefix;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
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
