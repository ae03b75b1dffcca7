//! What the console does on the log, behind a trait object so that the HTTP state stays free
//! of the engine's type: dead letters (through `deliver::dlq`, never reimplemented here) and
//! reading a received message back from the raw topic.

use std::sync::Arc;

use ketenbus_connectors::BoxFuture;
use ketenbus_schemas::{DeadLetter, RawEnvelope, topics};

use crate::bus::{Bus, BusError};
use crate::deliver::dlq::{self, PurgeError, Selection};
use crate::observe::audit::Audit;

/// What to do with dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Publish them to the subscription's replay topic.
    Replay,
    /// Remove them from the log.
    Purge,
}

/// The console's operations on the log.
pub trait Operations: Send + Sync {
    /// Dead letters of a subscription that match.
    fn dead_letters<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>>;
    /// Replay or purge matching dead letters (each audited with `actor`); what was done.
    fn work<'a>(
        &'a self,
        work: Work,
        subscription: &'a str,
        sel: &'a Selection,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, PurgeError>>;
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

    fn work<'a>(
        &'a self,
        work: Work,
        subscription: &'a str,
        sel: &'a Selection,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<serde_json::Value, PurgeError>> {
        let (bus, audit) = (self.bus.as_ref(), self.audit.as_ref());
        Box::pin(async move {
            Ok(match work {
                Work::Replay => {
                    let n = dlq::replay(bus, subscription, sel, audit, actor).await?;
                    serde_json::json!({ "replayed": n })
                }
                Work::Purge => {
                    let p = dlq::purge(bus, subscription, sel, audit, actor).await?;
                    serde_json::json!({ "selected": p.selected, "removed": p.removed })
                }
            })
        })
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
            crate::bus::bodies::decode_raw(self.bus.bodies(), &r.value)
                .map(Some)
                .map_err(|e| e.to_string())
        })
    }
}
