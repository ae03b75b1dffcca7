//! What the HTTP handlers share.

use std::sync::Arc;

use ketenbus_connectors::Ingest;

use crate::http::idempotency::Idempotency;
use crate::observe::health::Health;
use crate::observe::lineage::Lineage;

/// Shared state of the handlers: no log engine, only what takes messages.
pub struct ApiState {
    /// Where messages go: resolves once they are durable.
    pub ingest: Arc<dyn Ingest>,
    /// Lineage index.
    pub lineage: Lineage,
    /// Which `Idempotency-Key` gave which message id.
    pub idempotency: Idempotency,
    /// Component health.
    pub health: Arc<Health>,
    /// Largest accepted body.
    pub max_body: usize,
    /// Consent from Mitz: takes its change notifications (`POST /consent/mitz/notify`).
    pub mitz: Option<Arc<crate::deliver::mitz::MitzRegistry>>,
    /// Turns the BSN of a search by patient into the pseudonym the index holds.
    pub keyer: crate::route::keys::PatientKeyer,
    /// Notified Pull (`[notified_pull]`): the token endpoint and the inbox of notifications.
    pub pull: Option<Arc<crate::deliver::pull::NotifiedPull>>,
    /// The resources of every event, read at `GET /fhir/{Type}/{id}`.
    pub resources: Option<crate::deliver::resources::Resources>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}
