//! Ingest onto the log: every source hands its envelopes to [`BusIngest`], which answers
//! only when the envelope and its `received` lineage record are durable on the log (one
//! append).

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
            let size = crate::bus::bodies::body_len(&envelope);
            let spooled = envelope
                .attributes
                .contains_key(crate::bus::bodies::ATTRIBUTE);
            // A large body goes to its own file first (durable before the record that names
            // it), so the record on the log is small; one spooled as it arrived is there.
            let (envelope, claim) = match self.bus.bodies() {
                Some(store) if store.takes(size) || spooled => {
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
                _ if spooled => {
                    return Err(IngestError::Fatal(
                        "the envelope names a body file, and this engine keeps none".into(),
                    ));
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
            // Its `received` lineage record goes in the same append (one group commit, one
            // produce burst), so every node knows an accepted message even when this one dies
            // right after the answer. Its position comes only from this append: the router's
            // record of the envelope gives it.
            let mut seen = Received::of(&envelope, None);
            seen.size = size as u64;
            let folded = self.lineage.writes(std::slice::from_ref(&seen), &[]);
            let folds = folded.is_some();
            let records = std::iter::once(record)
                .chain(folded.into_iter().flatten())
                .collect();
            let published = tokio::time::timeout(self.timeout, self.bus.publish(records)).await;
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
            metrics::received(&envelope.connector, envelope.format, size);
            if folds {
                self.lineage
                    .published_at(positions.get(1..).unwrap_or_default());
            } else {
                // The lineage on a log of its own (tests of the stages): through its publisher.
                seen.raw = positions.first().copied();
                self.lineage.received(seen).await;
            }
            Ok(Accepted { id: envelope.id })
        })
    }
}

/// Reason code of a message refused because the log is full of unfinished records.
pub const REASON_LOG_FULL: &str = "log_full";

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use ketenbus_connectors::Ingest;
    use ketenbus_schemas::{Format, RawEnvelope, topics};

    use super::BusIngest;
    use crate::bus::{Bus, TopicSpec, test_log};
    use crate::observe::lineage::Lineage;

    /// A message's `received` record is on the log when the sender hears it was accepted,
    /// not gathering in this node's memory, where a kill right after the answer would take
    /// it; this node's index knows the message at once, its position once it is routed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_accepted_message_is_on_the_lineage_topic_before_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(test_log(dir.path(), "log.db"));
        let specs = [topics::RAW, topics::LINEAGE].map(|name| TopicSpec {
            name: name.to_owned(),
            partitions: 2,
        });
        bus.ensure_topics(&specs).await.unwrap();
        let lineage = Lineage::start(dir.path(), Arc::clone(&bus)).await.unwrap();
        let ingest = BusIngest::new(Arc::clone(&bus), lineage.clone(), Duration::from_secs(5));
        let envelope = RawEnvelope {
            id: ketenbus_schemas::new_envelope_id(),
            received_at_ms: 1_764_000_000_000,
            connector: "http".into(),
            format: Format::Edifact,
            content_type: "application/EDIFACT".into(),
            sender: Some("mailbox:500001234".into()),
            receiver: None,
            body: b"UNB+UNOA:1+500001234+500005678+261101:0815+IC7'UNZ+0+IC7'".to_vec(),
            attributes: std::collections::BTreeMap::new(),
        };
        let id = ingest.accept(envelope).await.unwrap().id;
        let on_log = crate::observe::lineage::on_topic(bus.as_ref()).await;
        let received = on_log
            .iter()
            .find(|r| r.message_id == id)
            .and_then(|r| r.received.as_ref())
            .expect("the received record is on the log");
        assert_eq!(received.sender.as_deref(), Some("mailbox:500001234"));
        let known = lineage.get(&id).await.unwrap().expect("known at once");
        assert_eq!(known.received.raw, None, "placed by its routing");
        assert_eq!(known.received.source_id.as_deref(), Some("IC7"));
    }
}
