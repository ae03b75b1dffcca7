//! Ingest onto the log: every source hands its envelopes to [`BusIngest`], which answers
//! only when the envelope is durable on the raw topic, then indexes it in the lineage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::BoxFuture;
use ketenbus_connectors::party;
use ketenbus_connectors::{Accepted, Ingest, IngestError};
use ketenbus_schemas::{AvroRecord, RawEnvelope, topics};

use crate::bus::{Bus, BusError, OutRecord};
use crate::lineage::{Lineage, Received};
use crate::telemetry;

/// Publishes envelopes on the raw topic with a deadline.
pub struct BusIngest<B: Bus> {
    bus: Arc<B>,
    lineage: Lineage,
    timeout: Duration,
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
                telemetry::rejected(&envelope.connector, REASON_LOG_FULL);
                return Err(IngestError::Unavailable(why));
            }
            let value = envelope
                .to_avro()
                .map_err(|e| IngestError::Fatal(e.to_string()))?;
            let record = OutRecord {
                topic: topics::RAW.to_owned(),
                key: envelope.id.clone().into_bytes(),
                value,
            };
            let positions =
                match tokio::time::timeout(self.timeout, self.bus.publish(vec![record])).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(BusError::TooLarge(e))) => {
                        return Err(telemetry::refused(
                            &envelope.connector,
                            IngestError::Refused {
                                reason: "too_large",
                                detail: e,
                            },
                        ));
                    }
                    Ok(Err(BusError::Unavailable(e))) => {
                        return Err(telemetry::refused(
                            &envelope.connector,
                            IngestError::Unavailable(e),
                        ));
                    }
                    Ok(Err(e)) => {
                        return Err(telemetry::refused(
                            &envelope.connector,
                            IngestError::Fatal(e.to_string()),
                        ));
                    }
                    Err(_) => {
                        return Err(telemetry::refused(
                            &envelope.connector,
                            IngestError::Unavailable("timed out waiting for the log".into()),
                        ));
                    }
                };
            let pos = positions[0];
            telemetry::received(&envelope.connector, envelope.format, envelope.body.len());
            self.lineage.received(Received::of(&envelope, pos)).await;
            Ok(Accepted { id: envelope.id })
        })
    }
}

/// Reason code of a message refused because the log is full of unfinished records.
pub const REASON_LOG_FULL: &str = "log_full";

/// Holds authenticated SMTP users to the parties they may send as (`party_ids` of
/// `[mail.smtp.auth] users`): a message whose EDIFACT or FHIR parts declare another sender
/// is refused (`550 5.7.1`) before it is stored; otherwise its envelope names the declared
/// party, or the user's first. Other envelopes pass unchanged.
pub struct SmtpSenderCheck {
    inner: Arc<dyn Ingest>,
    parties: HashMap<String, Vec<String>>,
}

/// Reason code of a message declaring a sender its login may not send as.
pub const REASON_SENDER_NOT_ALLOWED: &str = "sender_not_allowed";

impl SmtpSenderCheck {
    /// Check the users of `auth` (when configured) in front of `inner`.
    #[must_use]
    pub fn new(
        inner: Arc<dyn Ingest>,
        auth: Option<&ketenbus_connectors::mail::SmtpAuthConfig>,
    ) -> SmtpSenderCheck {
        let parties = auth
            .map(|a| {
                a.users
                    .iter()
                    .filter(|u| !u.party_ids.is_empty())
                    .map(|u| (u.username.clone(), u.party_ids.clone()))
                    .collect()
            })
            .unwrap_or_default();
        SmtpSenderCheck { inner, parties }
    }
}

impl Ingest for SmtpSenderCheck {
    fn accept(&self, mut envelope: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>> {
        Box::pin(async move {
            let login = envelope
                .attributes
                .get("smtp.auth_user")
                .and_then(|user| Some((user.clone(), self.parties.get(user)?)));
            if let Some((user, allowed)) = login {
                // Off the async workers: a mail may be large.
                let (declared, back) = tokio::task::spawn_blocking(move || {
                    (party::declared(envelope.format, &envelope.body), envelope)
                })
                .await
                .map_err(|e| IngestError::Fatal(format!("reading the message's parties: {e}")))?;
                envelope = back;
                match party::check_sender(&declared, &user, allowed) {
                    Ok(sender) => envelope.sender = sender,
                    Err(e) => {
                        telemetry::rejected(&envelope.connector, REASON_SENDER_NOT_ALLOWED);
                        return Err(IngestError::Refused {
                            reason: REASON_SENDER_NOT_ALLOWED,
                            detail: e.to_string(),
                        });
                    }
                }
            }
            self.inner.accept(envelope).await
        })
    }
}
