//! Health of the running components, for `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Component states: `/readyz` is green when every registered component is ready;
/// `/healthz` is red when any component failed fatally.
#[derive(Debug, Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, State>>,
}

/// One component's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum State {
    /// Starting up.
    Starting,
    /// Running.
    Ready,
    /// Stopped after a fatal error.
    Failed(String),
}

impl Health {
    /// Set a component's state.
    pub fn set(&self, component: &str, state: State) {
        self.components
            .lock()
            .expect("health lock")
            .insert(component.to_owned(), state);
    }

    /// All components.
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<String, State> {
        self.components.lock().expect("health lock").clone()
    }

    /// No component failed.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        !self
            .snapshot()
            .values()
            .any(|s| matches!(s, State::Failed(_)))
    }

    /// Every component is ready.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        let s = self.snapshot();
        !s.is_empty() && s.values().all(|s| *s == State::Ready)
    }
}
