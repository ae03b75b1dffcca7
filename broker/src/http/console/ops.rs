//! What the console does on the log, behind a trait object so that the HTTP state stays free
//! of the engine's type: dead letters (through `deliver::dlq`, never reimplemented here) and
//! reading a received message back from the raw topic.

use std::sync::Arc;

use ketenbus_connectors::BoxFuture;
use ketenbus_schemas::{AvroRecord, DeadLetter, RawEnvelope, topics};

use crate::bus::{Bus, BusError};
use crate::deliver::dlq::{self, PurgeError, Purged, Selection};
use crate::observe::audit::Audit;

/// The console's operations on the log.
pub trait Operations: Send + Sync {
    /// Dead letters of a subscription that match.
    fn dead_letters<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>>;
    /// Replay matching dead letters (each audited with `actor`); how many.
    fn replay<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<usize, PurgeError>>;
    /// Purge matching dead letters (each audited with `actor`).
    fn purge<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<Purged, PurgeError>>;
    /// The received message at this position of the raw topic; `None` when it is gone.
    fn raw(
        &self,
        partition: u32,
        offset: i64,
    ) -> BoxFuture<'_, Result<Option<RawEnvelope>, String>>;
}

/// [`Operations`] on a bus, with the audit trail the dead-letter functions write to.
#[derive(Debug)]
pub struct BusOperations<B> {
    /// The log.
    pub bus: Arc<B>,
    /// The audit trail, when there is one.
    pub audit: Option<Audit>,
}

impl<B: Bus> Operations for BusOperations<B> {
    fn dead_letters<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>> {
        Box::pin(dlq::list(self.bus.as_ref(), subscription, sel))
    }

    fn replay<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<usize, PurgeError>> {
        Box::pin(dlq::replay(
            self.bus.as_ref(),
            subscription,
            sel,
            self.audit.as_ref(),
            actor,
        ))
    }

    fn purge<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<Purged, PurgeError>> {
        Box::pin(dlq::purge(
            self.bus.as_ref(),
            subscription,
            sel,
            self.audit.as_ref(),
            actor,
        ))
    }

    fn raw(
        &self,
        partition: u32,
        offset: i64,
    ) -> BoxFuture<'_, Result<Option<RawEnvelope>, String>> {
        Box::pin(async move {
            let Some(r) = self
                .bus
                .read_at(topics::RAW, partition, offset)
                .await
                .map_err(|e| e.to_string())?
            else {
                return Ok(None);
            };
            RawEnvelope::from_avro(&r.value)
                .map(Some)
                .map_err(|e| e.to_string())
        })
    }
}
