//! Metrics in the Prometheus text format.
//!
//! The library never opens a port by itself: metrics are registered into a
//! [`prometheus_client::registry::Registry`] that the application owns and
//! serves where it wants. The `switchboard` subcommands do so with `http`,
//! a small HTTP/1 server for `/metrics` (and, on the registry, its status
//! page).

#[cfg(any(feature = "registry", feature = "registration"))]
pub mod http;

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
