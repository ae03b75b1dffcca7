//! Topic names. They are part of the public contract (README "Topics") and fixed by tests.

use crate::event::EventKind;

/// Raw envelopes exactly as received; key = envelope id.
pub const RAW: &str = "ketenbus.raw";
/// Delivery outcomes of every subscription; key = envelope id.
pub const DELIVERY_OUTCOMES: &str = "ketenbus.delivery-outcomes";
/// Dead letters of the router (messages that cannot be normalised).
pub const ROUTER_DEAD_LETTERS: &str = "ketenbus.dlq.router";

/// Topic of one event kind: `ketenbus.events.<kind>`; key = patient key.
#[must_use]
pub fn events(kind: EventKind) -> String {
    format!("ketenbus.events.{}", kind.as_str())
}

/// Dead letters of one subscription: `ketenbus.dlq.<subscription>`.
#[must_use]
pub fn dead_letters(subscription: &str) -> String {
    format!("ketenbus.dlq.{subscription}")
}

/// Records replayed from dead letters, read by that subscription only: `ketenbus.replay.<subscription>`.
#[must_use]
pub fn replay(subscription: &str) -> String {
    format!("ketenbus.replay.{subscription}")
}
