//! Operability: the operator subcommands against a live registry, the
//! registry's metrics moving on their events, the status page, and a drain
//! by address under client load that fails no RPC.

use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use switchboard::client::{BalancedChannel, PolicyKind};

/// Waits until the registry's metric `name` reads `value`.
async fn wait_metric(registry: &StatusRegistry, name: &str, value: f64) {
    wait_sample(&registry.status, name, |v| v == value).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_metrics_and_status_page_follow_a_live_registry() {
    let registry = StatusRegistry::start(&[]).await;
    let reg = registry.address.as_str();
    let ports = [
        free_port().expect("free port"),
        free_port().expect("free port"),
    ];
    let backends: Vec<String> = ports.iter().map(|p| local(*p)).collect();
    let mut echo = start_echo(reg, SERVICE, &ports, &["--meta", "zone=a"]).await;
    wait_registered(reg, SERVICE, &backends, STARTUP).await;
    wait_metric(&registry, "switchboard_registry_registrations_total", 2.0).await;
    wait_metric(
        &registry,
        &format!("switchboard_registry_endpoints{{service=\"{SERVICE}\",state=\"SERVING\"}}"),
        2.0,
    )
    .await;
    wait_metric(&registry, "switchboard_registry_leases", 2.0).await;

    // services: a table, then JSON; a list with an unreachable first entry
    // falls through to the live one.
    let list = format!("127.0.0.1:{},{reg}", free_port().expect("free port"));
    let table = run_ok(&["services", "--registry", &list]).await;
    assert!(table[0].starts_with("SERVICE"), "{table:?}");
    assert!(
        table
            .iter()
            .any(|l| l.starts_with(SERVICE) && l.ends_with('2')),
        "{table:?}"
    );
    let json: Value =
        serde_json::from_str(&run_ok(&["services", "--registry", reg, "-o", "json"]).await[0])
            .unwrap();
    assert_eq!(json["services"][0]["service"], SERVICE);
    assert_eq!(json["services"][0]["endpoints"], 2);

    // endpoints: state, metadata, lease age and TTL.
    let table = run_ok(&["endpoints", SERVICE, "--registry", reg]).await;
    assert!(
        table[0].contains("LEASE AGE") && table[0].contains("TTL"),
        "{table:?}"
    );
    assert!(
        table.iter().any(|l| l.starts_with(&backends[0])
            && l.contains("SERVING")
            && l.contains("zone=a")
            && l.contains("5.0s")),
        "{table:?}"
    );
    let json: Value = serde_json::from_str(
        &run_ok(&["endpoints", SERVICE, "--registry", reg, "-o", "json"]).await[0],
    )
    .unwrap();
    assert_eq!(json["endpoints"].as_array().unwrap().len(), 2);
    assert_eq!(json["endpoints"][0]["ttl_ms"], 5000);
    assert_eq!(json["endpoints"][0]["metadata"]["zone"], "a");

    // watch: one line per change, with the version.
    let watch = Proc::sub("watch", &[SERVICE, "--registry", reg]);
    watch.wait_line(" reset [", STARTUP).await;

    // The status page and its JSON list the endpoint.
    let (code, page) = get(&registry.status, "/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("status.json") && page.contains("DRAINING"),
        "the page polls status.json"
    );
    let (code, _) = get(&registry.status, "/healthz").await;
    assert_eq!(code, 200);
    let (code, _) = get(&registry.status, "/nowhere").await;
    assert_eq!(code, 404);
    let (_, body) = get(&registry.status, "/status.json").await;
    let status: Value = serde_json::from_str(&body).unwrap();
    assert!(status["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    let endpoint = |status: &Value, address: &str| -> Option<Value> {
        status["services"][0]["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["address"] == address)
            .cloned()
    };
    assert_eq!(endpoint(&status, &backends[0]).unwrap()["state"], "SERVING");

    // drain by address: DRAINING everywhere, and counted.
    let lines = run_ok(&["drain", SERVICE, &backends[0], "--registry", reg]).await;
    assert!(lines[0].contains("drained"), "{lines:?}");
    watch
        .wait_line(&format!("~{}(DRAINING)", backends[0]), STARTUP)
        .await;
    let (_, body) = get(&registry.status, "/status.json").await;
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        endpoint(&status, &backends[0]).unwrap()["state"],
        "DRAINING"
    );
    wait_metric(&registry, "switchboard_registry_drains_total", 1.0).await;
    wait_metric(
        &registry,
        &format!("switchboard_registry_endpoints{{service=\"{SERVICE}\",state=\"DRAINING\"}}"),
        1.0,
    )
    .await;

    // deregister by address: gone, counted, and the backend does not
    // re-register it (it says so and stays out).
    run_ok(&[
        "deregister",
        SERVICE,
        &backends[0],
        "--registry",
        reg,
        "-o",
        "json",
    ])
    .await;
    watch.wait_line(&format!("-{}", backends[0]), STARTUP).await;
    wait_metric(&registry, "switchboard_registry_deregistrations_total", 1.0).await;
    echo.wait_line("an operator removed this endpoint", STARTUP)
        .await;
    let table = run_ok(&["endpoints", SERVICE, "--registry", reg]).await;
    assert!(
        !table.iter().any(|l| l.starts_with(&backends[0])),
        "{table:?}"
    );
    assert_eq!(
        sample(
            &get(&registry.status, "/metrics").await.1,
            "switchboard_registry_registrations_total"
        ),
        Some(2.0),
        "the removed endpoint was registered again"
    );

    // Killing the backend breaks its KeepAlive stream: one more removal.
    echo.kill();
    wait_metric(
        &registry,
        "switchboard_registry_stream_break_removals_total",
        1.0,
    )
    .await;
    wait_metric(&registry, "switchboard_registry_leases", 0.0).await;
    let metrics = get(&registry.status, "/metrics").await.1;
    for name in [
        "switchboard_registry_watchers 1",
        "switchboard_registry_lease_expiries_total 0",
        "switchboard_registry_watcher_resets_total 0",
        "switchboard_registry_rpcs_total{method=\"Register\",code=\"OK\"} 2",
        "switchboard_registry_rpc_duration_seconds_count{method=\"DrainEndpoint\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == name),
            "no {name:?} in\n{metrics}"
        );
    }
    drop(watch);
    drop(registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_by_cap_and_by_token() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = dir.join("write.token");
    let wrong = dir.join("wrong.token");
    std::fs::write(&write, "s3cret\n").unwrap();
    std::fs::write(&wrong, "nope\n").unwrap();
    let write_path = write.to_string_lossy().into_owned();
    let wrong_path = wrong.to_string_lossy().into_owned();
    let registry = StatusRegistry::start(&[
        "--max-endpoints-per-service",
        "1",
        "--token-file",
        &write_path,
    ])
    .await;
    let reg = registry.address.as_str();
    let ports = [
        free_port().expect("free port"),
        free_port().expect("free port"),
    ];
    let _echo = start_echo(reg, SERVICE, &ports, &["--token-file", &write_path]).await;
    wait_metric(
        &registry,
        "switchboard_registry_refusals_total{reason=\"cap\",cap=\"endpoints per service\"}",
        1.0,
    )
    .await;
    let (code, lines) = run(&[
        "drain",
        SERVICE,
        &local(ports[0]),
        "--registry",
        reg,
        "--token-file",
        &wrong_path,
    ])
    .await;
    assert_eq!(code, Some(1), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("Unauthenticated"),
        "{lines:?}"
    );
    wait_metric(
        &registry,
        "switchboard_registry_refusals_total{reason=\"auth\"}",
        1.0,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operator_input_gets_one_error_line() {
    let registry = StatusRegistry::start(&[]).await;
    let reg = registry.address.clone();
    let nobody = local(free_port().expect("free port"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["services", "--registry", "nonsense"],
            "--registry \"nonsense\"",
        ),
        (
            vec!["services", "--registry", &nobody],
            "no registry reachable",
        ),
        (vec!["services", "-o", "yaml"], "invalid value 'yaml'"),
        (
            vec!["endpoints", "bad name!", "--registry", &reg],
            "service \"bad name!\"",
        ),
        (vec!["endpoints"], "required arguments were not provided"),
        (vec!["watch", "", "--registry", &reg], "service \"\""),
        (
            vec!["drain", SERVICE, "not-an-address", "--registry", &reg],
            "address \"not-an-address\"",
        ),
        (
            vec!["drain", SERVICE, "127.0.0.1:1", "--registry", &reg],
            "no endpoint 127.0.0.1:1",
        ),
        (
            vec!["deregister", SERVICE, "127.0.0.1:1", "--registry", &reg],
            "NotFound",
        ),
        (
            vec!["services", "--registry", &reg, "--cert", "x.crt"],
            "--cert needs --key",
        ),
        (
            vec![
                "services",
                "--registry",
                &reg,
                "--token-file",
                "/nonexistent",
            ],
            "cannot read token file",
        ),
    ];
    for (args, expected) in cases {
        refused_at_startup(
            args[0],
            &args[1..].iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            expected,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_by_address_under_client_load_fails_no_rpc() {
    let registry = StatusRegistry::start(&[]).await;
    let reg = registry.address.clone();
    let ports = [
        free_port().expect("free port"),
        free_port().expect("free port"),
    ];
    let backends: Vec<String> = ports.iter().map(|p| local(*p)).collect();
    let _echo = start_echo(&reg, SERVICE, &ports, &[]).await;
    wait_registered(&reg, SERVICE, &backends, STARTUP).await;
    let channel = BalancedChannel::builder(&format!("registry://{reg}/{SERVICE}"))
        .unwrap()
        .policy(PolicyKind::RoundRobin)
        .build();
    wait_ready_set(&channel, &backends, STARTUP).await;
    let load = Load::start(
        channel.clone(),
        4,
        Duration::from_millis(5),
        Duration::from_secs(5),
    );
    load.wait_more(100, STARTUP).await;
    run_ok(&["drain", SERVICE, &backends[0], "--registry", &reg]).await;
    wait_ready_set(&channel, &backends[1..], STARTUP).await;
    load.wait_more(200, STARTUP).await;
    let shots = load.stop().await;
    let failed = failures(&shots);
    assert!(
        failed.is_empty(),
        "{} of {} RPCs failed: {:?}",
        failed.len(),
        shots.len(),
        failed.first()
    );
    // After the drain took effect, only the other backend served.
    let settled = shots.iter().rev().take(100);
    for shot in settled {
        assert_eq!(shot.result.as_deref().ok(), Some(backends[1].as_str()));
    }
}
