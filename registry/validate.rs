//! What well-formed registry input looks like. The registry checks every
//! request here before touching state; the CLIs reuse the same rules so a bad
//! flag fails before anything starts.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::RegistryError;

/// Longest service name, as for a DNS name.
pub const MAX_SERVICE_LEN: usize = 253;
/// Longest address: a longest host name, a colon and a five-digit port,
/// with room for the brackets of an IPv6 address.
pub const MAX_ADDRESS_LEN: usize = MAX_SERVICE_LEN + 8;
/// Most metadata entries one endpoint may carry.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Most bytes (keys plus values) of one endpoint's metadata.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Shortest lease TTL a backend may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest lease TTL a backend may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// TTL granted when the request leaves it at 0.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// Checks a DNS-style service name: dot-separated labels of letters, digits,
/// `-` and `_`, each 1-63 bytes, 253 bytes in all.
pub fn service_name(name: &str) -> Result<(), RegistryError> {
    const FIELD: &str = "service";
    if name.is_empty() {
        return Err(RegistryError::invalid(FIELD, "must not be empty"));
    }
    if name.len() > MAX_SERVICE_LEN {
        return Err(RegistryError::invalid(
            FIELD,
            format!("is {} bytes, at most {MAX_SERVICE_LEN} allowed", name.len()),
        ));
    }
    dns_labels(name, true).map_err(|reason| RegistryError::invalid(FIELD, reason))
}

/// Checks `host:port` where host is an IPv4 address, a bracketed IPv6
/// address or a DNS host name, and port is 1-65535.
pub fn address(addr: &str) -> Result<(), RegistryError> {
    address_checked(addr)
}

/// Splits a list of registry replicas, `host:port[,host:port...]`, and
/// checks each address. Clients, backends and tools take such a list
/// wherever they take a registry, and move to the next replica when one
/// fails.
pub fn registry_addresses(list: &str) -> Result<Vec<&str>, RegistryError> {
    let addresses: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        return Err(RegistryError::invalid("address", "must not be empty"));
    }
    for address in &addresses {
        address_checked(address)?;
    }
    Ok(addresses)
}

fn address_checked(addr: &str) -> Result<(), RegistryError> {
    const FIELD: &str = "address";
    let bad = |reason: String| RegistryError::invalid(FIELD, format!("{addr:?} {reason}"));
    if addr.is_empty() {
        return Err(RegistryError::invalid(FIELD, "must not be empty"));
    }
    if addr.len() > MAX_ADDRESS_LEN {
        // Not echoed: a message carrying a huge address would not fit in the
        // client's header limit, and the call would fail with INTERNAL.
        return Err(RegistryError::invalid(
            FIELD,
            format!("is {} bytes, at most {MAX_ADDRESS_LEN} allowed", addr.len()),
        ));
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (v6, port) = rest
            .split_once("]:")
            .ok_or_else(|| bad("is not [ipv6]:port".into()))?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| bad(format!("has an invalid IPv6 address {v6:?}")))?;
        (None, port)
    } else {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| bad("is not host:port".into()))?;
        (Some(host), port)
    };
    // Plain decimal only: `u16::from_str` would also take "+80" and "080",
    // which are not dialable or alias another registration of the same port.
    let canonical =
        port.bytes().all(|b| b.is_ascii_digit()) && (port == "0" || !port.starts_with('0'));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|_| canonical)
        .ok_or_else(|| bad(format!("has an invalid port {port:?}: expected 1-65535")))?;
    if port == 0 {
        return Err(bad(
            "has port 0: register the port the server listens on".into()
        ));
    }
    if let Some(host) = host {
        if host.is_empty() {
            return Err(bad("has no host".into()));
        }
        if host.contains(':') {
            return Err(bad(
                "has an IPv6 host without brackets: use [ipv6]:port".into()
            ));
        }
        let looks_numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
        if looks_numeric {
            host.parse::<Ipv4Addr>()
                .map_err(|_| bad(format!("has an invalid IPv4 address {host:?}")))?;
        } else {
            dns_labels(host, false)
                .map_err(|reason| bad(format!("has a bad host name: {reason}")))?;
        }
    }
    Ok(())
}

/// Checks metadata against the entry and size caps; keys must be non-empty.
pub fn metadata(meta: &HashMap<String, String>) -> Result<(), RegistryError> {
    const FIELD: &str = "metadata";
    if meta.len() > MAX_METADATA_ENTRIES {
        return Err(RegistryError::invalid(
            FIELD,
            format!(
                "has {} entries, at most {MAX_METADATA_ENTRIES} allowed",
                meta.len()
            ),
        ));
    }
    let mut bytes = 0;
    for (key, value) in meta {
        if key.is_empty() {
            return Err(RegistryError::invalid(FIELD, "has an empty key"));
        }
        if key.len() > MAX_METADATA_KEY_LEN {
            return Err(RegistryError::invalid(
                FIELD,
                format!(
                    "key is {} bytes, at most {MAX_METADATA_KEY_LEN} allowed",
                    key.len()
                ),
            ));
        }
        bytes += key.len() + value.len();
    }
    if bytes > MAX_METADATA_BYTES {
        return Err(RegistryError::invalid(
            FIELD,
            format!("is {bytes} bytes, at most {MAX_METADATA_BYTES} allowed"),
        ));
    }
    Ok(())
}

/// Turns a requested TTL in milliseconds (0 for the default) into the TTL to
/// grant, refusing values outside [`MIN_TTL`]..=[`MAX_TTL`].
pub fn ttl(ttl_ms: u64) -> Result<Duration, RegistryError> {
    if ttl_ms == 0 {
        return Ok(DEFAULT_TTL);
    }
    let ttl = Duration::from_millis(ttl_ms);
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(RegistryError::invalid(
            "ttl_ms",
            format!(
                "{ttl_ms} is out of range: use 0 for the default or {}-{}",
                MIN_TTL.as_millis(),
                MAX_TTL.as_millis()
            ),
        ));
    }
    Ok(ttl)
}

/// Checks dot-separated DNS labels. `allow_underscore` admits `_` as used
/// in service names such as `_grpc._tcp.example`.
fn dns_labels(name: &str, allow_underscore: bool) -> Result<(), String> {
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots, or a leading or trailing dot)".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 bytes"));
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || (allow_underscore && c == '_')))
        {
            let allowed = if allow_underscore {
                "letters, digits, '-' and '_'"
            } else {
                "letters, digits and '-'"
            };
            return Err(format!("contains {c:?}: only {allowed} are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_addresses() {
        for ok in [
            "127.0.0.1:50051",
            "[::1]:80",
            "backend-1.example.com:443",
            "localhost:1",
        ] {
            address(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn refuses_bad_addresses() {
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            ":80",
            "::1:80",
            "1.2.3:80",
            "a b:1",
            "[::1]80",
            "host:-1",
            "host:+80",
            "host:080",
            "host: 80",
        ] {
            assert!(address(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_host_name_refusal_does_not_offer_underscores() {
        let err = address("a_b:80").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid address: \"a_b:80\" has a bad host name: contains '_': only letters, digits and '-' are allowed"
        );
    }

    #[test]
    fn a_huge_address_is_refused_without_being_echoed() {
        let err = address(&format!("{}:80", "x".repeat(100_000))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid address: is 100003 bytes, at most 261 allowed"
        );
    }

    #[test]
    fn service_names() {
        service_name("lb.example.grpc.io").unwrap();
        service_name("_grpc._tcp.x").unwrap();
        for bad in [
            "",
            ".a",
            "a..b",
            "a b",
            "-a",
            &"a".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(service_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(ttl(0).unwrap(), DEFAULT_TTL);
        assert!(ttl(999).is_err());
        assert!(ttl(300_001).is_err());
        assert_eq!(ttl(1000).unwrap(), MIN_TTL);
    }
}
