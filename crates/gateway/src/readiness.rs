//! Readiness: `/readyz` is 200 only when every registered condition holds.
//!
//! Conditions are registered by whoever owns a dependency: today the serve
//! command registers `listeners` and flips it once the data plane is bound;
//! the supervision tree will register its own (store connected, draining).
//! Only the admin endpoint reads the set, so a small lock here never touches
//! the request path; each condition is flipped with an atomic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug)]
struct Condition {
    name: String,
    ready: AtomicBool,
    reason: Mutex<String>,
}

/// The set of readiness conditions.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<Vec<Arc<Condition>>>>,
}

/// One condition, owned by the component it describes.
#[derive(Debug, Clone)]
pub struct ReadinessHandle {
    condition: Arc<Condition>,
}

impl ReadinessHandle {
    /// Marks the condition as met.
    pub fn set_ready(&self) {
        self.condition.ready.store(true, Ordering::Release);
    }

    /// Marks the condition as not met, with a reason shown by `/readyz`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self
            .condition
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason.into();
        self.condition.ready.store(false, Ordering::Release);
    }
}

/// One line of the readiness report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConditionReport {
    /// Condition name.
    pub name: String,
    /// Whether it holds.
    pub ready: bool,
    /// Why not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Readiness {
    /// Registers a condition, initially not ready with `reason`.
    pub fn register(&self, name: &str, reason: &str) -> ReadinessHandle {
        let condition = Arc::new(Condition {
            name: name.to_owned(),
            ready: AtomicBool::new(false),
            reason: Mutex::new(reason.to_owned()),
        });
        self.conditions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(condition.clone());
        ReadinessHandle { condition }
    }

    /// Every condition and its state.
    pub fn report(&self) -> Vec<ConditionReport> {
        let conditions = self
            .conditions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        conditions
            .iter()
            .map(|c| {
                let ready = c.ready.load(Ordering::Acquire);
                ConditionReport {
                    name: c.name.clone(),
                    ready,
                    reason: (!ready).then(|| {
                        c.reason
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clone()
                    }),
                }
            })
            .collect()
    }

    /// True when every condition holds.
    pub fn is_ready(&self) -> bool {
        self.report().iter().all(|c| c.ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_conditions_hold() {
        let readiness = Readiness::default();
        let listeners = readiness.register("listeners", "starting");
        let store = readiness.register("store", "connecting");
        assert!(!readiness.is_ready());
        listeners.set_ready();
        assert!(!readiness.is_ready());
        store.set_ready();
        assert!(readiness.is_ready());
        store.set_not_ready("redis unreachable");
        let report = readiness.report();
        assert_eq!(report[1].reason.as_deref(), Some("redis unreachable"));
        assert!(!readiness.is_ready());
    }
}
