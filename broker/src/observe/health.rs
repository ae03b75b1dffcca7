//! Health of the running components, for `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    /// Running, but its peer cannot be reached (an IMAP hub that is down); it keeps trying.
    /// Still ready: the broker takes and delivers messages in every other way.
    Degraded(String),
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
        !s.is_empty()
            && s.values()
                .all(|s| matches!(s, State::Ready | State::Degraded(_)))
    }
}

/// What sources (SMTP listener, IMAP pickups) report: a health component per source and the
/// `ketenbus_ingest_source_up` gauge.
pub struct SourceHealth(pub Arc<Health>);

impl std::fmt::Debug for SourceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceHealth").finish_non_exhaustive()
    }
}

impl ketenbus_connectors::SourceStatus for SourceHealth {
    fn up(&self, source: &str) {
        self.0.set(source, State::Ready);
        crate::observe::metrics::source_up(source, true);
    }

    fn down(&self, source: &str, reason: &str) {
        self.0.set(source, State::Degraded(reason.to_owned()));
        crate::observe::metrics::source_up(source, false);
    }

    fn refused(&self, connector: &str, reason: &'static str) {
        crate::observe::metrics::rejected(connector, reason);
    }
}

#[cfg(test)]
mod tests {
    use ketenbus_connectors::SourceStatus;

    use super::*;

    #[test]
    fn a_source_whose_peer_is_down_is_degraded_but_ready() {
        let health = Arc::new(Health::default());
        health.set("router", State::Ready);
        let sources = SourceHealth(Arc::clone(&health));
        sources.up("imap:hub");
        assert!(health.is_ready() && health.is_healthy());
        sources.down("imap:hub", "connect: connection refused");
        assert_eq!(
            health.snapshot()["imap:hub"],
            State::Degraded("connect: connection refused".into())
        );
        assert!(health.is_ready() && health.is_healthy());
        health.set("router", State::Failed("log gone".into()));
        assert!(!health.is_ready() && !health.is_healthy());
    }
}
