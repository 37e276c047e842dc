//! weighted_round_robin: rotate over the Ready endpoints in proportion to
//! their `weight` metadata (`Endpoint::weight`, 1 when absent or invalid),
//! interleaved smoothly: weights 1:2:3 give `c b a c b c`, never `a b b c c
//! c`, so no backend gets a burst.
//!
//! The order is an earliest-deadline-first schedule, as gRFC A58's
//! weighted_round_robin uses: an endpoint of weight w is due every 1/w, and
//! each slot goes to the endpoint due soonest. It is computed once per
//! picker, one cycle long, so an RPC only advances an atomic cursor; a
//! cycle longer than [`MAX_CYCLE`] slots is scaled down to it.
//!
//! Weights come from the registry (`--meta weight=N` on echo); ORCA load
//! reports are not read.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::client::policy::{
    Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, SubchannelId,
};
use crate::client::ready_set::ReadySet;
use crate::client::subchannel::ReadyConnection;
use crate::discovery::{Applied, EndpointSet};

/// The longest schedule a picker holds, in slots. Longer cycles (large or
/// many weights) are scaled down, which keeps each endpoint's share within
/// one slot in this many of its exact weight.
pub const MAX_CYCLE: u64 = 4096;

/// The weighted_round_robin policy.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    /// The subchannels and their Ready connections.
    subchannels: ReadySet,
    /// Each serving endpoint's weight, by address.
    weights: HashMap<String, u32>,
    /// The position in the schedule, shared by every picker so a rebuilt
    /// picker does not restart the rotation.
    cursor: Arc<AtomicUsize>,
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        Self {
            subchannels: ReadySet::default(),
            weights: HashMap::new(),
            cursor: Arc::new(AtomicUsize::new(rand::random::<u32>() as usize)),
        }
    }
}

impl Policy for WeightedRoundRobin {
    fn name(&self) -> &'static str {
        "weighted_round_robin"
    }

    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) {
        self.subchannels.endpoints_changed(endpoints, changes, cx);
        for address in &changes.removed {
            self.weights.remove(address);
        }
        for address in changes.added.iter().chain(&changes.updated) {
            let Some(endpoint) = endpoints.get(address) else {
                continue;
            };
            let weight = endpoint.weight().unwrap_or(1);
            if self.weights.insert(address.clone(), weight) != Some(weight) {
                self.subchannels.mark_dirty();
            }
        }
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        self.subchannels.subchannel_changed(id, cx);
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        if !self.subchannels.take_dirty() {
            return None;
        }
        // Sorted by address so equal weights interleave in a stable order.
        let mut ready: Vec<(Arc<ReadyConnection>, u32)> = self
            .subchannels
            .ready()
            .iter()
            .map(|(_, c)| {
                let weight = self.weights.get(&*c.address).copied().unwrap_or(1);
                (c.clone(), weight)
            })
            .collect();
        ready.sort_by(|a, b| a.0.address.cmp(&b.0.address));
        let weights: Vec<u32> = ready.iter().map(|(_, w)| *w).collect();
        Some(PolicyPicker {
            picker: Arc::new(WeightedRoundRobinPicker {
                schedule: schedule(&weights),
                connections: ready.into_iter().map(|(c, _)| c).collect(),
                cursor: self.cursor.clone(),
            }),
            connectivity: self.subchannels.connectivity(),
            last_error: self.subchannels.last_error().cloned(),
        })
    }
}

/// Walks a precomputed weighted schedule of Ready connections.
#[derive(Debug)]
pub struct WeightedRoundRobinPicker {
    connections: Vec<Arc<ReadyConnection>>,
    /// One cycle: indexes into `connections`.
    schedule: Vec<u32>,
    cursor: Arc<AtomicUsize>,
}

impl Picker for WeightedRoundRobinPicker {
    fn pick(&self, _info: &PickInfo<'_>) -> Pick {
        let len = self.schedule.len();
        // At most one cycle: past that, every connection has been tried.
        for _ in 0..len {
            let slot = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
            let connection = &self.connections[self.schedule[slot] as usize];
            // A connection may close before the balancer hears of it.
            if !connection.sender.is_closed() {
                return Pick::Connection {
                    connection: connection.clone(),
                    done: None,
                };
            }
        }
        Pick::Queue
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        &self.connections
    }
}

/// One endpoint's next turn in the earliest-deadline-first schedule.
#[derive(Debug, PartialEq)]
struct Turn {
    /// When it is next due, in cycles (1/weight apart).
    due: f64,
    /// Its index, which breaks ties (lower first) so the order is stable.
    index: u32,
    /// 1/weight.
    period: f64,
}

impl Eq for Turn {}

impl Ord for Turn {
    /// Reversed, so the max-heap pops the earliest turn.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .due
            .total_cmp(&self.due)
            .then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

/// One cycle of the smooth weighted order of endpoints with `weights`:
/// each index appears in proportion to its weight (after scaling a cycle
/// longer than [`MAX_CYCLE`] down), spread out rather than bunched.
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let weights = scaled(weights);
    let cycle: u64 = weights.iter().sum();
    let mut turns: BinaryHeap<Turn> = weights
        .iter()
        .enumerate()
        .map(|(index, &weight)| {
            let period = 1.0 / weight as f64;
            Turn {
                // Half a period in, so the heaviest goes first and each
                // endpoint's turns sit mid-interval.
                due: period / 2.0,
                index: index as u32,
                period,
            }
        })
        .collect();
    let mut order = Vec::with_capacity(cycle as usize);
    for _ in 0..cycle {
        let mut turn = turns.pop().expect("one turn per endpoint");
        order.push(turn.index);
        turn.due += turn.period;
        turns.push(turn);
    }
    order
}

/// `weights` divided by their greatest common divisor and, if they still
/// sum past [`MAX_CYCLE`] (and there are fewer endpoints than that), scaled
/// to sum to about it, each at least 1.
fn scaled(weights: &[u32]) -> Vec<u64> {
    let divisor = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    let reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w) / divisor).collect();
    let sum: u64 = reduced.iter().sum();
    let budget = MAX_CYCLE.max(weights.len() as u64);
    if sum <= budget {
        return reduced;
    }
    reduced
        .iter()
        .map(|&w| ((w as u128 * budget as u128 / sum as u128) as u64).max(1))
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::policy::test_utils::{addresses, FakeController};
    use crate::client::subchannel::ConnectivityState;
    use crate::discovery::{Delta, Endpoint, Update};

    fn weighted(address: &str, weight: &str) -> Endpoint {
        Endpoint::new(address).with_metadata("weight", weight)
    }

    /// A policy over `endpoints`, all Ready.
    fn ready(endpoints: Vec<Endpoint>) -> FakeController<WeightedRoundRobin> {
        let mut fake = FakeController::new(WeightedRoundRobin::default());
        let addresses: Vec<String> = endpoints.iter().map(|e| e.address.clone()).collect();
        fake.update(Update::Reset(endpoints));
        for address in &addresses {
            fake.ready(address);
        }
        fake
    }

    /// Whether `picks` is `cycle` started anywhere.
    fn is_rotation(picks: &[&str], cycle: &[&str]) -> bool {
        (0..cycle.len()).any(|start| {
            picks
                .iter()
                .enumerate()
                .all(|(i, p)| *p == cycle[(start + i) % cycle.len()])
        })
    }

    fn shares(picks: &[&str], address: &str) -> usize {
        picks.iter().filter(|p| **p == address).count()
    }

    #[test]
    fn rotates_in_proportion_to_weights_smoothly() {
        let fake = ready(vec![
            weighted("a:1", "1"),
            weighted("b:1", "2"),
            weighted("c:1", "3"),
        ]);
        assert_eq!(fake.connectivity(), ConnectivityState::Ready);
        let picks = fake.calls(12);
        let picks = addresses(&picks);
        let cycle = ["c:1", "b:1", "a:1", "c:1", "b:1", "c:1"];
        assert!(is_rotation(&picks, &cycle), "{picks:?}");
        // Weights are metadata, not load: no pick listens for outcomes.
        assert!(matches!(fake.pick(), Pick::Connection { done: None, .. }));
    }

    #[test]
    fn rpcs_in_flight_do_not_move_the_schedule() {
        let fake = ready(vec![weighted("a:1", "1"), weighted("b:1", "3")]);
        let b = fake
            .picker()
            .picker
            .connections()
            .iter()
            .find(|c| &*c.address == "b:1")
            .unwrap()
            .clone();
        let _busy: Vec<_> = (0..100).map(|_| b.in_flight.start()).collect();
        let picks = fake.calls(40);
        assert_eq!(shares(&addresses(&picks), "b:1"), 30);
    }

    #[test]
    fn counts_an_absent_or_invalid_weight_as_one() {
        let fake = ready(vec![
            Endpoint::new("a:1"),
            weighted("b:1", "0"),
            weighted("c:1", "heavy"),
            weighted("d:1", "2"),
        ]);
        let picks = fake.calls(10);
        let picks = addresses(&picks);
        for light in ["a:1", "b:1", "c:1"] {
            assert_eq!(shares(&picks, light), 2, "{picks:?}");
        }
        assert_eq!(shares(&picks, "d:1"), 4, "{picks:?}");
    }

    #[test]
    fn follows_weight_updates_without_reconnecting() {
        let mut fake = ready(vec![weighted("a:1", "1"), weighted("b:1", "1")]);
        fake.take_actions();
        let pickers = fake.pickers();
        fake.update(Update::Delta(Delta {
            updated: vec![weighted("b:1", "3")],
            ..Delta::default()
        }));
        assert!(fake.take_actions().is_empty());
        assert_eq!(fake.pickers(), pickers + 1);
        assert_eq!(shares(&addresses(&fake.calls(8)), "b:1"), 6);
        // The same weight again is no change.
        fake.update(Update::Delta(Delta {
            updated: vec![weighted("b:1", "3").with_metadata("zone", "z")],
            ..Delta::default()
        }));
        assert_eq!(fake.pickers(), pickers + 1);
    }

    #[test]
    fn only_ready_endpoints_share_the_schedule() {
        let mut fake = FakeController::new(WeightedRoundRobin::default());
        fake.update(Update::Reset(vec![
            weighted("a:1", "1"),
            weighted("b:1", "5"),
        ]));
        assert_eq!(fake.connectivity(), ConnectivityState::Connecting);
        assert!(matches!(fake.pick(), Pick::Queue));
        fake.ready("a:1");
        assert_eq!(addresses(&fake.calls(3)), ["a:1", "a:1", "a:1"]);
        fake.ready("b:1");
        fake.close("b:1");
        // Closed before the balancer heard: skipped, not waited for.
        assert_eq!(addresses(&fake.calls(3)), ["a:1", "a:1", "a:1"]);
        fake.close("a:1");
        assert!(matches!(fake.pick(), Pick::Queue));
    }

    #[test]
    fn schedule_interleaves_in_proportion() {
        assert_eq!(schedule(&[1, 2, 3]), [2, 1, 0, 2, 1, 2]);
        assert_eq!(schedule(&[2, 4, 6]), [2, 1, 0, 2, 1, 2]);
        assert_eq!(schedule(&[1, 1]), [0, 1]);
        let order = schedule(&[1, 10]);
        assert_eq!(order.len(), 11);
        // The light endpoint sits in the middle, not at either end.
        let light = order.iter().position(|&i| i == 0).unwrap();
        assert!((3..=7).contains(&light), "{order:?}");
    }

    #[test]
    fn huge_weights_are_scaled_to_a_bounded_cycle() {
        let order = schedule(&[u32::MAX, u32::MAX / 2, 1]);
        assert!(order.len() as u64 <= MAX_CYCLE + 3);
        let count = |i| order.iter().filter(|&&x| x == i).count() as f64;
        assert!((count(0) / count(1) - 2.0).abs() < 0.01);
        assert_eq!(count(2), 1.0);
    }
}
