//! Target strings in grpc-go's style, naming where endpoints come from.

use std::fmt;
use std::str::FromStr;

use crate::registry::validate;

/// Where a balanced channel learns its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `registry://<registry host:port>[,<host:port>...]/<service>`: watch
    /// the service in a switchboard registry, or in any of its replicas.
    Registry {
        /// The registry's `host:port`, or several replicas' joined by `,`.
        registry: String,
        /// The service name to watch.
        service: String,
    },
    /// `static:///host1:port,host2:port`: a fixed list of addresses.
    Static(Vec<String>),
    /// `dns:///host:port`: every address `host` resolves to, looked up
    /// again periodically and when a connection fails.
    Dns(String),
}

/// Why a target string was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid target {target:?}: {reason}; expected registry://<host:port>[,<host:port>]/<service>, static:///<host:port>,<host:port> or dns:///<host:port>")]
pub struct TargetError {
    target: String,
    reason: String,
}

impl Target {
    /// The name that errors and logs should use for what is being balanced.
    pub fn service(&self) -> String {
        match self {
            Target::Registry { service, .. } => service.clone(),
            Target::Static(addresses) => addresses.join(","),
            Target::Dns(name) => name.clone(),
        }
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(target: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| TargetError {
            target: target.to_owned(),
            reason,
        };
        if let Some(rest) = target.strip_prefix("registry://") {
            let (registry, service) = rest
                .split_once('/')
                .ok_or_else(|| fail("no /<service> after the registry address".into()))?;
            let replicas = validate::registry_addresses(registry)
                .map_err(|e| fail(format!("registry {e}")))?;
            validate::service_name(service).map_err(|e| fail(e.to_string()))?;
            Ok(Target::Registry {
                registry: replicas.join(","),
                service: service.to_owned(),
            })
        } else if let Some(rest) = target.strip_prefix("static://") {
            let list = rest.strip_prefix('/').unwrap_or(rest);
            let addresses: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect();
            if addresses.is_empty() {
                return Err(fail("no addresses".into()));
            }
            for address in &addresses {
                validate::address(address).map_err(|e| fail(e.to_string()))?;
            }
            Ok(Target::Static(addresses))
        } else if let Some(rest) = target.strip_prefix("dns://") {
            let name = rest.strip_prefix('/').ok_or_else(|| {
                fail("a DNS server authority is not supported: use dns:///<host:port> (three slashes)".into())
            })?;
            validate::address(name).map_err(|e| fail(e.to_string()))?;
            Ok(Target::Dns(name.to_owned()))
        } else {
            Err(fail("unknown scheme".into()))
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Registry { registry, service } => write!(f, "registry://{registry}/{service}"),
            Target::Static(addresses) => write!(f, "static:///{}", addresses.join(",")),
            Target::Dns(name) => write!(f, "dns:///{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            "registry://127.0.0.1:50050/lb.example.grpc.io"
                .parse::<Target>()
                .unwrap(),
            Target::Registry {
                registry: "127.0.0.1:50050".into(),
                service: "lb.example.grpc.io".into()
            }
        );
        assert_eq!(
            "registry://127.0.0.1:50050,127.0.0.1:50051/lb.example.grpc.io"
                .parse::<Target>()
                .unwrap(),
            Target::Registry {
                registry: "127.0.0.1:50050,127.0.0.1:50051".into(),
                service: "lb.example.grpc.io".into()
            }
        );
        assert_eq!(
            "static:///127.0.0.1:1,127.0.0.1:2"
                .parse::<Target>()
                .unwrap(),
            Target::Static(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()])
        );
        let dns: Target = "dns:///localhost:50051".parse().unwrap();
        assert_eq!(dns, Target::Dns("localhost:50051".into()));
        assert_eq!(dns.to_string(), "dns:///localhost:50051");
    }

    #[test]
    fn refuses_bad_targets() {
        for bad in [
            "",
            "dns://8.8.8.8/x:1",
            "dns:///x",
            "dns:///",
            "registry://127.0.0.1:50050",
            "registry://127.0.0.1/svc",
            "registry://127.0.0.1:1/bad name",
            "registry://127.0.0.1:1,nope/svc",
            "registry://,/svc",
            "static:///",
            "static:///nope",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?} accepted");
        }
    }
}
