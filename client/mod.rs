//! The client library: a streaming resolver feeding live `pick_first` and
//! `round_robin` balancers, behind a tower service that any tonic-generated
//! client accepts.
//!
//! - [`target`]: `registry://`, `static:///` and `dns:///` target strings;
//! - [`resolver`]: the [`Resolver`] trait and the static resolver;
//! - [`registry_resolver`]: endpoints from a registry watch stream;
//! - [`dns_resolver`]: endpoints from DNS, for `dns:///` targets;
//! - [`subchannel`]: one backend connection and its state machine;
//! - [`health`]: client-side health checking of each subchannel;
//! - [`transport`]: dialling a backend, over TLS if configured;
//! - [`policy`], [`round_robin`], [`pick_first`]: who gets RPCs;
//! - [`least_request`], [`weighted_round_robin`]: policies for backends
//!   that are unequal or unwell (built on [`ready_set`]);
//! - [`outlier_detection`]: ejects failing backends, around any policy;
//! - [`balancer`]: the task that turns all of the above into a picker;
//! - [`metrics`]: the channel's Prometheus metrics, in a registry the
//!   application serves;
//! - [`channel`]: [`BalancedChannel`], the tower service;
//! - [`backoff`]: gRPC's connection backoff;
//! - [`error`]: [`Error`], [`ConnectError`] and [`ResolverError`], the causes
//!   of failures.

pub mod backoff;
pub mod balancer;
pub mod channel;
pub mod dns_resolver;
pub mod error;
pub mod health;
pub mod least_request;
pub mod metrics;
pub mod outlier_detection;
pub mod pick_first;
pub mod policy;
pub mod ready_set;
pub mod registry_resolver;
pub mod resolver;
pub mod round_robin;
pub mod subchannel;
pub mod target;
pub mod transport;
pub mod weighted_round_robin;

pub use backoff::BackoffConfig;
pub use balancer::{BalancerState, BalancerStats};
pub use channel::{BalancedChannel, Builder, PolicyKind, WaitForReady};
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
pub use subchannel::{ConnectionStats, ConnectivityState};
pub use target::Target;
