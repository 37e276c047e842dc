//! Reading the server's first HTTP/2 frame header as it passes, the proof
//! that a connection counts as Ready (see the parent module).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The HTTP/2 frame type of SETTINGS (RFC 9113 §6.5).
const SETTINGS_FRAME: u8 = 0x4;
/// Length of an HTTP/2 frame header (RFC 9113 §4.1).
const FRAME_HEADER_LEN: usize = 9;

/// Passes I/O through and reports the server's first frame header once all
/// nine bytes of it have been read: `Ok` for a SETTINGS frame on stream 0,
/// which every HTTP/2 server sends first and is proof the process serves;
/// `Err(type)` for anything else. Nothing is reported for a connection
/// that closes or resets before then, so it can never pass for Ready.
pub(super) struct FirstFrame<T> {
    inner: T,
    header: [u8; FRAME_HEADER_LEN],
    seen: usize,
    heard: Option<oneshot::Sender<Result<(), u8>>>,
}

impl<T> FirstFrame<T> {
    pub(super) fn new(inner: T, heard: oneshot::Sender<Result<(), u8>>) -> Self {
        Self {
            inner,
            header: [0; FRAME_HEADER_LEN],
            seen: 0,
            heard: Some(heard),
        }
    }

    /// Takes note of bytes just read.
    fn observe(&mut self, bytes: &[u8]) {
        if self.heard.is_none() {
            return;
        }
        let take = bytes.len().min(FRAME_HEADER_LEN - self.seen);
        self.header[self.seen..self.seen + take].copy_from_slice(&bytes[..take]);
        self.seen += take;
        if self.seen == FRAME_HEADER_LEN {
            let frame_type = self.header[3];
            let stream_id = u32::from_be_bytes([
                self.header[5] & 0x7f,
                self.header[6],
                self.header[7],
                self.header[8],
            ]);
            let verdict = if frame_type == SETTINGS_FRAME && stream_id == 0 {
                Ok(())
            } else {
                Err(frame_type)
            };
            if let Some(heard) = self.heard.take() {
                let _ = heard.send(verdict);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstFrame<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let fresh = &buf.filled()[before..];
            self.observe(fresh);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstFrame<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
