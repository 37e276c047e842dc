//! A tower layer that counts every registry RPC by method and status code,
//! times it, and counts refusals by cap and by token. It sits outermost, so
//! it also sees what the token and message-size layers refuse.
//!
//! Each call is counted when it ends (see [`crate::metrics::rpc`]): a
//! Watch, KeepAlive or ADS stream with the status it finished with, and
//! timed until then.

use std::time::Duration;

use super::metrics::RegistryMetrics;
use crate::metrics::rpc::{RpcEndLayer, RpcObserver};

/// Counts the registry's RPCs into [`RegistryMetrics`] as each one ends.
pub type RpcMetricsLayer = RpcEndLayer<RegistryMetrics>;

impl RpcObserver for RegistryMetrics {
    fn rpc_ended(&self, method: &str, code: tonic::Code, message: &str, elapsed: Duration) {
        self.rpcs.observe(method, code, elapsed);
        match code {
            tonic::Code::ResourceExhausted => self.refused_by_cap(cap_of(message)),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => self.refused_by_auth(),
            _ => {}
        }
    }
}

/// The cap a RESOURCE_EXHAUSTED message names: every cap's message starts
/// with `<cap> limit of ...`; a service name in parentheses is dropped.
fn cap_of(message: &str) -> &str {
    let name = message.split(" limit of").next().unwrap_or_default();
    let name = name.split(" (").next().unwrap_or_default().trim();
    if name.is_empty() || name.len() > 64 {
        "other"
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::cap_of;
    use crate::metrics::code_name;

    #[test]
    fn codes_have_their_grpc_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
    }

    #[test]
    fn caps_are_named_by_their_message() {
        assert_eq!(cap_of("services limit of 3 reached"), "services");
        assert_eq!(
            cap_of("endpoints per service (a.b) limit of 2 reached"),
            "endpoints per service"
        );
        assert_eq!(
            cap_of("message size limit of 10 bytes reached: x"),
            "message size"
        );
        assert_eq!(cap_of(""), "other");
    }
}
