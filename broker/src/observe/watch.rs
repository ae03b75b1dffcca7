//! The watcher: what each subscription is working on (records in flight, parked records),
//! and a task that samples consumer lag, the age of the oldest undelivered record and the
//! log's size on disk into the metrics.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ketenbus_schemas::topics;
use tokio_util::sync::CancellationToken;

use crate::bus::{AckToken, Bus, Record};
use crate::observe::metrics::{self, Configured};
use ketenbus_schemas::now_ms;

/// How often the watcher samples lag, oldest-undelivered age and disk usage.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// What a subscription's dispatcher tells the watcher about one source topic.
#[derive(Default)]
struct Slot {
    /// Append time of the oldest record polled and not finished (ms since the epoch, 0 = none).
    oldest: AtomicI64,
    /// Per partition, the offset after the highest record polled.
    read: Mutex<HashMap<u32, i64>>,
    /// First failure of the oldest record of this topic parked on the retry topic (ms since
    /// the epoch, 0 = none): undelivered, though its source offset is committed.
    parked: AtomicI64,
}

impl Slot {
    fn read(&self) -> std::sync::MutexGuard<'_, HashMap<u32, i64>> {
        self.read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Slots by (subscription, topic).
type Slots = HashMap<(String, String), Arc<Slot>>;
static SLOTS: LazyLock<Mutex<Slots>> = LazyLock::new(Mutex::default);

fn slot_of(subscription: &str, topic: &str) -> Arc<Slot> {
    let mut map = SLOTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Arc::clone(
        map.entry((subscription.to_owned(), topic.to_owned()))
            .or_default(),
    )
}

/// The oldest record from `topic` that `subscription` holds parked failed first at
/// `since_ms` (0: none); it counts in that topic's oldest undelivered age.
pub fn parked_since(subscription: &str, topic: &str, since_ms: i64) {
    slot_of(subscription, topic)
        .parked
        .store(since_ms, Ordering::Relaxed);
}

/// The records one subscription is working on (polled, not yet finished), so the watcher
/// can tell the age of the oldest undelivered one per source topic.
pub struct InFlight {
    subscription: String,
    records: HashMap<AckToken, i64>,
    slots: HashMap<String, Arc<Slot>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("subscription", &self.subscription)
            .finish_non_exhaustive()
    }
}

impl InFlight {
    /// Tracking for `subscription`.
    #[must_use]
    pub fn new(subscription: &str) -> InFlight {
        InFlight {
            subscription: subscription.to_owned(),
            records: HashMap::new(),
            slots: HashMap::new(),
        }
    }

    fn slot(&mut self, topic: &str) -> &Slot {
        if !self.slots.contains_key(topic) {
            let slot = slot_of(&self.subscription, topic);
            self.slots.insert(topic.to_owned(), slot);
        }
        &self.slots[topic]
    }

    /// A record was polled; its append time counts until it is finished.
    pub fn started(&mut self, record: &Record) {
        let ts = record.timestamp_ms.max(1);
        self.records.insert(record.ack_token(), ts);
        let slot = self.slot(&record.topic);
        let current = slot.oldest.load(Ordering::Relaxed);
        if current == 0 || ts < current {
            slot.oldest.store(ts, Ordering::Relaxed);
        }
        let mut read = slot.read();
        let next = read.entry(record.partition).or_insert(0);
        *next = (*next).max(record.offset + 1);
    }

    /// Records were finished (delivered, dead-lettered or filtered).
    pub fn finished<'a>(&mut self, tokens: impl IntoIterator<Item = &'a AckToken>) {
        for t in tokens {
            self.records.remove(t);
        }
        let mut mins: HashMap<&str, i64> = HashMap::new();
        for (t, ts) in &self.records {
            let e = mins.entry(t.topic.as_str()).or_insert(*ts);
            *e = (*e).min(*ts);
        }
        for (topic, slot) in &self.slots {
            slot.oldest.store(
                mins.get(topic.as_str()).copied().unwrap_or(0),
                Ordering::Relaxed,
            );
        }
    }
}

/// What the watcher samples for one subscription.
struct Watched {
    name: String,
    group: String,
    topics: Vec<(String, Arc<Slot>)>,
}

impl Watched {
    fn new(name: &str, source_topics: &[String]) -> Watched {
        Watched {
            name: name.to_owned(),
            group: topics::subscription_group(name),
            topics: source_topics
                .iter()
                .map(|t| (t.clone(), slot_of(name, t)))
                .collect(),
        }
    }
}

/// Subscriptions started while the broker runs (FHIR Subscriptions): name -> source topics.
static STARTED: LazyLock<Mutex<HashMap<String, Vec<String>>>> = LazyLock::new(Mutex::default);

fn started() -> std::sync::MutexGuard<'static, HashMap<String, Vec<String>>> {
    STARTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sample subscription `name` reading `source_topics` too, from the next round on (one
/// started while the broker runs, as configured ones are from the start).
pub fn watch_also(name: &str, source_topics: &[String]) {
    started().insert(name.to_owned(), source_topics.to_vec());
}

/// The indexes built from the log whose lag is sampled: name (one of
/// [`metrics::INDEXES`]), the group they read as, and its topics.
type Index = (&'static str, String, Vec<String>);

static INDEXES: LazyLock<Mutex<Vec<Index>>> = LazyLock::new(Mutex::default);

fn indexes() -> std::sync::MutexGuard<'static, Vec<Index>> {
    INDEXES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sample the lag of index `name` reading `topics` as `group`, from the next round on.
pub fn watch_index(name: &'static str, group: &str, topics: &[String]) {
    let mut all = indexes();
    all.retain(|(n, _, _)| *n != name);
    all.push((name, group.to_owned(), topics.to_vec()));
}

/// Stop sampling subscription `name` (a deleted FHIR Subscription); the topics it read.
pub fn unwatch(name: &str) -> Option<Vec<String>> {
    let source_topics = started().remove(name)?;
    let mut slots = SLOTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for t in &source_topics {
        slots.remove(&(name.to_owned(), t.clone()));
    }
    Some(source_topics)
}

async fn lag_of<B: Bus>(bus: &B, group: &str, topic: &str) -> Option<Vec<(u32, i64, i64)>> {
    match bus.lag(group, topic).await {
        Ok(parts) => Some(parts),
        Err(e) => {
            tracing::debug!(group, topic, error = %e, "lag not available");
            None
        }
    }
}

fn total_lag(parts: &[(u32, i64, i64)]) -> i64 {
    parts
        .iter()
        .map(|(_, committed, end)| (end - committed).max(0))
        .sum()
}

/// Per partition, since when the subscription's read position (the offset after the last
/// record it polled, or the committed offset when it polled none) has stood still with records
/// behind it. That is a lower bound on the age of the first unread record, and covers what the
/// in-flight tracking cannot see: records a stopped or wedged dispatcher never polled.
/// Finished records whose commit is still pending do not count.
#[derive(Default)]
struct Stalls(HashMap<(String, String, u32), (i64, i64)>);

impl Stalls {
    /// Record `parts` (partition, committed, end) of `group` on `topic` at `now`, with the
    /// dispatcher's read positions; the longest stall in ms.
    fn observe(
        &mut self,
        group: &str,
        topic: &str,
        parts: &[(u32, i64, i64)],
        read: &HashMap<u32, i64>,
        now: i64,
    ) -> i64 {
        let mut longest = 0;
        for &(partition, committed, end) in parts {
            let key = (group.to_owned(), topic.to_owned(), partition);
            let position = read
                .get(&partition)
                .copied()
                .unwrap_or(committed)
                .max(committed);
            if end <= position {
                self.0.remove(&key);
                continue;
            }
            let entry = self.0.entry(key).or_insert((position, now));
            if entry.0 != position {
                *entry = (position, now);
            }
            longest = longest.max(now - entry.1);
        }
        longest
    }
}

async fn sample<B: Bus>(bus: &B, watched: &[Watched], stalls: &mut Stalls) {
    if let Some(parts) = lag_of(bus, topics::ROUTER_GROUP, topics::RAW).await {
        metrics::router_lag(total_lag(&parts));
    }
    let index_groups = indexes().clone();
    for (name, group, topics) in index_groups {
        let mut lag = 0;
        for topic in &topics {
            lag += lag_of(bus, &group, topic)
                .await
                .map_or(0, |p| total_lag(&p));
        }
        metrics::index_lag(name, lag);
    }
    let now = now_ms();
    let also: Vec<Watched> = started()
        .iter()
        .map(|(name, source_topics)| Watched::new(name, source_topics))
        .collect();
    for w in watched.iter().chain(&also) {
        for (topic, slot) in &w.topics {
            let Some(parts) = lag_of(bus, &w.group, topic).await else {
                continue;
            };
            let lag = total_lag(&parts);
            let kind = metrics::topic_kind(topic);
            metrics::consumer_lag(&w.name, kind, lag);
            let read = slot.read().clone();
            let stalled = stalls.observe(&w.group, topic, &parts, &read, now);
            let since = slot.oldest.load(Ordering::Relaxed);
            let in_flight = if since == 0 { 0 } else { now - since };
            let age = if lag == 0 {
                0
            } else {
                in_flight.max(stalled).max(0)
            };
            let parked = slot.parked.load(Ordering::Relaxed);
            let age = if parked == 0 {
                age
            } else {
                age.max(now - parked)
            };
            metrics::oldest_undelivered(&w.name, kind, age);
        }
    }
    if let Some(bytes) = bus.disk_bytes() {
        metrics::log_disk(bytes);
    }
}

/// The watcher: every [`WATCH_INTERVAL`] until `cancel`, sample consumer lag per subscription
/// and source topic (and the router's), the age of the oldest undelivered record (0 when the
/// lag is 0; otherwise the oldest in-flight record's age, or how long the committed offset
/// has stood still, whichever is larger), and the embedded log's size on disk.
pub fn watch<B: Bus>(
    bus: Arc<B>,
    configured: &Configured,
    cancel: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let watched: Vec<Watched> = configured
        .subscriptions
        .iter()
        .map(|(name, source_topics)| Watched::new(name, source_topics))
        .collect();
    async move {
        let mut stalls = Stalls::default();
        loop {
            sample(bus.as_ref(), &watched, &mut stalls).await;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(WATCH_INTERVAL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_in_flight_follows_what_is_unfinished() {
        let mut t = InFlight::new("t-age");
        let rec = |offset: i64, ts: i64| Record {
            topic: "ketenbus.events.acute_handover".into(),
            partition: 0,
            offset,
            key: vec![],
            value: vec![],
            timestamp_ms: ts,
        };
        let slot = slot_of("t-age", "ketenbus.events.acute_handover");
        let slot = &slot.oldest;
        t.started(&rec(1, 2000));
        t.started(&rec(2, 1000));
        t.started(&rec(3, 3000));
        assert_eq!(slot.load(Ordering::Relaxed), 1000);
        t.finished([&rec(2, 1000).ack_token()]);
        assert_eq!(slot.load(Ordering::Relaxed), 2000);
        t.finished([&rec(1, 0).ack_token(), &rec(3, 0).ack_token()]);
        assert_eq!(slot.load(Ordering::Relaxed), 0, "nothing in flight");
    }

    #[test]
    fn a_read_position_standing_still_counts_as_age() {
        let mut st = Stalls::default();
        let none = HashMap::new();
        // Caught up: nothing stalls.
        assert_eq!(st.observe("g", "t", &[(0, 5, 5)], &none, 1_000), 0);
        // Records behind, nothing polled, committed offset at 5 from t=2000 on.
        assert_eq!(st.observe("g", "t", &[(0, 5, 7)], &none, 2_000), 0);
        assert_eq!(st.observe("g", "t", &[(0, 5, 9)], &none, 7_000), 5_000);
        // It moves: the clock restarts for the new head.
        assert_eq!(st.observe("g", "t", &[(0, 6, 9)], &none, 12_000), 0);
        // The longest of several partitions; a caught-up one forgets its clock.
        assert_eq!(
            st.observe("g", "t", &[(0, 6, 9), (1, 0, 3)], &none, 17_000),
            5_000
        );
        assert_eq!(
            st.observe("g", "t", &[(0, 9, 9), (1, 0, 3)], &none, 20_000),
            3_000
        );
        assert_eq!(
            st.observe("g", "t", &[(0, 9, 10), (1, 3, 3)], &none, 21_000),
            0
        );
    }

    #[test]
    fn finished_records_waiting_for_their_commit_are_not_old() {
        let mut st = Stalls::default();
        // Everything up to offset 9 polled (and finished); the commit still says 7.
        let read: HashMap<u32, i64> = [(0, 9)].into();
        assert_eq!(st.observe("g", "t", &[(0, 7, 9)], &read, 1_000), 0);
        assert_eq!(st.observe("g", "t", &[(0, 7, 9)], &read, 600_000), 0);
        // A new record the dispatcher does not pick up: that one ages.
        assert_eq!(st.observe("g", "t", &[(0, 7, 10)], &read, 601_000), 0);
        assert_eq!(st.observe("g", "t", &[(0, 7, 10)], &read, 661_000), 60_000);
    }
}
