//! `[limits]`: the one memory budget every way in holds its message bytes against.

use serde::Deserialize;

use crate::env::Problem;

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most bytes of incoming messages held in memory at once, by all ways in together
    /// (HTTP bodies, SMTP DATA, inbox files, IMAP messages) until each is durable. Past it
    /// HTTP answers 503, SMTP `451 4.3.1`, and the inbox and IMAP pickup try again later.
    /// At least the largest message any way in accepts.
    pub ingest_memory: bytesize::ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            ingest_memory: bytesize::ByteSize::mib(256),
        }
    }
}

impl LimitsConfig {
    /// The problem with `[limits]` when `largest`, the largest message a way in accepts
    /// (its key and size), does not fit the budget.
    #[must_use]
    pub fn problems(&self, largest: Option<(&str, bytesize::ByteSize)>) -> Vec<Problem> {
        match largest {
            Some((key, size)) if self.ingest_memory < size => vec![Problem::new(
                "limits.ingest_memory",
                format!("must be at least {key} ({size}), or such a message is never taken"),
            )],
            _ => Vec::new(),
        }
    }

    /// The budget every way in holds its message bytes against.
    #[must_use]
    pub fn budget(&self) -> ketenbus_connectors::budget::Budget {
        ketenbus_connectors::budget::Budget::new(
            usize::try_from(self.ingest_memory.as_u64()).unwrap_or(usize::MAX),
        )
    }
}
