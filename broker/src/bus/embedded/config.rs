//! Settings of the embedded engine (`[bus.embedded]`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Settings of the embedded engine (`[bus.embedded]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Database file, relative to the data directory.
    pub file: PathBuf,
    /// `full` fsyncs every commit (durable against power loss); `normal` only against a process crash.
    pub synchronous: Synchronous,
    /// Most write requests committed together in one transaction.
    pub max_batch: usize,
    /// Records older than this are deleted once every consumer group that reads their topic
    /// (router, subscriptions) has finished them; dead letters are never deleted by age.
    #[serde(with = "humantime_serde")]
    pub retention_max_age: Duration,
    /// Most bytes (keys plus values as stored, see `packing`) kept per topic; the oldest
    /// finished records go first.
    /// Unfinished records and dead letters are kept past it.
    pub retention_max_bytes: bytesize::ByteSize,
    /// How far past `retention_max_bytes` a topic may grow with records not every reader has
    /// finished (a subscriber down) before new messages are refused (HTTP 503, SMTP 451)
    /// until the readers catch up. Checked on every retention pass.
    pub retention_refuse_margin: bytesize::ByteSize,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// A message body larger than this is kept in its own file in `data_dir/bodies`
    /// (written and fsynced before the message is acknowledged) and its record on the log
    /// refers to it, so large messages do not pass through the log's pages and caches. The
    /// file goes when retention removes the last record that names it.
    pub large_body: bytesize::ByteSize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            file: PathBuf::from("log.db"),
            synchronous: Synchronous::Full,
            max_batch: 512,
            retention_max_age: Duration::from_secs(7 * 24 * 3600),
            retention_max_bytes: bytesize::ByteSize::gib(10),
            retention_refuse_margin: bytesize::ByteSize::gib(1),
            retention_interval: Duration::from_secs(60),
            large_body: bytesize::ByteSize::kib(256),
        }
    }
}

/// SQLite `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit.
    Full,
    /// fsync at checkpoints only.
    Normal,
}

impl Synchronous {
    /// The value of SQLite's `synchronous` pragma.
    pub(super) fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}
