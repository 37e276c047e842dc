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

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus,
    Locality, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use prost::Name;

use crate::discovery::{Endpoint, EndpointSet};

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

/// The resource of `kind` for service `name` with endpoints `set`, or `None`
/// when that resource does not exist (the service has no endpoints).
/// `refuse` hears of every endpoint left out because its address is not an
/// IP socket address.
pub fn resource(
    kind: Kind,
    name: &str,
    set: &EndpointSet,
    refuse: &mut dyn FnMut(&Endpoint),
) -> Option<Any> {
    if kind.omits_absent() && set.is_empty() {
        return None;
    }
    match kind {
        Kind::Listener => Some(pack_any(listener(name))),
        Kind::Route => Some(pack_any(route_configuration(name))),
        Kind::Cluster => Some(pack_any(cluster(name))),
        Kind::Endpoints => Some(pack_any(load_assignment(name, set, refuse))),
        Kind::Other => None,
    }
}

/// The Listener a client resolving `xds:///<service>` asks for.
pub fn listener(service: &str) -> Listener {
    let manager = HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::RouteConfig(route_configuration(service))),
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

/// Every request for any authority, to the service's cluster.
pub fn route_configuration(service: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: service.into(),
        virtual_hosts: vec![VirtualHost {
            name: service.into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        service.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An EDS cluster whose endpoints come over the same ADS stream.
pub fn cluster(service: &str) -> Cluster {
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
        lb_policy: LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

/// The endpoints of `service` as one locality. gRPC clients ignore a
/// locality without a weight, so it gets weight 1.
pub fn load_assignment(
    service: &str,
    set: &EndpointSet,
    refuse: &mut dyn FnMut(&Endpoint),
) -> ClusterLoadAssignment {
    let lb_endpoints: Vec<LbEndpoint> = set
        .iter()
        .filter_map(|endpoint| {
            let lb_endpoint = lb_endpoint_of(endpoint);
            if lb_endpoint.is_none() {
                refuse(endpoint);
            }
            lb_endpoint
        })
        .collect();
    let endpoints = if lb_endpoints.is_empty() {
        Vec::new()
    } else {
        vec![LocalityLbEndpoints {
            locality: Some(Locality::default()),
            lb_endpoints,
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            priority: 0,
            ..Default::default()
        }]
    };
    ClusterLoadAssignment {
        cluster_name: service.into(),
        endpoints,
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
    use crate::discovery::{EndpointState, Update};
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
        let assignment = load_assignment("svc", &set, &mut |e| refused.push(e.address.clone()));
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
        let listener = listener("svc");
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
        assert!(resource(Kind::Listener, "svc", &empty, &mut refuse).is_none());
        assert!(resource(Kind::Cluster, "svc", &empty, &mut refuse).is_none());
        let any = resource(Kind::Endpoints, "svc", &empty, &mut refuse).unwrap();
        let assignment = ClusterLoadAssignment::decode(&*any.value).unwrap();
        assert!(assignment.endpoints.is_empty());
    }
}
