use std::time::Duration;

use tonic::Code;

use super::*;

const FULL: &str = r#"{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [
    {
      "name": [{"service": "grpc.examples.echo.Echo", "method": "UnaryEcho"}],
      "timeout": "1.5s",
      "waitForReady": true,
      "retryPolicy": {
        "maxAttempts": 9,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "resource_exhausted", 4]
      }
    },
    {
      "name": [{"service": "grpc.examples.echo.Echo"}],
      "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.05s", "nonFatalStatusCodes": ["UNAVAILABLE"]}
    },
    {"name": [{}], "timeout": "10s"},
    {"timeout": "3s"}
  ],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
  "healthCheckConfig": {"serviceName": "echo"},
  "somethingNew": {"ignored": true}
}"#;

fn error_of(text: &str) -> ConfigError {
    ServiceConfig::from_json(text).expect_err(text)
}

#[test]
fn a_full_config_parses_into_its_typed_parts() {
    let config = ServiceConfig::from_json(FULL).unwrap();
    assert_eq!(config.load_balancing()[0].name, "round_robin");
    assert_eq!(
        config.methods.len(),
        3,
        "an entry that names nothing is skipped"
    );
    assert_eq!(config.health_check_service.as_deref(), Some("echo"));
    assert_eq!(
        config.retry_throttling,
        Some(RetryThrottling {
            max_milli_tokens: 10_000,
            milli_token_ratio: 100,
        })
    );
    let unary = config.method("/grpc.examples.echo.Echo/UnaryEcho").unwrap();
    assert_eq!(unary.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(unary.wait_for_ready, Some(true));
    let Some(CallPolicy::Retry(retry)) = &unary.policy else {
        panic!("{unary:?}")
    };
    assert_eq!(retry.max_attempts, MAX_ATTEMPTS, "clamped, not refused");
    assert_eq!(
        retry.retryable_codes,
        CodeSet::of(&[
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded
        ])
    );
}

#[test]
fn the_most_specific_entry_wins_whole() {
    let config = ServiceConfig::from_json(FULL).unwrap();
    let other_method = config
        .method("/grpc.examples.echo.Echo/ServerStreamingEcho")
        .unwrap();
    assert!(matches!(other_method.policy, Some(CallPolicy::Hedging(_))));
    assert_eq!(other_method.timeout, None, "entries are not merged");
    let other_service = config.method("/other.Service/Call").unwrap();
    assert_eq!(other_service.timeout, Some(Duration::from_secs(10)));
    assert!(ServiceConfig::default().method("/a.B/C").is_none());
    let no_default = ServiceConfig::from_json(
        r#"{"methodConfig": [{"name": [{"service": "a.B"}], "timeout": "1s"}]}"#,
    )
    .unwrap();
    assert!(no_default.method("/x.Y/Z").is_none());
}

#[test]
fn it_writes_what_it_reads() {
    let config = ServiceConfig::from_json(FULL).unwrap();
    let again = ServiceConfig::from_json(&config.to_json()).unwrap();
    assert_eq!(again, config);
}

#[test]
fn durations_are_exact_decimal_seconds() {
    let timeout = |text: &str| {
        ServiceConfig::from_json(&format!(
            r#"{{"methodConfig": [{{"name": [{{}}], "timeout": "{text}"}}]}}"#
        ))
        .map(|c| c.methods[0].timeout.unwrap())
    };
    assert_eq!(timeout("1.000000001s"), Ok(Duration::new(1, 1)));
    assert_eq!(timeout(".5s"), Ok(Duration::from_millis(500)));
    assert_eq!(timeout("3s"), Ok(Duration::from_secs(3)));
    for bad in ["1", "1.0000000001s", "s", "-1s", "1ms", "1e3s"] {
        let err = timeout(bad).expect_err(bad);
        assert_eq!(err.field, "methodConfig[0].timeout", "{bad}");
    }
}

#[test]
fn each_bad_value_is_refused_naming_its_field() {
    let retry = |body: &str| {
        format!(r#"{{"methodConfig": [{{"name": [{{"service": "s"}}], "retryPolicy": {body}}}]}}"#)
    };
    let ok =
        r#""maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2"#;
    let cases = [
        ("{", "line 1 column 1"),
        ("[]", "(top level)"),
        (
            &retry(&format!(r#"{{{ok}}}"#)),
            "methodConfig[0].retryPolicy.retryableStatusCodes",
        ),
        (
            &retry(&format!(r#"{{{ok}, "retryableStatusCodes": []}}"#)),
            "methodConfig[0].retryPolicy.retryableStatusCodes",
        ),
        (
            &retry(&format!(r#"{{{ok}, "retryableStatusCodes": ["NOPE"]}}"#)),
            "methodConfig[0].retryPolicy.retryableStatusCodes[0]",
        ),
        (
            &retry(&format!(r#"{{{ok}, "retryableStatusCodes": ["OK"]}}"#)),
            "methodConfig[0].retryPolicy.retryableStatusCodes[0]",
        ),
        (
            &retry(
                r#"{"maxAttempts": 1, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": [14]}"#,
            ),
            "methodConfig[0].retryPolicy.maxAttempts",
        ),
        (
            &retry(
                r#"{"maxAttempts": 2, "initialBackoff": "0s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": [14]}"#,
            ),
            "methodConfig[0].retryPolicy.initialBackoff",
        ),
        (
            &retry(
                r#"{"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 0, "retryableStatusCodes": [14]}"#,
            ),
            "methodConfig[0].retryPolicy.backoffMultiplier",
        ),
        (
            r#"{"methodConfig": [{"name": [{"service": "s"}], "retryPolicy": {}, "hedgingPolicy": {}}]}"#,
            "methodConfig[0].hedgingPolicy",
        ),
        (
            r#"{"methodConfig": [{"name": [{"method": "M"}]}]}"#,
            "methodConfig[0].name[0].service",
        ),
        (
            r#"{"methodConfig": [{"name": [{}]}, {"name": [{"service": ""}]}]}"#,
            "methodConfig[1].name[0]",
        ),
        (
            r#"{"methodConfig": [{"name": [{}], "waitForReady": "yes"}]}"#,
            "methodConfig[0].waitForReady",
        ),
        (
            r#"{"retryThrottling": {"maxTokens": 1001, "tokenRatio": 0.1}}"#,
            "retryThrottling.maxTokens",
        ),
        (
            r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": 0.0001}}"#,
            "retryThrottling.tokenRatio",
        ),
        (
            r#"{"retryThrottling": {"maxTokens": 10}}"#,
            "retryThrottling.tokenRatio",
        ),
        (
            r#"{"loadBalancingConfig": [{"round_robin": {}, "pick_first": {}}]}"#,
            "loadBalancingConfig[0]",
        ),
    ];
    for (text, field) in cases {
        let err = error_of(text);
        assert_eq!(err.field, field, "{text}: {err}");
        assert!(err.to_string().starts_with("service config: "), "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

#[test]
fn token_ratios_keep_three_decimal_places() {
    let ratio = |text: &str| {
        ServiceConfig::from_json(&format!(
            r#"{{"retryThrottling": {{"maxTokens": 10, "tokenRatio": {text}}}}}"#
        ))
        .unwrap()
        .retry_throttling
        .unwrap()
        .milli_token_ratio
    };
    assert_eq!(ratio("0.7"), 700);
    assert_eq!(ratio("0.5466"), 546);
    assert_eq!(ratio("1"), 1000);
}

#[test]
fn backoff_grows_to_its_cap() {
    let policy = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(350),
        backoff_multiplier: 2.0,
        retryable_codes: CodeSet::of(&[Code::Unavailable]),
    };
    let ms = |n| policy.backoff(n).as_millis();
    assert_eq!((ms(1), ms(2), ms(3), ms(40)), (100, 200, 350, 350));
}

#[test]
fn a_typed_config_is_checked_as_json_is() {
    let err = ServiceConfig::with_methods(vec![MethodConfig {
        names: vec![MethodName::default()],
        policy: Some(CallPolicy::Hedging(HedgingPolicy {
            max_attempts: 1,
            hedging_delay: Duration::ZERO,
            non_fatal_codes: CodeSet::default(),
        })),
        ..MethodConfig::default()
    }])
    .unwrap_err();
    assert_eq!(err.field, "methodConfig[0].hedgingPolicy.maxAttempts");
}

#[test]
fn load_balancing_takes_the_first_known_policy_and_checks_them_all() {
    let config = ServiceConfig::from_json(
        r#"{"loadBalancingConfig": [
            {"some_future_policy": {"knob": 1}},
            {"outlier_detection_experimental": {
                "interval": "1s", "maxEjectionPercent": 50,
                "failurePercentageEjection": {"threshold": 90, "requestVolume": 10},
                "childPolicy": [{"least_request_experimental": {"choiceCount": 3}}]}},
            {"round_robin": {}}]}"#,
    )
    .unwrap();
    let policy = config.lb_policy().expect("a known policy");
    assert_eq!(
        policy.picking(),
        &LbPolicy::LeastRequest { choice_count: 3 }
    );
    let outlier = policy.outlier_detection().expect("outlier detection");
    assert_eq!(outlier.interval, Duration::from_secs(1));
    assert_eq!(outlier.max_ejection_percent, 50);
    // A50's defaults for what the document leaves out; an absent kind is off.
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(30));
    assert_eq!(outlier.success_rate, None);
    let failure = outlier.failure_percentage.expect("failure percentage");
    assert_eq!((failure.threshold, failure.minimum_hosts), (90, 5));
    assert_eq!(failure.request_volume, 10);
    // Unknown names are kept for other clients, and written back.
    assert_eq!(config.load_balancing().len(), 3);
    let again = ServiceConfig::from_json(&config.to_json()).unwrap();
    assert_eq!(again, config);
}

#[test]
fn each_bad_load_balancing_entry_is_refused_naming_its_field() {
    let lb = |list: &str| format!(r#"{{"loadBalancingConfig": {list}}}"#);
    let cases = [
        (lb(r#"[{"nope": {}}]"#), "loadBalancingConfig"),
        (lb(r#"[{"round_robin": {}, "pick_first": {}}]"#), "loadBalancingConfig[0]"),
        (
            lb(r#"[{"round_robin": {}}, {"least_request_experimental": {"choiceCount": 1}}]"#),
            "loadBalancingConfig[1].least_request_experimental.choiceCount",
        ),
        (
            lb(r#"[{"outlier_detection_experimental": {}}]"#),
            "loadBalancingConfig[0].outlier_detection_experimental.childPolicy",
        ),
        (
            lb(r#"[{"outlier_detection_experimental": {"interval": "0s",
                "childPolicy": [{"round_robin": {}}]}}]"#),
            "loadBalancingConfig[0].outlier_detection_experimental.interval",
        ),
        (
            lb(r#"[{"outlier_detection_experimental": {"maxEjectionPercent": 101,
                "childPolicy": [{"round_robin": {}}]}}]"#),
            "loadBalancingConfig[0].outlier_detection_experimental.maxEjectionPercent",
        ),
        (
            lb(r#"[{"outlier_detection_experimental": {
                "successRateEjection": {"enforcementPercentage": 200},
                "childPolicy": [{"round_robin": {}}]}}]"#),
            "loadBalancingConfig[0].outlier_detection_experimental.successRateEjection.enforcementPercentage",
        ),
        (
            lb(r#"[{"outlier_detection_experimental": {"childPolicy": [{"nope": {}}]}}]"#),
            "loadBalancingConfig[0].outlier_detection_experimental.childPolicy",
        ),
        (
            lb(r#"[{"outlier_detection_experimental": {"childPolicy": [
                {"outlier_detection_experimental": {"childPolicy": [{"round_robin": {}}]}}]}}]"#),
            "loadBalancingConfig[0].outlier_detection_experimental.childPolicy",
        ),
    ];
    for (text, field) in cases {
        let err = error_of(&text);
        assert_eq!(err.field, field, "{text}: {err}");
    }
}

#[test]
fn every_known_policy_is_kept_in_order() {
    let config = ServiceConfig::from_json(
        r#"{"loadBalancingConfig": [
            {"weighted_round_robin": {}}, {"some_future_policy": {}},
            {"least_request": {"choiceCount": 4}}, {"pick_first": {}}]}"#,
    )
    .unwrap();
    assert_eq!(
        config.lb_policies(),
        [
            LbPolicy::WeightedRoundRobin,
            LbPolicy::LeastRequest { choice_count: 4 },
            LbPolicy::PickFirst
        ]
    );
    assert_eq!(config.lb_policy(), Some(&LbPolicy::WeightedRoundRobin));
    assert!(ServiceConfig::default().lb_policies().is_empty());
}

#[test]
fn circuit_breakers_are_a_checked_extension_that_round_trips() {
    let config = ServiceConfig::from_json(r#"{"circuitBreakers": {"maxRequests": 100}}"#).unwrap();
    assert_eq!(
        config.circuit_breakers(),
        Some(CircuitBreakers { max_requests: 100 })
    );
    let again = ServiceConfig::from_json(&config.to_json()).unwrap();
    assert_eq!(again, config);
    assert_eq!(ServiceConfig::default().circuit_breakers(), None);
    for (bad, field) in [
        (
            r#"{"circuitBreakers": {"maxRequests": 0}}"#,
            "circuitBreakers.maxRequests",
        ),
        (
            r#"{"circuitBreakers": {"maxRequests": -3}}"#,
            "circuitBreakers.maxRequests",
        ),
        (
            r#"{"circuitBreakers": {"maxRequests": 1.5}}"#,
            "circuitBreakers.maxRequests",
        ),
        (
            r#"{"circuitBreakers": {"maxRequests": "10"}}"#,
            "circuitBreakers.maxRequests",
        ),
        (
            r#"{"circuitBreakers": {"maxRequests": 4294967296}}"#,
            "circuitBreakers.maxRequests",
        ),
        (r#"{"circuitBreakers": {}}"#, "circuitBreakers.maxRequests"),
        (r#"{"circuitBreakers": 5}"#, "circuitBreakers"),
    ] {
        assert_eq!(error_of(bad).field, field, "{bad}");
    }
    let typed = ServiceConfig::default().with_circuit_breakers(CircuitBreakers { max_requests: 0 });
    assert_eq!(typed.unwrap_err().field, "circuitBreakers.maxRequests");
}

#[test]
fn zone_preference_is_a_checked_extension_that_round_trips() {
    let config = ServiceConfig::from_json(
        r#"{"zonePreference": {"enabled": false, "overprovisioningFactor": 2}}"#,
    )
    .unwrap();
    assert_eq!(
        config.zone_preference(),
        ZonePreference {
            enabled: false,
            overprovisioning_percent: 200
        }
    );
    assert_eq!(ServiceConfig::from_json(&config.to_json()).unwrap(), config);
    // Absent, or with fields left out: the defaults (on, Envoy's 1.4).
    assert_eq!(
        ServiceConfig::default().zone_preference(),
        ZonePreference::default()
    );
    let partial = ServiceConfig::from_json(r#"{"zonePreference": {}}"#).unwrap();
    assert_eq!(partial.zone_preference().overprovisioning_percent, 140);
    for (bad, field, reason) in [
        (r#"{"zonePreference": true}"#, "zonePreference", "object"),
        (
            r#"{"zonePreference": {"enabled": "yes"}}"#,
            "zonePreference.enabled",
            "true or false",
        ),
        (
            r#"{"zonePreference": {"overprovisioningFactor": 0.5}}"#,
            "zonePreference.overprovisioningFactor",
            "from 1 to 100",
        ),
        (
            r#"{"zonePreference": {"overprovisioningFactor": "1.4"}}"#,
            "zonePreference.overprovisioningFactor",
            "from 1 to 100",
        ),
    ] {
        let err = error_of(bad);
        assert_eq!(err.field, field, "{bad}");
        assert!(err.reason.contains(reason), "{bad}: {err}");
    }
}

#[test]
fn slow_start_is_read_from_the_chosen_policy_and_checked_in_every_entry() {
    let config = ServiceConfig::from_json(
        r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
            "childPolicy": [{"round_robin": {"slowStartConfig": {"slowStartWindow": "30s"}}}]}}]}"#,
    )
    .unwrap();
    assert_eq!(
        config.slow_start(),
        Some(SlowStartConfig {
            window: Duration::from_secs(30),
            aggression: 1.0,
            min_weight_percent: 10.0,
        })
    );
    // It round-trips: the policy's own object is written back as it was.
    assert_eq!(ServiceConfig::from_json(&config.to_json()).unwrap(), config);
    assert_eq!(ServiceConfig::default().slow_start(), None);
    let at = "loadBalancingConfig[0].round_robin.slowStartConfig";
    for (bad, field) in [
        (r#"{}"#, format!("{at}.slowStartWindow")),
        (
            r#"{"slowStartWindow": "0s"}"#,
            format!("{at}.slowStartWindow"),
        ),
        (
            r#"{"slowStartWindow": "1s", "aggression": 0}"#,
            format!("{at}.aggression"),
        ),
        (
            r#"{"slowStartWindow": "1s", "minWeightPercent": 101}"#,
            format!("{at}.minWeightPercent"),
        ),
        (
            r#"{"slowStartWindow": "1s", "minWeightPercent": "5"}"#,
            format!("{at}.minWeightPercent"),
        ),
        (r#"5"#, at.to_string()),
    ] {
        let text = format!(
            r#"{{"loadBalancingConfig": [{{"round_robin": {{"slowStartConfig": {bad}}}}}]}}"#
        );
        assert_eq!(error_of(&text).field, field, "{text}");
    }
    // A fallback entry is checked too.
    let fallback = r#"{"loadBalancingConfig": [{"pick_first": {}},
        {"least_request_experimental": {"slowStartConfig": {"slowStartWindow": "-1s"}}}]}"#;
    assert!(error_of(fallback).field.ends_with("slowStartWindow"));
}

#[test]
fn ring_hash_takes_a42_defaults_caps_its_sizes_and_reads_its_header() {
    let ring = |config: &str| {
        let text =
            format!(r#"{{"loadBalancingConfig": [{{"ring_hash_experimental": {config}}}]}}"#);
        match ServiceConfig::from_json(&text).unwrap().lb_policy() {
            Some(LbPolicy::RingHash(config)) => *config,
            other => panic!("{text}: {other:?}"),
        }
    };
    assert_eq!(ring("{}"), RingHashConfig::default());
    assert_eq!(
        (ring("{}").min_ring_size, ring("{}").max_ring_size),
        (1024, 4096)
    );
    // 0 is the default; past the cap is lowered to it, as grpc-go does.
    let sized = ring(r#"{"minRingSize": 0, "maxRingSize": 8388608}"#);
    assert_eq!((sized.min_ring_size, sized.max_ring_size), (1024, 4096));
    let small = ring(r#"{"minRingSize": 4, "maxRingSize": 16}"#);
    assert_eq!((small.min_ring_size, small.max_ring_size), (4, 16));
    let keyed = ring(r#"{"requestHashHeader": "X-Session"}"#);
    assert_eq!(
        keyed.hash_header.map(|h| h.to_string()).as_deref(),
        Some("x-session")
    );
    assert_eq!(ring(r#"{"requestHashHeader": ""}"#).hash_header, None);
    assert_eq!(ring("{}").points_per_endpoint, None);
    assert_eq!(
        ring(r#"{"pointsPerEndpoint": 160}"#).points_per_endpoint,
        Some(160)
    );
}

#[test]
fn each_bad_ring_hash_field_is_refused_by_name() {
    let at = "loadBalancingConfig[0].ring_hash_experimental";
    let cases = [
        (r#"{"minRingSize": 8388609}"#, "minRingSize", "8M"),
        (r#"{"maxRingSize": 8388609}"#, "maxRingSize", "8M"),
        (r#"{"maxRingSize": -1}"#, "maxRingSize", "non-negative"),
        (
            r#"{"minRingSize": 20, "maxRingSize": 10}"#,
            "minRingSize",
            "maxRingSize",
        ),
        (
            r#"{"requestHashHeader": "key-bin"}"#,
            "requestHashHeader",
            "binary",
        ),
        (
            r#"{"requestHashHeader": "a b"}"#,
            "requestHashHeader",
            "metadata key",
        ),
        (
            r#"{"requestHashHeader": 7}"#,
            "requestHashHeader",
            "header name",
        ),
        (
            r#"{"pointsPerEndpoint": 0}"#,
            "pointsPerEndpoint",
            "1 to 4096",
        ),
        (
            r#"{"pointsPerEndpoint": 4097}"#,
            "pointsPerEndpoint",
            "1 to 4096",
        ),
        (
            r#"{"pointsPerEndpoint": "many"}"#,
            "pointsPerEndpoint",
            "integer",
        ),
    ];
    for (config, field, reason) in cases {
        let text =
            format!(r#"{{"loadBalancingConfig": [{{"ring_hash_experimental": {config}}}]}}"#);
        let err = error_of(&text);
        assert_eq!(err.field, format!("{at}.{field}"), "{text}: {err}");
        assert!(err.reason.contains(reason), "{text}: {err}");
    }
}
