//! What the HTTP handlers share.

use std::sync::Arc;

use crate::bus::Bus;
use crate::http::idempotency::Idempotency;
use crate::ingest::BusIngest;
use crate::observe::health::Health;
use crate::observe::lineage::Lineage;

/// Shared state of the handlers.
pub struct ApiState<B: Bus> {
    /// Where messages go.
    pub ingest: BusIngest<B>,
    /// Lineage index.
    pub lineage: Lineage,
    /// Which `Idempotency-Key` gave which message id.
    pub idempotency: Idempotency,
    /// Component health.
    pub health: Arc<Health>,
    /// Largest accepted body.
    pub max_body: usize,
}
