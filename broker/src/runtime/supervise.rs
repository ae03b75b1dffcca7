//! Supervision: every task of the broker runs in one `JoinSet` under a name, and one loop
//! watches them all. A task that ends before shutdown (it returned after a fatal error, or
//! panicked) is logged at ERROR, marked failed in the health report, and stops the others
//! cleanly; the broker then exits non-zero for its supervisor to restart it. Nothing
//! acknowledged is lost by that, since every record is acknowledged only once its next
//! durable store holds it.
//!
//! In the set: the router, each subscription, each inbox, the mail listener and pickups, the
//! watcher, retention and the HTTP server. Not in it, on purpose: a subscription's delivery
//! lanes run in that subscription's own set, and a lane that panics takes its subscription
//! down with the same panic (seen here under the subscription's name); the HTTP server's
//! per-connection tasks end with their connection; the signal listener of `ketenbus run`
//! only cancels.

use std::collections::HashMap;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::observe::health::{Health, State};

/// What a task started into [`Tasks::set`] without a name is called (the mail connectors
/// start their listeners and pickups there themselves).
const UNNAMED: &str = "a mail connector";

/// The broker's tasks, by name.
#[derive(Default)]
pub(crate) struct Tasks {
    set: JoinSet<()>,
    /// Task names by id, for the log line when one ends unexpectedly (and its health entry).
    names: HashMap<Id, String>,
}

impl Tasks {
    /// Start `task` under `name`.
    pub(crate) fn spawn<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name.into());
    }

    /// The set itself, for a starter that spawns its own tasks into it.
    pub(crate) fn set(&mut self) -> &mut JoinSet<()> {
        &mut self.set
    }

    /// Watch every task until all have ended. The first that ends before `cancel` (returned
    /// or panicked) is logged, marked failed in `health`, and cancels the rest. Returns what
    /// ended unexpectedly, if anything did.
    pub(crate) async fn supervise(
        mut self,
        health: &Health,
        cancel: &CancellationToken,
    ) -> Option<String> {
        let mut failure = None;
        while let Some(joined) = self.set.join_next_with_id().await {
            let (id, cause) = match joined {
                Ok(_) if cancel.is_cancelled() => continue, // stopped as asked
                Ok((id, ())) => (id, "it returned (see the error before)".to_owned()),
                Err(e) => (e.id(), panic_text(e)),
            };
            let task = self.names.get(&id).map_or(UNNAMED, String::as_str);
            tracing::error!(task, cause = %cause, "a task ended unexpectedly; stopping the broker");
            health.set(task, State::Failed(cause.clone()));
            failure.get_or_insert_with(|| format!("{task} ended unexpectedly: {cause}"));
            cancel.cancel();
        }
        failure
    }
}

/// Why a task ended: its panic message.
fn panic_text(e: JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            format!("panicked: {text}")
        }
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_dies_stops_the_others_and_is_named() {
        let (health, cancel) = (Health::default(), CancellationToken::new());
        let mut tasks = Tasks::default();
        let c = cancel.clone();
        tasks.spawn("patient", async move { c.cancelled().await });
        tasks.spawn("router", async { panic!("boom") });
        let failure = tasks.supervise(&health, &cancel).await;
        assert_eq!(
            failure.as_deref(),
            Some("router ended unexpectedly: panicked: boom")
        );
        assert!(cancel.is_cancelled());
    }

    #[tokio::test]
    async fn tasks_that_end_on_cancel_are_no_failure() {
        let (health, cancel) = (Health::default(), CancellationToken::new());
        let mut tasks = Tasks::default();
        for name in ["router", "http"] {
            let c = cancel.clone();
            tasks.spawn(name, async move { c.cancelled().await });
        }
        let c = cancel.clone();
        tasks.set().spawn(async move { c.cancelled().await });
        cancel.cancel();
        assert_eq!(tasks.supervise(&health, &cancel).await, None);
    }
}
