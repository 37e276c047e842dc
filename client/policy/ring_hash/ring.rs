//! The ring: each endpoint placed at many points ("virtual nodes") in
//! proportion to its weight, as Envoy and gRFC A42 build it, so that
//! removing one endpoint moves only the keys that fell on its points.

use super::xxhash::xxh64;

/// One point on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Point {
    /// Where the point sits.
    pub hash: u64,
    /// Which endpoint it stands for, an index into the list the ring was
    /// built from.
    pub endpoint: usize,
}

/// The endpoints' points in hash order.
#[derive(Debug, Clone, Default)]
pub(super) struct Ring {
    points: Vec<Point>,
}

impl Ring {
    /// The ring of `endpoints`, each a hash key (its address, or its
    /// `hash_key` metadata) and a weight of at least 1, with between
    /// `min_size` and `max_size` points.
    ///
    /// Envoy's construction: every endpoint gets its weight's share of
    /// the ring, scaled so that the lightest one still gets at least one
    /// point when the ring is `min_size` long, without passing `max_size`.
    /// The points of endpoint `key` are the hashes of `key_0`, `key_1`...,
    /// so an endpoint's points do not depend on the others: adding or
    /// removing one leaves everyone else's points where they were.
    pub fn new(endpoints: &[(&str, u32)], min_size: u64, max_size: u64) -> Self {
        if endpoints.is_empty() {
            return Self::default();
        }
        let total: f64 = endpoints.iter().map(|(_, w)| f64::from(*w)).sum();
        let lightest = endpoints
            .iter()
            .map(|(_, w)| f64::from(*w) / total)
            .fold(f64::INFINITY, f64::min);
        let scale = ((lightest * min_size as f64).ceil() / lightest).min(max_size as f64);
        let mut points = Vec::with_capacity(scale.ceil() as usize);
        let (mut made, mut due) = (0.0, 0.0);
        let mut key = String::new();
        for (index, (address, weight)) in endpoints.iter().enumerate() {
            due += scale * f64::from(*weight) / total;
            let mut count = 0u64;
            // Running totals, so rounding never loses or gains a point
            // over the whole ring.
            while made < due {
                key.clear();
                key.push_str(address);
                key.push('_');
                key.push_str(&count.to_string());
                points.push(Point {
                    hash: xxh64(key.as_bytes()),
                    endpoint: index,
                });
                count += 1;
                made += 1.0;
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
        let ring = Ring::new(&endpoints, 1024, 4096);
        // ceil(1/3 * 1024) * 3 points.
        assert_eq!(ring.len(), 1026);
        assert_eq!(shares(&ring, 3), [342, 342, 342]);
        assert!(ring.points().windows(2).all(|w| w[0].hash <= w[1].hash));
        // The maximum wins over the minimum's scaling.
        let small = Ring::new(&endpoints, 1024, 16);
        assert_eq!(small.len(), 16);
    }

    #[test]
    fn points_follow_the_weights() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 3)], 100, 4096);
        // The lightest gets ceil(0.25 * 100) = 25 points, the ring 100.
        assert_eq!(shares(&ring, 2), [25, 75]);
        // A weight too heavy for the maximum is scaled down with it.
        let capped = Ring::new(&[("a:1", 1), ("b:1", 1000)], 1024, 2002);
        assert_eq!(capped.len(), 2002);
        assert_eq!(shares(&capped, 2), [2, 2000]);
    }

    #[test]
    fn a_hash_belongs_to_the_next_point_and_wraps_around() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 1)], 4, 4);
        let points = ring.points();
        assert_eq!(ring.find(0), Some(0));
        assert_eq!(ring.find(points[1].hash), Some(1));
        assert_eq!(ring.find(points[1].hash + 1), Some(2));
        assert_eq!(ring.find(points[3].hash + 1), Some(0));
        assert_eq!(Ring::new(&[], 4, 4).find(1), None);
    }

    #[test]
    fn an_endpoints_points_do_not_depend_on_the_others() {
        let ring = Ring::new(&[("a:1", 1), ("b:1", 1)], 8, 8);
        let alone = Ring::new(&[("b:1", 1)], 4, 4);
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
}
