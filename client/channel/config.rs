//! Which service config a channel follows, and which policy that means.
//!
//! A channel starts on the builder's config (its default). A resolver may
//! bring the source's own config (the registry's, pushed on Watch); as in
//! gRPC, that one wins over the default while the source has one, and the
//! default comes back when it says it has none. An application can opt out
//! ([`Builder::disable_service_config_lookup`](super::Builder::disable_service_config_lookup)).
//!
//! What the builder set explicitly wins over any config: a
//! [`Builder::policy`](super::Builder::policy) or custom policy,
//! [`Builder::outlier_detection`](super::Builder::outlier_detection) and
//! [`Builder::health_check`](super::Builder::health_check).
//!
//! Calls read the config in force through a lock-free [`ArcSwap`], so a
//! new method timeout or retry policy applies from the next call on; the
//! balancer task swaps policies when the config names another one.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::builder::PolicyKind;
use crate::client::health::HealthCheck;
use crate::client::outlier_detection::{OutlierDetection, OutlierDetectionConfig};
use crate::client::policy::Policy;
use crate::client::retry::throttle::Throttle;
use crate::client::slow_start::SlowStart;
use crate::client::subchannel::ConnectConfig;
use crate::client::zone_aware::ZoneAware;
use crate::service_config::{ServiceConfig, SlowStartConfig};

/// What calls follow: the config in force and its retry token bucket.
pub(crate) struct CallConfig {
    /// The service config in force.
    pub service_config: Arc<ServiceConfig>,
    /// Its `retryThrottling` bucket, kept across configs that do not
    /// change it (tokens are state, not config).
    pub throttle: Option<Arc<Throttle>>,
}

/// The balancing the config in force asks for: a change of any part
/// builds a new policy with subchannels of its own.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PolicyChoice {
    /// The built-in policy.
    pub kind: PolicyKind,
    /// Outlier detection around it, if any.
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// Slow start of newly joined endpoints, if any (policies that use
    /// every endpoint only).
    pub slow_start: Option<SlowStartConfig>,
    /// The client's zone, to prefer its endpoints (policies that use every
    /// endpoint only, and unless the config's `zonePreference` is off).
    pub zone: Option<String>,
    /// The config's overprovisioning factor, as a percentage.
    pub zone_overprovisioning: u32,
    /// The health service its subchannels watch, from the config
    /// (`None` too when the builder set one: that one is in the base
    /// connect config).
    pub health_check: Option<String>,
}

impl PolicyChoice {
    /// The policy this choice describes.
    pub fn build(&self) -> Box<dyn Policy> {
        let mut policy = self.kind.build();
        if let Some(config) = self.slow_start {
            policy = Box::new(SlowStart::new(policy, config));
        }
        if let Some(zone) = &self.zone {
            let factor = f64::from(self.zone_overprovisioning) / 100.0;
            policy = Box::new(ZoneAware::new(policy, zone.clone()).with_factor(factor));
        }
        match self.outlier_detection {
            Some(config) => Box::new(OutlierDetection::new(policy, config)),
            None => policy,
        }
    }

    /// The subchannels' settings under this choice: `base` with the
    /// config's health check, if it names one.
    pub fn connect(&self, base: &Arc<ConnectConfig>) -> Arc<ConnectConfig> {
        match &self.health_check {
            Some(service) => Arc::new(ConnectConfig {
                health_check: Some(Arc::new(HealthCheck::new(service.clone()))),
                ..ConnectConfig::clone(base)
            }),
            None => base.clone(),
        }
    }
}

/// Whether `kind` spreads calls over every Ready endpoint, which slow
/// start and zone preference shape; pick_first uses one, ring_hash picks
/// by key.
fn uses_every_endpoint(kind: PolicyKind) -> bool {
    matches!(
        kind,
        PolicyKind::RoundRobin | PolicyKind::LeastRequest(_) | PolicyKind::WeightedRoundRobin
    )
}

/// What the builder fixed, whatever the config says.
#[derive(Debug, Clone, Default)]
pub(crate) struct Explicit {
    /// [`Builder::policy`](super::Builder::policy).
    pub policy: Option<PolicyKind>,
    /// A custom policy: the channel never swaps it.
    pub custom: bool,
    /// [`Builder::outlier_detection`](super::Builder::outlier_detection).
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// [`Builder::health_check`](super::Builder::health_check).
    pub health_check: bool,
    /// [`Builder::slow_start`](super::Builder::slow_start).
    pub slow_start: Option<SlowStartConfig>,
    /// [`Builder::zone`](super::Builder::zone).
    pub zone: Option<String>,
}

/// Chooses the config in force and publishes it to calls.
pub(crate) struct ConfigSelector {
    default: Arc<ServiceConfig>,
    lookup: bool,
    explicit: Explicit,
    /// The source's config, when it has one.
    from_source: Option<Arc<ServiceConfig>>,
    out: Arc<ArcSwap<CallConfig>>,
}

impl ConfigSelector {
    /// Starts on `default`; `lookup` false ignores the source's configs.
    pub fn new(default: ServiceConfig, lookup: bool, explicit: Explicit) -> Self {
        let default = Arc::new(default);
        let out = Arc::new(ArcSwap::from_pointee(CallConfig {
            throttle: default.retry_throttling.map(|t| Arc::new(Throttle::new(t))),
            service_config: default.clone(),
        }));
        Self {
            default,
            lookup,
            explicit,
            from_source: None,
            out,
        }
    }

    /// Where calls read the config in force.
    pub fn calls(&self) -> Arc<ArcSwap<CallConfig>> {
        self.out.clone()
    }

    /// The config in force.
    pub fn in_force(&self) -> Arc<ServiceConfig> {
        self.from_source
            .clone()
            .unwrap_or_else(|| self.default.clone())
    }

    /// The balancing the config in force asks for; `None` under a custom
    /// policy.
    pub fn choice(&self) -> Option<PolicyChoice> {
        if self.explicit.custom {
            return None;
        }
        let config = self.in_force();
        let configured = config.lb_policy();
        let kind = self
            .explicit
            .policy
            .or_else(|| configured.map(PolicyKind::from))
            .unwrap_or_default();
        let zone_preference = config.zone_preference();
        Some(PolicyChoice {
            outlier_detection: self
                .explicit
                .outlier_detection
                .or_else(|| configured.and_then(|p| p.outlier_detection().copied())),
            health_check: config
                .health_check_service
                .clone()
                .filter(|_| !self.explicit.health_check),
            slow_start: self
                .explicit
                .slow_start
                .or_else(|| config.slow_start())
                .filter(|_| uses_every_endpoint(kind)),
            // Where the client runs is the builder's to say; whether that
            // matters for this service, the config's.
            zone: self
                .explicit
                .zone
                .clone()
                .filter(|_| uses_every_endpoint(kind) && zone_preference.enabled),
            zone_overprovisioning: zone_preference.overprovisioning_percent,
            kind,
        })
    }

    /// The source's config (`None`: it has none). Returns whether the
    /// config in force changed; calls see the new one from now on.
    pub fn set_source(&mut self, config: Option<Arc<ServiceConfig>>) -> bool {
        if !self.lookup {
            return false;
        }
        let before = self.in_force();
        self.from_source = config;
        let after = self.in_force();
        if *before == *after {
            return false;
        }
        let old = self.out.load();
        let throttle = match (&old.throttle, after.retry_throttling) {
            (Some(bucket), Some(t)) if before.retry_throttling == Some(t) => Some(bucket.clone()),
            (_, t) => t.map(|t| Arc::new(Throttle::new(t))),
        };
        self.out.store(Arc::new(CallConfig {
            service_config: after,
            throttle,
        }));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Arc<ServiceConfig> {
        Arc::new(ServiceConfig::from_json(json).unwrap())
    }

    const ROUND_ROBIN: &str = r#"{"loadBalancingConfig":[{"round_robin":{}}]}"#;

    #[test]
    fn the_source_config_wins_over_the_default_until_it_has_none() {
        let default = ServiceConfig::from_json(
            r#"{"loadBalancingConfig":[{"least_request_experimental":{}}]}"#,
        )
        .unwrap();
        let mut selector = ConfigSelector::new(default, true, Explicit::default());
        assert!(matches!(
            selector.choice().unwrap().kind,
            PolicyKind::LeastRequest(_)
        ));
        assert!(selector.set_source(Some(config(ROUND_ROBIN))));
        assert_eq!(selector.choice().unwrap().kind, PolicyKind::RoundRobin);
        assert!(
            !selector.set_source(Some(config(ROUND_ROBIN))),
            "same again"
        );
        assert!(selector.set_source(None));
        assert!(matches!(
            selector.choice().unwrap().kind,
            PolicyKind::LeastRequest(_)
        ));
    }

    #[test]
    fn an_opted_out_channel_and_explicit_settings_ignore_the_source() {
        let mut selector =
            ConfigSelector::new(ServiceConfig::default(), false, Explicit::default());
        assert!(!selector.set_source(Some(config(ROUND_ROBIN))));
        assert_eq!(selector.choice().unwrap().kind, PolicyKind::PickFirst);

        let explicit = Explicit {
            policy: Some(PolicyKind::PickFirst),
            ..Explicit::default()
        };
        let mut selector = ConfigSelector::new(ServiceConfig::default(), true, explicit);
        assert!(selector.set_source(Some(config(ROUND_ROBIN))));
        assert_eq!(selector.choice().unwrap().kind, PolicyKind::PickFirst);

        let custom = Explicit {
            custom: true,
            ..Explicit::default()
        };
        let selector = ConfigSelector::new(ServiceConfig::default(), true, custom);
        assert_eq!(selector.choice(), None);
    }

    #[test]
    fn the_throttle_bucket_survives_a_config_that_keeps_it() {
        let throttled = r#"{"retryThrottling":{"maxTokens":10,"tokenRatio":0.1}"#;
        let mut selector = ConfigSelector::new(ServiceConfig::default(), true, Explicit::default());
        selector.set_source(Some(config(&format!("{throttled}}}"))));
        let bucket = selector.calls().load().throttle.clone().unwrap();
        selector.set_source(Some(config(&format!(
            r#"{throttled},"loadBalancingConfig":[{{"round_robin":{{}}}}]}}"#
        ))));
        let kept = selector.calls().load().throttle.clone().unwrap();
        assert!(Arc::ptr_eq(&bucket, &kept));
        selector.set_source(None);
        assert!(selector.calls().load().throttle.is_none());
    }

    #[test]
    fn the_builders_zone_is_preferred_as_the_config_says() {
        let explicit = Explicit {
            zone: Some("a".into()),
            ..Explicit::default()
        };
        let mut selector = ConfigSelector::new(ServiceConfig::default(), true, explicit);
        selector.set_source(Some(config(ROUND_ROBIN)));
        let choice = selector.choice().unwrap();
        assert_eq!(
            (choice.zone.as_deref(), choice.zone_overprovisioning),
            (Some("a"), 140)
        );
        selector.set_source(Some(config(
            r#"{"loadBalancingConfig":[{"round_robin":{}}],"zonePreference":{"overprovisioningFactor":2}}"#,
        )));
        assert_eq!(selector.choice().unwrap().zone_overprovisioning, 200);
        selector.set_source(Some(config(
            r#"{"loadBalancingConfig":[{"round_robin":{}}],"zonePreference":{"enabled":false}}"#,
        )));
        assert_eq!(selector.choice().unwrap().zone, None);
    }
}
