//! Metrics in the Prometheus text format.
//!
//! The library never opens a port by itself: metrics are registered into a
//! [`prometheus_client::registry::Registry`] that the application owns and
//! serves where it wants. The `switchboard` subcommands do so with `http`,
//! a small HTTP/1 server for `/metrics` (and, on the registry, its status
//! page).

#[cfg(any(feature = "registry", feature = "registration"))]
pub mod http;
#[cfg(any(feature = "registry", feature = "registration"))]
pub mod rpc;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the Prometheus text format (OpenMetrics flavour).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `registry` in the text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, registry);
    text
}

/// Label set of metrics keyed by arbitrary label names.
pub type Labels = Vec<(&'static str, String)>;

/// gRPC's canonical name of `code`, e.g. `RESOURCE_EXHAUSTED`: the value of
/// every `code` label.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
