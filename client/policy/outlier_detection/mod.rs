//! Outlier detection: a wrapper around any policy that ejects backends
//! whose calls fail far more than they should, following gRFC A50 without
//! xDS.
//!
//! The wrapper counts each call's outcome per address (through the child
//! picker's [`Pick`], whose [`OnDone`] it extends). Every `interval` it
//! swaps the counts out and runs two checks, each optional:
//!
//! - **success rate**: among addresses with enough calls, eject those whose
//!   success rate is more than `stdev_factor / 1000` standard deviations
//!   below the mean (an outlier relative to its peers);
//! - **failure percentage**: eject addresses whose failure percentage is
//!   above an absolute `threshold`.
//!
//! An ejected address looks TRANSIENT_FAILURE to the child policy (as A50
//! does it, by wrapping the child's view of the subchannel), so the child
//! stops picking it while its connection stays open, ready for the return.
//! It is let back after `base_ejection_time` times the number of times it
//! has been ejected recently (capped at `max_ejection_time`); the count
//! drops by one every interval it spends in service.
//!
//! Two deliberate departures from A50, for a client without a control plane
//! (see [`OutlierDetectionConfig`] for the defaults and why):
//!
//! - what counts as a failure is a choice ([`OutlierDetectionConfig::is_failure`]):
//!   by default only statuses that speak of the backend (UNAVAILABLE,
//!   INTERNAL, UNKNOWN, DATA_LOSS, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED),
//!   not those that speak of the request (NOT_FOUND, INVALID_ARGUMENT, ...)
//!   or of the caller (CANCELLED); A50 counts every non-OK status;
//! - `max_ejection_percent` is never exceeded (A50 checks before each
//!   ejection whether it has been, so it can overshoot by one): one of two
//!   backends may be ejected at 50 %, the only backend never is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::error::ConnectError;
use crate::client::policy::{
    CallOutcome, OnDone, Pick, PickInfo, Picker, Policy, PolicyContext, PolicyPicker, SubchannelId,
};
use crate::client::subchannel::{ReadyConnection, SubchannelState};
use crate::client::wrapped::{with_state_of, Wrapped};
use crate::discovery::{Applied, EndpointSet};

#[cfg(test)]
mod tests;

pub use crate::service_config::outlier::{
    is_any_error, is_backend_failure, FailurePercentageEjection, OutlierDetectionConfig,
    SuccessRateEjection,
};

/// The outlier_detection wrapper around a child policy.
pub struct OutlierDetection {
    child: Wrapped,
    config: OutlierDetectionConfig,
    /// Every serving address, as A50's map: counts and ejection state.
    addresses: HashMap<Arc<str>, AddressEntry>,
    /// The real state of each subchannel the child is shown as failing.
    hidden: HashMap<SubchannelId, SubchannelState>,
    /// When the next sweep is due; `None` when no check is enabled.
    next_sweep: Option<Instant>,
    /// Whether a new picker is due (the child's, or the counters changed).
    dirty: bool,
}

/// One address's counts and ejection state.
#[derive(Debug, Default)]
struct AddressEntry {
    /// Calls since the last sweep, shared with pickers.
    counter: Arc<CallCounter>,
    /// Since when it is ejected, if it is.
    ejected_at: Option<Instant>,
    /// How many recent ejections lengthen the next one.
    multiplier: u32,
}

/// Successes and failures since the last sweep. Swapping each counter to
/// zero stands in for A50's two buckets: a call racing the sweep lands in
/// one interval or the next, never in none.
#[derive(Debug, Default)]
pub struct CallCounter {
    successes: AtomicU64,
    failures: AtomicU64,
}

impl CallCounter {
    fn record(&self, failed: bool) {
        let counter = if failed {
            &self.failures
        } else {
            &self.successes
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (successes, failures) since the last call.
    fn take(&self) -> (u64, u64) {
        (
            self.successes.swap(0, Ordering::Relaxed),
            self.failures.swap(0, Ordering::Relaxed),
        )
    }
}

/// One address's calls in the interval just ended.
struct Volume {
    address: Arc<str>,
    successes: u64,
    failures: u64,
}

impl Volume {
    fn total(&self) -> u64 {
        self.successes + self.failures
    }
}

impl OutlierDetection {
    /// Wraps `child`; percentages above 100 count as 100 and an interval
    /// under a millisecond as one millisecond.
    pub fn new(child: Box<dyn Policy>, mut config: OutlierDetectionConfig) -> Self {
        config.interval = config.interval.max(Duration::from_millis(1));
        config.max_ejection_percent = config.max_ejection_percent.min(100);
        if let Some(check) = &mut config.success_rate {
            check.enforcement_percentage = check.enforcement_percentage.min(100);
        }
        if let Some(check) = &mut config.failure_percentage {
            check.threshold = check.threshold.min(100);
            check.enforcement_percentage = check.enforcement_percentage.min(100);
        }
        Self {
            child: Wrapped::new(child),
            config,
            addresses: HashMap::new(),
            hidden: HashMap::new(),
            next_sweep: None,
            dirty: false,
        }
    }

    /// The wrapped policy's name.
    pub fn child_name(&self) -> &'static str {
        self.child.name()
    }

    fn counting(&self) -> bool {
        self.config.success_rate.is_some() || self.config.failure_percentage.is_some()
    }

    fn is_ejected(&self, address: &str) -> bool {
        self.addresses
            .get(address)
            .is_some_and(|entry| entry.ejected_at.is_some())
    }

    /// Shows subchannel `id` to the child as failing, keeping its real
    /// state for the return.
    fn hide(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        let Some(subchannel) = cx.subchannels().get_mut(id) else {
            return;
        };
        let real = subchannel.state().clone();
        if matches!(
            real,
            SubchannelState::TransientFailure { ref error }
                if matches!(**error, ConnectError::Ejected { .. })
        ) {
            return;
        }
        let address = subchannel.address().clone();
        subchannel.set_state(SubchannelState::TransientFailure {
            error: Arc::new(ConnectError::Ejected { address }),
        });
        // The child already sees it failing: only the real state moved.
        if self.hidden.insert(id, real).is_none() {
            self.child
                .with(cx, |child, cx| child.subchannel_changed(id, cx));
        }
    }

    /// Shows subchannel `id` to the child as it really is.
    fn reveal(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        let Some(real) = self.hidden.remove(&id) else {
            return;
        };
        let Some(subchannel) = cx.subchannels().get_mut(id) else {
            return;
        };
        subchannel.set_state(real);
        self.child
            .with(cx, |child, cx| child.subchannel_changed(id, cx));
    }

    fn sweep(&mut self, now: Instant, cx: &mut PolicyContext<'_>) {
        let mut volumes: Vec<Volume> = self
            .addresses
            .iter()
            .map(|(address, entry)| {
                let (successes, failures) = entry.counter.take();
                Volume {
                    address: address.clone(),
                    successes,
                    failures,
                }
            })
            .collect();
        // A stable order, so which address goes first is not hash luck.
        volumes.sort_by(|a, b| a.address.cmp(&b.address));
        let mut ejections = Vec::new();
        if let Some(check) = self.config.success_rate {
            self.success_rate(&check, &volumes, &mut ejections);
        }
        if let Some(check) = self.config.failure_percentage {
            self.failure_percentage(&check, &volumes, &mut ejections);
        }
        for (address, why) in ejections {
            let Some(entry) = self.addresses.get_mut(&address) else {
                continue;
            };
            entry.ejected_at = Some(now);
            entry.multiplier += 1;
            tracing::info!(%address, ejections = entry.multiplier, "outlier detection ejected {address}: {why}");
            if let Some(id) = cx.subchannels().id_of(&address) {
                self.hide(id, cx);
            }
        }
        let base = self.config.base_ejection_time;
        let cap = base.max(self.config.max_ejection_time);
        let mut returning = Vec::new();
        for (address, entry) in &mut self.addresses {
            match entry.ejected_at {
                None => entry.multiplier = entry.multiplier.saturating_sub(1),
                Some(since) => {
                    let term = base.saturating_mul(entry.multiplier).min(cap);
                    if now >= since + term {
                        entry.ejected_at = None;
                        returning.push(address.clone());
                    }
                }
            }
        }
        for address in returning {
            tracing::info!(%address, "outlier detection let {address} back");
            if let Some(id) = cx.subchannels().id_of(&address) {
                self.reveal(id, cx);
            }
        }
    }

    /// Whether one more ejection keeps the ejected share within the limit
    /// (`pending` ejections decided this sweep included).
    fn may_eject(&self, pending: usize) -> bool {
        let ejected = self
            .addresses
            .values()
            .filter(|e| e.ejected_at.is_some())
            .count()
            + pending;
        let total = self.addresses.len();
        (ejected + 1) * 100 <= self.config.max_ejection_percent as usize * total
    }

    fn success_rate(
        &self,
        check: &SuccessRateEjection,
        volumes: &[Volume],
        ejections: &mut Vec<(Arc<str>, String)>,
    ) {
        let judged: Vec<(&Volume, f64)> = volumes
            .iter()
            .filter(|v| v.total() >= u64::from(check.request_volume))
            .map(|v| (v, v.successes as f64 / v.total() as f64))
            .collect();
        if judged.len() < check.minimum_hosts as usize || judged.is_empty() {
            return;
        }
        let n = judged.len() as f64;
        let mean = judged.iter().map(|(_, rate)| rate).sum::<f64>() / n;
        let variance = judged
            .iter()
            .map(|(_, rate)| (rate - mean).powi(2))
            .sum::<f64>()
            / n;
        let floor = mean - variance.sqrt() * (check.stdev_factor as f64 / 1000.0);
        for (volume, rate) in judged {
            if !self.may_eject(ejections.len()) {
                return;
            }
            if rate < floor
                && !self.is_ejected(&volume.address)
                && rand::random_range(0..100) < check.enforcement_percentage
            {
                ejections.push((
                    volume.address.clone(),
                    format!(
                        "success rate {:.1} % < {:.1} % (mean {:.1} % over {} addresses)",
                        rate * 100.0,
                        floor * 100.0,
                        mean * 100.0,
                        n
                    ),
                ));
            }
        }
    }

    fn failure_percentage(
        &self,
        check: &FailurePercentageEjection,
        volumes: &[Volume],
        ejections: &mut Vec<(Arc<str>, String)>,
    ) {
        if volumes.len() < check.minimum_hosts as usize {
            return;
        }
        for volume in volumes {
            if !self.may_eject(ejections.len()) {
                return;
            }
            if volume.total() < u64::from(check.request_volume)
                || self.is_ejected(&volume.address)
                || ejections.iter().any(|(a, _)| *a == volume.address)
            {
                continue;
            }
            let percent = volume.failures as f64 * 100.0 / volume.total() as f64;
            if percent > check.threshold as f64
                && rand::random_range(0..100) < check.enforcement_percentage
            {
                ejections.push((
                    volume.address.clone(),
                    format!(
                        "{percent:.1} % of {} calls failed (threshold {} %)",
                        volume.total(),
                        check.threshold
                    ),
                ));
            }
        }
    }

    /// Arms the balancer's timer for whichever of ours is due first.
    fn arm(&self, cx: &mut PolicyContext<'_>) {
        for at in [self.next_sweep, self.child.timer()].into_iter().flatten() {
            cx.schedule_at(at);
        }
    }
}

impl Policy for OutlierDetection {
    fn name(&self) -> &'static str {
        "outlier_detection"
    }

    fn endpoints_changed(
        &mut self,
        endpoints: &EndpointSet,
        changes: &Applied,
        cx: &mut PolicyContext<'_>,
    ) {
        for address in &changes.removed {
            if self.addresses.remove(address.as_str()).is_some() {
                self.dirty = true;
            }
        }
        for address in changes.added.iter().chain(&changes.updated) {
            let serving = endpoints.get(address).is_some_and(|e| !e.is_draining());
            if !serving {
                if self.addresses.remove(address.as_str()).is_some() {
                    self.dirty = true;
                }
            } else if !self.addresses.contains_key(address.as_str()) {
                self.addresses
                    .insert(Arc::from(address.as_str()), AddressEntry::default());
                self.dirty = true;
            }
        }
        self.child.with(cx, |child, cx| {
            child.endpoints_changed(endpoints, changes, cx)
        });
        // Subchannels the child removed no longer need hiding.
        self.hidden
            .retain(|id, _| cx.subchannels().get(*id).is_some());
        if self.counting() && self.next_sweep.is_none() && !self.addresses.is_empty() {
            self.next_sweep = Some(cx.now() + self.config.interval);
            self.arm(cx);
        }
    }

    fn subchannel_changed(&mut self, id: SubchannelId, cx: &mut PolicyContext<'_>) {
        let Some(subchannel) = cx.subchannels().get(id) else {
            return;
        };
        if self.is_ejected(subchannel.address()) {
            // The balancer just recorded the real state over ours: keep it
            // for the return and show the child a failure again.
            self.hide(id, cx);
        } else {
            self.child
                .with(cx, |child, cx| child.subchannel_changed(id, cx));
        }
    }

    fn timer_fired(&mut self, cx: &mut PolicyContext<'_>) {
        let now = cx.now();
        self.child.fire_if_due(cx);
        if self.next_sweep.is_some_and(|at| at <= now) {
            self.sweep(now, cx);
            self.next_sweep = Some(now + self.config.interval);
        }
        self.arm(cx);
    }

    fn take_picker(&mut self) -> Option<PolicyPicker> {
        self.dirty |= self.child.refresh_picker();
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let child = self.child.picker()?;
        let counters = if self.counting() {
            self.addresses
                .iter()
                .map(|(address, entry)| (address.clone(), entry.counter.clone()))
                .collect()
        } else {
            HashMap::new()
        };
        let picker = Arc::new(OutlierDetectionPicker {
            child: child.picker.clone(),
            counters,
            is_failure: self.config.is_failure,
        });
        Some(with_state_of(child, picker))
    }
}

impl std::fmt::Debug for OutlierDetection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutlierDetection")
            .field("child", &self.child.name())
            .field("config", &self.config)
            .field("addresses", &self.addresses.len())
            .field("hidden", &self.hidden.len())
            .finish()
    }
}

/// The child's picker, with each call's outcome counted for its address.
pub struct OutlierDetectionPicker {
    child: Arc<dyn Picker>,
    /// Each address's counter; empty when no check is enabled.
    counters: HashMap<Arc<str>, Arc<CallCounter>>,
    is_failure: fn(tonic::Code) -> bool,
}

impl Picker for OutlierDetectionPicker {
    fn pick(&self, info: &PickInfo<'_>) -> Pick {
        match self.child.pick(info) {
            Pick::Connection { connection, done } => {
                let Some(counter) = self.counters.get(&*connection.address).cloned() else {
                    return Pick::Connection { connection, done };
                };
                let is_failure = self.is_failure;
                let counted: OnDone = Box::new(move |outcome: &CallOutcome| {
                    counter.record(is_failure(outcome.code));
                    if let Some(done) = done {
                        done(outcome);
                    }
                });
                Pick::Connection {
                    connection,
                    done: Some(counted),
                }
            }
            other => other,
        }
    }

    fn connections(&self) -> &[Arc<ReadyConnection>] {
        self.child.connections()
    }
}
