//! gRFC A6 through real sockets: retry and hedging policies from the
//! service config, throttling, pushback, the attempt header, the deadline
//! over all attempts, replay of streamed requests until commit, and
//! transparent retry of streams a server refused unseen. Every assertion
//! is a cause (a status code, what a server saw, a counter), never a
//! stopwatch upper bound.

use std::time::Duration;

use switchboard::client::{BalancedChannel, PolicyKind, RetryStats};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use tonic::Code;

use crate::common::faulty::{FaultyEcho, Step};
use crate::common::refusing::Refusing;
use crate::common::{backend_of, wait_for, wait_ready_set, STARTUP};

const UNARY: &str = "grpc.examples.echo.Echo";

/// A round_robin channel over `backends` under `config`.
fn channel(backends: &[&str], config: &str) -> BalancedChannel {
    BalancedChannel::builder(&format!("static:///{}", backends.join(",")))
        .unwrap()
        .policy(PolicyKind::RoundRobin)
        .service_config_json(config)
        .unwrap()
        .build()
}

fn retry_config(max_attempts: u32, initial_backoff: &str, codes: &str) -> String {
    format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{UNARY}"}}],
            "retryPolicy": {{"maxAttempts": {max_attempts}, "initialBackoff": "{initial_backoff}",
              "maxBackoff": "{initial_backoff}", "backoffMultiplier": 1,
              "retryableStatusCodes": [{codes}]}}}}]}}"#
    )
}

async fn echo(channel: &BalancedChannel, message: &str) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(EchoRequest {
        message: message.into(),
    });
    request.set_timeout(Duration::from_secs(20));
    EchoClient::new(channel.clone())
        .unary_echo(request)
        .await
        .map(|r| r.into_inner().message)
}

fn counts(stats: &RetryStats) -> [u64; 5] {
    [
        stats.retries(),
        stats.transparent_retries(),
        stats.hedges(),
        stats.throttled(),
        stats.pushbacks(),
    ]
}

#[tokio::test]
async fn a_failing_backend_costs_no_call_under_a_retry_policy() {
    let broken = FaultyEcho::start().await;
    let healthy = FaultyEcho::start().await;
    broken.faults.set_fail(true);
    let channel = channel(
        &[&broken.address, &healthy.address],
        &retry_config(5, "0.01s", r#""UNAVAILABLE""#),
    );
    wait_ready_set(
        &channel,
        &[broken.address.clone(), healthy.address.clone()],
        STARTUP,
    )
    .await;
    for i in 0..40 {
        let reply = echo(&channel, &format!("m{i}")).await.expect("retried");
        assert_eq!(backend_of(&reply), healthy.address);
    }
    // Every failure was retried, and the retry said which attempt it was.
    let failures = broken.faults.calls() as u64;
    assert!(failures > 0, "round_robin sent the broken backend nothing");
    assert_eq!(channel.retry_stats().retries(), failures);
    let retried: Vec<_> = broken
        .faults
        .seen()
        .into_iter()
        .chain(healthy.faults.seen())
        .filter_map(|s| s.previous)
        .collect();
    assert_eq!(retried.len() as u64, failures, "{retried:?}");
    assert!(retried
        .iter()
        .all(|p| p.parse::<u32>().is_ok_and(|n| (1..5).contains(&n))));
}

/// round_robin that hands out each pick twice in a row (A, A, B, B, ...):
/// a policy that, unlike plain round robin, may pick a retry's failed
/// backend again.
mod twice {
    use std::sync::{Arc, Mutex};

    use switchboard::client::round_robin::RoundRobin;
    use switchboard::client::subchannel::ReadyConnection;
    use switchboard::client::{Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker};
    use switchboard::discovery::{Applied, EndpointSet};

    #[derive(Default)]
    pub struct Twice(RoundRobin);

    struct TwicePicker {
        inner: Arc<dyn Picker>,
        /// The pick to hand out once more.
        again: Mutex<Option<Arc<ReadyConnection>>>,
    }

    impl Picker for TwicePicker {
        fn pick(&self, info: &PickInfo<'_>) -> Pick {
            let mut again = self.again.lock().unwrap();
            if let Some(connection) = again.take() {
                return Pick::Connection {
                    connection,
                    done: None,
                };
            }
            let pick = self.inner.pick(info);
            if let Pick::Connection { connection, .. } = &pick {
                *again = Some(connection.clone());
            }
            pick
        }
        fn connections(&self) -> &[Arc<ReadyConnection>] {
            self.inner.connections()
        }
    }

    impl Policy for Twice {
        fn name(&self) -> &'static str {
            "twice"
        }
        fn endpoints_changed(
            &mut self,
            endpoints: &EndpointSet,
            changes: &Applied,
            cx: &mut PolicyContext<'_>,
        ) {
            self.0.endpoints_changed(endpoints, changes, cx)
        }
        fn subchannel_changed(&mut self, id: u64, cx: &mut PolicyContext<'_>) {
            self.0.subchannel_changed(id, cx)
        }
        fn take_picker(&mut self) -> Option<PolicyPicker> {
            let mut published = self.0.take_picker()?;
            published.picker = Arc::new(TwicePicker {
                inner: published.picker,
                again: Mutex::new(None),
            });
            Some(published)
        }
    }
}

#[tokio::test]
async fn a_retry_avoids_the_backend_that_just_failed_it() {
    let broken = FaultyEcho::start().await;
    let healthy = FaultyEcho::start().await;
    broken.faults.set_fail(true);
    let channel =
        BalancedChannel::builder(&format!("static:///{},{}", broken.address, healthy.address))
            .unwrap()
            .custom_policy(twice::Twice::default())
            .service_config_json(&retry_config(2, "0.01s", r#""UNAVAILABLE""#))
            .unwrap()
            .build();
    wait_ready_set(
        &channel,
        &[broken.address.clone(), healthy.address.clone()],
        STARTUP,
    )
    .await;
    // The picker offers a failed call's retry the same backend half the
    // time; with one retry allowed, each such call would fail.
    for i in 0..20 {
        let reply = echo(&channel, &format!("m{i}"))
            .await
            .expect("retried elsewhere");
        assert_eq!(backend_of(&reply), healthy.address);
    }
    let failures = broken.faults.calls() as u64;
    assert!(failures > 0, "the broken backend was never picked");
    assert_eq!(channel.retry_stats().retries(), failures);
    // No call was sent to the broken backend twice.
    assert!(broken.faults.seen().iter().all(|s| s.previous.is_none()));
}

#[tokio::test]
async fn only_the_listed_codes_are_retried_and_attempts_are_capped() {
    let server = FaultyEcho::start().await;
    let mut registry = prometheus_client::registry::Registry::default();
    let channel = BalancedChannel::builder(&format!("static:///{}", server.address))
        .unwrap()
        .service_config_json(&retry_config(3, "0.01s", r#""UNAVAILABLE""#))
        .unwrap()
        .metrics(&mut registry)
        .build();
    server.faults.script([Step::Fail(Code::Internal)]);
    let status = echo(&channel, "x").await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(server.faults.calls(), 1, "INTERNAL is not retryable here");

    server.faults.script(vec![Step::Fail(Code::Unavailable); 3]);
    let status = echo(&channel, "x").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        server.faults.calls(),
        4,
        "3 attempts in all, then the status"
    );
    let previous: Vec<_> = server.faults.seen()[1..]
        .iter()
        .map(|s| s.previous.clone())
        .collect();
    assert_eq!(previous, [None, Some("1".into()), Some("2".into())]);
    assert_eq!(counts(channel.retry_stats()), [2, 0, 0, 0, 0]);
    // The same under gRPC's metric names (gRFC A66, A96).
    let text = switchboard::metrics::render(&registry);
    let labels = format!(
        r#"grpc_method="{UNARY}/UnaryEcho",grpc_target="static:///{}""#,
        server.address
    );
    for (name, value) in [
        (
            format!("grpc_client_attempt_started_total{{{labels}}}"),
            4.0,
        ),
        (
            format!(
                r#"grpc_client_attempt_duration_seconds_count{{{labels},grpc_status="UNAVAILABLE"}}"#
            ),
            3.0,
        ),
        (
            format!(
                r#"grpc_client_call_duration_seconds_count{{{labels},grpc_status="INTERNAL"}}"#
            ),
            1.0,
        ),
        (
            format!(
                r#"grpc_client_call_duration_seconds_count{{{labels},grpc_status="UNAVAILABLE"}}"#
            ),
            1.0,
        ),
        (format!("grpc_client_call_retries_count{{{labels}}}"), 1.0),
        (format!("grpc_client_call_retries_sum{{{labels}}}"), 2.0),
    ] {
        assert_eq!(
            crate::common::sample(&text, &name),
            Some(value),
            "{name} in\n{text}"
        );
    }
}

#[tokio::test]
async fn pushback_replaces_the_backoff_or_stops_retries() {
    let server = FaultyEcho::start().await;
    // A backoff far beyond the deadline: only the pushback lets a retry in.
    let channel = channel(
        &[&server.address],
        &retry_config(3, "600s", r#""UNAVAILABLE""#),
    );
    server
        .faults
        .script([Step::Pushback(Code::Unavailable, "200"), Step::Answer]);
    echo(&channel, "x")
        .await
        .expect("retried after the pushback");
    let seen = server.faults.seen();
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(200));

    server
        .faults
        .script([Step::Pushback(Code::Unavailable, "-1"), Step::Answer]);
    let status = echo(&channel, "x").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        server.faults.calls(),
        3,
        "a negative pushback means no retry"
    );
    assert_eq!(counts(channel.retry_stats()), [1, 0, 0, 0, 2]);
}

#[tokio::test]
async fn the_throttle_stops_retries_while_tokens_are_at_half_or_below() {
    let server = FaultyEcho::start().await;
    server.faults.set_fail(true);
    let config = r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 5,
        "initialBackoff": "0.01s", "maxBackoff": "0.01s", "backoffMultiplier": 1,
        "retryableStatusCodes": ["UNAVAILABLE"]}}],
        "retryThrottling": {"maxTokens": 3, "tokenRatio": 0.5}}"#;
    let channel = channel(&[&server.address], config);
    // 3 tokens: the first failure leaves 2 (a retry may go), the second 1.
    echo(&channel, "x").await.unwrap_err();
    assert_eq!(server.faults.calls(), 2);
    echo(&channel, "x").await.unwrap_err();
    assert_eq!(server.faults.calls(), 3, "throttled: no retry at all");
    // Successes refill it: 0 + 6 × 0.5 = 3, so a failure leaves 2 again.
    server.faults.set_fail(false);
    for _ in 0..6 {
        echo(&channel, "x").await.unwrap();
    }
    server
        .faults
        .script([Step::Fail(Code::Unavailable), Step::Answer]);
    echo(&channel, "x").await.expect("retried again");
    assert_eq!(counts(channel.retry_stats()), [2, 0, 0, 2, 0]);
}

#[tokio::test]
async fn the_deadline_covers_every_attempt_and_each_is_sent_what_is_left() {
    let server = FaultyEcho::start().await;
    server.faults.set_fail(true);
    let config = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{UNARY}"}}], "timeout": "1.5s",
            "retryPolicy": {{"maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "0.5s",
              "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}}}]}}"#
    );
    let channel = channel(&[&server.address], &config);
    let mut client = EchoClient::new(channel.clone());
    // No deadline of its own: the config's 1.5 s covers all attempts,
    // which 4 backoffs of at least 0.4 s each cannot all fit in.
    let status = client
        .unary_echo(EchoRequest {
            message: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let timeouts: Vec<u64> = server
        .faults
        .seen()
        .iter()
        .map(|s| parse_timeout(s.timeout.as_deref().expect("a grpc-timeout")))
        .collect();
    assert!(timeouts.len() >= 2, "{timeouts:?}");
    assert!(timeouts[0] <= 1_500_000, "{timeouts:?}");
    assert!(timeouts.windows(2).all(|w| w[1] < w[0]), "{timeouts:?}");
}

/// A `grpc-timeout` value in microseconds.
fn parse_timeout(value: &str) -> u64 {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().unwrap();
    match unit {
        "n" => n / 1000,
        "u" => n,
        "m" => n * 1000,
        "S" => n * 1_000_000,
        other => panic!("unit {other}"),
    }
}

#[tokio::test]
async fn streamed_requests_are_replayed_until_commit_and_not_past_their_cap() {
    let server = FaultyEcho::start().await;
    let config = retry_config(3, "0.01s", r#""UNAVAILABLE""#);
    let channel = channel(&[&server.address], &config);
    let messages =
        || futures_util::stream::iter(["a", "b", "c"].map(|m| EchoRequest { message: m.into() }));
    server
        .faults
        .script([Step::Fail(Code::Unavailable), Step::Answer]);
    let reply = EchoClient::new(channel.clone())
        .client_streaming_echo(messages())
        .await
        .expect("replayed");
    assert_eq!(reply.into_inner().message, "a,b,c");
    assert_eq!(server.faults.calls(), 2);

    // A bidi call refused before any headers is replayed from its first
    // message on the next attempt.
    server
        .faults
        .script([Step::Fail(Code::Unavailable), Step::Answer]);
    let mut replies = EchoClient::new(channel.clone())
        .bidirectional_streaming_echo(messages())
        .await
        .expect("replayed")
        .into_inner();
    let mut echoed = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        echoed.push(reply.message);
    }
    assert_eq!(echoed.len(), 3, "{echoed:?}");
    assert!(
        echoed
            .iter()
            .zip(["a", "b", "c"])
            .all(|(r, m)| r.starts_with(m)),
        "{echoed:?}"
    );
    assert_eq!(server.faults.calls(), 4);

    // A server stream that failed after its headers had committed the
    // call: its status is the caller's, not retried.
    server.faults.script([Step::Fail(Code::Unavailable)]);
    let mut replies = EchoClient::new(channel.clone())
        .server_streaming_echo(EchoRequest {
            message: "s".into(),
        })
        .await
        .expect("headers arrived")
        .into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "s");
    assert_eq!(
        replies.message().await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(server.faults.calls(), 5, "committed: not retried");

    // A call whose body passes the per-call cap commits to its attempt.
    let capped = BalancedChannel::builder(&format!("static:///{}", server.address))
        .unwrap()
        .service_config_json(&config)
        .unwrap()
        .retry_buffer(8, 1 << 20)
        .build();
    server
        .faults
        .script([Step::Fail(Code::Unavailable), Step::Answer]);
    let status = EchoClient::new(capped.clone())
        .client_streaming_echo(messages())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.faults.calls(), 6, "not retried past the cap");
    assert_eq!(capped.retry_stats().retries(), 0);
}

#[tokio::test]
async fn hedging_answers_from_whichever_backend_answers_and_cancels_the_rest() {
    let hung = FaultyEcho::start().await;
    let fast = FaultyEcho::start().await;
    hung.faults.set_delay(Duration::from_secs(600));
    let config = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{UNARY}"}}],
            "hedgingPolicy": {{"maxAttempts": 2, "hedgingDelay": "0.05s"}}}}]}}"#
    );
    let channel = channel(&[&hung.address, &fast.address], &config);
    wait_ready_set(
        &channel,
        &[hung.address.clone(), fast.address.clone()],
        STARTUP,
    )
    .await;
    for i in 0..10 {
        // The hung backend never answers within the 20 s deadline: only a
        // hedge to the other one can.
        let reply = echo(&channel, &format!("m{i}")).await.expect("hedged");
        assert_eq!(backend_of(&reply), fast.address);
    }
    let hung_calls = hung.faults.calls();
    assert!(hung_calls > 0);
    assert!(channel.retry_stats().hedges() >= hung_calls as u64);
    // Each attempt left on the hung backend was cancelled, not left to run.
    wait_for("hedges cancelled", STARTUP, || {
        let done = hung.faults.cancelled() == hung_calls;
        async move { done.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_non_fatal_status_sends_the_next_hedge_at_once_and_a_fatal_one_ends_the_call() {
    let failing = FaultyEcho::start().await;
    let healthy = FaultyEcho::start().await;
    failing.faults.set_fail(true);
    // A delay far beyond the deadline: only an immediate hedge can answer.
    let config = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{UNARY}"}}],
            "hedgingPolicy": {{"maxAttempts": 3, "hedgingDelay": "600s",
              "nonFatalStatusCodes": ["UNAVAILABLE"]}}}}]}}"#
    );
    let channel = channel(&[&failing.address, &healthy.address], &config);
    wait_ready_set(
        &channel,
        &[failing.address.clone(), healthy.address.clone()],
        STARTUP,
    )
    .await;
    for i in 0..10 {
        echo(&channel, &format!("m{i}"))
            .await
            .expect("hedged at once");
    }
    assert!(failing.faults.calls() > 0);
    // INTERNAL is fatal: no hedge follows it.
    let before = healthy.faults.calls() + failing.faults.calls();
    failing.faults.set_fail(false);
    failing.faults.script([Step::Fail(Code::Internal)]);
    healthy.faults.script([Step::Fail(Code::Internal)]);
    let status = echo(&channel, "fatal").await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(healthy.faults.calls() + failing.faults.calls(), before + 1);
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_once_without_any_policy() {
    let once = Refusing::start(1).await;
    let channel = BalancedChannel::builder(&format!("static:///{}", once.address))
        .unwrap()
        .build();
    let reply = echo(&channel, "x").await.expect("sent again");
    assert_eq!(reply, format!("x (from {})", once.address));
    assert_eq!(once.streams(), 2);
    assert_eq!(counts(channel.retry_stats()), [0, 1, 0, 0, 0]);

    // Refused again: the second refusal is the answer.
    let always = Refusing::start(usize::MAX).await;
    let channel = BalancedChannel::builder(&format!("static:///{}", always.address))
        .unwrap()
        .build();
    let status = echo(&channel, "x").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(always.streams(), 2);
}

#[tokio::test]
async fn disabled_transparent_retries_answer_the_first_refusal() {
    let once = Refusing::start(1).await;
    let channel = BalancedChannel::builder(&format!("static:///{}", once.address))
        .unwrap()
        .disable_transparent_retries()
        .build();
    let status = echo(&channel, "x").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(once.streams(), 1);
    assert_eq!(counts(channel.retry_stats()), [0, 0, 0, 0, 0]);
    // The refusal was the server's only one: the next call is answered.
    let reply = echo(&channel, "y").await.expect("answered");
    assert_eq!(reply, format!("y (from {})", once.address));
}

#[tokio::test]
async fn disabled_retries_leave_failures_to_the_caller() {
    let server = FaultyEcho::start().await;
    let channel = BalancedChannel::builder(&format!("static:///{}", server.address))
        .unwrap()
        .service_config_json(&retry_config(5, "0.01s", r#""UNAVAILABLE""#))
        .unwrap()
        .disable_retries()
        .build();
    server.faults.script([Step::Fail(Code::Unavailable)]);
    assert_eq!(
        echo(&channel, "x").await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn the_config_wait_for_ready_queues_instead_of_failing_fast() {
    // Nothing listens there: fail fast means UNAVAILABLE at once; waiting
    // for a Ready backend ends at the deadline instead.
    let port = crate::common::free_port().expect("free port");
    let config = r#"{"methodConfig": [{"name": [{}], "waitForReady": true, "timeout": "1s"}]}"#;
    let channel = BalancedChannel::builder(&format!("static:///127.0.0.1:{port}"))
        .unwrap()
        .service_config_json(config)
        .unwrap()
        .build();
    let status = EchoClient::new(channel)
        .unary_echo(EchoRequest {
            message: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

/// The failover scenario with a retry policy: each `kill -9` under load,
/// and the backend's return, cost no RPC at all. The calls in flight on
/// the killed backend fail before any response headers, so they are
/// retried on a survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_under_load_cost_no_rpc_with_a_retry_policy() {
    use crate::common::{all_but, assert_no_failed_rpc, registry_target, Cluster, Load, SERVICE};
    let mut cluster = Cluster::start_with(3, &[]).await;
    let addresses = cluster.addresses();
    let channel = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .policy(PolicyKind::RoundRobin)
        .backoff(switchboard::client::BackoffConfig::fast())
        .service_config_json(&retry_config(5, "0.05s", r#""UNAVAILABLE""#))
        .unwrap()
        .build();
    wait_ready_set(&channel, &addresses, STARTUP).await;
    let load = Load::start(
        channel.clone(),
        8,
        Duration::from_millis(2),
        Duration::from_secs(10),
    );
    load.wait_more(200, STARTUP).await;
    let mut live = addresses.clone();
    for victim in &addresses[..2] {
        cluster.kill(victim);
        live = all_but(&live, victim);
        wait_ready_set(&channel, &live, STARTUP).await;
        load.wait_more(200, STARTUP).await;
    }
    let back = cluster.add_backend().await;
    live.push(back);
    live.sort();
    crate::common::wait_registered(&cluster.registry, SERVICE, &live, STARTUP).await;
    wait_ready_set(&channel, &live, STARTUP).await;
    load.wait_more(200, STARTUP).await;
    let ran = assert_no_failed_rpc(load, "two SIGKILLs and a return").await;
    eprintln!(
        "SIGKILL with retries: {ran} RPCs, 0 failed, {} retried, {} sent again transparently",
        channel.retry_stats().retries(),
        channel.retry_stats().transparent_retries()
    );
}

/// A real cluster with one more echo process started with `flags`;
/// returns the cluster, that process and its address.
async fn cluster_with_one(flags: &[&str]) -> (crate::common::Cluster, crate::common::Proc, String) {
    use crate::common::{local, start_echo, wait_keepers, Cluster, SERVICE};
    let cluster = Cluster::start_with(2, &[]).await;
    let port = crate::common::free_port().expect("free port");
    let odd = start_echo(&cluster.registry, SERVICE, &[port], flags).await;
    let address = local(port);
    let odd = vec![(address.clone(), odd)];
    wait_keepers(&odd).await;
    let odd = odd.into_iter().next().unwrap().1;
    (cluster, odd, address)
}

fn registry_channel(cluster: &crate::common::Cluster, config: &str) -> BalancedChannel {
    BalancedChannel::builder(&crate::common::registry_target(&cluster.registry))
        .unwrap()
        .policy(PolicyKind::RoundRobin)
        .service_config_json(config)
        .unwrap()
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_process_failing_every_call_costs_none_unless_its_code_is_not_retryable() {
    let config = retry_config(3, "0.01s", r#""UNAVAILABLE""#);
    for (code, retried) in [("UNAVAILABLE", true), ("INTERNAL", false)] {
        let (cluster, _failing, failing) =
            cluster_with_one(&["--fail-rate", "1", "--fail-code", code]).await;
        let channel = registry_channel(&cluster, &config);
        let mut all = cluster.addresses();
        all.push(failing.clone());
        wait_ready_set(&channel, &all, STARTUP).await;
        let mut failed = Vec::new();
        for i in 0..60 {
            match echo(&channel, &format!("m{i}")).await {
                Ok(reply) => assert_ne!(backend_of(&reply), failing),
                Err(status) => failed.push(status.code()),
            }
        }
        if retried {
            assert!(failed.is_empty(), "{code}: {failed:?}");
            assert!(channel.retry_stats().retries() > 0);
        } else {
            // round_robin gives it a third of the calls; none is retried.
            assert!(!failed.is_empty());
            assert!(failed.iter().all(|c| *c == Code::Internal), "{failed:?}");
            assert_eq!(channel.retry_stats().retries(), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_answer_from_the_fast_echo_processes_and_the_slow_one_sees_the_cancel() {
    let (cluster, slow_proc, slow) =
        cluster_with_one(&["--delay", "200ms", "--metrics-listen", "127.0.0.1:0"]).await;
    let metrics = crate::common::metrics_address(&slow_proc).await;
    let config = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{UNARY}"}}],
            "hedgingPolicy": {{"maxAttempts": 3, "hedgingDelay": "0.02s"}}}}]}}"#
    );
    let channel = registry_channel(&cluster, &config);
    let mut all = cluster.addresses();
    all.push(slow.clone());
    wait_ready_set(&channel, &all, STARTUP).await;
    for i in 0..30 {
        let reply = echo(&channel, &format!("m{i}")).await.expect("hedged");
        // Slower than two hedges 20 ms apart on a loaded machine is
        // possible: then it may win, and that is no failure either.
        let _ = backend_of(&reply);
    }
    assert!(channel.retry_stats().hedges() > 0);
    // The slow backend saw its attempts cancelled, not answered.
    let cancelled = r#"switchboard_echo_rpcs_total{method="UnaryEcho",code="CANCELLED"}"#;
    let seen = crate::common::wait_sample(&metrics, cancelled, |n| n >= 1.0).await;
    assert!(seen >= 1.0);
}
