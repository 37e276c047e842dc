//! A request body that can be sent again: each attempt of a call reads the
//! same frames, pulled once from the caller's body and kept (as `Bytes`,
//! shared, not copied) until the call commits. Hedged attempts read at
//! once: whichever reaches the end of what is kept pulls the next frame
//! and wakes the others.
//!
//! The buffer is capped per call and per channel (gRFC A6's memory
//! management). The attempt whose frame would pass a cap is committed: it
//! goes on alone, unbuffered, and the call is retried no more.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

/// Which attempt of a call reads a [`ReplayBody`].
pub(crate) type AttemptId = u32;

/// The call's hold on its request body: hands out one [`ReplayBody`] per
/// attempt and commits.
#[derive(Clone)]
pub(crate) struct Replay {
    shared: Arc<Mutex<State>>,
}

/// What every attempt's body reads from.
struct State {
    /// The caller's body; `None` once it ended.
    source: Option<tonic::body::Body>,
    /// How the source ended, when it ended with an error.
    failed: Option<Status>,
    /// Frames kept for replay, the first being frame number `offset`.
    frames: VecDeque<Frame<Bytes>>,
    offset: usize,
    /// Bytes of data held in `frames`.
    held: usize,
    /// Most bytes one call may hold.
    limit: usize,
    /// Bytes held by every call of the channel, and their cap.
    channel: Arc<ChannelBudget>,
    /// The attempt that goes on alone, once there is one.
    committed: Option<AttemptId>,
    /// Attempts waiting for a frame another attempt is pulling.
    waiting: Vec<Waker>,
}

/// The per-channel cap on bytes kept for replay, across all its calls.
#[derive(Debug)]
pub(crate) struct ChannelBudget {
    held: AtomicUsize,
    limit: usize,
}

impl ChannelBudget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes kept now by every call.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= self.limit).then_some(held + bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl Replay {
    /// Keeps up to `limit` bytes of `body` for replay, within `channel`.
    pub(crate) fn new(body: tonic::body::Body, limit: usize, channel: Arc<ChannelBudget>) -> Self {
        Self {
            shared: Arc::new(Mutex::new(State {
                source: Some(body),
                failed: None,
                frames: VecDeque::new(),
                offset: 0,
                held: 0,
                limit,
                channel,
                committed: None,
                waiting: Vec::new(),
            })),
        }
    }

    /// The body attempt `id` sends, from the first frame.
    pub(crate) fn body(&self, id: AttemptId) -> ReplayBody {
        ReplayBody {
            shared: self.shared.clone(),
            id,
            next: 0,
        }
    }

    /// Commits the call to attempt `id` (if no other attempt was): only it
    /// reads on, and nothing more is kept.
    pub(crate) fn commit(&self, id: AttemptId) {
        let mut state = self.lock();
        if state.committed.is_none() {
            state.committed = Some(id);
        }
        state.wake_all();
    }

    /// The attempt the call is committed to, if any.
    pub(crate) fn committed(&self) -> Option<AttemptId> {
        self.lock().committed
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn wake_all(&mut self) {
        for waker in self.waiting.drain(..) {
            waker.wake();
        }
    }

    fn free(&mut self, frames: usize) {
        for _ in 0..frames.min(self.frames.len()) {
            if let Some(frame) = self.frames.pop_front() {
                let len = frame.data_ref().map_or(0, Bytes::len);
                self.held -= len;
                self.channel.give_back(len);
            }
            self.offset += 1;
        }
    }

    /// Keeps `frame` for replay, unless that passes a cap: then `id` is
    /// committed and the frame is not kept.
    fn keep(&mut self, frame: &Frame<Bytes>, id: AttemptId) {
        let len = frame.data_ref().map_or(0, Bytes::len);
        if self.committed.is_none() && (self.held + len > self.limit || !self.channel.take(len)) {
            self.committed = Some(id);
        }
        if self.committed.is_some() {
            // Only the committed attempt reads on, and it has sent every
            // frame kept so far.
            self.free(self.frames.len());
            self.offset += 1;
            return;
        }
        self.held += len;
        self.frames.push_back(copy(frame));
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.channel.give_back(self.held);
    }
}

/// One attempt's request body.
pub(crate) struct ReplayBody {
    shared: Arc<Mutex<State>>,
    id: AttemptId,
    /// The number of the next frame to send.
    next: usize,
}

impl ReplayBody {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn copy(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match frame.data_ref() {
        Some(data) => Frame::data(data.clone()),
        None => Frame::trailers(frame.trailers_ref().cloned().unwrap_or_default()),
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let id = self.id;
        let next = self.next;
        let mut state = self.lock();
        let mine = state.committed.is_none_or(|winner| winner == id);
        if next < state.offset + state.frames.len() {
            if next < state.offset || !mine {
                return Poll::Ready(Some(Err(Status::cancelled(
                    "another attempt of this call was committed",
                ))));
            }
            let frame = copy(&state.frames[next - state.offset]);
            if state.committed == Some(id) {
                // Nobody else reads it again.
                let sent = next + 1 - state.offset;
                state.free(sent);
            }
            drop(state);
            self.next += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if !mine || next > state.offset + state.frames.len() {
            return Poll::Ready(Some(Err(Status::cancelled(
                "another attempt of this call was committed",
            ))));
        }
        let Some(source) = state.source.as_mut() else {
            return Poll::Ready(state.failed.clone().map(Err));
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                state.keep(&frame, id);
                state.wake_all();
                drop(state);
                self.next += 1;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => {
                state.source = None;
                state.failed = Some(status.clone());
                state.wake_all();
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                state.source = None;
                state.wake_all();
                Poll::Ready(None)
            }
            Poll::Pending => {
                // The source wakes this task; the others wait for it to
                // pull the frame, or to go away (see Drop).
                if !state.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                    state.waiting.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Asked after every frame: a source that knows it is done lets
        // hyper set END_STREAM on the last frame, instead of sending an
        // empty one after it.
        let state = self.lock();
        self.next >= state.offset + state.frames.len()
            && state.failed.is_none()
            && state.source.as_ref().is_none_or(|s| s.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        // This attempt may have been the one the source would wake: let a
        // waiting attempt poll it instead.
        self.lock().wake_all();
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    /// A caller's body of ready data frames.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
        }
    }

    fn frames(parts: &[&'static [u8]]) -> tonic::body::Body {
        tonic::body::Body::new(Chunks(
            parts.iter().map(|p| Bytes::from_static(p)).collect(),
        ))
    }

    fn read_all(body: &mut ReplayBody) -> Result<Vec<Bytes>, Status> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => out.push(frame.into_data().unwrap()),
                Poll::Ready(Some(Err(status))) => return Err(status),
                Poll::Ready(None) => return Ok(out),
                Poll::Pending => panic!("a ready source never pends"),
            }
        }
    }

    #[test]
    fn every_attempt_reads_the_same_frames() {
        let budget = Arc::new(ChannelBudget::new(1 << 20));
        let replay = Replay::new(frames(&[b"ab", b"cd"]), 1024, budget.clone());
        let first = read_all(&mut replay.body(0)).unwrap();
        assert_eq!(budget.held(), 4);
        let second = read_all(&mut replay.body(1)).unwrap();
        assert_eq!(first, second);
        assert_eq!(
            first,
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]
        );
        assert_eq!(replay.committed(), None);
        drop(replay);
        assert_eq!(budget.held(), 0, "the channel's budget is given back");
    }

    #[test]
    fn passing_the_call_limit_commits_the_attempt_that_passed_it() {
        let budget = Arc::new(ChannelBudget::new(1 << 20));
        let replay = Replay::new(frames(&[b"abc", b"defg", b"h"]), 5, budget.clone());
        let mut first = replay.body(0);
        assert_eq!(read_all(&mut first).unwrap().len(), 3);
        assert_eq!(replay.committed(), Some(0));
        assert_eq!(budget.held(), 0, "once committed, nothing is kept");
        assert!(
            read_all(&mut replay.body(1)).is_err(),
            "a later attempt cannot replay"
        );
    }

    #[test]
    fn the_channel_budget_caps_all_calls_together() {
        let budget = Arc::new(ChannelBudget::new(4));
        let one = Replay::new(frames(&[b"abc"]), 100, budget.clone());
        let two = Replay::new(frames(&[b"de"]), 100, budget.clone());
        read_all(&mut one.body(0)).unwrap();
        read_all(&mut two.body(0)).unwrap();
        assert_eq!((one.committed(), two.committed()), (None, Some(0)));
        drop(one);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_committed_attempt_frees_what_it_sent_and_the_others_stop() {
        let budget = Arc::new(ChannelBudget::new(1 << 20));
        let replay = Replay::new(frames(&[b"ab", b"cd"]), 1024, budget.clone());
        read_all(&mut replay.body(0)).unwrap();
        let mut winner = replay.body(1);
        replay.commit(1);
        assert_eq!(read_all(&mut winner).unwrap().len(), 2);
        assert_eq!(budget.held(), 0);
        assert!(read_all(&mut replay.body(2)).is_err());
    }
}
