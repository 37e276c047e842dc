//! The service config's JSON form: read with every error naming its field,
//! and written back in the same shape.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{
    CallPolicy, CircuitBreakers, CodeSet, HedgingPolicy, LbPolicyConfig, MethodConfig, MethodName,
    RetryPolicy, RetryThrottling, ServiceConfig, ZonePreference,
};

/// Why a service config was refused: the field, as a JSON path like
/// `methodConfig[0].retryPolicy.maxAttempts`, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service config: {field}: {reason}")]
pub struct ConfigError {
    /// Where in the document.
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl ConfigError {
    pub(super) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub(super) fn parse(text: &str) -> Result<ServiceConfig, ConfigError> {
    let root: Value = serde_json::from_str(text).map_err(|e| {
        let at = format!("line {} column {}", e.line(), e.column());
        let message = e.to_string();
        let what = message.trim_end_matches(&format!(" at {at}"));
        ConfigError::new(at, format!("not valid JSON: {what}"))
    })?;
    let root = object(&root, "(top level)")?;
    let mut config = ServiceConfig::default();
    if let Some(list) = root.get("loadBalancingConfig") {
        config.load_balancing = policy_list(list, "loadBalancingConfig")?;
    } else if let Some(name) = root.get("loadBalancingPolicy") {
        // The deprecated form, still written by older configs.
        let name = string(name, "loadBalancingPolicy")?;
        config.load_balancing.push(LbPolicyConfig {
            name: name.to_ascii_lowercase(),
            config: Value::Object(Map::new()),
        });
    }
    if let Some(list) = root.get("methodConfig") {
        for (i, entry) in array(list, "methodConfig")?.iter().enumerate() {
            let method = method_config(entry, &format!("methodConfig[{i}]"))?;
            // An entry that names nothing applies to nothing (gRPC skips it).
            if !method.names.is_empty() {
                config.methods.push(method);
            }
        }
    }
    if let Some(throttling) = root.get("retryThrottling") {
        let at = "retryThrottling";
        let fields = object(throttling, at)?;
        config.retry_throttling = Some(RetryThrottling {
            max_milli_tokens: milli(
                required(fields, "maxTokens", at)?,
                "retryThrottling.maxTokens",
            )?,
            milli_token_ratio: milli(
                required(fields, "tokenRatio", at)?,
                "retryThrottling.tokenRatio",
            )?,
        });
    }
    if let Some(breakers) = root.get("circuitBreakers") {
        let at = "circuitBreakers";
        let fields = object(breakers, at)?;
        let max = required(fields, "maxRequests", at)?;
        let max_requests = max
            .as_u64()
            .filter(|n| *n > 0)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                ConfigError::new(
                    "circuitBreakers.maxRequests",
                    format!(
                        "must be a positive integer (at most {}), got {max}",
                        u32::MAX
                    ),
                )
            })?;
        config.circuit_breakers = Some(CircuitBreakers { max_requests });
    }
    if let Some(preference) = root.get("zonePreference") {
        config.zone_preference = Some(zone_preference(preference)?);
    }
    if let Some(health) = root.get("healthCheckConfig") {
        let fields = object(health, "healthCheckConfig")?;
        if let Some(name) = fields.get("serviceName") {
            config.health_check_service =
                Some(string(name, "healthCheckConfig.serviceName")?.to_owned());
        }
    }
    config.validated()
}

/// `zonePreference`: `enabled` and `overprovisioningFactor`, each optional.
fn zone_preference(value: &Value) -> Result<ZonePreference, ConfigError> {
    let at = "zonePreference";
    let fields = object(value, at)?;
    let mut preference = ZonePreference::default();
    if let Some(enabled) = fields.get("enabled") {
        preference.enabled = enabled.as_bool().ok_or_else(|| {
            ConfigError::new(
                "zonePreference.enabled",
                format!("must be true or false, got {enabled}"),
            )
        })?;
    }
    if let Some(factor) = fields.get("overprovisioningFactor") {
        preference.overprovisioning_percent = factor
            .as_f64()
            .filter(|f| (1.0..=100.0).contains(f))
            .map(|f| (f * 100.0).round() as u32)
            .ok_or_else(|| {
                ConfigError::new(
                    "zonePreference.overprovisioningFactor",
                    format!("must be a number from 1 to 100, got {factor}"),
                )
            })?;
    }
    Ok(preference)
}

/// A `loadBalancingConfig`-shaped list: objects of one policy each.
pub(super) fn policy_list(list: &Value, at: &str) -> Result<Vec<LbPolicyConfig>, ConfigError> {
    let mut policies = Vec::new();
    for (i, entry) in array(list, at)?.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let entry = object(entry, &at)?;
        let mut fields = entry.iter();
        let (Some((name, policy)), None) = (fields.next(), fields.next()) else {
            return Err(ConfigError::new(
                at,
                "must hold exactly one policy, as {\"name\": {config}}",
            ));
        };
        object(policy, &format!("{at}.{name}"))?;
        policies.push(LbPolicyConfig {
            name: name.clone(),
            config: policy.clone(),
        });
    }
    Ok(policies)
}

fn method_config(entry: &Value, at: &str) -> Result<MethodConfig, ConfigError> {
    let fields = object(entry, at)?;
    let mut method = MethodConfig::default();
    if let Some(names) = fields.get("name") {
        for (j, name) in array(names, &format!("{at}.name"))?.iter().enumerate() {
            let at = format!("{at}.name[{j}]");
            let name = object(name, &at)?;
            let part = |key: &str| -> Result<Option<String>, ConfigError> {
                match name.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(value) => {
                        let text = string(value, &format!("{at}.{key}"))?;
                        Ok((!text.is_empty()).then(|| text.to_owned()))
                    }
                }
            };
            method.names.push(MethodName {
                service: part("service")?,
                method: part("method")?,
            });
        }
    }
    if let Some(timeout) = fields.get("timeout") {
        method.timeout = Some(duration(timeout, &format!("{at}.timeout"))?);
    }
    if let Some(wait) = fields.get("waitForReady") {
        method.wait_for_ready = Some(wait.as_bool().ok_or_else(|| {
            ConfigError::new(format!("{at}.waitForReady"), "must be true or false")
        })?);
    }
    match (fields.get("retryPolicy"), fields.get("hedgingPolicy")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                format!("{at}.hedgingPolicy"),
                "cannot be set together with retryPolicy",
            ))
        }
        (Some(retry), None) => {
            let at = format!("{at}.retryPolicy");
            let fields = object(retry, &at)?;
            let field = |key: &str| format!("{at}.{key}");
            method.policy = Some(CallPolicy::Retry(RetryPolicy {
                max_attempts: attempts(
                    required(fields, "maxAttempts", &at)?,
                    &field("maxAttempts"),
                )?,
                initial_backoff: duration(
                    required(fields, "initialBackoff", &at)?,
                    &field("initialBackoff"),
                )?,
                max_backoff: duration(required(fields, "maxBackoff", &at)?, &field("maxBackoff"))?,
                backoff_multiplier: required(fields, "backoffMultiplier", &at)?
                    .as_f64()
                    .ok_or_else(|| {
                        ConfigError::new(field("backoffMultiplier"), "must be a number above 0")
                    })?,
                retryable_codes: codes(
                    required(fields, "retryableStatusCodes", &at)?,
                    &field("retryableStatusCodes"),
                )?,
            }));
        }
        (None, Some(hedging)) => {
            let at = format!("{at}.hedgingPolicy");
            let fields = object(hedging, &at)?;
            let field = |key: &str| format!("{at}.{key}");
            method.policy = Some(CallPolicy::Hedging(HedgingPolicy {
                max_attempts: attempts(
                    required(fields, "maxAttempts", &at)?,
                    &field("maxAttempts"),
                )?,
                hedging_delay: match fields.get("hedgingDelay") {
                    Some(delay) => duration(delay, &field("hedgingDelay"))?,
                    None => Duration::ZERO,
                },
                non_fatal_codes: match fields.get("nonFatalStatusCodes") {
                    Some(list) => codes(list, &field("nonFatalStatusCodes"))?,
                    None => CodeSet::default(),
                },
            }));
        }
        (None, None) => {}
    }
    Ok(method)
}

pub(super) fn object<'a>(
    value: &'a Value,
    at: &str,
) -> Result<&'a Map<String, Value>, ConfigError> {
    value
        .as_object()
        .ok_or_else(|| ConfigError::new(at, format!("must be an object, got {}", kind(value))))
}

fn array<'a>(value: &'a Value, at: &str) -> Result<&'a Vec<Value>, ConfigError> {
    value
        .as_array()
        .ok_or_else(|| ConfigError::new(at, format!("must be an array, got {}", kind(value))))
}

fn string<'a>(value: &'a Value, at: &str) -> Result<&'a str, ConfigError> {
    value
        .as_str()
        .ok_or_else(|| ConfigError::new(at, format!("must be a string, got {}", kind(value))))
}

fn required<'a>(
    fields: &'a Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<&'a Value, ConfigError> {
    fields
        .get(key)
        .ok_or_else(|| ConfigError::new(format!("{at}.{key}"), "is required"))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A non-negative integer that fits 32 bits.
pub(super) fn uint(value: &Value, at: &str) -> Result<u32, ConfigError> {
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| ConfigError::new(at, format!("must be a non-negative integer, got {value}")))
}

/// `maxAttempts`: an integer; above [`super::MAX_ATTEMPTS`] it is clamped.
fn attempts(value: &Value, at: &str) -> Result<u32, ConfigError> {
    let n = value
        .as_u64()
        .ok_or_else(|| ConfigError::new(at, "must be an integer of at least 2"))?;
    Ok(n.min(u64::from(super::MAX_ATTEMPTS)) as u32)
}

/// A count in thousandths, from a number with up to 3 decimal places
/// (more are dropped, as gRPC drops them).
fn milli(value: &Value, at: &str) -> Result<u32, ConfigError> {
    let n = value
        .as_f64()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| ConfigError::new(at, "must be a number above 0"))?;
    // The nudge keeps 0.7 (stored as 0.69999...) at 700, not 699.
    Ok((n * 1000.0 + 1e-6).floor().min(f64::from(u32::MAX)) as u32)
}

/// A protobuf JSON duration: decimal seconds and an `s`, as `"0.25s"`.
pub(super) fn duration(value: &Value, at: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::new(at, format!("must be a duration like \"0.5s\", got {value}"));
    let text = value.as_str().ok_or_else(bad)?;
    let digits = text.strip_suffix('s').ok_or_else(bad)?;
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if (whole.is_empty() && fraction.is_empty())
        || fraction.len() > 9
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let secs: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let nanos: u32 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().map_err(|_| bad())?
    };
    Ok(Duration::new(secs, nanos))
}

/// A list of status codes, by name (any case) or number; `OK` is refused,
/// as it is never a failure.
fn codes(value: &Value, at: &str) -> Result<CodeSet, ConfigError> {
    let mut set = CodeSet::default();
    for (i, entry) in array(value, at)?.iter().enumerate() {
        let code = match entry {
            Value::Number(n) => n
                .as_u64()
                .filter(|n| *n <= 16)
                .map(|n| tonic::Code::from_i32(n as i32)),
            Value::String(name) => code_named(name),
            _ => None,
        }
        .ok_or_else(|| {
            ConfigError::new(
                format!("{at}[{i}]"),
                format!("{entry} is not a gRPC status code (a name like \"UNAVAILABLE\" or 0-16)"),
            )
        })?;
        if code == tonic::Code::Ok {
            return Err(ConfigError::new(
                format!("{at}[{i}]"),
                "OK is not a failure",
            ));
        }
        set.insert(code);
    }
    Ok(set)
}

fn code_named(name: &str) -> Option<tonic::Code> {
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|code| crate::metrics::code_name(*code).eq_ignore_ascii_case(name))
}

pub(super) fn write(config: &ServiceConfig) -> String {
    let mut root = Map::new();
    if !config.load_balancing.is_empty() {
        let policies = config
            .load_balancing
            .iter()
            .map(|p| {
                let mut entry = Map::new();
                entry.insert(p.name.clone(), p.config.clone());
                Value::Object(entry)
            })
            .collect();
        root.insert("loadBalancingConfig".into(), Value::Array(policies));
    }
    if !config.methods.is_empty() {
        let methods = config.methods.iter().map(method_json).collect();
        root.insert("methodConfig".into(), Value::Array(methods));
    }
    if let Some(t) = &config.retry_throttling {
        root.insert(
            "retryThrottling".into(),
            serde_json::json!({
                "maxTokens": f64::from(t.max_milli_tokens) / 1000.0,
                "tokenRatio": f64::from(t.milli_token_ratio) / 1000.0,
            }),
        );
    }
    if let Some(breakers) = &config.circuit_breakers {
        root.insert(
            "circuitBreakers".into(),
            serde_json::json!({ "maxRequests": breakers.max_requests }),
        );
    }
    if let Some(preference) = &config.zone_preference {
        root.insert(
            "zonePreference".into(),
            serde_json::json!({
                "enabled": preference.enabled,
                "overprovisioningFactor":
                    f64::from(preference.overprovisioning_percent) / 100.0,
            }),
        );
    }
    if let Some(name) = &config.health_check_service {
        root.insert(
            "healthCheckConfig".into(),
            serde_json::json!({ "serviceName": name }),
        );
    }
    Value::Object(root).to_string()
}

fn method_json(method: &MethodConfig) -> Value {
    let mut entry = Map::new();
    let names = method
        .names
        .iter()
        .map(|name| {
            let mut out = Map::new();
            if let Some(service) = &name.service {
                out.insert("service".into(), service.clone().into());
            }
            if let Some(m) = &name.method {
                out.insert("method".into(), m.clone().into());
            }
            Value::Object(out)
        })
        .collect();
    entry.insert("name".into(), Value::Array(names));
    if let Some(timeout) = method.timeout {
        entry.insert("timeout".into(), duration_json(timeout));
    }
    if let Some(wait) = method.wait_for_ready {
        entry.insert("waitForReady".into(), wait.into());
    }
    match &method.policy {
        Some(CallPolicy::Retry(r)) => {
            entry.insert(
                "retryPolicy".into(),
                serde_json::json!({
                    "maxAttempts": r.max_attempts,
                    "initialBackoff": duration_json(r.initial_backoff),
                    "maxBackoff": duration_json(r.max_backoff),
                    "backoffMultiplier": r.backoff_multiplier,
                    "retryableStatusCodes": codes_json(r.retryable_codes),
                }),
            );
        }
        Some(CallPolicy::Hedging(h)) => {
            entry.insert(
                "hedgingPolicy".into(),
                serde_json::json!({
                    "maxAttempts": h.max_attempts,
                    "hedgingDelay": duration_json(h.hedging_delay),
                    "nonFatalStatusCodes": codes_json(h.non_fatal_codes),
                }),
            );
        }
        None => {}
    }
    Value::Object(entry)
}

fn duration_json(duration: Duration) -> Value {
    let nanos = duration.subsec_nanos();
    let text = if nanos == 0 {
        format!("{}s", duration.as_secs())
    } else {
        let fraction = format!("{nanos:09}");
        format!("{}.{}s", duration.as_secs(), fraction.trim_end_matches('0'))
    };
    Value::String(text)
}

fn codes_json(codes: CodeSet) -> Value {
    codes
        .iter()
        .map(|code| Value::String(crate::metrics::code_name(code).to_owned()))
        .collect()
}

impl fmt::Display for ServiceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&write(self))
    }
}
