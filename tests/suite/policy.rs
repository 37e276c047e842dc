//! Per-service traffic policy held by the registry: `switchboard config
//! set|get|delete` against a real registry process, and every bad config
//! refused with INVALID_ARGUMENT naming its field, changing nothing.

use crate::common::cases::{self, case, expect_status, Case};
use crate::common::*;
use serde_json::Value;
use std::time::Duration;
use switchboard::client::{BalancedChannel, PolicyKind};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::registry::watch_response::Event;
use switchboard::proto::registry::{
    GetServiceConfigRequest, ServiceConfigUpdate, SetServiceConfigRequest, WatchResponse,
};
use switchboard::service_config::ServiceConfig;
use tonic::Code;

const RETRY: &str = r#"{
  "loadBalancingConfig": [{"outlier_detection_experimental": {
    "interval": "1s", "failurePercentageEjection": {"requestVolume": 10},
    "childPolicy": [{"round_robin": {}}]}}],
  "methodConfig": [{"name": [{"service": "grpc.examples.echo.Echo"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]
}"#;

/// A file holding `text`, unique to this test run.
pub(crate) fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("configs-{}", free_port().expect("free port")));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `switchboard config set SERVICE file -o json`; returns the version.
pub(crate) async fn cli_set(registry: &str, file: &str) -> u64 {
    let lines = run_ok(&[
        "config",
        "set",
        SERVICE,
        file,
        "--registry",
        registry,
        "-o",
        "json",
    ])
    .await;
    let reply: Value = serde_json::from_str(&lines[0]).unwrap();
    reply["version"].as_u64().expect("a version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_set_get_and_delete_round_trip_through_the_cli() {
    let port = free_port().expect("free port");
    let _registry = start_registry(port).await;
    let reg = local(port);
    let file = config_file("retry.json", RETRY);
    let file = file.to_str().unwrap();

    let version = cli_set(&reg, file).await;

    let got = run_ok(&["config", "get", SERVICE, "--registry", &reg, "-o", "json"]).await;
    let got: Value = serde_json::from_str(&got.join("\n")).unwrap();
    assert_eq!(got["version"].as_u64(), Some(version));
    // What comes back is the same config, written out in full.
    assert_eq!(
        ServiceConfig::from_json(&got["config"].to_string()),
        ServiceConfig::from_json(RETRY)
    );

    // A second set is a new version.
    let again = cli_set(&reg, file).await;
    assert!(again > version, "{again} after {version}");

    let deleted = run_ok(&["config", "delete", SERVICE, "--registry", &reg]).await;
    assert_eq!(
        deleted,
        [format!("deleted the service config of {SERVICE}")]
    );
    let (code, lines) = run(&["config", "get", SERVICE, "--registry", &reg]).await;
    assert_eq!(code, Some(1), "{lines:?}");
    assert!(
        lines.len() == 1 && lines[0].contains("has no service config"),
        "{lines:?}"
    );
    let (code, lines) = run(&["config", "delete", SERVICE, "--registry", &reg]).await;
    assert_eq!(code, Some(1), "{lines:?}");

    // A bad file is refused before it reaches the registry, naming the field.
    let bad = config_file(
        "bad.json",
        r#"{"methodConfig": [{"name": [{}], "timeout": "1"}]}"#,
    );
    let (code, lines) = run(&[
        "config",
        "set",
        SERVICE,
        bad.to_str().unwrap(),
        "--registry",
        &reg,
    ])
    .await;
    assert_eq!(code, Some(1), "{lines:?}");
    assert!(
        lines.len() == 1 && lines[0].contains("methodConfig[0].timeout"),
        "{lines:?}"
    );
}

/// Bad configs as the registry sees them: what each must be answered.
fn bad_configs() -> Vec<Case<(&'static str, &'static str), &'static str>> {
    vec![
        case(
            "not JSON",
            (SERVICE, "{"),
            "service config: line 1 column 1: not valid JSON",
        ),
        case(
            "not an object",
            (SERVICE, "[]"),
            "service config: (top level): must be an object",
        ),
        case(
            "unknown policies only",
            (SERVICE, r#"{"loadBalancingConfig": [{"magic": {}}]}"#),
            "service config: loadBalancingConfig: names no policy this version knows (magic)",
        ),
        case(
            "outlier detection without a child",
            (
                SERVICE,
                r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {}}]}"#,
            ),
            "loadBalancingConfig[0].outlier_detection_experimental.childPolicy: is required",
        ),
        case(
            "a retry policy without codes",
            (
                SERVICE,
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2,
                    "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 1}}]}"#,
            ),
            "methodConfig[0].retryPolicy.retryableStatusCodes",
        ),
        case("a bad service name", ("not a service!", "{}"), "service"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_naming_the_field_and_change_nothing() {
    let port = free_port().expect("free port");
    let _registry = start_registry(port).await;
    let mut client = registry_client(&local(port), STARTUP).await;
    let good = client
        .set_service_config(SetServiceConfigRequest {
            service: SERVICE.into(),
            json: RETRY.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    cases::in_turn(bad_configs(), |call| {
        let mut client = client.clone();
        async move {
            let (service, json) = call.input;
            let outcome = client
                .set_service_config(SetServiceConfigRequest {
                    service: service.into(),
                    json: json.into(),
                })
                .await;
            expect_status(outcome, Code::InvalidArgument, call.expected);
            let stored = client
                .get_service_config(GetServiceConfigRequest {
                    service: SERVICE.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(stored.version, good, "a refusal changed the config");
        }
    })
    .await;
}

/// A memory registry on `port` keeping its service configs in `dir`.
async fn registry_with_dir(port: u16, dir: &std::path::Path) -> Proc {
    let listen = local(port);
    let proc = Proc::sub(
        "registry",
        &[
            "--listen",
            &listen,
            "--service-config-dir",
            dir.to_str().unwrap(),
        ],
    );
    proc.wait_line("registry listening on", STARTUP).await;
    proc
}

/// The config version of `service` at `registry` once `check` holds for
/// what it answers (`None`: no config).
async fn wait_config(
    registry: &str,
    service: &str,
    what: &str,
    check: impl Fn(Option<&ServiceConfig>) -> bool,
) -> Option<u64> {
    let client = registry_client(registry, STARTUP).await;
    wait_for(what, STARTUP, || {
        let mut client = client.clone();
        let check = &check;
        async move {
            let answer = client
                .get_service_config(GetServiceConfigRequest {
                    service: service.into(),
                })
                .await;
            match answer {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let config = ServiceConfig::from_json(&reply.json).unwrap();
                    check(Some(&config)).then_some(Some(reply.version))
                }
                Err(status) if status.code() == Code::NotFound => check(None).then_some(None),
                Err(status) => panic!("{what}: {status:?}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_dir_is_loaded_followed_written_and_survives_a_restart() {
    let dir = config_file("unused", "").parent().unwrap().join("dir");
    let timeout = r#"{"methodConfig": [{"name": [{}], "timeout": "2s"}]}"#;
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{SERVICE}.json")), timeout).unwrap();
    let port = free_port().expect("free port");
    let mut registry = registry_with_dir(port, &dir).await;
    let reg = local(port);
    let expected = ServiceConfig::from_json(timeout).unwrap();
    wait_config(&reg, SERVICE, "the file's config", |c| c == Some(&expected)).await;

    // Set through the registry: written to the directory.
    let other = "other.example";
    let file = config_file("retry.json", RETRY);
    run_ok(&[
        "config",
        "set",
        other,
        file.to_str().unwrap(),
        "--registry",
        &reg,
    ])
    .await;
    let written = std::fs::read_to_string(dir.join(format!("{other}.json"))).unwrap();
    assert_eq!(
        ServiceConfig::from_json(&written),
        ServiceConfig::from_json(RETRY)
    );

    // kill -9 and start again: both are back.
    registry.kill();
    let _registry = registry_with_dir(port, &dir).await;
    wait_config(&reg, SERVICE, "the file's config after a restart", |c| {
        c == Some(&expected)
    })
    .await;
    let retry = ServiceConfig::from_json(RETRY).unwrap();
    let version = wait_config(&reg, other, "the set config after a restart", |c| {
        c == Some(&retry)
    })
    .await;

    // A bad edit is refused and the config stays; a good one applies.
    std::fs::write(dir.join(format!("{other}.json")), "{ not json").unwrap();
    _registry
        .wait_line("service config file refused", STARTUP)
        .await;
    assert_eq!(
        wait_config(&reg, other, "the config kept", |c| c == Some(&retry)).await,
        version
    );
    std::fs::write(dir.join(format!("{other}.json")), timeout).unwrap();
    wait_config(&reg, other, "the edited config", |c| c == Some(&expected)).await;

    // A removed file removes its config.
    std::fs::remove_file(dir.join(format!("{SERVICE}.json"))).unwrap();
    wait_config(&reg, SERVICE, "the config removed", |c| c.is_none()).await;
}

const ROUND_ROBIN: &str = r#"{"loadBalancingConfig": [{"round_robin": {}}]}"#;

/// Reads `stream` until a message carries a service config; returns that
/// message.
async fn next_config(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    let deadline = tokio::time::Instant::now() + STARTUP;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(message))) if message.service_config.is_some() => return message,
            Ok(Ok(Some(_))) => {}
            other => panic!("no message with a service config: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_carries_the_config_first_then_each_change_as_its_own_message() {
    let port = free_port().expect("free port");
    let _registry = start_registry(port).await;
    let reg = local(port);
    let file = config_file("round_robin.json", ROUND_ROBIN);
    let version = cli_set(&reg, file.to_str().unwrap()).await;
    let mut client = registry_client(&reg, STARTUP).await;

    // The first message carries the config: on the (empty) endpoint set,
    // or alone while a freshly started registry holds its first snapshot
    // back (its warm-up), the set following.
    let mut stream = watch(&mut client, SERVICE).await;
    let mut first = stream.message().await.unwrap().expect("a first message");
    let config = first.service_config.clone().expect("the config");
    if first.event.is_none() {
        first = stream.message().await.unwrap().expect("the endpoint set");
        assert_eq!(first.service_config, None, "sent once: {first:?}");
    }
    assert!(matches!(first.event, Some(Event::Reset(_))), "{first:?}");
    assert_eq!(config.version, version);
    assert_eq!(
        ServiceConfig::from_json(&config.json),
        ServiceConfig::from_json(ROUND_ROBIN)
    );

    // A change is a message of its own, with no event, at the same position.
    let retry = config_file("retry.json", RETRY);
    let changed_to = cli_set(&reg, retry.to_str().unwrap()).await;
    let change = next_config(&mut stream).await;
    assert_eq!(change.event, None);
    assert_eq!((change.epoch, change.version), (first.epoch, first.version));
    let config = change.service_config.unwrap();
    assert_eq!(config.version, changed_to);
    assert_eq!(
        ServiceConfig::from_json(&config.json),
        ServiceConfig::from_json(RETRY)
    );

    // A delete says "none": empty JSON.
    run_ok(&["config", "delete", SERVICE, "--registry", &reg]).await;
    let deleted = next_config(&mut stream).await;
    assert_eq!(deleted.service_config, Some(ServiceConfigUpdate::default()));

    // An endpoint change after it carries no config: nothing changed.
    let echo_port = free_port().expect("free port");
    let _echo = start_echo(&reg, SERVICE, &[echo_port], &[]).await;
    let delta = stream.message().await.unwrap().expect("the registration");
    assert!(matches!(delta.event, Some(Event::Delta(_))), "{delta:?}");
    assert_eq!(delta.service_config, None);
}

/// Load on `channel` until stopped, each call with a 5 s timeout.
fn load_on(channel: &BalancedChannel) -> Load {
    Load::start(
        channel.clone(),
        4,
        Duration::from_millis(5),
        Duration::from_secs(5),
    )
}

/// The backends that answered the shots after index `from`.
fn served_after(shots: &[Shot], from: usize) -> std::collections::BTreeSet<String> {
    shots[from..]
        .iter()
        .filter_map(|s| s.result.as_ref().ok().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_pushed_by_the_registry_swaps_the_policy_under_load_without_a_failed_rpc() {
    let cluster = Cluster::start(3).await;
    let addresses = cluster.addresses();
    // The application's own default: pick_first, so one backend serves.
    let channel = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .build();
    let opted_out = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .disable_service_config_lookup()
        .build();
    channel.wait_ready(STARTUP).await;
    assert_eq!(channel.policy(), "pick_first");
    let load = load_on(&channel);
    load.wait_more(100, STARTUP).await;
    assert_eq!(served_after(&load.shots(), 0).len(), 1, "pick_first");

    let file = config_file("round_robin.json", ROUND_ROBIN);
    cli_set(&cluster.registry, file.to_str().unwrap()).await;
    let mut state = channel.watch_state();
    let switched = state.wait_for(|s| s.policy == "round_robin");
    tokio::time::timeout(STARTUP, switched)
        .await
        .expect("the channel switches to round_robin")
        .unwrap();
    let from = load.count();
    load.wait_more(300, STARTUP).await;
    let shots = load.shots();
    assert_eq!(
        served_after(&shots, from).into_iter().collect::<Vec<_>>(),
        addresses,
        "round_robin uses every backend"
    );

    // Deleted: the default (pick_first) is back, again without a failure.
    run_ok(&["config", "delete", SERVICE, "--registry", &cluster.registry]).await;
    let mut state = channel.watch_state();
    tokio::time::timeout(STARTUP, state.wait_for(|s| s.policy == "pick_first"))
        .await
        .expect("the channel switches back")
        .unwrap();
    load.wait_more(100, STARTUP).await;
    assert_no_failed_rpc(load, "two policy switches").await;
    // Both times the new policy took over once it had a Ready backend,
    // the old one serving until then.
    let stats = channel.balancer_stats();
    let switches = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(switches(&stats.graceful_switches), 2);
    assert_eq!(switches(&stats.immediate_switches), 0);

    // The opted-out channel heard the same stream (a later endpoint change
    // reached it, so the config messages before it did too) and kept its
    // policy.
    let mut cluster = cluster;
    let added = cluster.add_backend().await;
    let mut expected = addresses.clone();
    expected.push(added);
    expected.sort();
    let mut state = opted_out.watch_state();
    let all_known = state.wait_for(|s| {
        let mut known: Vec<String> = s.endpoints.iter().map(|e| e.address.clone()).collect();
        known.sort();
        known == expected
    });
    tokio::time::timeout(STARTUP, all_known)
        .await
        .expect("the new backend reaches the opted-out channel")
        .unwrap();
    assert_eq!(opted_out.policy(), "pick_first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_retry_policy_applies_to_the_next_call() {
    let cluster = Cluster::start(2).await;
    let port = free_port().expect("free port");
    let _failing = start_echo(
        &cluster.registry,
        SERVICE,
        &[port],
        &["--fail-rate", "1", "--fail-code", "UNAVAILABLE"],
    )
    .await;
    let failing = local(port);
    let mut all = cluster.addresses();
    all.push(failing.clone());
    let channel = channel(&registry_target(&cluster.registry), PolicyKind::RoundRobin);
    wait_ready_set(&channel, &all, STARTUP).await;
    let mut client = EchoClient::new(channel.clone());
    // Without a config, round_robin sends a third of the calls to it.
    let mut failed = 0;
    for _ in 0..30 {
        failed += usize::from(
            echo_once(&mut client, Duration::from_secs(5))
                .await
                .is_err(),
        );
    }
    assert!(failed > 0, "the failing backend fails calls");
    assert_eq!(channel.retry_stats().retries(), 0);

    let config = r#"{"methodConfig": [{"name": [{"service": "grpc.examples.echo.Echo"}],
      "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#;
    let file = config_file("retry.json", config);
    cli_set(&cluster.registry, file.to_str().unwrap()).await;
    // Once a call has been retried, the config is in force: from then on
    // no call fails.
    wait_for("a retried call", STARTUP, || {
        let mut client = client.clone();
        let channel = channel.clone();
        async move {
            let _ = echo_once(&mut client, Duration::from_secs(5)).await;
            (channel.retry_stats().retries() > 0).then_some(())
        }
    })
    .await;
    for i in 0..60 {
        let reply = echo_once(&mut client, Duration::from_secs(5)).await;
        assert!(reply.is_ok(), "call {i}: {reply:?}");
    }
    assert!(channel.retry_stats().retries() > 0);
}

/// Shares of `shots` by backend.
fn share(shots: &[Shot], backend: &str) -> f64 {
    let served = shots.iter().filter(|s| s.result.is_ok()).count();
    let on = shots
        .iter()
        .filter(|s| s.result.as_ref().is_ok_and(|b| b == backend))
        .count();
    on as f64 / served.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_to_least_request_under_load_fails_nothing_and_calls_follow_the_new_policy() {
    let cluster = Cluster::start(2).await;
    let port = free_port().expect("free port");
    let _slow = start_echo(&cluster.registry, SERVICE, &[port], &["--delay", "50ms"]).await;
    let slow = local(port);
    let mut all = cluster.addresses();
    all.push(slow.clone());
    let rr = config_file("round_robin.json", ROUND_ROBIN);
    cli_set(&cluster.registry, rr.to_str().unwrap()).await;
    let channel = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .build();
    wait_ready_set(&channel, &all, STARTUP).await;
    assert_eq!(channel.policy(), "round_robin");
    let load = Load::start(
        channel.clone(),
        8,
        Duration::from_millis(1),
        Duration::from_secs(5),
    );
    load.wait_more(300, STARTUP).await;
    // round_robin: every backend its turn, however slow.
    let before = share(&load.shots(), &slow);
    assert!(
        before > 0.25,
        "round_robin gives the slow backend its third: {before}"
    );

    let lr = config_file(
        "least_request.json",
        r#"{"loadBalancingConfig": [{"least_request_experimental": {"choiceCount": 2}}]}"#,
    );
    cli_set(&cluster.registry, lr.to_str().unwrap()).await;
    let mut state = channel.watch_state();
    tokio::time::timeout(STARTUP, state.wait_for(|s| s.policy == "least_request"))
        .await
        .expect("the channel switches to least_request")
        .unwrap();
    let from = load.count();
    load.wait_more(600, STARTUP).await;
    let shots = load.shots();
    // least_request: the slow backend holds the most calls in flight, so
    // it is picked only when both choices are worse.
    let after = share(&shots[from..], &slow);
    assert!(
        after < before / 2.0,
        "least_request sends the slow backend less: {after} after {before}"
    );
    assert_no_failed_rpc(load, "round_robin to least_request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_outlier_detection_ejects_a_failing_backend_from_a_running_client() {
    let cluster = Cluster::start(2).await;
    let port = free_port().expect("free port");
    let _failing = start_echo(
        &cluster.registry,
        SERVICE,
        &[port],
        &["--fail-rate", "1", "--fail-code", "UNAVAILABLE"],
    )
    .await;
    let failing = local(port);
    let mut all = cluster.addresses();
    all.push(failing.clone());
    let rr = config_file("round_robin.json", ROUND_ROBIN);
    cli_set(&cluster.registry, rr.to_str().unwrap()).await;
    let channel = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .build();
    wait_ready_set(&channel, &all, STARTUP).await;
    let load = load_on(&channel);
    load.wait_more(100, STARTUP).await;
    assert!(!failures(&load.shots()).is_empty(), "it fails calls");

    let od = config_file(
        "outlier.json",
        r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
          "interval": "0.5s", "baseEjectionTime": "30s", "maxEjectionPercent": 50,
          "failurePercentageEjection": {"threshold": 50, "minimumHosts": 3, "requestVolume": 10},
          "childPolicy": [{"round_robin": {}}]}}]}"#,
    );
    cli_set(&cluster.registry, od.to_str().unwrap()).await;
    // Ejected, not merely not connected yet (the new policy has its own
    // subchannels): the new policy sends the failing backend calls (more
    // failures than the 4 workers could have had in flight under the old
    // one), then a run of 100 calls in a row succeeds, which round_robin
    // would not give a Ready backend; from then on no call fails.
    let mut state = channel.watch_state();
    tokio::time::timeout(STARTUP, state.wait_for(|s| s.policy == "outlier_detection"))
        .await
        .expect("the channel switches to outlier_detection")
        .unwrap();
    let switched = load.count();
    let expected = cluster.addresses();
    let from = wait_for(
        "the failing backend tried, then 100 calls in a row OK",
        STARTUP,
        || {
            let shots = load.shots();
            async move {
                let tail = shots.len().checked_sub(100)?;
                let tried = failures(&shots[switched.min(tail)..tail]).len() > 4;
                (tried && failures(&shots[tail..]).is_empty()).then_some(shots.len())
            }
        },
    )
    .await;
    wait_ready_set(&channel, &expected, STARTUP).await;
    assert_eq!(channel.policy(), "outlier_detection");
    load.wait_more(300, STARTUP).await;
    let shots = load.stop().await;
    assert!(
        failures(&shots[from..]).is_empty(),
        "{:?}",
        failures(&shots[from..])
    );
    assert!(!served_after(&shots, from).contains(&failing));
}

/// `switchboard clients [args] -o json` against `registry`.
async fn clients_json(registry: &str, args: &[&str]) -> Value {
    let mut argv = vec!["clients"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--registry", registry, "-o", "json"]);
    let lines = run_ok(&argv).await;
    serde_json::from_str(&lines.join("\n")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_lists_each_watch_stream_with_the_versions_it_was_sent() {
    let port = free_port().expect("free port");
    let registry_proc = Proc::sub(
        "registry",
        &["--listen", &local(port), "--metrics-listen", "127.0.0.1:0"],
    );
    registry_proc
        .wait_line("registry listening on", STARTUP)
        .await;
    let status = metrics_address(&registry_proc).await;
    let reg = local(port);
    let file = config_file("round_robin.json", ROUND_ROBIN);
    let version = cli_set(&reg, file.to_str().unwrap()).await;
    let channel = BalancedChannel::builder(&registry_target(&reg))
        .unwrap()
        .build();
    let listed = wait_for("the channel's watch stream listed", STARTUP, || {
        let reg = reg.clone();
        async move {
            let reply = clients_json(&reg, &[SERVICE]).await;
            let clients = reply["clients"].as_array()?.clone();
            let watch = clients.into_iter().find(|c| c["kind"] == "watch")?;
            (watch["types"]["config"]["sent"].as_str() == Some(version.to_string().as_str())
                && watch["types"]["endpoints"]["sent"].is_string())
            .then_some(watch)
        }
    })
    .await;
    assert_eq!(listed["services"], serde_json::json!([SERVICE]));
    assert!(listed["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    // Watch has no ACKs: nothing claims one.
    assert!(listed["types"]["config"]["acked"].is_null());

    // The status page shows the same stream; another service's filter
    // does not; the table has a row per type.
    let (_, body) = get(&status, "/status.json").await;
    let page: Value = serde_json::from_str(&body).unwrap();
    assert!(page["clients"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == listed["id"]));
    let other = clients_json(&reg, &["other.example"]).await;
    assert_eq!(other["clients"], serde_json::json!([]));
    let table = run_ok(&["clients", "--registry", &reg]).await;
    assert!(table[0].starts_with("ID"), "{table:?}");
    assert!(
        table
            .iter()
            .any(|l| l.contains("watch") && l.contains("config")),
        "{table:?}"
    );

    // Gone with its channel.
    drop(channel);
    wait_for("the stream gone from the list", STARTUP, || {
        let reg = reg.clone();
        let id = listed["id"].clone();
        async move {
            let reply = clients_json(&reg, &[]).await;
            let open = reply["clients"].as_array()?.iter().any(|c| c["id"] == id);
            (!open).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_circuit_breakers_max_requests_calls_fail_at_once_until_one_ends() {
    let port = free_port().expect("free port");
    let registry = start_registry(port).await;
    let reg = local(port);
    let echo_port = free_port().expect("free port");
    let _slow = start_echo(&reg, SERVICE, &[echo_port], &["--delay", "3s"]).await;
    let backend = local(echo_port);
    let config = r#"{"loadBalancingConfig": [{"round_robin": {}}],
        "circuitBreakers": {"maxRequests": 2}}"#;
    let file = config_file("breaker.json", config);
    cli_set(&reg, file.to_str().unwrap()).await;
    let channel = BalancedChannel::builder(&registry_target(&reg))
        .unwrap()
        .build();
    wait_ready_set(&channel, &[backend], STARTUP).await;
    // Two calls take the two places and wait on the slow backend.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut client = EchoClient::new(channel.clone());
            tokio::spawn(async move { echo_once(&mut client, Duration::from_secs(30)).await })
        })
        .collect();
    wait_for("two calls in flight", STARTUP, || {
        let in_flight: usize = channel.in_flight().iter().map(|(_, n)| n).sum();
        async move { (in_flight == 2).then_some(()) }
    })
    .await;
    // The config reached the channel before those calls (its first Watch
    // message carries it), so the next ones are refused at once.
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..3 {
        let status = echo_once(&mut client, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("circuit breaker"), "{status:?}");
    }
    assert_eq!(channel.retry_stats().breaker_rejections(), 3);
    for call in slow {
        call.await.unwrap().expect("the admitted calls are served");
    }
    // Their places are free again.
    echo_once(&mut client, Duration::from_secs(30))
        .await
        .expect("a call after they ended");
    drop(registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_demo_pushes_a_config_and_the_failures_stop() {
    let args = ["--scenario", "policy", "--phase-secs", "1", "--rate", "100"];
    let mut demo = Proc::sub("demo", &args);
    // Its own waits are bounded (20 s each); this only keeps a stuck run
    // from hanging the suite.
    let code = demo.wait_exit(Duration::from_secs(180)).await;
    let lines = demo.output();
    assert_eq!(code, Some(0), "{lines:#?}");
    let row = |needle: &str| {
        lines
            .iter()
            .find(|l| l.starts_with("round_robin") && l.contains(needle))
            .unwrap_or_else(|| panic!("no summary row with {needle:?}: {lines:#?}"))
            .clone()
    };
    // The failing backend cost calls before the config...
    let failing = row("fails every call");
    let failed: u64 = failing
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("a failed count");
    assert!(failed > 0, "{failing}");
    // ...and after the push a whole second went by without a failure.
    let pushed = row("config set");
    assert!(pushed.contains("pushed config version"), "{pushed}");
    assert!(
        pushed.contains("no failure in the second ending"),
        "{pushed}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("grpcio xds:/// client")),
        "the grpcio client ran or the summary says why not: {lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_joining_under_slow_start_gets_a_share_that_rises_over_the_window() {
    let mut cluster = Cluster::start(3).await;
    let config = r#"{"loadBalancingConfig": [{"round_robin": {"slowStartConfig":
        {"slowStartWindow": "6s", "aggression": 1.0, "minWeightPercent": 5}}}]}"#;
    let file = config_file("slow_start.json", config);
    cli_set(&cluster.registry, file.to_str().unwrap()).await;
    let channel = BalancedChannel::builder(&registry_target(&cluster.registry))
        .unwrap()
        .build();
    wait_ready_set(&channel, &cluster.addresses(), STARTUP).await;
    let load = load_on(&channel);
    load.wait_more(200, STARTUP).await;

    let joined = cluster.add_backend().await;
    let all = cluster.addresses();
    wait_ready_set(&channel, &all, STARTUP).await;
    // Ready at the latest now: its window began at or before this.
    let ready = tokio::time::Instant::now();
    let window = Duration::from_secs(6);
    wait_for("the window to pass and a second more", STARTUP, || {
        let shots = load.shots();
        async move {
            shots
                .last()
                .is_some_and(|s| s.sent >= ready + window + Duration::from_secs(2))
                .then_some(())
        }
    })
    .await;
    let shots = assert_no_failed_rpc_shots(load).await;
    let share_in = |from: Duration, to: Duration| {
        let window: Vec<Shot> = shots
            .iter()
            .filter(|s| s.sent >= ready + from && s.sent < ready + to)
            .cloned()
            .collect();
        assert!(
            window.len() >= 50,
            "too few calls in {from:?}..{to:?}: {}",
            window.len()
        );
        share(&window, &joined)
    };
    let full = 1.0 / all.len() as f64;
    let first = share_in(Duration::ZERO, Duration::from_secs(1));
    let late = share_in(Duration::from_secs(4), Duration::from_secs(6));
    let after = share_in(
        window + Duration::from_millis(500),
        window + Duration::from_secs(2),
    );
    eprintln!("share of {joined}: first second {first:.3}, 4-6 s {late:.3}, after {after:.3} (full {full:.3})");
    assert!(
        first < full / 2.0,
        "not a full share in its first second: {first}"
    );
    assert!(
        late > first,
        "the share rises over the window: {first} then {late}"
    );
    assert!(after > full * 0.7, "a full share after the window: {after}");
}

/// Stops `load`, asserts no RPC failed, and returns every outcome.
async fn assert_no_failed_rpc_shots(load: Load) -> Vec<Shot> {
    let shots = load.stop().await;
    assert!(
        failures(&shots).is_empty(),
        "{:?}",
        failures(&shots).first()
    );
    shots
}
