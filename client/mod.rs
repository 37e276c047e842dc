//! The client library: a streaming resolver feeding live balancers, behind
//! a tower service that any tonic-generated client accepts.
//!
//! - [`target`]: `registry://`, `static:///` and `dns:///` target strings;
//! - [`resolver`]: the [`Resolver`] trait, the static resolver, and the
//!   registry's ([`resolver::registry`]) and DNS ([`resolver::dns`]) ones;
//! - [`subchannel`]: one backend connection and its state machine, with
//!   client-side health checking ([`subchannel::health`]);
//! - [`connectivity`]: the connectivity states every layer speaks;
//! - [`transport`]: dialling a backend, over TLS if configured;
//! - [`policy`]: who gets RPCs: the [`Policy`] seam and every policy
//!   (`pick_first`, `round_robin`, `least_request`, `weighted_round_robin`,
//!   and `outlier_detection` around any of them);
//! - [`balancer`]: the task that turns all of the above into a picker;
//! - [`metrics`]: the channel's Prometheus metrics, in a registry the
//!   application serves;
//! - [`channel`]: [`BalancedChannel`], the tower service, its builder and
//!   the send path;
//! - [`error`]: [`Error`], [`ConnectError`] and [`ResolverError`], the causes
//!   of failures.

pub mod balancer;
pub mod channel;
pub mod connectivity;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod resolver;
pub(crate) mod retry;
pub mod subchannel;
pub mod target;
pub mod transport;

// The paths these modules had before they moved into their folders.
pub use crate::net::backoff;
pub use policy::{
    least_request, outlier_detection, pick_first, ready_set, ring_hash, round_robin, slow_start,
    weighted_round_robin, wrapped, zone_aware,
};
pub use resolver::{dns as dns_resolver, registry as registry_resolver};
pub use subchannel::health;

pub use backoff::BackoffConfig;
pub use balancer::{BalancerState, BalancerStats};
pub use channel::{BalancedChannel, Builder, PolicyKind, RetryStats, WaitForReady};
pub use connectivity::ConnectivityState;
pub use dns_resolver::DnsResolver;
pub use error::{ConnectError, Error, ResolverError};
pub use health::HealthCheck;
pub use least_request::LeastRequestConfig;
pub use metrics::ClientMetrics;
pub use outlier_detection::OutlierDetectionConfig;
pub use policy::{CallOutcome, Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker};
pub use registry_resolver::RegistryResolver;
pub use resolver::{
    Endpoint, EndpointState, ResolveNow, Resolver, ResolverSink, StaticResolver, Update,
};
pub use ring_hash::{RequestHash, RingHashConfig};
pub use subchannel::ConnectionStats;
pub use target::Target;
