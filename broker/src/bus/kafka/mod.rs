//! The `kafka` engine: the bus on any Kafka-protocol cluster through rdkafka (bundled
//! librdkafka). An idempotent producer with `acks=all` whose `publish` resolves once the
//! cluster acknowledged every record; consumer groups that commit the contiguous finished
//! prefix per partition; topics created through the admin API, never auto-created.
//!
//! Retention is the cluster's: ketenbus cannot stop Kafka from deleting a record a consumer
//! group has not finished, so `retention.ms` of the raw and event topics must be longer than
//! the longest outage a subscriber may have (README, "Engines"). Dead-letter topics are
//! created with `retention.ms = -1` and `retention.bytes = -1` (kept until `ketenbus dlq
//! purge`), and an existing one with time or size retention is reported at start-up. The
//! lineage topic is created compacted (`cleanup.policy=compact`, see
//! [`super::is_compacted_topic`]).

mod classify;
mod config;
mod consumer;
mod holes;
mod producer;

pub use config::{KafkaConfig, RECORD_OVERHEAD};
pub use consumer::KafkaConsumer;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    Bus, BusError, OutRecord, Position, Record, TopicSpec, is_compacted_topic, is_dead_letter_topic,
};
use classify::classify;

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// Sends librdkafka's own log lines to `tracing`.
#[derive(Debug, Clone, Copy, Default)]
struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for LogContext {}

/// librdkafka's log levels on ketenbus's: it logs connection failures as errors and retries
/// them itself, so those are warnings here (the error callback reports them too); property
/// scope notes ("a producer property, ignored by this consumer") are debug, since one
/// `properties` map feeds every client.
fn log_line(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", facility = fac, "{msg}");
        }
        _ if fac == "CONFWARN" => tracing::debug!(target: "librdkafka", facility = fac, "{msg}"),
        RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility = fac, "{msg}");
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{msg}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{msg}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn partition_i32(partition: u32) -> Result<i32, BusError> {
    i32::try_from(partition)
        .map_err(|_| BusError::Fatal(format!("partition {partition} out of range")))
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BusError> + Send + 'static,
) -> Result<T, BusError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BusError::Fatal(format!("kafka worker task failed: {e}")))?
}

/// Partition ids of `topic`, or `UnknownTopic`.
fn topic_partitions(metadata: &Metadata, topic: &str) -> Result<Vec<i32>, BusError> {
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(BusError::UnknownTopic(topic.to_owned()));
    };
    if let Some(err) = t.error() {
        let code = RDKafkaErrorCode::from(err);
        return Err(classify(&KafkaError::MetadataFetch(code), Some(topic)));
    }
    if t.partitions().is_empty() {
        return Err(BusError::UnknownTopic(topic.to_owned()));
    }
    let mut parts: Vec<i32> = t
        .partitions()
        .iter()
        .map(rdkafka::metadata::MetadataPartition::id)
        .collect();
    parts.sort_unstable();
    Ok(parts)
}

/// The `kafka` engine. One idempotent producer and one admin client per bus; one consumer
/// client per `subscribe` call.
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer<LogContext>,
    admin: AdminClient<LogContext>,
    /// Topics known to exist: publishing to others first asks the cluster.
    known_topics: Mutex<HashSet<String>>,
}

impl fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("bootstrap_servers", &self.config.bootstrap_servers)
            .finish_non_exhaustive()
    }
}

/// Topic settings of dead-letter topics: no time or size retention.
const DEAD_LETTER_RETENTION: [(&str, &str); 2] =
    [("retention.ms", "-1"), ("retention.bytes", "-1")];

impl KafkaBus {
    /// Report dead-letter topics (made before ketenbus set their retention, or changed since)
    /// that the cluster would expire: their dead letters are lost when it does; and a lineage
    /// topic that is not compacted.
    async fn check_retention(&self, topics: &[TopicSpec]) {
        let specs: Vec<ResourceSpecifier<'_>> = topics
            .iter()
            .filter(|t| is_dead_letter_topic(&t.name) || is_compacted_topic(&t.name))
            .map(|t| ResourceSpecifier::Topic(&t.name))
            .collect();
        if specs.is_empty() {
            return;
        }
        let opts = AdminOptions::new().request_timeout(Some(self.config.request_timeout));
        let results = match self.admin.describe_configs(&specs, &opts).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the retention of the dead-letter topics");
                return;
            }
        };
        for resource in results.into_iter().flatten() {
            if matches!(&resource.specifier, rdkafka::admin::OwnedResourceSpecifier::Topic(t) if is_compacted_topic(t))
            {
                let policy = resource
                    .get("cleanup.policy")
                    .and_then(|e| e.value.as_deref());
                // Not set is the cluster's default, `delete`.
                if !policy.is_some_and(|p| p.contains("compact")) {
                    tracing::error!(
                        topic = ?resource.specifier,
                        value = policy.unwrap_or("delete"),
                        "the lineage topic is not compacted; set cleanup.policy=compact (kafka-configs --alter) or the lineage expires with the topic"
                    );
                }
                continue;
            }
            for (key, keep) in DEAD_LETTER_RETENTION {
                let value = resource.get(key).and_then(|e| e.value.as_deref());
                if value.is_some_and(|v| v != keep) {
                    tracing::error!(
                        topic = ?resource.specifier,
                        setting = key,
                        value = value.unwrap_or(""),
                        "a dead-letter topic expires its records; set it to -1 (kafka-configs --alter) or dead letters are lost"
                    );
                }
            }
        }
    }

    /// Builds the producer and admin clients. Nothing connects yet: the first request does.
    ///
    /// # Errors
    ///
    /// `BusError::Fatal` listing every problem of the config, or when librdkafka refuses it.
    pub fn new(config: &KafkaConfig) -> Result<Self, BusError> {
        let problems = config.resolved_problems();
        if !problems.is_empty() {
            return Err(BusError::Fatal(format!(
                "invalid kafka config: {}",
                problems.join("; ")
            )));
        }
        let producer = producer::producer(config)?;
        let admin = AdminClient::from_config_and_context(&config.client_config(), LogContext)
            .map_err(|e| BusError::Fatal(format!("kafka admin client: {e}")))?;
        Ok(KafkaBus {
            config: config.clone(),
            producer,
            admin,
            known_topics: Mutex::new(HashSet::new()),
        })
    }

    /// Fails with `UnknownTopic` unless every topic exists; remembers the ones that do.
    async fn check_topics<'a>(
        &self,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), BusError> {
        let unknown: Vec<String> = {
            let known = lock(&self.known_topics);
            let mut seen = HashSet::new();
            topics
                .into_iter()
                .filter(|t| !known.contains(*t) && seen.insert(*t))
                .map(str::to_owned)
                .collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let producer = self.producer.clone();
        let timeout = self.config.request_timeout;
        let found = blocking(move || {
            for topic in &unknown {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(topic), timeout)
                    .map_err(|e| classify(&e, Some(topic)))?;
                topic_partitions(&metadata, topic)?;
            }
            Ok(unknown)
        })
        .await?;
        lock(&self.known_topics).extend(found);
        Ok(())
    }

    /// Waits until the cluster's metadata shows each topic; warns about topics that exist
    /// with fewer partitions than asked for.
    async fn await_topics(&self, topics: Vec<(String, usize)>) -> Result<(), BusError> {
        let producer = self.producer.clone();
        let timeout = self.config.request_timeout;
        blocking(move || {
            let deadline = Instant::now() + timeout;
            for (topic, wanted) in &topics {
                loop {
                    let metadata = producer.client().fetch_metadata(Some(topic), timeout).map_err(|e| classify(&e, Some(topic)))?;
                    match topic_partitions(&metadata, topic) {
                        Ok(parts) => {
                            if parts.len() < *wanted {
                                tracing::warn!(topic = %topic, partitions = parts.len(), wanted, "topic exists with fewer partitions than configured");
                            }
                            break;
                        }
                        Err(BusError::UnknownTopic(_)) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        })
        .await
    }
}

impl Bus for KafkaBus {
    type Consumer = KafkaConsumer;

    fn max_record_bytes(&self) -> Option<u64> {
        Some(self.config.max_record_bytes)
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError> {
        if topics.is_empty() {
            return Ok(());
        }
        let mut new_topics = Vec::with_capacity(topics.len());
        let max_message_bytes = self.config.max_record_bytes.to_string();
        let mut wanted = Vec::with_capacity(topics.len());
        for spec in topics {
            let partitions = if spec.partitions == 0 {
                self.config.default_partitions
            } else {
                spec.partitions
            };
            let partitions = i32::try_from(partitions).map_err(|_| {
                BusError::Fatal(format!("topic {}: too many partitions", spec.name))
            })?;
            let mut topic = NewTopic::new(
                &spec.name,
                partitions,
                TopicReplication::Fixed(i32::from(self.config.replication_factor)),
            );
            let dead_letters = is_dead_letter_topic(&spec.name);
            let compacted = is_compacted_topic(&spec.name);
            if !self.config.topic_config.contains_key("max.message.bytes") {
                topic = topic.set("max.message.bytes", &max_message_bytes);
            }
            for (k, v) in &self.config.topic_config {
                if compacted && k == "cleanup.policy" {
                    continue;
                }
                if dead_letters
                    && DEAD_LETTER_RETENTION
                        .iter()
                        .any(|(key, _)| *key == k.as_str())
                {
                    continue;
                }
                topic = topic.set(k, v);
            }
            if dead_letters {
                for (k, v) in DEAD_LETTER_RETENTION {
                    topic = topic.set(k, v);
                }
            }
            if compacted {
                topic = topic.set("cleanup.policy", "compact");
            }
            new_topics.push(topic);
            wanted.push((spec.name.clone(), usize::try_from(partitions).unwrap_or(0)));
        }
        let opts = AdminOptions::new()
            .request_timeout(Some(self.config.request_timeout))
            .operation_timeout(Some(self.config.request_timeout));
        let results = self
            .admin
            .create_topics(&new_topics, &opts)
            .await
            .map_err(|e| classify(&e, None))?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(topic = %topic, "kafka topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(match classify(&KafkaError::AdminOp(code), Some(&topic)) {
                        BusError::Unavailable(m) => {
                            BusError::Unavailable(format!("creating topic {topic}: {m}"))
                        }
                        BusError::Fatal(_) | BusError::TooLarge(_) => {
                            BusError::Fatal(format!("creating topic {topic}: {code}"))
                        }
                        e @ BusError::UnknownTopic(_) => e,
                    });
                }
            }
        }
        self.await_topics(wanted.clone()).await?;
        self.check_retention(topics).await;
        lock(&self.known_topics).extend(wanted.into_iter().map(|(t, _)| t));
        Ok(())
    }

    async fn remove(&self, topic: &str, positions: &[(u32, i64)]) -> Result<u64, BusError> {
        // DeleteRecords removes a partition's oldest records only: remove the selected
        // records up to the first one that is not selected.
        let selected: HashSet<(u32, i64)> = positions.iter().copied().collect();
        let mut upto: BTreeMap<u32, (i64, u64)> = BTreeMap::new();
        let mut blocked = HashSet::new();
        for r in self.read_all(topic).await? {
            if blocked.contains(&r.partition) {
                continue;
            }
            if selected.contains(&(r.partition, r.offset)) {
                let e = upto.entry(r.partition).or_insert((0, 0));
                *e = (r.offset + 1, e.1 + 1);
            } else {
                blocked.insert(r.partition);
            }
        }
        if upto.is_empty() {
            return Ok(0);
        }
        let mut tpl = TopicPartitionList::new();
        for (p, (offset, _)) in &upto {
            let p = i32::try_from(*p)
                .map_err(|_| BusError::Fatal(format!("partition {p} out of range")))?;
            tpl.add_partition_offset(topic, p, Offset::Offset(*offset))
                .map_err(|e| classify(&e, Some(topic)))?;
        }
        let opts = AdminOptions::new()
            .request_timeout(Some(self.config.request_timeout))
            .operation_timeout(Some(self.config.request_timeout));
        let result = self
            .admin
            .delete_records(&tpl, &opts)
            .await
            .map_err(|e| classify(&e, Some(topic)))?;
        for elem in result.elements() {
            elem.error().map_err(|e| classify(&e, Some(topic)))?;
        }
        Ok(upto.values().map(|(_, n)| n).sum())
    }

    async fn publish(&self, records: Vec<OutRecord>) -> Result<Vec<Position>, BusError> {
        self.produce(records).await
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<KafkaConsumer, BusError> {
        KafkaConsumer::join(self, group, topics).await
    }

    async fn read_alone(
        &self,
        group: &str,
        topic: &str,
        from: &[(u32, i64)],
    ) -> Result<KafkaConsumer, BusError> {
        KafkaConsumer::alone(self, group, topic, from).await
    }

    async fn read_all(&self, topic: &str) -> Result<Vec<Record>, BusError> {
        self.read_topic(topic).await
    }

    async fn read_at(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Option<Record>, BusError> {
        self.read_one(topic, partition, offset).await
    }

    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<(u32, i64, i64)>, BusError> {
        self.group_lag(group, topic).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    /// The broker under test, from `KETENBUS_TEST_KAFKA` (start one with
    /// `ops/kafka/tansu.sh start 19092`). Without it the test is skipped, except in CI.
    pub(super) fn test_bus(name: &str) -> Option<(KafkaBus, String)> {
        // librdkafka's and this engine's warnings show up in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
        let Some(bootstrap) = std::env::var("KETENBUS_TEST_KAFKA")
            .ok()
            .filter(|v| !v.is_empty())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "KETENBUS_TEST_KAFKA is not set but CI is: the Kafka-engine tests must run in CI \
                 (bash ops/kafka/tansu.sh start 19092; KETENBUS_TEST_KAFKA=127.0.0.1:19092)"
            );
            eprintln!(
                "notice: KETENBUS_TEST_KAFKA not set; skipping Kafka-engine test {name} (see ops/kafka/tansu.sh)"
            );
            return None;
        };
        let mut config = KafkaConfig::new(bootstrap);
        config.replication_factor = 1;
        // tansu 0.6 (memory storage) serves a fetch from offset N only from record batches
        // that *start* at N or later, and answers ListOffsets(latest) with the last batch's
        // base offset + 1. A consumer group that committed inside a multi-record batch would
        // skip the rest of it. One record per batch keeps tansu exact; real Kafka needs none
        // of this.
        config
            .properties
            .insert("batch.num.messages".into(), "1".into());
        let bus = KafkaBus::new(&config).expect("kafka bus");
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Some((bus, format!("kt{}x{nanos}.{name}", std::process::id())))
    }

    pub(super) fn rec(topic: &str, key: String, value: Vec<u8>) -> OutRecord {
        OutRecord {
            topic: topic.to_owned(),
            key: key.into_bytes(),
            value,
        }
    }

    /// The lineage topic is created compacted, whatever `topic_config` says of the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lineage_topic_is_compacted() {
        let Some((mut bus, _)) = test_bus("compacted") else {
            return;
        };
        bus.config
            .topic_config
            .insert("cleanup.policy".into(), "delete".into());
        let lineage = ketenbus_schemas::topics::LINEAGE;
        bus.ensure_topics(&[TopicSpec {
            name: lineage.to_owned(),
            partitions: 3,
        }])
        .await
        .unwrap();
        let opts = AdminOptions::new().request_timeout(Some(bus.config.request_timeout));
        let found = bus
            .admin
            .describe_configs(&[ResourceSpecifier::Topic(lineage)], &opts)
            .await
            .unwrap();
        let resource = found.into_iter().next().unwrap().unwrap();
        assert_eq!(
            resource
                .get("cleanup.policy")
                .and_then(|e| e.value.as_deref()),
            Some("compact")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_engine_keeps_the_bus_contract() {
        let Some((bus, prefix)) = test_bus("contract") else {
            return;
        };
        super::super::contract::run_contract(&bus, &prefix).await;
    }
}
