//! What the ring_hash policy (gRFC A42, with A76's `requestHashHeader`)
//! is configured with: the ring's size bounds and where a request's hash
//! key comes from. It lives with the service config, which carries it
//! (`ring_hash_experimental`) from the registry to the client; the client's
//! ring_hash policy re-exports it.

use std::fmt;

/// The smallest ring by default (A42's default).
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// The largest ring by default (grpc-go's default since A42's 8M proved
/// too costly to build on every endpoint change).
pub const DEFAULT_MAX_RING_SIZE: u64 = 4096;
/// The most a config may ask for: larger values are refused (A42).
pub const RING_SIZE_UPPER_BOUND: u64 = 8 * 1024 * 1024;
/// The most points a stable ring ([`RingHashConfig::points_per_endpoint`])
/// may ask of one endpoint of weight 1.
pub const MAX_POINTS_PER_ENDPOINT: u32 = 4096;
/// The most points a stable ring holds in all (4 MiB of points, rebuilt
/// in milliseconds): past it, every endpoint's count is scaled down alike.
pub const STABLE_RING_CAP: u64 = 1 << 18;
/// The ring this client builds at most, whatever the config asks: grpc-go
/// caps both bounds at the same 4096 by default, so a config written for
/// it builds the same ring here.
pub const RING_SIZE_CAP: u64 = 4096;

/// How ring_hash builds its ring and finds each request's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingHashConfig {
    /// `minRingSize`: the ring has at least this many entries, so that
    /// endpoints' shares stay close to their weights. 1 to
    /// [`RING_SIZE_CAP`] once capped.
    pub min_ring_size: u64,
    /// `maxRingSize`: the ring has at most this many entries, which bounds
    /// the cost of a rebuild. At least `min_ring_size`.
    pub max_ring_size: u64,
    /// `pointsPerEndpoint` (a switchboard extension): each endpoint gets
    /// this many points per unit of `weight`, whatever the others, instead
    /// of A42's share of a ring of `min_ring_size`..`max_ring_size`. When
    /// one of N endpoints leaves, only its keys move (A42's sizing also
    /// moves about half as many again between the survivors, because
    /// their counts grow); the price is that the ring no longer matches
    /// grpc-go's point for point. `None`: A42's sizing.
    pub points_per_endpoint: Option<u32>,
    /// `requestHashHeader` (A76): the header whose value is each request's
    /// hash key; `None`: only a per-call
    /// [`RequestHash`](crate::client::RequestHash) gives one.
    pub hash_header: Option<HashHeader>,
}

impl Default for RingHashConfig {
    fn default() -> Self {
        Self {
            min_ring_size: DEFAULT_MIN_RING_SIZE,
            max_ring_size: DEFAULT_MAX_RING_SIZE,
            points_per_endpoint: None,
            hash_header: None,
        }
    }
}

impl RingHashConfig {
    /// The same config, keyed by header `name` (checked as A76 checks
    /// `requestHashHeader`).
    pub fn with_hash_header(mut self, name: &str) -> Result<Self, HashHeaderError> {
        self.hash_header = Some(HashHeader::new(name)?);
        Ok(self)
    }
}

/// The name of the header ring_hash hashes: lowercase, a valid gRPC
/// metadata key, not binary (`-bin`).
///
/// Held inline (at most [`HashHeader::MAX_LEN`] bytes) rather than as a
/// `String`, so that the policy's settings stay a plain `Copy` value like
/// every other built-in policy's.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashHeader {
    bytes: [u8; HashHeader::MAX_LEN],
    len: u8,
}

/// Why a header name cannot be ring_hash's key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashHeaderError {
    /// Empty.
    #[error("must not be empty")]
    Empty,
    /// Longer than [`HashHeader::MAX_LEN`].
    #[error("must be at most {max} bytes, got {len}", max = HashHeader::MAX_LEN)]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// Has a character a gRPC metadata key may not have.
    #[error("{name:?} is not a gRPC metadata key: {found:?} is not one of 0-9 a-z - _ .")]
    BadCharacter {
        /// The name as given.
        name: String,
        /// The first character refused.
        found: char,
    },
    /// A binary header, whose value is not text to hash (A76 refuses it).
    #[error("{name:?} is a binary header (-bin); its value cannot be the hash key")]
    Binary {
        /// The name as given.
        name: String,
    },
}

impl HashHeader {
    /// The longest name accepted; real header names are far shorter.
    pub const MAX_LEN: usize = 64;

    /// `name`, lowercased (HTTP/2 header names are lowercase) and checked.
    pub fn new(name: &str) -> Result<Self, HashHeaderError> {
        if name.is_empty() {
            return Err(HashHeaderError::Empty);
        }
        if name.len() > Self::MAX_LEN {
            return Err(HashHeaderError::TooLong { len: name.len() });
        }
        let lower = name.to_ascii_lowercase();
        if let Some(found) = lower
            .chars()
            .find(|c| !matches!(c, '0'..='9' | 'a'..='z' | '-' | '_' | '.'))
        {
            return Err(HashHeaderError::BadCharacter {
                name: name.to_owned(),
                found,
            });
        }
        if lower.ends_with("-bin") {
            return Err(HashHeaderError::Binary {
                name: name.to_owned(),
            });
        }
        let mut bytes = [0; Self::MAX_LEN];
        bytes[..lower.len()].copy_from_slice(lower.as_bytes());
        Ok(Self {
            bytes,
            len: lower.len() as u8,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Only ASCII was ever copied in.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for HashHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for HashHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_name_is_lowercased_and_checked() {
        assert_eq!(HashHeader::new("X-User").unwrap().as_str(), "x-user");
        assert_eq!(HashHeader::new(""), Err(HashHeaderError::Empty));
        assert!(matches!(
            HashHeader::new("x user"),
            Err(HashHeaderError::BadCharacter { found: ' ', .. })
        ));
        assert!(matches!(
            HashHeader::new("key-bin"),
            Err(HashHeaderError::Binary { .. })
        ));
        let long = "a".repeat(HashHeader::MAX_LEN + 1);
        assert_eq!(
            HashHeader::new(&long),
            Err(HashHeaderError::TooLong { len: 65 })
        );
        let longest = "a".repeat(HashHeader::MAX_LEN);
        assert_eq!(HashHeader::new(&longest).unwrap().as_str(), longest);
    }
}
