//! What watches it all: metrics (a leaf), the lineage of every message, the audit trail and
//! component health.

pub mod audit;
pub mod health;
pub mod lineage;
pub mod metrics;
pub mod watch;
