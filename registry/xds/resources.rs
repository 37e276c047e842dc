//! The xDS resources one registered service becomes, shaped the way gRPC's
//! xDS clients accept them (gRFCs A27, A28):
//!
//! - a Listener named after the service whose `api_listener` is an
//!   HttpConnectionManager with the route configuration inline and the
//!   router filter (clients refuse a filter chain without it);
//! - that RouteConfiguration, also served by itself for clients that ask
//!   for it over RDS: every domain, every path, to the service's cluster;
//! - a Cluster of type EDS, its endpoints over ADS, ROUND_ROBIN;
//! - the ClusterLoadAssignment: one locality holding every endpoint.
//!
//! A service with a service config gets its traffic policy too (see
//! [`super::policy`]): the Cluster's load-balancing policy list, outlier
//! detection and circuit breakers, and a route per configured method with
//! its retry policy and timeout, every route with ring_hash's hash policy. Without one, every resource is exactly
//! what it was before configs existed, so existing clients see no change.

use std::net::SocketAddr;

use crate::client::zone_aware::ZONE_KEY;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus,
    Locality, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::cluster_load_assignment::Policy;
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use prost::Name;

use super::policy;
use crate::discovery::{Endpoint, EndpointSet};
use crate::service_config::{ServiceConfig, ZonePreference};

/// The type URL of Listener resources (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The type URL of RouteConfiguration resources (RDS).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// The type URL of Cluster resources (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// The type URL of ClusterLoadAssignment resources (EDS).
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The resource types the registry serves, by what answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// LDS: one Listener per existing service.
    Listener,
    /// RDS: one RouteConfiguration per existing service.
    Route,
    /// CDS: one Cluster per existing service.
    Cluster,
    /// EDS: one ClusterLoadAssignment per subscribed name, empty when the
    /// service has no endpoints.
    Endpoints,
    /// A type the registry holds nothing of; answered with no resources.
    Other,
}

impl Kind {
    /// The kind of resources `type_url` names.
    pub fn of(type_url: &str) -> Self {
        match type_url {
            LISTENER => Kind::Listener,
            ROUTE => Kind::Route,
            CLUSTER => Kind::Cluster,
            ENDPOINTS => Kind::Endpoints,
            _ => Kind::Other,
        }
    }

    /// Its short name in the fleet view and the NACK metric.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Route => "rds",
            Kind::Cluster => "cds",
            Kind::Endpoints => "eds",
            Kind::Other => "other",
        }
    }

    /// Whether names of this kind are service names the registry watches.
    pub fn is_served(self) -> bool {
        self != Kind::Other
    }

    /// Whether the resource of a service without endpoints is left out of
    /// responses. For LDS and CDS that is how state-of-the-world says a
    /// resource does not exist (A27); RDS has nothing to route to. EDS
    /// answers with an empty assignment instead, so clients fail fast
    /// rather than after their does-not-exist timer.
    pub fn omits_absent(self) -> bool {
        matches!(self, Kind::Listener | Kind::Route | Kind::Cluster)
    }
}

/// The resource of `kind` for service `name` with endpoints `set` and
/// service config `config`, or `None` when that resource does not exist
/// (the service has no endpoints). `refuse` hears of every endpoint left
/// out because its address is not an IP socket address.
pub fn resource(
    kind: Kind,
    name: &str,
    set: &EndpointSet,
    config: Option<&ServiceConfig>,
    zone: Option<&str>,
    refuse: &mut dyn FnMut(&Endpoint),
) -> Option<Any> {
    if kind.omits_absent() && set.is_empty() {
        return None;
    }
    match kind {
        Kind::Listener => Some(pack_any(listener(name, config))),
        Kind::Route => Some(pack_any(route_configuration(name, config))),
        Kind::Cluster => Some(pack_any(cluster(name, config))),
        Kind::Endpoints => {
            let preference = config.and_then(|c| c.zone_preference);
            Some(pack_any(load_assignment(
                name, set, zone, preference, refuse,
            )))
        }
        Kind::Other => None,
    }
}

/// The Listener a client resolving `xds:///<service>` asks for, its routes
/// inline (so they follow `config` too).
pub fn listener(service: &str, config: Option<&ServiceConfig>) -> Listener {
    let manager = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::RouteConfig(route_configuration(
            service, config,
        ))),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: service.into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    }
}

/// Every request for any authority, to the service's cluster: a route per
/// method name `config` configures, most specific first, with that
/// method's retry policy and timeout, then the catch-all. Every route
/// hashes calls as the config's ring_hash does, whichever route a call
/// takes, so a key lands on the same endpoint for every method.
pub fn route_configuration(service: &str, config: Option<&ServiceConfig>) -> RouteConfiguration {
    let hash_policy = config.map(policy::hash_policy).unwrap_or_default();
    let routes = policy::method_routes(config)
        .into_iter()
        .map(|(path, method)| Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(path),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(service.into())),
                retry_policy: method.and_then(policy::retry_policy),
                max_stream_duration: method.and_then(policy::max_stream_duration),
                hash_policy: hash_policy.clone(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    RouteConfiguration {
        name: service.into(),
        virtual_hosts: vec![VirtualHost {
            name: service.into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An EDS cluster whose endpoints come over the same ADS stream, with the
/// balancing, outlier detection and circuit breakers of `config`.
pub fn cluster(service: &str, config: Option<&ServiceConfig>) -> Cluster {
    let load_balancing_policy = config.and_then(policy::load_balancing_policy);
    Cluster {
        name: service.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource::default(),
                )),
                resource_api_version: ApiVersion::V3 as i32,
                ..Default::default()
            }),
            // Empty: the assignment is named after the cluster.
            service_name: String::new(),
        }),
        // The legacy enum only without a policy list: clients ignore it
        // beside one, and ROUND_ROBIN is its default value anyway.
        lb_policy: LbPolicy::RoundRobin as i32,
        load_balancing_policy,
        outlier_detection: config
            .and_then(ServiceConfig::lb_policy)
            .and_then(|policy| policy.outlier_detection())
            .map(policy::outlier_detection),
        circuit_breakers: config.and_then(policy::circuit_breakers),
        ..Default::default()
    }
}

/// The ClusterLoadAssignment of `service`: one locality per zone (the
/// endpoints' `zone` metadata), at priority 0 for the subscriber's own
/// `zone` and 1 for the others, so gRPC clients fail over between zones by
/// priority (A27). Without zones on the endpoints, or when the subscriber's
/// zone has none, every locality is at priority 0; with no zone at all it
/// is today's single default locality, unchanged.
pub fn load_assignment(
    service: &str,
    set: &EndpointSet,
    zone: Option<&str>,
    preference: Option<ZonePreference>,
    refuse: &mut dyn FnMut(&Endpoint),
) -> ClusterLoadAssignment {
    // A service whose config turns zone preference off has one priority,
    // whatever the subscriber's zone.
    let zone = zone.filter(|_| preference.is_none_or(|p| p.enabled));
    // By zone name ("" for endpoints without one), in name order so every
    // build of the same set is the same message.
    let mut zones: std::collections::BTreeMap<&str, Vec<LbEndpoint>> =
        std::collections::BTreeMap::new();
    for endpoint in set.iter() {
        let Some(lb_endpoint) = lb_endpoint_of(endpoint) else {
            refuse(endpoint);
            continue;
        };
        let of = endpoint.metadata.get(ZONE_KEY).map_or("", String::as_str);
        zones.entry(of).or_default().push(lb_endpoint);
    }
    let zoned = zones.keys().any(|z| !z.is_empty());
    let local = zone.filter(|z| zones.contains_key(z));
    let endpoints = zones
        .into_iter()
        .map(|(name, lb_endpoints)| LocalityLbEndpoints {
            locality: Some(match zoned {
                true => Locality {
                    zone: name.to_owned(),
                    ..Default::default()
                },
                false => Locality::default(),
            }),
            lb_endpoints,
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            priority: match local {
                Some(local) if local != name => 1,
                _ => 0,
            },
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: service.into(),
        endpoints,
        // Envoy spills between priorities by it; gRPC fails over only
        // when a whole priority is down (A27) and ignores it.
        policy: preference.map(|p| Policy {
            overprovisioning_factor: Some(UInt32Value {
                value: p.overprovisioning_percent,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One endpoint, or `None` if its address is a host name: gRPC's xDS
/// clients take only IP socket addresses from EDS and would NACK the whole
/// assignment over one host name.
fn lb_endpoint_of(endpoint: &Endpoint) -> Option<LbEndpoint> {
    let socket: SocketAddr = endpoint.address.parse().ok()?;
    let address = envoy_types::pb::envoy::config::core::v3::Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            protocol: socket_address::Protocol::Tcp as i32,
            address: socket.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                socket.port(),
            ))),
            ..Default::default()
        })),
    };
    let health_status = if endpoint.is_draining() {
        HealthStatus::Draining
    } else {
        HealthStatus::Healthy
    };
    Some(LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
            envoy_types::pb::envoy::config::endpoint::v3::Endpoint {
                address: Some(address),
                ..Default::default()
            },
        )),
        health_status: health_status as i32,
        load_balancing_weight: endpoint.weight().map(|value| UInt32Value { value }),
        ..Default::default()
    })
}

/// The type URL of `T`, for tests and clients that build requests.
pub fn type_url<T: Name>() -> String {
    T::type_url()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_in_zones_are_localities_with_the_subscribers_zone_first() {
        let zoned =
            |address: &str, zone: &str| Endpoint::new(address).with_metadata(ZONE_KEY, zone);
        let mut set = EndpointSet::new();
        set.apply(crate::discovery::Update::Reset(vec![
            zoned("10.0.0.1:1", "a"),
            zoned("10.0.0.2:1", "b"),
            zoned("10.0.0.3:1", "a"),
        ]));
        let localities = |zone: Option<&str>| -> Vec<(String, u32, usize)> {
            load_assignment("svc", &set, zone, None, &mut |_| {})
                .endpoints
                .iter()
                .map(|l| {
                    let name = l.locality.as_ref().unwrap().zone.clone();
                    (name, l.priority, l.lb_endpoints.len())
                })
                .collect()
        };
        assert_eq!(
            localities(Some("a")),
            [("a".into(), 0, 2), ("b".into(), 1, 1)]
        );
        assert_eq!(
            localities(Some("b")),
            [("a".into(), 1, 2), ("b".into(), 0, 1)]
        );
        // No zone, or one without endpoints: every locality at priority 0,
        // never a gap in the priorities (clients NACK that).
        assert_eq!(localities(None), [("a".into(), 0, 2), ("b".into(), 0, 1)]);
        assert_eq!(
            localities(Some("c")),
            [("a".into(), 0, 2), ("b".into(), 0, 1)]
        );

        // The config's zone preference: off is one priority for everyone;
        // on carries its overprovisioning factor to Envoy.
        let with = |preference: ZonePreference| {
            load_assignment("svc", &set, Some("a"), Some(preference), &mut |_| {})
        };
        let off = with(ZonePreference {
            enabled: false,
            ..ZonePreference::default()
        });
        assert!(off.endpoints.iter().all(|l| l.priority == 0));
        let factor = with(ZonePreference {
            enabled: true,
            overprovisioning_percent: 200,
        });
        assert_eq!(factor.endpoints[1].priority, 1);
        assert_eq!(
            factor.policy.and_then(|p| p.overprovisioning_factor),
            Some(UInt32Value { value: 200 })
        );
        // Without a config nothing is added to what clients always got.
        assert_eq!(
            load_assignment("svc", &set, Some("a"), None, &mut |_| {}).policy,
            None
        );
    }
    use crate::discovery::{EndpointState, Update};
    use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
    use envoy_types::pb::envoy::config::core::v3::RoutingPriority;
    use envoy_types::pb::envoy::config::route::v3::route_action::{hash_policy, HashPolicy};
    use envoy_types::pb::envoy::config::route::v3::route_match;
    use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
    use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::ring_hash::HashFunction;
    use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
    use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
    use envoy_types::pb::google::protobuf::UInt64Value;
    use prost::Message;

    fn set(endpoints: Vec<Endpoint>) -> EndpointSet {
        let mut set = EndpointSet::new();
        set.apply(Update::Reset(endpoints));
        set
    }

    #[test]
    fn type_urls_match_the_generated_messages() {
        assert_eq!(type_url::<Listener>(), LISTENER);
        assert_eq!(type_url::<RouteConfiguration>(), ROUTE);
        assert_eq!(type_url::<Cluster>(), CLUSTER);
        assert_eq!(type_url::<ClusterLoadAssignment>(), ENDPOINTS);
    }

    #[test]
    fn endpoints_carry_state_weight_and_refuse_host_names() {
        let set = set(vec![
            Endpoint::new("127.0.0.1:1").with_metadata("weight", "5"),
            Endpoint::new("[::1]:2").with_state(EndpointState::Draining),
            Endpoint::new("backend.internal:3"),
        ]);
        let mut refused = Vec::new();
        let assignment = load_assignment("svc", &set, None, None, &mut |e| {
            refused.push(e.address.clone())
        });
        assert_eq!(refused, ["backend.internal:3"]);
        let locality = &assignment.endpoints[0];
        assert_eq!(
            locality.load_balancing_weight,
            Some(UInt32Value { value: 1 })
        );
        let [first, second] = &locality.lb_endpoints[..] else {
            panic!("two endpoints: {locality:?}");
        };
        assert_eq!(first.health_status, HealthStatus::Healthy as i32);
        assert_eq!(first.load_balancing_weight, Some(UInt32Value { value: 5 }));
        assert_eq!(second.health_status, HealthStatus::Draining as i32);
        assert_eq!(second.load_balancing_weight, None);
        let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &second.host_identifier else {
            panic!("an endpoint");
        };
        let Some(address::Address::SocketAddress(socket)) =
            endpoint.address.as_ref().and_then(|a| a.address.as_ref())
        else {
            panic!("a socket address");
        };
        assert_eq!(socket.address, "::1");
        assert_eq!(
            socket.port_specifier,
            Some(socket_address::PortSpecifier::PortValue(2))
        );
    }

    #[test]
    fn listener_routes_everything_to_the_cluster_through_the_router() {
        let listener = listener("svc", None);
        let any = listener.api_listener.unwrap().api_listener.unwrap();
        let manager = HttpConnectionManager::decode(&*any.value).unwrap();
        assert_eq!(manager.http_filters.len(), 1);
        let Some(RouteSpecifier::RouteConfig(routes)) = manager.route_specifier else {
            panic!("inline routes");
        };
        let host = &routes.virtual_hosts[0];
        assert_eq!(host.domains, ["*"]);
        assert_eq!(
            host.routes[0].action,
            Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("svc".into())),
                ..Default::default()
            }))
        );
    }

    #[test]
    fn absent_services_have_no_listener_but_an_empty_assignment() {
        let empty = set(Vec::new());
        let mut refuse = |_: &Endpoint| {};
        assert!(resource(Kind::Listener, "svc", &empty, None, None, &mut refuse).is_none());
        assert!(resource(Kind::Cluster, "svc", &empty, None, None, &mut refuse).is_none());
        let any = resource(Kind::Endpoints, "svc", &empty, None, None, &mut refuse).unwrap();
        let assignment = ClusterLoadAssignment::decode(&*any.value).unwrap();
        assert!(assignment.endpoints.is_empty());
    }

    fn config(json: &str) -> ServiceConfig {
        ServiceConfig::from_json(json).unwrap()
    }

    /// The type URLs of a cluster's policy list, in order.
    fn policy_types(cluster: &Cluster) -> Vec<String> {
        cluster
            .load_balancing_policy
            .as_ref()
            .expect("a policy list")
            .policies
            .iter()
            .map(|p| {
                let typed = p.typed_extension_config.as_ref().unwrap();
                let any = typed.typed_config.as_ref().unwrap();
                assert!(typed.name.starts_with("envoy.load_balancing_policies."));
                any.type_url
                    .trim_start_matches(
                        "type.googleapis.com/envoy.extensions.load_balancing_policies.",
                    )
                    .to_owned()
            })
            .collect()
    }

    fn routes(config: Option<&ServiceConfig>) -> Vec<Route> {
        route_configuration("svc", config).virtual_hosts[0]
            .routes
            .clone()
    }

    fn action(route: &Route) -> &RouteAction {
        let Some(route::Action::Route(action)) = &route.action else {
            panic!("a route action: {route:?}");
        };
        action
    }

    fn secs(seconds: i64, nanos: i32) -> Option<ProtoDuration> {
        Some(ProtoDuration { seconds, nanos })
    }

    fn n(value: u32) -> Option<UInt32Value> {
        Some(UInt32Value { value })
    }

    /// What every resource was before service configs, built by hand:
    /// without a config (or with one that sets no traffic policy) the
    /// bytes must not change, so clients that never asked for a policy see
    /// none.
    #[test]
    fn no_config_keeps_the_resources_byte_for_byte() {
        let route = RouteConfiguration {
            name: "svc".into(),
            virtual_hosts: vec![VirtualHost {
                name: "svc".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            "svc".into(),
                        )),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let cluster_before = Cluster {
            name: "svc".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                eds_config: Some(ConfigSource {
                    config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                        AggregatedConfigSource::default(),
                    )),
                    resource_api_version: ApiVersion::V3 as i32,
                    ..Default::default()
                }),
                service_name: String::new(),
            }),
            lb_policy: LbPolicy::RoundRobin as i32,
            ..Default::default()
        };
        // Settings xDS has no field for change nothing either.
        let untranslated = config(
            r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
                "healthCheckConfig": {"serviceName": "x"}}"#,
        );
        for config in [None, Some(&untranslated)] {
            assert_eq!(
                route_configuration("svc", config).encode_to_vec(),
                route.encode_to_vec()
            );
            assert_eq!(
                cluster("svc", config).encode_to_vec(),
                cluster_before.encode_to_vec()
            );
            let manager = listener("svc", config).api_listener.unwrap().api_listener;
            let manager = HttpConnectionManager::decode(&*manager.unwrap().value).unwrap();
            assert_eq!(
                manager.route_specifier,
                Some(RouteSpecifier::RouteConfig(route.clone()))
            );
        }
    }

    #[test]
    fn each_policy_is_offered_first_with_round_robin_after_it() {
        let types = |json: &str| policy_types(&cluster("svc", Some(&config(json))));
        let rr = "round_robin.v3.RoundRobin";
        let wrr = "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin";
        let lr = "least_request.v3.LeastRequest";
        let pf = "pick_first.v3.PickFirst";
        assert_eq!(
            types(r#"{"loadBalancingConfig": [{"weighted_round_robin": {}}]}"#),
            [wrr, rr]
        );
        assert_eq!(
            types(r#"{"loadBalancingConfig": [{"least_request_experimental": {}}]}"#),
            [lr, rr]
        );
        assert_eq!(
            types(r#"{"loadBalancingConfig": [{"pick_first": {}}]}"#),
            [pf, rr]
        );
        assert_eq!(
            types(r#"{"loadBalancingConfig": [{"round_robin": {}}]}"#),
            [rr]
        );
        // The config's own order of preference, unknown names skipped,
        // each type once; outlier detection offers its child.
        assert_eq!(
            types(
                r#"{"loadBalancingConfig": [
                    {"outlier_detection_experimental": {
                        "childPolicy": [{"weighted_round_robin": {}}]}},
                    {"some_future_policy": {}},
                    {"round_robin": {}},
                    {"least_request": {"choiceCount": 3}}]}"#
            ),
            [wrr, rr, lr]
        );
        // choice_count is carried.
        let cluster = cluster(
            "svc",
            Some(&config(
                r#"{"loadBalancingConfig": [{"least_request": {"choiceCount": 4}}]}"#,
            )),
        );
        let first = &cluster.load_balancing_policy.unwrap().policies[0];
        let any = first.typed_extension_config.as_ref().unwrap();
        let least = LeastRequest::decode(&*any.typed_config.as_ref().unwrap().value).unwrap();
        assert_eq!(least.choice_count, n(4));
        // The legacy enum stays ROUND_ROBIN, which is also its default.
        assert_eq!(cluster.lb_policy, LbPolicy::RoundRobin as i32);
    }

    /// The cluster's ring_hash entry, decoded, and its extension name.
    fn ring_hash_of(cluster: &Cluster) -> (String, RingHash) {
        let list = cluster
            .load_balancing_policy
            .as_ref()
            .expect("a policy list");
        let typed = list
            .policies
            .iter()
            .filter_map(|p| p.typed_extension_config.as_ref())
            .find(|t| t.name.ends_with(".ring_hash"))
            .expect("a ring_hash entry");
        let any = typed.typed_config.as_ref().unwrap();
        assert_eq!(any.type_url, type_url::<RingHash>());
        (typed.name.clone(), RingHash::decode(&*any.value).unwrap())
    }

    #[test]
    fn ring_hash_is_offered_where_the_config_has_it_with_its_sizes_and_xx_hash() {
        let types = |json: &str| policy_types(&cluster("svc", Some(&config(json))));
        let rh = "ring_hash.v3.RingHash";
        let rr = "round_robin.v3.RoundRobin";
        let wrr = "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin";
        assert_eq!(
            types(r#"{"loadBalancingConfig": [{"ring_hash_experimental": {}}]}"#),
            [rh, rr]
        );
        assert_eq!(
            types(
                r#"{"loadBalancingConfig": [{"weighted_round_robin": {}},
                    {"ring_hash_experimental": {}}, {"round_robin": {}}]}"#
            ),
            [wrr, rh, rr]
        );
        // Under outlier detection, ring_hash picks and the ejection goes
        // to the Cluster's field.
        let ejecting = cluster(
            "svc",
            Some(&config(
                r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
                    "childPolicy": [{"ring_hash_experimental": {}}]}}]}"#,
            )),
        );
        assert_eq!(policy_types(&ejecting), [rh, rr]);
        assert!(ejecting.outlier_detection.is_some());

        let sized = cluster(
            "svc",
            Some(&config(
                r#"{"loadBalancingConfig": [{"ring_hash_experimental": {
                    "minRingSize": 10, "maxRingSize": 100}}]}"#,
            )),
        );
        let (name, ring) = ring_hash_of(&sized);
        assert_eq!(name, "envoy.load_balancing_policies.ring_hash");
        // Named: grpc-go NACKs DEFAULT_HASH.
        assert_eq!(ring.hash_function, HashFunction::XxHash as i32);
        assert_eq!(ring.minimum_ring_size, Some(UInt64Value { value: 10 }));
        assert_eq!(ring.maximum_ring_size, Some(UInt64Value { value: 100 }));
        // Unset sizes are the service config's defaults, written out, not
        // xDS's (an 8M maximum).
        let (_, defaults) = ring_hash_of(&cluster(
            "svc",
            Some(&config(
                r#"{"loadBalancingConfig": [{"ring_hash_experimental": {}}]}"#,
            )),
        ));
        assert_eq!(
            defaults.minimum_ring_size,
            Some(UInt64Value { value: 1024 })
        );
        assert_eq!(
            defaults.maximum_ring_size,
            Some(UInt64Value { value: 4096 })
        );
        // The 4096 cap gRPC's clients apply too.
        let (_, capped) = ring_hash_of(&cluster(
            "svc",
            Some(&config(
                r#"{"loadBalancingConfig": [{"ring_hash_experimental": {
                    "minRingSize": 8000, "maxRingSize": 8388608}}]}"#,
            )),
        ));
        assert_eq!(capped.minimum_ring_size, Some(UInt64Value { value: 4096 }));
        assert_eq!(capped.maximum_ring_size, Some(UInt64Value { value: 4096 }));
    }

    #[test]
    fn a_hash_header_puts_its_hash_policy_on_every_route_and_no_header_none() {
        let header = |name: &str| HashPolicy {
            policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
                header_name: name.into(),
                regex_rewrite: None,
            })),
            terminal: false,
        };
        let methods = r#""methodConfig": [
            {"name": [{"service": "pkg.Echo", "method": "Slow"}], "timeout": "1s"},
            {"name": [{"service": "pkg.Echo"}], "timeout": "2s"}]"#;
        let keyed = config(&format!(
            r#"{{"loadBalancingConfig": [{{"ring_hash_experimental": {{
                "requestHashHeader": "X-Key"}}}}], {methods}}}"#
        ));
        let keyed_routes = routes(Some(&keyed));
        assert_eq!(keyed_routes.len(), 3, "two methods and the catch-all");
        for route in &keyed_routes {
            // Lowercased, as the header is on the wire.
            assert_eq!(action(route).hash_policy, [header("x-key")], "{route:?}");
        }
        // Through the listener's inline routes too.
        let manager = listener("svc", Some(&keyed))
            .api_listener
            .unwrap()
            .api_listener;
        let manager = HttpConnectionManager::decode(&*manager.unwrap().value).unwrap();
        let Some(RouteSpecifier::RouteConfig(inline)) = manager.route_specifier else {
            panic!("inline routes");
        };
        assert_eq!(
            inline,
            route_configuration("svc", Some(&keyed)),
            "the listener carries the same routes"
        );
        // A later entry of the list still gives its header: a client
        // that picks the first entry ignores the hash policy.
        let later = config(
            r#"{"loadBalancingConfig": [{"round_robin": {}},
                {"ring_hash_experimental": {"requestHashHeader": "x-user"}}]}"#,
        );
        assert_eq!(
            action(&routes(Some(&later))[0]).hash_policy,
            [header("x-user")]
        );
        // No header (or an empty one, A76's "absent"), or no ring_hash:
        // no hash policy, so xDS clients hash each call at random.
        for json in [
            r#"{"loadBalancingConfig": [{"ring_hash_experimental": {}}]}"#,
            r#"{"loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": ""}}]}"#,
            r#"{"loadBalancingConfig": [{"round_robin": {}}]}"#,
        ] {
            let config = config(&format!(r#"{{{}, {methods}}}"#, &json[1..json.len() - 1]));
            for route in routes(Some(&config)) {
                assert!(action(&route).hash_policy.is_empty(), "{json}: {route:?}");
            }
        }
    }

    #[test]
    fn outlier_detection_sets_every_field_and_turns_off_what_is_off() {
        let cluster = cluster(
            "svc",
            Some(&config(
                r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
                    "interval": "1.5s", "baseEjectionTime": "20s", "maxEjectionPercent": 40,
                    "failurePercentageEjection": {"threshold": 60, "minimumHosts": 3,
                        "requestVolume": 10},
                    "childPolicy": [{"round_robin": {}}]}}]}"#,
            )),
        );
        let expected = OutlierDetection {
            interval: secs(1, 500_000_000),
            base_ejection_time: secs(20, 0),
            // A50's defaults where the config is silent, not xDS's.
            max_ejection_time: secs(300, 0),
            max_ejection_percent: n(40),
            enforcing_success_rate: n(0),
            success_rate_stdev_factor: n(1900),
            success_rate_minimum_hosts: n(5),
            success_rate_request_volume: n(100),
            enforcing_failure_percentage: n(100),
            failure_percentage_threshold: n(60),
            failure_percentage_minimum_hosts: n(3),
            failure_percentage_request_volume: n(10),
            enforcing_consecutive_5xx: n(0),
            enforcing_consecutive_gateway_failure: n(0),
            enforcing_consecutive_local_origin_failure: n(0),
            enforcing_local_origin_success_rate: n(0),
            enforcing_failure_percentage_local_origin: n(0),
            ..Default::default()
        };
        assert_eq!(cluster.outlier_detection, Some(expected));
        // Round robin picks under it.
        assert_eq!(policy_types(&cluster), ["round_robin.v3.RoundRobin"]);

        let success = self::cluster(
            "svc",
            Some(&config(
                r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
                    "successRateEjection": {"stdevFactor": 1000, "enforcementPercentage": 50},
                    "childPolicy": [{"pick_first": {}}]}}]}"#,
            )),
        )
        .outlier_detection
        .unwrap();
        assert_eq!(success.interval, secs(10, 0));
        assert_eq!(success.max_ejection_percent, n(10));
        assert_eq!(success.enforcing_success_rate, n(50));
        assert_eq!(success.success_rate_stdev_factor, n(1000));
        assert_eq!(success.success_rate_request_volume, n(100));
        assert_eq!(success.enforcing_failure_percentage, n(0));

        // Only the chosen policy's outlier detection counts; without it
        // the field is unset (clients then run none).
        let plain = self::cluster(
            "svc",
            Some(&config(r#"{"loadBalancingConfig": [{"round_robin": {}}]}"#)),
        );
        assert_eq!(plain.outlier_detection, None);
    }

    #[test]
    fn circuit_breakers_carry_max_requests_at_the_default_priority() {
        let cluster = cluster(
            "svc",
            Some(&config(r#"{"circuitBreakers": {"maxRequests": 64}}"#)),
        );
        let breakers = cluster.circuit_breakers.expect("circuit breakers");
        let [threshold] = &breakers.thresholds[..] else {
            panic!("one threshold: {breakers:?}");
        };
        assert_eq!(threshold.priority, RoutingPriority::Default as i32);
        assert_eq!(threshold.max_requests, n(64));
        assert_eq!(threshold.max_connections, None);
        // Nothing else changes: no policy list.
        assert!(cluster.load_balancing_policy.is_none());
    }

    #[test]
    fn each_method_gets_a_route_most_specific_first_with_its_retries_and_timeout() {
        let config = config(
            r#"{"methodConfig": [
                {"name": [{}], "timeout": "10s"},
                {"name": [{"service": "pkg.Echo"}],
                 "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED", "ABORTED"]}},
                {"name": [{"service": "pkg.Echo", "method": "Slow"},
                          {"service": "pkg.Other", "method": "Get"}],
                 "timeout": "0.25s",
                 "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.1s"}},
                {"name": [{"service": "pkg.Bad"}],
                 "retryPolicy": {"maxAttempts": 2, "initialBackoff": "2s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["ABORTED"]}}]}"#,
        );
        let routes = routes(Some(&config));
        let paths: Vec<_> = routes
            .iter()
            .map(|r| r.r#match.as_ref().unwrap().path_specifier.clone().unwrap())
            .collect();
        use route_match::PathSpecifier::{Path, Prefix};
        assert_eq!(
            paths,
            [
                Path("/pkg.Echo/Slow".into()),
                Path("/pkg.Other/Get".into()),
                Prefix("/pkg.Echo/".into()),
                Prefix("/pkg.Bad/".into()),
                Prefix(String::new()),
            ]
        );
        for route in &routes {
            assert_eq!(
                action(route).cluster_specifier,
                Some(route_action::ClusterSpecifier::Cluster("svc".into()))
            );
        }
        // A timeout caps the call's deadline; hedging has no xDS form.
        let slow = action(&routes[0]);
        assert_eq!(slow.retry_policy, None);
        let duration = slow.max_stream_duration.as_ref().unwrap();
        assert_eq!(duration.max_stream_duration, secs(0, 250_000_000));
        assert_eq!(duration.grpc_timeout_header_max, secs(0, 250_000_000));
        // A retry policy in A44's terms; ABORTED has no retry_on condition.
        let echo = action(&routes[2]);
        assert_eq!(echo.max_stream_duration, None);
        let retry = echo.retry_policy.as_ref().expect("a retry policy");
        assert_eq!(retry.retry_on, "cancelled,unavailable");
        assert_eq!(retry.num_retries, n(2));
        let backoff = retry.retry_back_off.as_ref().unwrap();
        assert_eq!(backoff.base_interval, secs(0, 50_000_000));
        assert_eq!(backoff.max_interval, secs(1, 0));
        // Retrying only on codes xDS cannot name: no retry policy at all.
        assert_eq!(action(&routes[3]).retry_policy, None);
        // The default entry is the catch-all's.
        let catch_all = action(&routes[4]);
        assert_eq!(
            catch_all
                .max_stream_duration
                .as_ref()
                .unwrap()
                .max_stream_duration,
            secs(10, 0)
        );
        assert_eq!(catch_all.retry_policy, None);
    }

    #[test]
    fn a_backoff_cap_below_its_base_and_huge_timeouts_are_sent_as_clients_accept() {
        let config = config(
            r#"{"methodConfig": [{"name": [{}], "timeout": "99999999999999s",
                "retryPolicy": {"maxAttempts": 2, "initialBackoff": "2s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
        );
        let routes = routes(Some(&config));
        let action = action(&routes[0]);
        let backoff = action
            .retry_policy
            .as_ref()
            .and_then(|r| r.retry_back_off.as_ref())
            .unwrap();
        assert_eq!(backoff.base_interval, secs(2, 0));
        assert_eq!(backoff.max_interval, secs(2, 0));
        assert_eq!(
            action
                .max_stream_duration
                .as_ref()
                .unwrap()
                .max_stream_duration,
            secs(315_576_000_000, 0)
        );
    }
}
