//! Topic and consumer-group names. They are part of the public contract (README "Topics") and fixed by tests.

use crate::event::EventKind;

/// Raw envelopes exactly as received; key = envelope id.
pub const RAW: &str = "ketenbus.raw";
/// Delivery outcomes of every subscription; key = envelope id.
pub const DELIVERY_OUTCOMES: &str = "ketenbus.delivery-outcomes";
/// Every lineage write of every node ([`crate::lineage::LineageRecord`]), compacted;
/// key = `<message id>/<step id>`. Each node reads all of it into its lineage index.
pub const LINEAGE: &str = "ketenbus.lineage";
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

/// Records one subscription parked for a later attempt, read by that subscription only:
/// `ketenbus.retry.<subscription>`; key = the original record key.
#[must_use]
pub fn retry(subscription: &str) -> String {
    format!("ketenbus.retry.{subscription}")
}

/// The consumer group under which one node's lineage index commits how far it read
/// [`LINEAGE`]: `ketenbus.lineage.<node>`. Each node reads every partition alone (no other
/// member shares them); the group only tells retention and `lag` how far it is.
#[must_use]
pub fn lineage_group(node: &str) -> String {
    format!("ketenbus.lineage.{node}")
}

/// Consumer group of the router, which reads [`RAW`].
pub const ROUTER_GROUP: &str = "ketenbus.router";

/// Consumer group of one subscription on the topics it reads: `ketenbus.sub.<subscription>`.
#[must_use]
pub fn subscription_group(subscription: &str) -> String {
    format!("ketenbus.sub.{subscription}")
}

/// Consumer group that reads one subscription's [`retry`] topic:
/// `ketenbus.sub.<subscription>.retry`.
#[must_use]
pub fn retry_group(subscription: &str) -> String {
    format!("ketenbus.sub.{subscription}.retry")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Topic names are a contract with every consumer outside ketenbus (README "Topics").
    #[test]
    fn topic_names_are_fixed() {
        assert_eq!(RAW, "ketenbus.raw");
        assert_eq!(DELIVERY_OUTCOMES, "ketenbus.delivery-outcomes");
        assert_eq!(ROUTER_DEAD_LETTERS, "ketenbus.dlq.router");
        assert_eq!(LINEAGE, "ketenbus.lineage");
        assert_eq!(lineage_group("n1"), "ketenbus.lineage.n1");
        let kinds: Vec<String> = EventKind::ALL.iter().map(|k| events(*k)).collect();
        assert_eq!(
            kinds,
            [
                "ketenbus.events.lab_result",
                "ketenbus.events.letter",
                "ketenbus.events.acute_handover",
                "ketenbus.events.handover_notification"
            ]
        );
        assert_eq!(dead_letters("gp"), "ketenbus.dlq.gp");
        assert_eq!(replay("gp"), "ketenbus.replay.gp");
        assert_eq!(retry("gp"), "ketenbus.retry.gp");
    }
}
