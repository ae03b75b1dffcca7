//! The `Bus` contract: topics of keyed records, published durably and read by consumer
//! groups that commit the contiguous prefix of finished records per partition.
//! Two engines: [`embedded`] (SQLite in the data directory) and [`kafka`] (rdkafka), chosen
//! in one place ([`open`], from the `[bus]` section): nothing outside `bus` names either.

pub mod background;
pub mod bodies;
mod config;
#[cfg(test)]
mod contract;
pub mod embedded;
pub mod kafka;
mod offsets;
mod retry;

pub use config::{BusConfig, Engine, WithBus, open};
pub use retry::{publish_retrying, while_unavailable};

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

pub use offsets::OffsetTracker;

/// A topic to create at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
}

/// A record to publish.
#[derive(Clone)]
pub struct OutRecord {
    /// Target topic.
    pub topic: String,
    /// Key: records with one key land in one partition, in order.
    pub key: Vec<u8>,
    /// Value (Avro single-object encoded).
    pub value: Vec<u8>,
}

impl std::fmt::Debug for OutRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutRecord")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// A record read from a topic. Finish it with [`Consumer::ack`] on its token.
#[derive(Clone)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: i64,
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// When it was appended, ms since the epoch.
    pub timestamp_ms: i64,
}

impl Record {
    /// The token that acknowledges this record.
    pub fn ack_token(&self) -> AckToken {
        AckToken {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Record({}/{}@{}, {} bytes)",
            self.topic,
            self.partition,
            self.offset,
            self.value.len()
        )
    }
}

/// Identifies one read record for acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[must_use = "a record that is never acknowledged is delivered again after a restart"]
pub struct AckToken {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
}

/// Where a published record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
}

/// The consumer groups that must finish each topic before retention may remove a record
/// from it, by topic: the router's group for the raw topic, each subscription's group for
/// the topics it reads. Known from the configuration, so a group that never started (or
/// never committed) holds its topics from offset 0.
pub type Readers = HashMap<String, Vec<String>>;

/// Stable partitioner: FNV-1a of the key, modulo the partition count. The embedded engine's
/// partitions and a subscription's lanes both follow it, so one key keeps one order.
#[must_use]
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u32::try_from(h % u64::from(partitions.max(1))).unwrap_or(0)
}

/// Dead-letter topics (`ketenbus.dlq.*`): never removed by retention, only by an operator
/// (`ketenbus dlq purge`).
#[must_use]
pub fn is_dead_letter_topic(topic: &str) -> bool {
    topic.starts_with("ketenbus.dlq.")
}

/// A log of its own in `dir` (the database `file`), for the tests of the stages above the
/// bus, which never name an engine.
///
/// # Panics
/// When the log cannot be opened.
#[cfg(test)]
pub(crate) fn test_log(dir: &std::path::Path, file: &str) -> impl Bus {
    embedded::EmbeddedBus::open(
        dir,
        &embedded::EmbeddedConfig {
            file: file.into(),
            synchronous: embedded::Synchronous::Normal,
            ..embedded::EmbeddedConfig::default()
        },
    )
    .expect("a test log")
}

/// Compacted topics (`ketenbus.lineage`): on Kafka created with `cleanup.policy=compact`, so
/// the cluster keeps the latest record of every key for good rather than expiring by time or
/// size.
#[must_use]
pub fn is_compacted_topic(topic: &str) -> bool {
    topic == ketenbus_schemas::topics::LINEAGE
}

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Records deleted.
    pub deleted: u64,
    /// Topics still past the size limit because their oldest records are not finished by
    /// every reader: (topic, bytes past the limit).
    pub held: Vec<(String, u64)>,
    /// Why new messages are refused after this pass (a topic past the size limit by more
    /// than the margin), or `None`.
    pub refusing: Option<String>,
}

impl RetentionReport {
    /// Bytes past the size limit of the fullest held topic (0 when every topic is within).
    #[must_use]
    pub fn excess_bytes(&self) -> u64 {
        self.held.iter().map(|(_, b)| *b).max().unwrap_or(0)
    }
}

/// Bus errors, classified.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The log cannot take writes right now (full, busy, broker down): try again later.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The topic does not exist.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// The engine failed in a way a retry will not fix.
    #[error("log failure: {0}")]
    Fatal(String),
    /// This record is larger than the log takes; other records are not affected.
    #[error("record too large for the log: {0}")]
    TooLarge(String),
}

impl BusError {
    /// How to handle it.
    #[must_use]
    pub fn kind(&self) -> ketenbus_connectors::ErrorKind {
        match self {
            BusError::Unavailable(_) => ketenbus_connectors::ErrorKind::Retryable,
            BusError::UnknownTopic(_) | BusError::Fatal(_) => ketenbus_connectors::ErrorKind::Fatal,
            BusError::TooLarge(_) => ketenbus_connectors::ErrorKind::Rejected,
        }
    }
}

/// A log engine.
pub trait Bus: Send + Sync + 'static {
    /// The consumer type of this engine.
    type Consumer: Consumer;

    /// Create topics that do not exist yet (never relies on auto-creation).
    fn ensure_topics(
        &self,
        topics: &[TopicSpec],
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Append records; resolves only when all are durable, with their positions in order.
    fn publish(
        &self,
        records: Vec<OutRecord>,
    ) -> impl Future<Output = Result<Vec<Position>, BusError>> + Send;

    /// Join consumer group `group` on `topics`, starting after the group's committed offsets
    /// (or at the beginning for a new group).
    fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> impl Future<Output = Result<Self::Consumer, BusError>> + Send;

    /// Read every partition of `topic` as one reader alone: no other member of any group
    /// shares its partitions (no rebalance takes one away), so each node that calls this sees
    /// every record, also those other nodes publish. Starts at `from` (partition, next
    /// offset); a partition not named starts at its beginning. The caller keeps its own
    /// position (the lineage index keeps it next to what it applied): `group`'s committed
    /// offsets do not decide where it starts. Acknowledged records are committed under
    /// `group` as a subscription's are, so retention (see [`Readers`]) and [`Bus::lag`] see
    /// how far the reader is. Partitions added to the topic later are not read.
    fn read_alone(
        &self,
        group: &str,
        topic: &str,
        from: &[(u32, i64)],
    ) -> impl Future<Output = Result<Self::Consumer, BusError>> + Send;

    /// Read a whole topic from the beginning without a consumer group (dlq list, tests),
    /// up to the end as it is when called.
    fn read_all(&self, topic: &str) -> impl Future<Output = Result<Vec<Record>, BusError>> + Send;

    /// The record at one position, without a consumer group; `None` when it is not (or no
    /// longer, after retention) in the log.
    fn read_at(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> impl Future<Output = Result<Option<Record>, BusError>> + Send;

    /// Committed offset and end offset per partition for a group: (partition, committed, end).
    fn lag(
        &self,
        group: &str,
        topic: &str,
    ) -> impl Future<Output = Result<Vec<(u32, i64, i64)>, BusError>> + Send;

    /// Remove the records at `positions` (partition, offset) of `topic`: `ketenbus dlq purge`.
    /// Returns how many were removed; an engine that can remove only from the start of a
    /// partition (Kafka) removes the selected records up to the first one not selected.
    fn remove(
        &self,
        topic: &str,
        positions: &[(u32, i64)],
    ) -> impl Future<Output = Result<u64, BusError>> + Send {
        let _ = positions;
        std::future::ready(Err(BusError::Fatal(format!(
            "topic {topic}: this engine cannot remove records"
        ))))
    }

    /// Run the engine's own retention once, never removing a record that a group in
    /// `readers` has not finished, nor a dead letter. Engines whose cluster keeps its own
    /// retention (Kafka) do nothing here.
    fn enforce_retention(
        &self,
        readers: &Readers,
    ) -> impl Future<Output = Result<RetentionReport, BusError>> + Send {
        let _ = readers;
        std::future::ready(Ok(RetentionReport::default()))
    }

    /// Why the log takes no new messages from senders now (a topic held past its size limit
    /// by more than the margin, see [`RetentionReport::refusing`]), or `None`. Ingest answers
    /// "try again" (HTTP 503, SMTP 451) while it says so; the router and subscriptions go on.
    fn refuses_ingest(&self) -> Option<String> {
        None
    }

    /// Bytes the log takes on this machine's disk, for an engine that keeps it here.
    fn disk_bytes(&self) -> Option<u64> {
        None
    }

    /// Where large bodies of raw envelopes are kept beside the log (the claim check, see
    /// [`bodies`]), for an engine whose every reader is on this machine.
    fn bodies(&self) -> Option<&bodies::BodyStore> {
        None
    }

    /// The largest record (key and value) the engine takes, when it has a limit: a record
    /// past it is refused with [`BusError::TooLarge`].
    fn max_record_bytes(&self) -> Option<u64> {
        None
    }
}

/// A consumer group member.
pub trait Consumer: Send + 'static {
    /// The next record, waiting up to `timeout`; `None` when nothing came. Cancel-safe: a
    /// poll dropped before it resolves loses no record (dispatch polls inside `select!`).
    fn poll(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<Record>, BusError>> + Send;

    /// Mark a record finished. Offsets are committed as the contiguous finished prefix per
    /// partition (the engine may batch the commit).
    fn ack(&mut self, token: AckToken) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Commit whatever finished prefix is pending now.
    fn commit(&mut self) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Stay a live member for up to `timeout` without taking a record: what a reader with no
    /// room for more (or paused by an operator) calls instead of [`Consumer::poll`], so that
    /// an engine with group membership keeps answering rebalances and hands partitions over
    /// when another member joins or leaves. A record that arrives meanwhile is kept for the
    /// next poll; nothing is lost and nothing skipped. Cancel-safe, like `poll`.
    fn idle(&mut self, timeout: Duration) -> impl Future<Output = Result<(), BusError>> + Send {
        async move {
            tokio::time::sleep(timeout).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::partition_for;

    #[test]
    fn partitioner_is_stable() {
        assert_eq!(partition_for(b"abc", 8), partition_for(b"abc", 8));
        assert_eq!(partition_for(b"", 1), 0);
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            partition_for(b"a", 1000),
            u32::try_from(0xaf63_dc4c_8601_ec8c_u64 % 1000).unwrap()
        );
    }
}
