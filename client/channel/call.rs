//! The send path of one call: its method's service config (timeout,
//! wait-for-ready, retry or hedging policy), its deadline over every
//! attempt, and the attempts themselves (gRFC A6).
//!
//! Every call's request body is kept for replay until the call commits,
//! which happens when response headers arrive or the body passes its
//! buffer caps. Before that:
//! - a request that never left this process is picked again, as often as
//!   it takes until the deadline (inside [`Shared::attempt`]);
//! - one the server refused unseen (REFUSED_STREAM, a graceful GOAWAY) is
//!   sent once more, whatever the policy;
//! - a retry policy retries a trailers-only or failed attempt whose status
//!   it lists, after a backoff or the server's pushback, within
//!   `maxAttempts` and the channel's throttle;
//! - a hedging policy sends attempts `hedgingDelay` apart (at once after a
//!   non-fatal status), and the first answer wins: the others are
//!   cancelled by dropping them.
//!
//! None of the transparent sends count toward `maxAttempts` or the
//! throttle.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tonic::Status;

use super::attempt::{
    grpc_status, grpc_timeout, Attempt, CallContext, CallSlot, ResponseBody, Tried,
};
use super::Shared;
use crate::client::error::Error;
use crate::client::metrics::MethodMetrics;
use crate::client::retry::replay::{AttemptId, Replay};
use crate::client::retry::throttle::Throttle;
use crate::client::retry::{Pushback, Retries, Stop, PREVIOUS_ATTEMPTS};
use crate::client::ring_hash::RequestHash;
use crate::service_config::{CallPolicy, HedgingPolicy, RetryPolicy};

/// Marks a request as wait-for-ready: instead of failing fast when no
/// backend is Ready, it waits for one until its deadline. Insert it into a
/// `tonic::Request`'s extensions.
#[derive(Debug, Clone, Copy)]
pub struct WaitForReady;

/// What a call hands back to tonic.
type Answer = Result<http::Response<ResponseBody>, Status>;

/// One call between its start and its commit.
struct Call<'a> {
    shared: &'a Shared,
    /// The request as the caller made it, less its body and extensions:
    /// each attempt sends a copy.
    parts: http::request::Parts,
    /// The caller's extensions, until the first attempt takes them.
    extensions: std::sync::Mutex<Option<http::Extensions>>,
    /// Whether the deadline is the caller's own `grpc-timeout`.
    caller_timeout: bool,
    replay: Replay,
    deadline: Option<Instant>,
    wait_for_ready: bool,
    /// The caller's ring_hash key, if it gave one: kept here because
    /// only the first attempt gets the extensions, and every attempt
    /// picks by it.
    hash: Option<u64>,
    /// Whether any attempt reached a pick (for the unpicked count).
    picked: AtomicBool,
    /// Attempts sent so far, transparent ones included: each reads the
    /// body under its own id.
    sent: AtomicU32,
    /// Sends that did not count toward the policy.
    transparent: AtomicU32,
    /// Whether a refused-unseen send was already made again: once per call.
    refused_before: AtomicBool,
    /// The backends this call's attempts went to, when it has a policy:
    /// a retry or hedge prefers one it has not tried.
    tried: Option<Tried>,
    /// Retries and hedges, for the call's metrics.
    retried: AtomicU32,
    hedged: AtomicU32,
    /// The method's series, if the channel has metrics.
    metrics: Option<Arc<MethodMetrics>>,
    /// The retry token bucket of the config in force, if it has one.
    throttle: Option<Arc<Throttle>>,
}

impl Shared {
    pub(super) async fn send(&self, request: http::Request<tonic::body::Body>) -> Answer {
        let started = Instant::now();
        // Loaded once: the whole call follows the config in force when it
        // started, even if a new one arrives meanwhile.
        let config = self.config.load_full();
        // A32: past the config's cap on calls in flight, fail at once
        // rather than queue more load onto a service that is behind.
        let slot = match config.service_config.circuit_breakers() {
            Some(limit) => match CallSlot::take(&self.calls_in_flight, limit.max_requests) {
                Some(slot) => Some(slot),
                None => {
                    if let Some(metrics) = &self.metrics {
                        metrics.unpicked(tonic::Code::Unavailable);
                    }
                    self.retries.stats.count_breaker_rejection();
                    return Err(Status::unavailable(format!(
                        "circuit breaker open: {} calls already in flight to {} \
                         (the service config's circuitBreakers.maxRequests)",
                        limit.max_requests, self.service
                    )));
                }
            },
            None => None,
        };
        let method = config.service_config.method(request.uri().path());
        let (mut parts, body) = request.into_parts();
        let extensions = std::mem::take(&mut parts.extensions);
        let metrics = self.metrics.as_ref().map(|m| m.method(parts.uri.path()));
        // The config's timeout bounds the call unless the caller's own
        // deadline is sooner.
        let caller = grpc_timeout(&parts.headers);
        let config_timeout = method.and_then(|m| m.timeout);
        let timeout = match (caller, config_timeout) {
            (Some(caller), Some(config)) => Some(caller.min(config)),
            (caller, config) => caller.or(config).or(self.default_timeout),
        };
        let wait_for_ready = extensions.get::<WaitForReady>().is_some()
            || method
                .and_then(|m| m.wait_for_ready)
                .unwrap_or(self.wait_for_ready);
        let hash = extensions.get::<RequestHash>().map(|h| h.0);
        let policy = method
            .and_then(|m| m.policy.as_ref())
            .filter(|_| self.retries.enabled);
        let call = Call {
            shared: self,
            caller_timeout: caller.is_some() && timeout == caller,
            parts,
            extensions: std::sync::Mutex::new(Some(extensions)),
            replay: Replay::new(
                body,
                self.retries.per_call_buffer,
                self.retries.budget.clone(),
            ),
            deadline: timeout.map(|t| Instant::now() + t),
            wait_for_ready,
            hash,
            picked: AtomicBool::new(false),
            sent: Default::default(),
            transparent: Default::default(),
            refused_before: AtomicBool::new(false),
            tried: policy.map(|_| Tried::default()),
            retried: Default::default(),
            hedged: Default::default(),
            metrics,
            throttle: config.throttle.clone(),
        };
        let run = async {
            match policy {
                Some(CallPolicy::Retry(retry)) => call.retry(retry).await,
                Some(CallPolicy::Hedging(hedging)) => call.hedge(hedging).await,
                None => call.once().await,
            }
        };
        let mut answer = match call.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, run)
                .await
                .unwrap_or_else(|_| Err(self.deadline_exceeded().into())),
            None => run.await,
        };
        if let (Err(status), Some(metrics)) = (&answer, &self.metrics) {
            if !call.picked.load(Ordering::Relaxed) {
                metrics.unpicked(status.code());
            }
        }
        let transparent = call.transparent.load(Ordering::Relaxed);
        self.retries.stats.count_transparent(transparent);
        if let Some(metrics) = call.metrics {
            metrics.extra_attempts(
                call.retried.load(Ordering::Relaxed),
                transparent,
                call.hedged.load(Ordering::Relaxed),
            );
            match &mut answer {
                Ok(response) => response.body_mut().ends_call(metrics, started),
                Err(status) => metrics.call_ended(status.code(), started.elapsed()),
            }
        }
        if let Ok(response) = &mut answer {
            response.body_mut().hold(slot);
        }
        answer
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

/// How an attempt that did not commit the call ended.
struct Failure {
    code: tonic::Code,
    pushback: Option<Pushback>,
    /// What the caller gets if it is the last.
    answer: Answer,
}

/// An attempt's end, sorted for the policies.
enum Sorted {
    /// Headers without a status, or an OK: the call is answered.
    Commit(Answer),
    /// Refused unseen: may be sent again once.
    Refused(Status),
    /// Failed before any headers, or trailers-only with a failure.
    Failure(Failure),
}

fn sort(attempt: Attempt) -> Sorted {
    match attempt {
        Attempt::Answered(response) => match grpc_status(response.headers()) {
            None | Some(tonic::Code::Ok) => Sorted::Commit(Ok(response)),
            Some(code) => Sorted::Failure(Failure {
                code,
                pushback: Pushback::of(response.headers()),
                answer: Ok(response),
            }),
        },
        Attempt::Failed {
            status,
            refused: true,
        } => Sorted::Refused(status),
        Attempt::Failed { status, .. } => Sorted::Failure(Failure {
            code: status.code(),
            pushback: None,
            answer: Err(status),
        }),
    }
}

impl Call<'_> {
    /// Sorts an attempt's end for the policies; a refusal is `Refused` (to
    /// be sent again, uncounted) only the first time in the call, after
    /// that an ordinary failure.
    fn sort(&self, attempt: Attempt) -> Sorted {
        match sort(attempt) {
            Sorted::Refused(status) => {
                if !self.shared.retries.transparent
                    || self.refused_before.swap(true, Ordering::Relaxed)
                {
                    Sorted::Failure(Failure {
                        code: status.code(),
                        pushback: None,
                        answer: Err(status),
                    })
                } else {
                    self.transparent.fetch_add(1, Ordering::Relaxed);
                    Sorted::Refused(status)
                }
            }
            sorted => sorted,
        }
    }

    /// Sends attempt number `previous + 1` (the header a server reads it
    /// from is absent on the first) with what is left of the deadline.
    async fn attempt(&self, previous: u32) -> (AttemptId, Attempt) {
        let id = self.sent.fetch_add(1, Ordering::Relaxed);
        let mut request = http::Request::new(tonic::body::Body::new(self.replay.body(id)));
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = self.parts.uri.clone();
        *request.version_mut() = self.parts.version;
        *request.headers_mut() = self.parts.headers.clone();
        // Only layers above the channel read extensions (hyper reads none
        // that tonic sets), so the first attempt takes them rather than a
        // copy, and later ones go without.
        if let Some(extensions) = self
            .extensions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            *request.extensions_mut() = extensions;
        }
        let headers = request.headers_mut();
        match self.deadline {
            // The first attempt is sent the caller's own grpc-timeout: it
            // is what is left.
            Some(_) if id == 0 && self.caller_timeout => {}
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                headers.insert("grpc-timeout", encode_timeout(left));
            }
            None => {}
        }
        headers.remove(PREVIOUS_ATTEMPTS);
        if previous > 0 {
            headers.insert(PREVIOUS_ATTEMPTS, previous.into());
        }
        let picked = AtomicBool::new(false);
        let started = Instant::now();
        if let Some(metrics) = &self.metrics {
            metrics.attempt_started();
        }
        let attempt = self
            .shared
            .attempt(
                request,
                &CallContext {
                    wait_for_ready: self.wait_for_ready,
                    deadline: self.deadline,
                    tried: self.tried.as_ref(),
                    method: self.metrics.as_ref(),
                    throttle: self.throttle.as_ref(),
                    hash: self.hash,
                },
                &picked,
            )
            .await;
        if picked.load(Ordering::Relaxed) {
            self.picked.store(true, Ordering::Relaxed);
        } else if let (Some(metrics), Attempt::Failed { status, .. }) = (&self.metrics, &attempt) {
            // No pick, no outcome to report it.
            metrics.attempt_ended(status.code(), started.elapsed());
        }
        (id, attempt)
    }

    /// No policy: one attempt, sent once more if it was refused unseen.
    async fn once(&self) -> Answer {
        loop {
            let (id, attempt) = self.attempt(0).await;
            match self.sort(attempt) {
                Sorted::Refused(_) => {}
                Sorted::Commit(answer) | Sorted::Failure(Failure { answer, .. }) => {
                    self.replay.commit(id);
                    return answer;
                }
            }
        }
    }

    /// A retry policy: one attempt at a time.
    async fn retry(&self, policy: &RetryPolicy) -> Answer {
        let throttle = self.throttle.as_deref();
        let stats = &self.shared.retries.stats;
        let mut retries = Retries::new(policy, throttle);
        loop {
            let (id, attempt) = self.attempt(retries.attempts() - 1).await;
            let failure = match self.sort(attempt) {
                Sorted::Commit(answer) => {
                    self.replay.commit(id);
                    return answer;
                }
                Sorted::Refused(_) => continue,
                Sorted::Failure(failure) => failure,
            };
            // A body past its buffer cap cannot be sent again.
            if self.replay.committed().is_some() {
                return failure.answer;
            }
            if failure.pushback.is_some() {
                self.pushback();
            }
            match retries.after_failure(failure.code, failure.pushback) {
                Ok(delay) => {
                    drop(failure);
                    stats.count_retry();
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                }
                Err(stop) => {
                    if stop == Stop::Throttled {
                        self.throttled();
                    }
                    self.replay.commit(id);
                    return failure.answer;
                }
            }
        }
    }

    /// A hedging policy: attempts side by side, the first answer wins.
    async fn hedge(&self, policy: &HedgingPolicy) -> Answer {
        let throttle = self.throttle.as_deref();
        let stats = &self.shared.retries.stats;
        let mut live = FuturesUnordered::new();
        live.push(self.attempt(0));
        let mut hedges = 1;
        let mut next_hedge = Instant::now() + policy.hedging_delay;
        // No more hedges: a pushback said so, or the throttle.
        let mut frozen = false;
        let mut last: Option<Answer> = None;
        loop {
            let may_hedge = hedges < policy.max_attempts && !frozen;
            tokio::select! {
                Some((id, attempt)) = live.next() => {
                    let failure = match self.sort(attempt) {
                        Sorted::Commit(answer) => {
                            self.replay.commit(id);
                            return answer;
                        }
                        Sorted::Refused(_) => {
                            // It replaces itself, uncounted.
                            live.push(self.attempt(hedges - 1));
                            continue;
                        }
                        Sorted::Failure(failure) => failure,
                    };
                    let fatal = !policy.non_fatal_codes.contains(failure.code);
                    if fatal || self.replay.committed() == Some(id) {
                        self.replay.commit(id);
                        return failure.answer;
                    }
                    if throttle.is_some_and(|t| !t.failure()) {
                        frozen = true;
                        self.throttled();
                    }
                    match failure.pushback {
                        Some(Pushback::Stop) => frozen = true,
                        Some(Pushback::After(delay)) => next_hedge = Instant::now() + delay,
                        None => next_hedge = Instant::now(),
                    }
                    if failure.pushback.is_some() {
                        self.pushback();
                    }
                    last = Some(failure.answer);
                    let may_hedge = hedges < policy.max_attempts && !frozen;
                    if live.is_empty() && (!may_hedge || self.replay.committed().is_some()) {
                        return last.unwrap_or_else(|| Err(Status::internal("no attempt")));
                    }
                }
                () = tokio::time::sleep_until(next_hedge), if may_hedge => {
                    if self.replay.committed().is_some() || throttle.is_some_and(|t| !t.allows()) {
                        frozen = true;
                        if live.is_empty() {
                            return last.unwrap_or_else(|| Err(Status::internal("no attempt")));
                        }
                        continue;
                    }
                    live.push(self.attempt(hedges));
                    hedges += 1;
                    stats.count_hedge();
                    self.hedged.fetch_add(1, Ordering::Relaxed);
                    next_hedge = Instant::now() + policy.hedging_delay;
                }
                else => {
                    return last.unwrap_or_else(|| Err(Status::internal("no attempt")));
                }
            }
        }
    }
}

impl Call<'_> {
    fn throttled(&self) {
        self.shared.retries.stats.count_throttled();
        if let Some(metrics) = &self.shared.metrics {
            metrics.throttled();
        }
    }

    fn pushback(&self) {
        self.shared.retries.stats.count_pushback();
        if let Some(metrics) = &self.shared.metrics {
            metrics.pushback();
        }
    }
}

/// `duration` as a `grpc-timeout` value: at most 8 digits, in the finest
/// unit that fits.
fn encode_timeout(duration: Duration) -> http::HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = duration.as_nanos().max(1);
    let (amount, unit) = [
        (nanos, 'n'),
        (nanos / 1_000, 'u'),
        (nanos / 1_000_000, 'm'),
        (nanos / 1_000_000_000, 'S'),
        (nanos / 60_000_000_000, 'M'),
    ]
    .into_iter()
    .find(|(amount, _)| *amount <= MAX)
    .unwrap_or(((nanos / 3_600_000_000_000).min(MAX), 'H'));
    http::HeaderValue::from_str(&format!("{amount}{unit}"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("99999999H"))
}

/// Counts of the channel's retries, for its metrics and for tests.
#[derive(Debug, Default)]
pub struct RetryStats {
    retries: std::sync::atomic::AtomicU64,
    transparent: std::sync::atomic::AtomicU64,
    hedges: std::sync::atomic::AtomicU64,
    throttled: std::sync::atomic::AtomicU64,
    pushbacks: std::sync::atomic::AtomicU64,
    breaker_rejections: std::sync::atomic::AtomicU64,
}

impl RetryStats {
    fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    fn count_transparent(&self, n: u32) {
        if n > 0 {
            self.transparent.fetch_add(u64::from(n), Ordering::Relaxed);
        }
    }
    fn count_hedge(&self) {
        self.hedges.fetch_add(1, Ordering::Relaxed);
    }
    fn count_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }
    fn count_breaker_rejection(&self) {
        self.breaker_rejections.fetch_add(1, Ordering::Relaxed);
    }
    fn count_pushback(&self) {
        self.pushbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Retries sent under a retry policy.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
    /// Requests sent again because the server refused them unseen.
    pub fn transparent_retries(&self) -> u64 {
        self.transparent.load(Ordering::Relaxed)
    }
    /// Hedged attempts sent after the first.
    pub fn hedges(&self) -> u64 {
        self.hedges.load(Ordering::Relaxed)
    }
    /// Retries or hedges the throttle held back.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }
    /// Calls refused at once because `circuitBreakers.maxRequests` were
    /// already in flight.
    pub fn breaker_rejections(&self) -> u64 {
        self.breaker_rejections.load(Ordering::Relaxed)
    }
    /// Attempts whose server sent `grpc-retry-pushback-ms`.
    pub fn pushbacks(&self) -> u64 {
        self.pushbacks.load(Ordering::Relaxed)
    }
}

/// The channel's retry settings.
pub(super) struct RetrySettings {
    /// Whether service-config retry and hedging policies apply
    /// (transparent retries are `transparent`).
    pub(super) enabled: bool,
    /// Whether a request refused unseen is sent once more.
    pub(super) transparent: bool,
    /// Most request bytes one call keeps for replay.
    pub(super) per_call_buffer: usize,
    /// Most request bytes all calls keep together.
    pub(super) budget: Arc<crate::client::retry::replay::ChannelBudget>,
    /// Counts; always kept, they cost an atomic add per retry.
    pub(super) stats: Arc<RetryStats>,
}
