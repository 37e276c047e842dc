//! Following a client's HTTP/2 frames and HPACK state through the header
//! blocks it sends, and re-encoding a block whose `:authority` h2 would
//! refuse (see the parent module for why).

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use loona_hpack::Decoder;

/// The client connection preface, `PRI * HTTP/2.0...`, in bytes.
pub(super) const PREFACE_LEN: usize = 24;
/// Length, type, flags and stream id.
pub(super) const FRAME_HEADER_LEN: usize = 9;
pub(super) const HEADERS: u8 = 0x1;
pub(super) const CONTINUATION: u8 = 0x9;
pub(super) const END_STREAM: u8 = 0x1;
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer must accept (RFC 9113 §4.2), so
/// re-encoded blocks are cut to it whatever h2 advertised.
pub(super) const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The HPACK table size a client may use while the server advertises none
/// (h2's default, under hyper and tonic).
pub(super) const DEFAULT_HEADER_TABLE_SIZE: usize = 4_096;
/// Header blocks larger than this are not inspected: h2's own header list
/// limit refuses them long before.
pub(super) const MAX_BLOCK: usize = 1 << 20;
/// How much one read from the socket asks for.
pub(super) const READ_CHUNK: usize = 16 * 1024;

/// What the repairer does with header blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
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
pub(super) struct Pending {
    /// The stream the block opens (or ends, for trailers).
    pub(super) stream_id: u32,
    /// The HEADERS frame also ended the stream.
    pub(super) end_stream: bool,
    /// The frames as received, passed on unchanged in [`Mode::Forward`].
    pub(super) frames: BytesMut,
    /// The HPACK bytes, without padding and priority.
    pub(super) block: BytesMut,
}

/// The inbound half of an HTTP/2 server connection, frame by frame.
pub(super) struct Repairer {
    /// The authority that replaces a malformed one.
    pub(super) replacement: Bytes,
    /// The client, for the log line.
    pub(super) peer: Option<SocketAddr>,
    pub(super) mode: Mode,
    /// Mirrors the client's HPACK encoder.
    pub(super) decoder: Decoder<'static>,
    /// Preface bytes still to pass on.
    pub(super) preface_left: usize,
    /// Payload bytes of the current non-header frame still to pass on.
    pub(super) payload_left: usize,
    pub(super) pending: Option<Pending>,
    /// Requests whose authority was replaced.
    pub(super) repaired: u64,
}

impl Repairer {
    pub(super) fn new(replacement: Bytes, peer: Option<SocketAddr>) -> Self {
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
    pub(super) fn feed(&mut self, raw: &mut BytesMut, out: &mut BytesMut) {
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
    pub(super) fn finish(&mut self, raw: &mut BytesMut, out: &mut BytesMut) {
        self.mode = Mode::Transparent;
        if let Some(pending) = self.pending.take() {
            out.extend_from_slice(&pending.frames);
        }
        out.extend_from_slice(&raw.split());
    }

    /// Gives up on this connection: bytes from here on pass through.
    pub(super) fn step_aside(&mut self, out: &mut BytesMut) {
        if self.mode != Mode::Transparent {
            tracing::debug!(peer = ?self.peer, "unexpected HTTP/2 input; no longer inspecting this connection");
        }
        self.mode = Mode::Transparent;
        if let Some(pending) = self.pending.take() {
            out.extend_from_slice(&pending.frames);
        }
    }

    pub(super) fn header_frame(
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
    pub(super) fn header_block(&mut self, pending: Pending, out: &mut BytesMut) {
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
pub(super) fn headers_fragment(payload: &[u8], flags: u8) -> Option<&[u8]> {
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
pub(super) fn encode_block(
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
pub(super) fn encode_string(bytes: &[u8], out: &mut BytesMut) {
    encode_integer(bytes.len(), 7, 0, out);
    out.extend_from_slice(bytes);
}

/// An HPACK integer with a `prefix_bits`-bit prefix (RFC 7541 §5.1).
pub(super) fn encode_integer(
    mut value: usize,
    prefix_bits: u32,
    high_bits: u8,
    out: &mut BytesMut,
) {
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
