//! Ingest onto the log: every source hands its envelopes to [`BusIngest`], which answers
//! only when the envelope is durable on the raw topic, then indexes it in the lineage.

pub mod limits;

use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::{Accepted, BoxFuture, Ingest, IngestError};
use ketenbus_schemas::{AvroRecord, RawEnvelope, topics};

use crate::bus::{Bus, BusError, OutRecord};
use crate::observe::lineage::{Lineage, Received};
use crate::observe::metrics;

/// Publishes envelopes on the raw topic with a deadline.
pub struct BusIngest<B: Bus> {
    bus: Arc<B>,
    lineage: Lineage,
    timeout: Duration,
}

impl<B: Bus> std::fmt::Debug for BusIngest<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusIngest")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B: Bus> BusIngest<B> {
    /// Ingest onto `bus`, giving up after `timeout` (the sender then hears "try again").
    pub fn new(bus: Arc<B>, lineage: Lineage, timeout: Duration) -> BusIngest<B> {
        BusIngest {
            bus,
            lineage,
            timeout,
        }
    }
}

impl<B: Bus> Ingest for BusIngest<B> {
    fn accept(&self, envelope: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>> {
        Box::pin(async move {
            // A topic held past its size limit by unfinished records: "try again" rather
            // than a record retention would have to delete unfinished.
            if let Some(why) = self.bus.refuses_ingest() {
                metrics::rejected(&envelope.connector, REASON_LOG_FULL);
                return Err(IngestError::Unavailable(why));
            }
            let size = envelope.body.len();
            // A large body goes to its own file first (durable before the record that names
            // it), so the record on the log is small.
            let (envelope, claim) = match self.bus.bodies() {
                Some(store) if store.takes(size) => {
                    let store = store.clone();
                    let mut envelope = envelope;
                    let (envelope, claim) = tokio::task::spawn_blocking(move || {
                        let claim = store.claim(&mut envelope);
                        (envelope, claim)
                    })
                    .await
                    .map_err(|e| IngestError::Fatal(format!("body file task: {e}")))?;
                    let claim = claim.map_err(|e| {
                        tracing::warn!(error = %e, "large body not written");
                        metrics::refused(
                            &envelope.connector,
                            IngestError::Unavailable(format!("body file: {e}")),
                        )
                    })?;
                    (envelope, Some(claim))
                }
                _ => (envelope, None),
            };
            let value = envelope
                .to_avro()
                .map_err(|e| IngestError::Fatal(e.to_string()))?;
            let record = OutRecord {
                topic: topics::RAW.to_owned(),
                key: envelope.id.clone().into_bytes(),
                value,
            };
            let published =
                tokio::time::timeout(self.timeout, self.bus.publish(vec![record])).await;
            let claim = match (claim, &published) {
                (Some(c), Ok(Ok(p))) => {
                    c.published(p[0]);
                    None
                }
                // Surely not on the log: the body goes. A timeout keeps it (see `Claim`).
                (Some(c), Ok(Err(_))) => {
                    c.refused();
                    None
                }
                (c, _) => c,
            };
            drop(claim);
            let positions = match published {
                Ok(Ok(p)) => p,
                Ok(Err(BusError::TooLarge(e))) => {
                    return Err(metrics::refused(
                        &envelope.connector,
                        IngestError::Refused {
                            reason: "too_large",
                            detail: e,
                        },
                    ));
                }
                Ok(Err(BusError::Unavailable(e))) => {
                    return Err(metrics::refused(
                        &envelope.connector,
                        IngestError::Unavailable(e),
                    ));
                }
                Ok(Err(e)) => {
                    return Err(metrics::refused(
                        &envelope.connector,
                        IngestError::Fatal(e.to_string()),
                    ));
                }
                Err(_) => {
                    return Err(metrics::refused(
                        &envelope.connector,
                        IngestError::Unavailable("timed out waiting for the log".into()),
                    ));
                }
            };
            let pos = positions[0];
            metrics::received(&envelope.connector, envelope.format, size);
            let mut seen = Received::of(&envelope, pos);
            seen.size = size as u64;
            self.lineage.received(seen).await;
            Ok(Accepted { id: envelope.id })
        })
    }
}

/// Reason code of a message refused because the log is full of unfinished records.
pub const REASON_LOG_FULL: &str = "log_full";
