//! The registry's caps, named once. A refusal past a cap carries its
//! [`Cap`] as the source of its RESOURCE_EXHAUSTED status, so the metrics
//! layer counts it by that value (how it gets there from each cap: the
//! `rpc_metrics` module) and nothing ever reads the cap back out of the
//! message.

use std::sync::Arc;

use tonic::Status;

/// The `cap` label of a refusal no [`Cap`] explains. It is also what the
/// ADS cap is labelled: the label was read from messages before this
/// enum existed, and that message names no cap, so dashboards know it by
/// this name.
pub const OTHER: &str = "other";

/// One cap of the registry: what a RESOURCE_EXHAUSTED refusal ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cap {
    /// Services with endpoints (`--max-services`).
    Services,
    /// Endpoints of one service (`--max-endpoints-per-service`).
    EndpointsPerService,
    /// Watch streams open at once, in all (`--max-watch-streams`); ADS
    /// streams have a pool of their own under the same cap.
    WatchStreams,
    /// Watch streams open at once on one client connection
    /// (`--max-watch-streams-per-connection`); ADS likewise.
    WatchStreamsPerConnection,
    /// Register calls per second on one client connection
    /// (`--max-registrations-per-second`).
    RegistrationsPerSecondPerConnection,
    /// The size of one request message (`--max-message-bytes`).
    MessageSize,
    /// Services one ADS stream may name (`MAX_NAMES_PER_STREAM` of the
    /// xDS stream).
    AdsServicesPerStream,
}

impl Cap {
    /// The value of the `cap` label of `switchboard_registry_refusals_total`.
    /// Dashboards and alerts match these strings: never change one.
    pub fn label(self) -> &'static str {
        match self {
            Cap::Services => "services",
            Cap::EndpointsPerService => "endpoints per service",
            Cap::WatchStreams => "watch streams",
            Cap::WatchStreamsPerConnection => "watch streams per connection",
            Cap::RegistrationsPerSecondPerConnection => "registrations per second per connection",
            Cap::MessageSize => "message size",
            Cap::AdsServicesPerStream => OTHER,
        }
    }

    /// How a refusal's message names the cap, as in `<words> limit of 2
    /// reached`. The ADS cap's message is a sentence of its own ("an ADS
    /// stream may name at most ..."), kept as clients know it.
    pub fn words(self) -> &'static str {
        match self {
            Cap::AdsServicesPerStream => "services per ADS stream",
            other => other.label(),
        }
    }

    /// A RESOURCE_EXHAUSTED status saying `message`, with this cap as its
    /// source for whoever counts refusals on the way out.
    pub fn refusal(self, message: impl Into<String>) -> Status {
        let mut status = Status::resource_exhausted(message);
        status.set_source(Arc::new(self));
        status
    }
}

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.words())
    }
}

/// A cap is the cause of its refusal: as an error it can ride as a
/// status's source.
impl std::error::Error for Cap {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cap_keeps_the_label_it_was_counted_under() {
        // The labels that messages gave before caps were typed.
        for (cap, label) in [
            (Cap::Services, "services"),
            (Cap::EndpointsPerService, "endpoints per service"),
            (Cap::WatchStreams, "watch streams"),
            (
                Cap::WatchStreamsPerConnection,
                "watch streams per connection",
            ),
            (
                Cap::RegistrationsPerSecondPerConnection,
                "registrations per second per connection",
            ),
            (Cap::MessageSize, "message size"),
            (Cap::AdsServicesPerStream, "other"),
        ] {
            assert_eq!(cap.label(), label, "{cap:?}");
        }
    }

    #[test]
    fn a_refusal_carries_its_cap() {
        let status = Cap::MessageSize.refusal("message size limit of 1 bytes reached");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let source = std::error::Error::source(&status).expect("a source");
        assert_eq!(source.downcast_ref::<Cap>(), Some(&Cap::MessageSize));
        assert_eq!(
            Cap::EndpointsPerService.to_string(),
            "endpoints per service"
        );
    }
}
