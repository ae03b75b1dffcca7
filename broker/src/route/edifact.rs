//! `[edifact]`: EDIFACT partner settings the router reads.

use std::collections::HashSet;

use serde::Deserialize;

/// `[edifact]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdifactConfig {
    /// Partners (UNB sender party ids, e.g. `mailbox:500001234`) that get a UN CONTRL
    /// acknowledgement of every interchange they send. The CONTRL goes on the raw topic
    /// addressed to them (receiver = their party id) for a raw subscription to send back.
    pub contrl_partners: Vec<String>,
}

impl EdifactConfig {
    /// The partners that get a CONTRL, as the router looks them up.
    #[must_use]
    pub fn contrl_partners(&self) -> HashSet<String> {
        self.contrl_partners.iter().cloned().collect()
    }
}
