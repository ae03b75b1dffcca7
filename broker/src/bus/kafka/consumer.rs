//! Consumer group members and the reads without a group (`read_all`, `read_at`, `lag`):
//! members commit the contiguous finished prefix per partition, also when a rebalance takes
//! partitions away.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::classify::classify;
use super::config::{DEFAULT_FETCH_MAX_BYTES, RECORD_OVERHEAD};
use super::holes::{Holes, Verdict};
use super::{
    KafkaBus, LogContext, blocking, lock, log_line, millis, partition_i32, topic_partitions,
};
use crate::bus::{AckToken, BusError, Consumer, OffsetTracker, Record};

impl KafkaBus {
    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.config.client_config();
        c.set("group.id", group)
            .set("session.timeout.ms", millis(self.config.session_timeout))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .set("enable.partition.eof", "false");
        // Every record ketenbus may write can be fetched, whatever the broker does with
        // batches larger than a fetch.
        let fetch = self.config.max_record_bytes.max(DEFAULT_FETCH_MAX_BYTES);
        c.set(
            "max.partition.fetch.bytes",
            self.config.max_record_bytes.to_string(),
        )
        .set("fetch.max.bytes", fetch.to_string())
        .set(
            "receive.message.max.bytes",
            (fetch + RECORD_OVERHEAD).to_string(),
        );
        c
    }

    /// A consumer client that never subscribes, for reading offsets, watermarks and whole
    /// topics by assignment.
    fn plain_consumer(&self, group: &str) -> Result<BaseConsumer<LogContext>, BusError> {
        BaseConsumer::from_config_and_context(&self.consumer_config(group), LogContext)
            .map_err(|e| BusError::Fatal(format!("kafka consumer: {e}")))
    }

    /// Read a whole topic up to its end as it is now, without a group.
    pub(super) async fn read_topic(&self, topic: &str) -> Result<Vec<Record>, BusError> {
        // librdkafka wants a group id even for assign(); this one never joins, commits or
        // subscribes, so it leaves no trace on the cluster.
        let consumer = self.plain_consumer(&format!("{}.read-all", self.config.client_id))?;
        let topic = topic.to_owned();
        let timeout = self.config.request_timeout;
        blocking(move || {
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| classify(&e, Some(&topic)))?;
            let mut tpl = TopicPartitionList::new();
            // Partition -> high watermark as it is now: read up to there and stop.
            let mut remaining = HashMap::new();
            for p in topic_partitions(&metadata, &topic)? {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| classify(&e, Some(&topic)))?;
                if high > low {
                    tpl.add_partition_offset(&topic, p, Offset::Offset(low))
                        .map_err(|e| classify(&e, Some(&topic)))?;
                    remaining.insert(p, high);
                }
            }
            let mut out = Vec::new();
            if remaining.is_empty() {
                return Ok(out);
            }
            consumer
                .assign(&tpl)
                .map_err(|e| classify(&e, Some(&topic)))?;
            let mut last_progress = Instant::now();
            while !remaining.is_empty() {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        last_progress = Instant::now();
                        let Some(&high) = remaining.get(&m.partition()) else {
                            continue;
                        };
                        if m.offset() < high {
                            out.push(to_record(&m));
                        }
                        if m.offset() + 1 >= high {
                            remaining.remove(&m.partition());
                        }
                    }
                    Some(Err(e)) => return Err(classify(&e, Some(&topic))),
                    None if last_progress.elapsed() > timeout => {
                        return Err(BusError::Unavailable(format!(
                            "reading topic {topic}: no progress within {}",
                            humantime::format_duration(timeout)
                        )));
                    }
                    None => {}
                }
            }
            out.sort_by_key(|r| (r.partition, r.offset));
            Ok(out)
        })
        .await
    }

    /// The record at one position, without a group.
    pub(super) async fn read_one(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<Option<Record>, BusError> {
        self.check_topics([topic]).await?;
        let consumer = self.plain_consumer(&format!("{}.read-at", self.config.client_id))?;
        let topic = topic.to_owned();
        let timeout = self.config.request_timeout;
        blocking(move || {
            let p = i32::try_from(partition)
                .map_err(|_| BusError::Fatal(format!("partition {partition} out of range")))?;
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, timeout)
                .map_err(|e| classify(&e, Some(&topic)))?;
            if offset < low || offset >= high {
                return Ok(None);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, p, Offset::Offset(offset))
                .map_err(|e| classify(&e, Some(&topic)))?;
            consumer
                .assign(&tpl)
                .map_err(|e| classify(&e, Some(&topic)))?;
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(100)) {
                    // A compacted or transactional partition can skip the offset itself.
                    Some(Ok(m)) if m.offset() == offset => return Ok(Some(to_record(&m))),
                    Some(Ok(m)) if m.offset() > offset => return Ok(None),
                    Some(Ok(_)) | None => {}
                    Some(Err(e)) => return Err(classify(&e, Some(&topic))),
                }
            }
            Err(BusError::Unavailable(format!(
                "reading {topic}/{partition}@{offset}: nothing within {}",
                humantime::format_duration(timeout)
            )))
        })
        .await
    }

    /// (partition, committed, end) of `group` on `topic`.
    pub(super) async fn group_lag(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, i64, i64)>, BusError> {
        let consumer = self.plain_consumer(group)?;
        let topic = topic.to_owned();
        let timeout = self.config.request_timeout;
        blocking(move || {
            let parts = partitions_now(consumer.client(), &topic, timeout)?;
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition(&topic, *p);
            }
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| classify(&e, Some(&topic)))?;
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| classify(&e, Some(&topic)))?;
                // A group that never committed starts at the beginning (auto.offset.reset=earliest).
                let at = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                out.push((u32::try_from(p).unwrap_or_default(), at, high));
            }
            Ok(out)
        })
        .await
    }
}

/// Partition ids of `topic` as the cluster's metadata has them now.
fn partitions_now<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, BusError> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| classify(&e, Some(topic)))?;
    topic_partitions(&metadata, topic)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn to_record<M: rdkafka::message::Message>(m: &M) -> Record {
    Record {
        topic: m.topic().to_owned(),
        partition: u32::try_from(m.partition()).unwrap_or_default(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
    }
}

/// What a consumer and its rebalance callback share.
#[derive(Debug, Default)]
struct GroupState {
    tracker: OffsetTracker,
    /// Partitions this member handed out records of since they were assigned.
    partitions: HashSet<(String, u32)>,
    /// Holes in what the fetches returned, read again before they are believed.
    holes: Holes,
    /// Records that arrived while the member was idle, for the next polls; a rebalance drops
    /// those of the partitions it takes away (their next owner reads them).
    waiting: VecDeque<Record>,
}

impl GroupState {
    /// Commit points of every partition handed out from, as an offset list.
    fn all_points(&mut self) -> Result<TopicPartitionList, BusError> {
        let _ = self.tracker.take_dirty();
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &self.partitions {
            if let Some(point) = self.tracker.commit_point(topic, *partition) {
                tpl.add_partition_offset(topic, partition_i32(*partition)?, Offset::Offset(point))
                    .map_err(|e| classify(&e, Some(topic)))?;
            }
        }
        Ok(tpl)
    }

    /// Commit points that moved since the last commit.
    fn dirty_points(&mut self) -> Result<TopicPartitionList, BusError> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, point) in self.tracker.take_dirty() {
            tpl.add_partition_offset(&topic, partition_i32(partition)?, Offset::Offset(point))
                .map_err(|e| classify(&e, Some(&topic)))?;
        }
        Ok(tpl)
    }
}

/// Consumer callbacks: commit what is finished of partitions that are being taken away,
/// then forget them; log commit failures.
struct GroupContext {
    group: String,
    state: Arc<Mutex<GroupState>>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", group = %self.group, error = %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        {
            let mut state = lock(&self.state);
            for e in revoked.elements() {
                let Ok(partition) = u32::try_from(e.partition()) else {
                    continue;
                };
                if let Some(point) = state.tracker.commit_point(e.topic(), partition) {
                    let _ =
                        tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(point));
                }
                state.tracker.forget(e.topic(), partition);
                state.holes.forget(e.topic(), partition);
                state
                    .waiting
                    .retain(|r| !(r.topic == e.topic() && r.partition == partition));
                state.partitions.remove(&(e.topic().to_owned(), partition));
            }
        }
        if tpl.count() > 0 && !consumer.assignment_lost() {
            // Hand the partitions over with their finished prefix committed, so the next
            // owner does not redo finished work.
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(group = %self.group, error = %e, "commit on partition revocation failed; finished records may be delivered again");
            }
        }
        tracing::info!(group = %self.group, partitions = revoked.count(), "kafka partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.group, partitions = tpl.count(), "kafka partitions assigned")
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "kafka rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(group = %self.group, error = %e, "kafka offset commit failed; finished records may be delivered again");
        }
    }
}

/// A consumer group member on Kafka. Dropping it leaves the group: the partitions it loses
/// get their finished prefix committed first. The drop blocks its thread while librdkafka
/// closes the consumer (about 100 ms against tansu on loopback).
pub struct KafkaConsumer {
    group: String,
    consumer: Arc<StreamConsumer<GroupContext>>,
    state: Arc<Mutex<GroupState>>,
    acks_since_commit: u32,
    last_commit: Instant,
    commit_every: u32,
    commit_interval: Duration,
    request_timeout: Duration,
    /// Since when [`Consumer::idle`] has been called without a poll in between.
    idle_since: Option<Instant>,
    /// Whether this member paused its assigned partitions while idle.
    paused: bool,
}

/// How long a member stays idle before it pauses its partitions: a short wait for room
/// keeps the fetched records, a long one serves the group without taking records.
const PAUSE_AFTER: Duration = Duration::from_millis(500);

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group", &self.group)
            .field("acks_since_commit", &self.acks_since_commit)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Join `group` on `topics` of `bus`.
    pub(super) async fn join(
        bus: &KafkaBus,
        group: &str,
        topics: &[String],
    ) -> Result<KafkaConsumer, BusError> {
        bus.check_topics(topics.iter().map(String::as_str)).await?;
        let state = Arc::new(Mutex::new(GroupState::default()));
        let context = GroupContext {
            group: group.to_owned(),
            state: Arc::clone(&state),
        };
        let mut config = bus.consumer_config(group);
        if let Some(id) = &bus.config.instance_id {
            // Static membership: one member per node and group.
            config.set("group.instance.id", id);
        }
        let consumer: StreamConsumer<GroupContext> =
            StreamConsumer::from_config_and_context(&config, context)
                .map_err(|e| BusError::Fatal(format!("kafka consumer: {e}")))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| classify(&e, topics.first().map(String::as_str)))?;
        tracing::info!(group, topics = ?topics, "kafka consumer subscribed");
        Ok(KafkaConsumer::new(bus, group, Arc::new(consumer), state))
    }

    fn new(
        bus: &KafkaBus,
        group: &str,
        consumer: Arc<StreamConsumer<GroupContext>>,
        state: Arc<Mutex<GroupState>>,
    ) -> KafkaConsumer {
        KafkaConsumer {
            group: group.to_owned(),
            consumer,
            state,
            acks_since_commit: 0,
            last_commit: Instant::now(),
            commit_every: bus.config.commit_every,
            commit_interval: bus.config.commit_interval,
            request_timeout: bus.config.request_timeout,
            idle_since: None,
            paused: false,
        }
    }

    /// Read every partition of `topic` alone (assigned, never joining `group`), from `from`
    /// (partition, next offset; the beginning for a partition not named). Commits go to
    /// `group` as a simple consumer's: nothing else joins that group.
    pub(super) async fn alone(
        bus: &KafkaBus,
        group: &str,
        topic: &str,
        from: &[(u32, i64)],
    ) -> Result<KafkaConsumer, BusError> {
        bus.check_topics([topic]).await?;
        let mut start = GroupState::default();
        for (partition, next) in from {
            start.holes.expect(topic, *partition, *next);
        }
        let state = Arc::new(Mutex::new(start));
        let context = GroupContext {
            group: group.to_owned(),
            state: Arc::clone(&state),
        };
        let consumer: StreamConsumer<GroupContext> =
            StreamConsumer::from_config_and_context(&bus.consumer_config(group), context)
                .map_err(|e| BusError::Fatal(format!("kafka consumer: {e}")))?;
        let consumer = Arc::new(consumer);
        let (c, name, timeout) = (
            Arc::clone(&consumer),
            topic.to_owned(),
            bus.config.request_timeout,
        );
        let from: HashMap<u32, i64> = from.iter().copied().collect();
        let count = blocking(move || {
            let parts = partitions_now(c.client(), &name, timeout)?;
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                let offset = u32::try_from(*p)
                    .ok()
                    .and_then(|p| from.get(&p))
                    .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                tpl.add_partition_offset(&name, *p, offset)
                    .map_err(|e| classify(&e, Some(&name)))?;
            }
            c.assign(&tpl).map_err(|e| classify(&e, Some(&name)))?;
            Ok(parts.len())
        })
        .await?;
        tracing::info!(
            group,
            topic,
            partitions = count,
            "kafka reader assigned every partition"
        );
        Ok(KafkaConsumer::new(bus, group, consumer, state))
    }

    /// Starts an asynchronous commit of the commit points that moved. Failures are logged by
    /// the commit callback; the next commit carries the points again only if they move again,
    /// so [`Consumer::commit`] commits every point synchronously.
    fn commit_moved(&mut self) -> Result<(), BusError> {
        self.acks_since_commit = 0;
        self.last_commit = Instant::now();
        let tpl = lock(&self.state).dirty_points()?;
        if tpl.count() == 0 {
            return Ok(());
        }
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| classify(&e, None))
    }

    /// The next record from the consumer queue (serving rebalances on the way), or `None`
    /// when what came was not a record for the caller: a recovered error, or a record past
    /// a hole that is being read again.
    async fn receive(&mut self) -> Result<Option<Record>, BusError> {
        let m = match self.consumer.recv().await {
            Ok(m) => m,
            // librdkafka reports broker trouble on the consumer queue and recovers by itself
            // (reconnect, coordinator lookup, metadata refresh): log it and keep waiting.
            // Only what a retry cannot fix reaches the caller.
            Err(e) => {
                return match classify(&e, None) {
                    fatal @ BusError::Fatal(_) => Err(fatal),
                    other => {
                        tracing::warn!(group = %self.group, error = %other, "kafka consumer error, recovering");
                        Ok(None)
                    }
                };
            }
        };
        let record = to_record(&m);
        drop(m);
        let verdict = lock(&self.state).holes.check(
            &record.topic,
            record.partition,
            record.offset,
            record.timestamp_ms,
            now_ms(),
            Instant::now(),
        );
        if let Verdict::ReadFrom(offset) = verdict {
            tracing::debug!(group = %self.group, topic = %record.topic, partition = record.partition, from = offset, to = record.offset - 1, "kafka fetch skipped offsets; reading them again");
            // Asynchronous (no timeout): librdkafka drops what it fetched before.
            let sought = self.consumer.seek(
                &record.topic,
                partition_i32(record.partition)?,
                Offset::Offset(offset),
                Duration::ZERO,
            );
            match sought {
                Ok(()) => return Ok(None),
                // Not worse than before: the record is handed out.
                Err(e) => {
                    tracing::warn!(group = %self.group, topic = %record.topic, partition = record.partition, error = %e, "kafka offsets skipped by a fetch cannot be read again");
                }
            }
        }
        Ok(Some(record))
    }

    /// Track `record` as started and give it to the caller.
    fn hand_out(&self, record: Record) -> Record {
        let mut state = lock(&self.state);
        state
            .tracker
            .started(&record.topic, record.partition, record.offset);
        state
            .partitions
            .insert((record.topic.clone(), record.partition));
        record
    }

    /// Pause every partition assigned now: fetches stop, what was fetched is dropped and
    /// fetched again after [`KafkaConsumer::resume`].
    fn pause(&mut self) -> Result<(), BusError> {
        let assigned = self.consumer.assignment().map_err(|e| classify(&e, None))?;
        self.consumer
            .pause(&assigned)
            .map_err(|e| classify(&e, None))?;
        if !self.paused {
            tracing::debug!(group = %self.group, partitions = assigned.count(), "kafka member idle: partitions paused");
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BusError> {
        let assigned = self.consumer.assignment().map_err(|e| classify(&e, None))?;
        self.consumer
            .resume(&assigned)
            .map_err(|e| classify(&e, None))?;
        tracing::debug!(group = %self.group, partitions = assigned.count(), "kafka member has room again: partitions resumed");
        self.paused = false;
        Ok(())
    }

    fn commit_due(&self) -> bool {
        self.acks_since_commit > 0
            && (self.acks_since_commit >= self.commit_every
                || self.last_commit.elapsed() >= self.commit_interval)
    }
}

impl Consumer for KafkaConsumer {
    async fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, BusError> {
        self.idle_since = None;
        if self.paused {
            self.resume()?;
        }
        let waiting = lock(&self.state).waiting.pop_front();
        if let Some(record) = waiting {
            return Ok(Some(self.hand_out(record)));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.commit_due() {
                self.commit_moved()?;
            }
            // While acknowledgements wait for their batched commit, wake up in time for it.
            let wake = if self.acks_since_commit > 0 {
                deadline.min(tokio::time::Instant::now() + self.commit_interval)
            } else {
                deadline
            };
            match tokio::time::timeout_at(wake, self.receive()).await {
                Ok(Ok(Some(record))) => return Ok(Some(self.hand_out(record))),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) if tokio::time::Instant::now() >= deadline => return Ok(None),
                Err(_) => {}
            }
        }
    }

    async fn idle(&mut self, timeout: Duration) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        if self.commit_due() {
            self.commit_moved()?;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        if !self.paused {
            let pause_at = tokio::time::Instant::from_std(since + PAUSE_AFTER);
            if pause_at > tokio::time::Instant::now() {
                tokio::time::sleep_until(pause_at.min(deadline)).await;
                return Ok(());
            }
            self.pause()?;
        }
        // Paused partitions hand out nothing; receiving serves the group's rebalances. A
        // partition assigned meanwhile is not paused yet: what it hands out waits.
        if let Ok(received) = tokio::time::timeout_at(deadline, self.receive()).await
            && let Some(record) = received?
        {
            lock(&self.state).waiting.push_back(record);
            self.pause()?;
        }
        Ok(())
    }

    async fn ack(&mut self, token: AckToken) -> Result<(), BusError> {
        lock(&self.state)
            .tracker
            .finished(&token.topic, token.partition, token.offset);
        self.acks_since_commit = self.acks_since_commit.saturating_add(1);
        if self.commit_due() {
            self.commit_moved()?;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), BusError> {
        self.acks_since_commit = 0;
        self.last_commit = Instant::now();
        let tpl = lock(&self.state).all_points()?;
        if tpl.count() == 0 {
            return Ok(());
        }
        let consumer = Arc::clone(&self.consumer);
        let commit = blocking(move || {
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| classify(&e, None))
        });
        match tokio::time::timeout(self.request_timeout, commit).await {
            Ok(result) => result,
            Err(_) => Err(BusError::Unavailable(format!(
                "offset commit: no answer within {}",
                humantime::format_duration(self.request_timeout)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::KafkaBus;
    use super::super::tests::{rec, test_bus};
    use crate::bus::{Bus, Consumer, OutRecord, Position, TopicSpec};

    /// Topic `<prefix>.t` of 4 partitions holding 40 small records, and where they went.
    async fn forty_on_four_partitions(bus: &KafkaBus, prefix: &str) -> (String, Vec<Position>) {
        let topic = format!("{prefix}.t");
        bus.ensure_topics(&[TopicSpec {
            name: topic.clone(),
            partitions: 4,
        }])
        .await
        .unwrap();
        let records: Vec<OutRecord> = (0..40)
            .map(|i| rec(&topic, format!("k{i}"), vec![b'x'; 10]))
            .collect();
        let positions = bus.publish(records).await.unwrap();
        (topic, positions)
    }

    /// A member that loses partitions in a rebalance commits what it finished first, so the
    /// member that takes them over does not deliver finished records again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revoked_partitions_hand_over_their_finished_prefix() {
        let Some((mut bus, prefix)) = test_bus("rebalance") else {
            return;
        };
        // Only a rebalance commits in this test: no batched commits.
        bus.config.commit_every = u32::MAX;
        bus.config.commit_interval = Duration::from_secs(3600);
        let (topic, _) = forty_on_four_partitions(&bus, &prefix).await;

        let group = format!("{prefix}.g");
        let mut a = bus
            .subscribe(&group, std::slice::from_ref(&topic))
            .await
            .unwrap();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < 40 && Instant::now() < deadline {
            if let Some(r) = a.poll(Duration::from_millis(200)).await.unwrap() {
                a.ack(r.ack_token()).await.unwrap();
                got += 1;
            }
        }
        assert_eq!(got, 40);
        assert!(
            bus.lag(&group, &topic)
                .await
                .unwrap()
                .iter()
                .all(|(_, committed, _)| *committed == 0),
            "nothing committed yet"
        );

        let mut b = bus
            .subscribe(&group, std::slice::from_ref(&topic))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut redelivered = 0;
        let mut handed_over = false;
        while Instant::now() < deadline {
            for c in [&mut a, &mut b] {
                if c.poll(Duration::from_millis(100)).await.unwrap().is_some() {
                    redelivered += 1;
                }
            }
            let lag = bus.lag(&group, &topic).await.unwrap();
            if lag.iter().all(|(_, committed, end)| committed == end) {
                handed_over = true;
                break;
            }
        }
        assert!(
            handed_over,
            "the revoked member committed its finished prefix"
        );
        for _ in 0..10 {
            for c in [&mut a, &mut b] {
                if c.poll(Duration::from_millis(100)).await.unwrap().is_some() {
                    redelivered += 1;
                }
            }
        }
        assert_eq!(redelivered, 0, "finished records were delivered again");
    }

    /// A member with no room for more records (its subscription's lanes are full, or an
    /// operator paused it) idles instead of polling: it still answers the rebalance a new
    /// member starts, so the newcomer gets partitions at once rather than after the old
    /// member's poll interval; and what the idle member received meanwhile is neither lost
    /// nor handed out twice by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_without_room_still_hands_partitions_over() {
        let Some((bus, prefix)) = test_bus("idle") else {
            return;
        };
        let (topic, positions) = forty_on_four_partitions(&bus, &prefix).await;
        let group = format!("{prefix}.g");
        let mut a = bus
            .subscribe(&group, std::slice::from_ref(&topic))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while seen.is_empty() && Instant::now() < deadline {
            if let Some(r) = a.poll(Duration::from_millis(200)).await.unwrap() {
                a.ack(r.ack_token()).await.unwrap();
                seen.push((r.partition, r.offset));
            }
        }
        assert_eq!(seen.len(), 1, "member a got its first record");

        // a has no room from now on, and only idles.
        let stop = tokio_util::sync::CancellationToken::new();
        let idling = {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    a.idle(Duration::from_millis(200)).await.unwrap();
                }
                a
            })
        };
        let joined = Instant::now();
        let mut b = bus
            .subscribe(&group, std::slice::from_ref(&topic))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(r) = b.poll(Duration::from_millis(200)).await.unwrap() {
                b.ack(r.ack_token()).await.unwrap();
                seen.push((r.partition, r.offset));
                break;
            }
        }
        let waited = joined.elapsed();
        assert_eq!(
            seen.len(),
            2,
            "member b got no partition in {waited:?} while member a idled"
        );
        stop.cancel();
        let mut a = idling.await.unwrap();

        // Both read on: every record is handed out, none twice by the member that idled.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut from_a = std::collections::HashSet::new();
        while seen.len() < 40 * 2 && Instant::now() < deadline {
            let mut got = false;
            if let Some(r) = a.poll(Duration::from_millis(100)).await.unwrap() {
                assert!(
                    from_a.insert((r.partition, r.offset)),
                    "a handed out {r:?} twice"
                );
                a.ack(r.ack_token()).await.unwrap();
                seen.push((r.partition, r.offset));
                got = true;
            }
            if let Some(r) = b.poll(Duration::from_millis(100)).await.unwrap() {
                b.ack(r.ack_token()).await.unwrap();
                seen.push((r.partition, r.offset));
                got = true;
            }
            let all: std::collections::HashSet<_> = seen.iter().copied().collect();
            if !got
                && positions
                    .iter()
                    .all(|p| all.contains(&(p.partition, p.offset)))
            {
                break;
            }
        }
        let all: std::collections::HashSet<_> = seen.iter().copied().collect();
        let missing: Vec<_> = positions
            .iter()
            .filter(|p| !all.contains(&(p.partition, p.offset)))
            .collect();
        assert!(missing.is_empty(), "never handed out: {missing:?}");
    }

    /// Acknowledged records are committed by the batching alone, within the commit interval,
    /// while the consumer keeps polling.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_are_committed_within_the_commit_interval() {
        let Some((mut bus, prefix)) = test_bus("batched") else {
            return;
        };
        bus.config.commit_interval = Duration::from_millis(200);
        let topic = format!("{prefix}.t");
        bus.ensure_topics(&[TopicSpec {
            name: topic.clone(),
            partitions: 2,
        }])
        .await
        .unwrap();
        bus.publish(
            (0..10)
                .map(|i| rec(&topic, format!("k{i}"), b"v".to_vec()))
                .collect(),
        )
        .await
        .unwrap();
        let group = format!("{prefix}.g");
        let mut c = bus
            .subscribe(&group, std::slice::from_ref(&topic))
            .await
            .unwrap();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < 10 && Instant::now() < deadline {
            if let Some(r) = c.poll(Duration::from_millis(200)).await.unwrap() {
                c.ack(r.ack_token()).await.unwrap();
                got += 1;
            }
        }
        assert_eq!(got, 10);
        // One idle poll longer than the interval carries the last acknowledgements out.
        assert!(c.poll(Duration::from_millis(600)).await.unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lag = bus.lag(&group, &topic).await.unwrap();
        assert!(
            lag.iter().all(|(_, committed, end)| committed == end),
            "{lag:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_all_and_lag_see_every_partition() {
        let Some((mut bus, prefix)) = test_bus("readall") else {
            return;
        };
        let topic = format!("{prefix}.t");
        bus.config
            .topic_config
            .insert("retention.ms".into(), "604800000".into());
        bus.ensure_topics(&[TopicSpec {
            name: topic.clone(),
            partitions: 3,
        }])
        .await
        .unwrap();
        assert!(bus.read_all(&topic).await.unwrap().is_empty());
        let positions = bus
            .publish(
                (0..25)
                    .map(|i| rec(&topic, format!("k{i}"), format!("v{i}").into_bytes()))
                    .collect(),
            )
            .await
            .unwrap();
        let all = bus.read_all(&topic).await.unwrap();
        assert_eq!(all.len(), 25);
        let mut want: Vec<(u32, i64)> = positions.iter().map(|p| (p.partition, p.offset)).collect();
        want.sort_unstable();
        assert_eq!(
            all.iter()
                .map(|r| (r.partition, r.offset))
                .collect::<Vec<_>>(),
            want
        );
        assert!(all.iter().all(|r| r.timestamp_ms > 0));

        let lag = bus.lag(&format!("{prefix}.never"), &topic).await.unwrap();
        assert_eq!(
            lag.iter().map(|(p, _, _)| *p).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(
            lag.iter()
                .map(|(_, committed, end)| end - committed)
                .sum::<i64>(),
            25,
            "a new group lags by everything"
        );
    }
}
