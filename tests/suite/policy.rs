//! Per-service traffic policy held by the registry: `switchboard config
//! set|get|delete` against a real registry process, and every bad config
//! refused with INVALID_ARGUMENT naming its field, changing nothing.

use crate::common::cases::{self, case, expect_status, Case};
use crate::common::*;
use serde_json::Value;
use switchboard::proto::registry::{GetServiceConfigRequest, SetServiceConfigRequest};
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
