//! The ketenbus broker: configuration, the log engines, the router that normalises raw
//! envelopes into events, dispatch to subscriptions, the HTTP API and dead-letter tools.
//! `main.rs` is the command line around [`runtime::run`].

pub mod api;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod config;
pub mod consent;
pub mod dispatch;
pub mod dlq;
#[cfg(debug_assertions)]
pub mod fault;
pub mod fhir_api;
pub mod health;
pub mod http_budget;
pub mod idempotency;
pub mod ingest;
pub mod inspect;
pub mod keys;
pub mod lineage;
pub mod retention;
pub mod router;
pub mod runtime;
pub mod status;
pub mod telemetry;
pub mod tls;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use bus::{Bus, BusError, OutRecord, Position};

pub use ketenbus_schemas::now_ms;

/// Publish, waiting and trying again while the log is unavailable, until `cancel`.
///
/// # Errors
/// A fatal bus error, or `Unavailable` when cancelled while waiting.
pub async fn publish_retrying<B: Bus>(
    bus: &B,
    records: Vec<OutRecord>,
    cancel: &CancellationToken,
) -> Result<Vec<Position>, BusError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    while_unavailable(cancel, || bus.publish(records.clone())).await
}

/// Run `op` until it succeeds or fails for good, waiting (100 ms, doubling up to 5 s) and
/// trying again while it answers `Unavailable`, until `cancel`.
///
/// # Errors
/// What `op` failed with for good, or its last `Unavailable` when cancelled while waiting.
pub async fn while_unavailable<T, F, Fut>(
    cancel: &CancellationToken,
    mut op: F,
) -> Result<T, BusError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BusError>>,
{
    let mut wait = Duration::from_millis(100);
    loop {
        match op().await {
            Err(e @ BusError::Unavailable(_)) => {
                tracing::warn!(error = %e, "unavailable, retrying");
                tokio::select! {
                    () = cancel.cancelled() => return Err(e),
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}
