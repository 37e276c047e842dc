//! A tower layer that counts every registry RPC by method and status code,
//! times it, and counts refusals by cap and by token. It sits outermost, so
//! it also sees what the token and message-size layers refuse.
//!
//! Each call is counted when it ends (see [`crate::metrics::rpc`]): a
//! Watch, KeepAlive or ADS stream with the status it finished with, and
//! timed until then.
//!
//! A RESOURCE_EXHAUSTED refusal is counted under the label of the [`Cap`]
//! its code attached, never under words read from its message. Every cap
//! attaches itself as the source of its status ([`Cap::refusal`]); how
//! that value reaches this layer depends on where the call is refused:
//!
//! - **a handler's error before any response**: Register's caps (rate per
//!   connection, services, endpoints per service) and the Watch and ADS
//!   stream caps, met before their stream starts. tonic answers
//!   trailers-only and leaves the status in the response's extensions,
//!   where the layer reads its source.
//! - **a stream's last status**: the ADS stream's cap on the services it
//!   names, met mid-stream. tonic sends that status as trailers and drops
//!   the value, so every registry response stream goes through
//!   [`keep_end_cause`](crate::metrics::rpc::keep_end_cause), which
//!   records it in the call's [`EndCause`](crate::metrics::rpc::EndCause)
//!   slot on its way out.
//! - **a request body's error**: the message size cap, met by the
//!   [`message_size`](super::message_size) layer as a frame's length
//!   arrives. tonic's router wraps the body's error, and tonic rebuilds a
//!   status from the wrapper (the cap three sources deep, by a downcast
//!   tonic promises nothing about); that status then ends the call
//!   trailers-only (unary, Watch) or, when the handler passes it on, as its
//!   stream's trailers (KeepAlive, ADS). So the message-size layer records
//!   its cap in the call's slot itself when it fails the body, whatever
//!   becomes of the status.
//!
//! Counting at each cap's site instead would need the metrics handle in
//! the message-size layer and the ADS stream, and this layer would then
//! have to tell which RESOURCE_EXHAUSTED were already counted; with the
//! slot, refusals are counted in one place, once per call that ended.
//! A RESOURCE_EXHAUSTED that no cap explains (tonic's own) keeps the label
//! it always had, [`OTHER`](super::cap::OTHER).

use super::cap::Cap;
use super::metrics::RegistryMetrics;
use crate::metrics::rpc::{CallEnd, RpcEndLayer, RpcObserver};

/// Counts the registry's RPCs into [`RegistryMetrics`] as each one ends.
pub type RpcMetricsLayer = RpcEndLayer<RegistryMetrics>;

impl RpcObserver for RegistryMetrics {
    fn rpc_ended(&self, call: &CallEnd<'_>) {
        self.rpcs.observe(call.method, call.code, call.elapsed);
        match call.code {
            // A cap recorded for a call that then ended another way (a
            // heartbeat refused before an oversized one is read) is no
            // refusal by that cap.
            tonic::Code::ResourceExhausted => {
                self.refused_by_cap(call.find_cause::<Cap>().copied())
            }
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => self.refused_by_auth(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::code_name;

    #[test]
    fn codes_have_their_grpc_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
    }

    /// `metrics` in the text format.
    fn rendered(metrics: &RegistryMetrics) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        crate::metrics::render(&registry)
    }

    #[test]
    fn refusals_are_counted_by_the_cap_they_carry() {
        let metrics = RegistryMetrics::default();
        let refusal = Cap::WatchStreamsPerConnection.refusal("no text is read");
        let end = |code, cause| CallEnd {
            method: "Watch",
            code,
            cause,
            elapsed: Duration::ZERO,
        };
        // The cap itself (a handler's status's source), the status whole
        // (a stream's, recorded in the slot), no cause, another code.
        let cap = std::error::Error::source(&refusal);
        metrics.rpc_ended(&end(tonic::Code::ResourceExhausted, cap));
        metrics.rpc_ended(&end(tonic::Code::ResourceExhausted, Some(&refusal)));
        metrics.rpc_ended(&end(tonic::Code::ResourceExhausted, None));
        metrics.rpc_ended(&end(tonic::Code::NotFound, Some(&refusal)));
        let text = rendered(&metrics);
        let mut refusals: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("switchboard_registry_refusals_total"))
            .collect();
        refusals.sort();
        assert_eq!(
            refusals,
            [
                "switchboard_registry_refusals_total{reason=\"cap\",cap=\"other\"} 1",
                "switchboard_registry_refusals_total{reason=\"cap\",cap=\"watch streams per connection\"} 2",
            ],
            "{text}"
        );
    }
}
