//! What outlier detection's checks look at and when they eject: the
//! configuration, with the defaults for a client without a control plane
//! and why they depart from A50's. It lives with the service config, which
//! carries it (gRFC A50's `outlier_detection_experimental` policy) from the
//! registry to the client and into xDS; the client's outlier detection
//! policy re-exports it.

use std::time::Duration;

/// When and how outlier detection ejects. The defaults suit a standalone
/// client: fast enough to eject a dead-but-connected backend within about
/// a second of steady traffic, conservative about what counts as dead.
#[derive(Debug, Clone, Copy)]
pub struct OutlierDetectionConfig {
    /// How often outcomes are evaluated. Default 500 ms (A50: 10 s, made for
    /// fleets configured by a control plane): a backend that fails every
    /// call is ejected within one or two intervals.
    pub interval: Duration,
    /// How long a first ejection lasts; later ones multiply it. Default
    /// 30 s (A50's).
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts. Default 300 s (A50's).
    pub max_ejection_time: Duration,
    /// At most this share of addresses is ejected at once, in percent.
    /// Default 50: outlier detection may route around a bad half, never
    /// take the whole service away (A50's default, 10, would still eject
    /// one of three, but never two).
    pub max_ejection_percent: u32,
    /// The success-rate check, if enabled (default: enabled).
    pub success_rate: Option<SuccessRateEjection>,
    /// The failure-percentage check, if enabled (default: enabled).
    pub failure_percentage: Option<FailurePercentageEjection>,
    /// Which status codes count as failures. Default
    /// [`is_backend_failure`]; [`is_any_error`] is A50's rule.
    pub is_failure: fn(tonic::Code) -> bool,
}

// By hand: comparing `is_failure` as an address says "the same rule" well
// enough, where comparing fn pointers directly is linted as unreliable.
impl PartialEq for OutlierDetectionConfig {
    fn eq(&self, other: &Self) -> bool {
        self.interval == other.interval
            && self.base_ejection_time == other.base_ejection_time
            && self.max_ejection_time == other.max_ejection_time
            && self.max_ejection_percent == other.max_ejection_percent
            && self.success_rate == other.success_rate
            && self.failure_percentage == other.failure_percentage
            && self.is_failure as usize == other.is_failure as usize
    }
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            success_rate: Some(SuccessRateEjection::default()),
            failure_percentage: Some(FailurePercentageEjection::default()),
            is_failure: is_backend_failure,
        }
    }
}

/// Ejects addresses whose success rate is an outlier among their peers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuccessRateEjection {
    /// Eject below `mean - stdev * stdev_factor / 1000`. Default 1900
    /// (A50's: 1.9 standard deviations).
    pub stdev_factor: u32,
    /// The chance, in percent, that a detected outlier is ejected. Default
    /// 100.
    pub enforcement_percentage: u32,
    /// Run only when at least this many addresses had `request_volume`
    /// calls in the interval. Default 5 (A50's): statistics over fewer are
    /// noise.
    pub minimum_hosts: u32,
    /// Calls an address needs in one interval to be judged. Default 50
    /// (A50: 100 in an interval twenty times longer).
    pub request_volume: u32,
}

impl Default for SuccessRateEjection {
    fn default() -> Self {
        Self {
            stdev_factor: 1900,
            enforcement_percentage: 100,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

/// Ejects addresses that fail more than a fixed share of their calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePercentageEjection {
    /// Eject above this failure percentage. Default 85 (A50's): only a
    /// backend that fails nearly everything, which a wrong ejection cannot
    /// make worse.
    pub threshold: u32,
    /// The chance, in percent, that an address over the threshold is
    /// ejected. Default 100.
    pub enforcement_percentage: u32,
    /// Run only when there are at least this many addresses. Default 2
    /// (A50: 5): with two or more, the others can take the traffic; a
    /// lone backend is never ejected anyway.
    pub minimum_hosts: u32,
    /// Calls an address needs in one interval to be judged. Default 10
    /// (A50: 50 in an interval twenty times longer): 20 RPC/s is enough.
    pub request_volume: u32,
}

impl Default for FailurePercentageEjection {
    fn default() -> Self {
        Self {
            threshold: 85,
            enforcement_percentage: 100,
            minimum_hosts: 2,
            request_volume: 10,
        }
    }
}

/// The default failure rule: statuses that say the backend is in trouble,
/// whatever the request. Application errors (NOT_FOUND, INVALID_ARGUMENT,
/// PERMISSION_DENIED, ...) are answers, and CANCELLED is the caller's doing.
pub fn is_backend_failure(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | ResourceExhausted | Internal | Unavailable | DataLoss
    )
}

/// A50's failure rule: every status but OK.
pub fn is_any_error(code: tonic::Code) -> bool {
    code != tonic::Code::Ok
}
