//! The ring: each endpoint placed at many points ("virtual nodes") in
//! proportion to its weight, as Envoy and gRFC A42 build it, so that
//! removing one endpoint moves only the keys that fell on its points.

use super::xxhash::xxh64;
use crate::service_config::ring_hash::{RingHashConfig, STABLE_RING_CAP};

/// One point on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Point {
    /// Where the point sits.
    pub hash: u64,
    /// Which endpoint it stands for, an index into the list the ring was
    /// built from.
    pub endpoint: usize,
}

/// How many points each endpoint gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sizing {
    /// Envoy's and A42's: every endpoint gets its weight's share of the
    /// ring, scaled so that the lightest one still gets at least one point
    /// when the ring is `min` long, without passing `max`. An endpoint's
    /// count depends on the whole set, so when one leaves the survivors
    /// gain points, and some keys move between them.
    A42 {
        /// `minRingSize`.
        min: u64,
        /// `maxRingSize`.
        max: u64,
    },
    /// `pointsPerEndpoint`: this many points per unit of weight, whatever
    /// the others (scaled down alike past [`STABLE_RING_CAP`]), so when one
    /// leaves only the keys on its points move.
    PerEndpoint(u32),
}

impl Sizing {
    /// The sizing `config` asks for.
    pub fn of(config: &RingHashConfig) -> Self {
        match config.points_per_endpoint {
            Some(points) => Self::PerEndpoint(points),
            None => Self::A42 {
                min: config.min_ring_size,
                max: config.max_ring_size,
            },
        }
    }

    /// Each endpoint's point count, in order.
    fn counts(self, endpoints: &[(&str, u32)]) -> Vec<u64> {
        let total: f64 = endpoints.iter().map(|(_, w)| f64::from(*w)).sum();
        // The ring's length.
        let scale = match self {
            Sizing::A42 { min, max } => {
                let lightest = endpoints
                    .iter()
                    .map(|(_, w)| f64::from(*w) / total)
                    .fold(f64::INFINITY, f64::min);
                ((lightest * min as f64).ceil() / lightest).min(max as f64)
            }
            Sizing::PerEndpoint(points) => (f64::from(points) * total).min(STABLE_RING_CAP as f64),
        };
        let per_weight = scale / total;
        // Running totals, so rounding never loses or gains a point over
        // the whole ring.
        let (mut made, mut due) = (0u64, 0.0);
        endpoints
            .iter()
            .map(|(_, weight)| {
                due += per_weight * f64::from(*weight);
                let count = (due.ceil() as u64).saturating_sub(made);
                made += count;
                count
            })
            .collect()
    }
}

/// The endpoints' points in hash order.
#[derive(Debug, Clone, Default)]
pub(super) struct Ring {
    points: Vec<Point>,
}

impl Ring {
    /// The ring of `endpoints`, each a hash key (its address, or its
    /// `hash_key` metadata) and a weight of at least 1, sized by `sizing`.
    ///
    /// The points of endpoint `key` are the hashes of `key_0`, `key_1`...,
    /// so an endpoint's points do not depend on the others; only how many
    /// it gets may.
    pub fn new(endpoints: &[(&str, u32)], sizing: Sizing) -> Self {
        if endpoints.is_empty() {
            return Self::default();
        }
        let counts = sizing.counts(endpoints);
        let mut points = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
        let mut key = String::new();
        for (index, ((address, _), count)) in endpoints.iter().zip(counts).enumerate() {
            for i in 0..count {
                key.clear();
                key.push_str(address);
                key.push('_');
                key.push_str(&i.to_string());
                points.push(Point {
                    hash: xxh64(key.as_bytes()),
                    endpoint: index,
                });
            }
        }
        points.sort_by_key(|p| p.hash);
        Self { points }
    }

    /// The points in hash order.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// How many points there are.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// The index of the point that owns `hash`: the first at or after it,
    /// wrapping past the end to the first. `None` on an empty ring.
    pub fn find(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let index = self.points.partition_point(|p| p.hash < hash);
        Some(index % self.points.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a42(min: u64, max: u64) -> Sizing {
        Sizing::A42 { min, max }
    }

    fn shares(ring: &Ring, endpoints: usize) -> Vec<usize> {
        let mut shares = vec![0; endpoints];
        for point in ring.points() {
            shares[point.endpoint] += 1;
        }
        shares
    }

    #[test]
    fn equal_weights_get_equal_points_within_the_size_bounds() {
        let endpoints = [("a:1", 1), ("b:1", 1), ("c:1", 1)];
        let ring = Ring::new(&endpoints, a42(1024, 4096));
        // ceil(1/3 * 1024) * 3 points.
        assert_eq!(ring.len(), 1026);
        assert_eq!(shares(&ring, 3), [342, 342, 342]);
        assert!(ring.points().windows(2).all(|w| w[0].hash <= w[1].hash));
        // The maximum wins over the minimum's scaling.
        let small = Ring::new(&endpoints, a42(1024, 16));
        assert_eq!(small.len(), 16);
    }

    #[test]
    fn points_follow_the_weights() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 3)], a42(100, 4096));
        // The lightest gets ceil(0.25 * 100) = 25 points, the ring 100.
        assert_eq!(shares(&ring, 2), [25, 75]);
        // A weight too heavy for the maximum is scaled down with it.
        let capped = Ring::new(&[("a:1", 1), ("b:1", 1000)], a42(1024, 2002));
        assert_eq!(capped.len(), 2002);
        assert_eq!(shares(&capped, 2), [2, 2000]);
    }

    #[test]
    fn a_hash_belongs_to_the_next_point_and_wraps_around() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 1)], a42(4, 4));
        let points = ring.points();
        assert_eq!(ring.find(0), Some(0));
        assert_eq!(ring.find(points[1].hash), Some(1));
        assert_eq!(ring.find(points[1].hash + 1), Some(2));
        assert_eq!(ring.find(points[3].hash + 1), Some(0));
        assert_eq!(Ring::new(&[], a42(4, 4)).find(1), None);
    }

    #[test]
    fn an_endpoints_points_do_not_depend_on_the_others() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 1)], a42(8, 8));
        let alone = Ring::new(&[("b:1", 1)], a42(4, 4));
        let of_b: Vec<u64> = ring
            .points()
            .iter()
            .filter(|p| p.endpoint == 1)
            .map(|p| p.hash)
            .collect();
        let hashes: Vec<u64> = alone.points().iter().map(|p| p.hash).collect();
        assert_eq!(of_b, hashes);
        // The key is `address_index`, hashed with XXH64 seed 0.
        assert!(hashes.contains(&xxh64(b"b:1_0")));
    }

    #[test]
    fn a_stable_ring_gives_each_endpoint_its_points_whatever_the_others() {
        let five: Vec<String> = (1..=5).map(|i| format!("10.0.0.{i}:80")).collect();
        let endpoints: Vec<(&str, u32)> = five.iter().map(|a| (a.as_str(), 1)).collect();
        let stable = Ring::new(&endpoints, Sizing::PerEndpoint(160));
        assert_eq!(shares(&stable, 5), [160; 5]);
        let fewer = Ring::new(&endpoints[1..], Sizing::PerEndpoint(160));
        let survivors = |ring: &Ring, offset: usize| -> Vec<(u64, usize)> {
            ring.points()
                .iter()
                .filter(|p| p.endpoint + offset != 0)
                .map(|p| (p.hash, p.endpoint + offset))
                .collect()
        };
        // The same points for every survivor: only the victim's are gone.
        assert_eq!(survivors(&stable, 0), survivors(&fewer, 1));
        // A42 instead grows every survivor's count (205 to 256 points).
        let whole = Ring::new(&endpoints, a42(1024, 4096));
        let a42_fewer = Ring::new(&endpoints[1..], a42(1024, 4096));
        assert_eq!(shares(&whole, 5), [205; 5]);
        assert_eq!(shares(&a42_fewer, 4), [256; 4]);
        // Weights multiply the count; the cap scales everyone alike.
        let weighted = Ring::new(&[("a:1", 1), ("b:1", 3)], Sizing::PerEndpoint(10));
        assert_eq!(shares(&weighted, 2), [10, 30]);
        let capped = Ring::new(&[("a:1", 1), ("b:1", 1)], Sizing::PerEndpoint(4096));
        let heavy = Ring::new(&[("a:1", 100), ("b:1", 100)], Sizing::PerEndpoint(4096));
        assert_eq!(capped.len(), 8192);
        assert_eq!(heavy.len() as u64, STABLE_RING_CAP);
        assert_eq!(shares(&heavy, 2), [1 << 17, 1 << 17]);
    }
}
