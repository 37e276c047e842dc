//! The child of a wrapping policy (outlier detection, slow start, zone
//! preference): the child itself, a timer of its own so that the wrapper's
//! timer and its child's do not overwrite each other, and its last picker.

use std::sync::Arc;

use tokio::time::Instant;

use crate::client::policy::{Picker, Policy, PolicyContext, PolicyPicker};

/// A policy wrapped by another.
pub struct Wrapped {
    policy: Box<dyn Policy>,
    timer: Option<Instant>,
    picker: Option<PolicyPicker>,
}

impl Wrapped {
    /// Wraps `policy`.
    pub fn new(policy: Box<dyn Policy>) -> Self {
        Self {
            policy,
            timer: None,
            picker: None,
        }
    }

    /// The child's name: a wrapper that only shapes picks names itself
    /// after the policy that picks.
    pub fn name(&self) -> &'static str {
        self.policy.name()
    }

    /// Runs `f` on the child with a context whose timer requests go to the
    /// child's own timer, then asks `cx` for that time too.
    pub fn with<R>(
        &mut self,
        cx: &mut PolicyContext<'_>,
        f: impl FnOnce(&mut dyn Policy, &mut PolicyContext<'_>) -> R,
    ) -> R {
        let result = f(&mut *self.policy, &mut cx.for_child(&mut self.timer));
        if let Some(at) = self.timer {
            cx.schedule_at(at);
        }
        result
    }

    /// Fires the child's timer if it is due.
    pub fn fire_if_due(&mut self, cx: &mut PolicyContext<'_>) {
        if self.timer.is_some_and(|at| at <= cx.now()) {
            self.timer = None;
            self.with(cx, |child, cx| child.timer_fired(cx));
        }
    }

    /// When the child's timer is due, if it asked for one.
    pub fn timer(&self) -> Option<Instant> {
        self.timer
    }

    /// Takes the child's new picker, if it has one; true if it had.
    pub fn refresh_picker(&mut self) -> bool {
        match self.policy.take_picker() {
            Some(fresh) => {
                self.picker = Some(fresh);
                true
            }
            None => false,
        }
    }

    /// The child's last picker.
    pub fn picker(&self) -> Option<&PolicyPicker> {
        self.picker.as_ref()
    }
}

/// `picker` published with the child's state and last error.
pub fn with_state_of(child: &PolicyPicker, picker: Arc<dyn Picker>) -> PolicyPicker {
    PolicyPicker {
        picker,
        connectivity: child.connectivity,
        last_error: child.last_error.clone(),
    }
}
