//! Search in the lineage index by what people ask: sender, receiver, event kind, connector,
//! format, current status, subscription, time, the id the message gives itself and patient.
//!
//! Every message has a row in `message_facets` per thing it can be found by: `(facet, value,
//! received_at, message_id)`, the primary key, so one filter is one range of one B-tree read
//! newest first, the same order as the cursor (`received_at`, `id`). The facets of a message
//! are worked out again from its row and its steps after each batch that touched it
//! ([`refresh`]), so its `status` facet is always its current state. `facet_counts` holds how
//! many messages each value has: with several filters the rarest drives the scan and the
//! others are one primary-key probe each. Two common values that seldom meet (connector
//! `smtp` with format `edifact`) would still make the rarer one's whole range a scan, so the
//! small closed dimensions (connector, format, kind) are also stored in pairs
//! ([`facet::PAIRS`]): such a search is one short range, or none when the pair never occurs.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, OptionalExtension, Transaction, params, params_from_iter};
use serde::{Deserialize, Serialize};

use super::{Page, Received, received_row};

/// The outcome name of a dead letter sent back for another go (a replay): its delivery is
/// pending again until the next attempt's outcome.
pub const OUTCOME_REPLAYED: &str = "replayed";

/// What a message, or one subscription's handling of it, has come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// On the log; the router has not read it yet.
    Received,
    /// The router read it (made events, found none, or passes it on raw) and no subscription
    /// has an outcome for it yet, or every subscription's filter let it pass by.
    Normalised,
    /// Every delivery with an outcome ended delivered (a mail delivery report saying so
    /// counts too).
    Delivered,
    /// A delivery is not finished: retrying, delayed (a mail delivery report), or a dead
    /// letter that was replayed and has no new outcome yet. Ranks above delivered.
    Pending,
    /// The router refused it (unreadable, or an event that does not fit its schema: it lies
    /// in the router's dead letters), or a delivery report says a delivery failed for good and
    /// it was not dead-lettered.
    Failed,
    /// A subscription gave up on one of its deliveries and that dead letter has not been
    /// replayed since.
    DeadLettered,
}

impl Status {
    /// Every status, as the API names them.
    pub const ALL: [Status; 6] = [
        Status::Received,
        Status::Normalised,
        Status::Pending,
        Status::Delivered,
        Status::Failed,
        Status::DeadLettered,
    ];

    /// The name the API takes and the index stores.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Received => "received",
            Status::Normalised => "normalised",
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::DeadLettered => "dead_lettered",
        }
    }

    fn parse(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// One step as the status is worked out from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepFacts {
    /// Stage name.
    pub stage: String,
    /// Subscription.
    pub subscription: Option<String>,
    /// Record id.
    pub record_id: Option<String>,
    /// Event kind.
    pub kind: Option<String>,
    /// Outcome name.
    pub outcome: String,
    /// Patient pseudonym.
    pub patient: Option<String>,
}

/// The current status of a message from its steps in order, and that of each subscription
/// with an outcome for it. The status of a subscription is the worst of its deliveries'
/// latest outcomes (dead_lettered, failed, pending, delivered); a message's is the worst of
/// its subscriptions' and the router's (failed when it refused the message), else normalised
/// once the router read it, else received. A filtered delivery counts for nothing.
#[must_use]
pub fn status_of(steps: &[StepFacts]) -> (Status, BTreeMap<String, Status>) {
    let mut routed = false;
    let mut refused = false;
    let mut latest: BTreeMap<(&str, &str), Status> = BTreeMap::new();
    for s in steps {
        match s.stage.as_str() {
            "normalise" | "normalised" | "acknowledge" => {
                routed = true;
                refused |= s.outcome == "rejected";
            }
            _ => {}
        }
        let (Some(sub), Some(record)) = (&s.subscription, &s.record_id) else {
            continue;
        };
        let state = match s.outcome.as_str() {
            "delivered" => Status::Delivered,
            "retrying" | "delayed" | OUTCOME_REPLAYED => Status::Pending,
            "failed" => Status::Failed,
            "dead_lettered" => Status::DeadLettered,
            _ => continue, // filtered, ignored reports: no delivery outcome
        };
        latest.insert((sub, record), state);
    }
    let mut subs: BTreeMap<String, Status> = BTreeMap::new();
    for ((sub, _), state) in latest {
        let s = subs.entry(sub.to_owned()).or_insert(state);
        *s = (*s).max(state);
    }
    let router = if refused {
        Status::Failed
    } else if routed {
        Status::Normalised
    } else {
        Status::Received
    };
    let status = subs.values().copied().fold(router, Status::max);
    (status, subs)
}

/// Facet names, as stored.
mod facet {
    pub(super) const SENDER: &str = "sender";
    pub(super) const RECEIVER: &str = "receiver";
    pub(super) const KIND: &str = "kind";
    pub(super) const CONNECTOR: &str = "connector";
    pub(super) const FORMAT: &str = "format";
    pub(super) const STATUS: &str = "status";
    pub(super) const SUBSCRIPTION: &str = "subscription";
    /// `<subscription>` U+001F `<status>`: the status of one subscription's handling.
    pub(super) const SUBSCRIPTION_STATUS: &str = "subscription_status";
    pub(super) const SOURCE_ID: &str = "source_id";
    pub(super) const PATIENT: &str = "patient";
    /// Pairs of the small closed dimensions, each stored as one facet whose value is
    /// `<value of the first>` U+001F `<value of the second>`.
    pub(super) const PAIRS: [(&str, &str, &str); 3] = [
        (CONNECTOR, FORMAT, "connector+format"),
        (CONNECTOR, KIND, "connector+kind"),
        (FORMAT, KIND, "format+kind"),
    ];

    /// The value of a pair facet.
    pub(super) fn pair(first: &str, second: &str) -> String {
        format!("{first}\u{1f}{second}")
    }
}

fn subscription_status(sub: &str, status: Status) -> String {
    format!("{sub}\u{1f}{}", status.as_str())
}

/// Schema version of the search tables, kept in `PRAGMA user_version`: 2 added the pair
/// facets.
const VERSION: i64 = 2;

/// Bring an index of any earlier release up to this one: the new columns (with NULL for
/// what was never recorded), the facet tables, and the facets of every message already in
/// it, in one transaction.
///
/// # Errors
/// When the database fails.
pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version >= VERSION {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for (table, column) in [("messages", "source_id"), ("steps", "patient")] {
        let has: bool = tx.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            params![column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} TEXT"))?;
        }
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS message_facets (
             facet TEXT NOT NULL, value TEXT NOT NULL, received_at INTEGER NOT NULL,
             message_id TEXT NOT NULL,
             PRIMARY KEY (facet, value, received_at, message_id)) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS message_facets_message ON message_facets (message_id);
         CREATE TABLE IF NOT EXISTS facet_counts (
             facet TEXT NOT NULL, value TEXT NOT NULL, n INTEGER NOT NULL,
             PRIMARY KEY (facet, value)) WITHOUT ROWID;",
    )?;
    let ids: Vec<String> = tx
        .prepare("SELECT id FROM messages")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        refresh(&tx, id)?;
    }
    tx.pragma_update(None, "user_version", VERSION)?;
    tx.commit()?;
    if !ids.is_empty() {
        tracing::info!(
            messages = ids.len(),
            "lineage index upgraded: messages can be searched"
        );
    }
    Ok(())
}

/// Work out the facets of message `id` again from its row and its steps and store what
/// changed. A message whose row is not there yet gets its facets with its row.
///
/// # Errors
/// When the database fails.
pub fn refresh(tx: &Transaction<'_>, id: &str) -> rusqlite::Result<()> {
    let row = tx
        .prepare_cached(
            "SELECT received_at, connector, format, sender, receiver, source_id FROM messages WHERE id = ?1",
        )?
        .query_row(params![id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })
        .optional()?;
    let Some((received_at, connector, format, sender, receiver, source_id)) = row else {
        return Ok(());
    };
    let steps: Vec<StepFacts> = tx
        .prepare_cached(
            "SELECT stage, subscription, record_id, kind, outcome, patient
             FROM steps WHERE message_id = ?1 ORDER BY at, step_key, rowid",
        )?
        .query_map(params![id], |r| {
            Ok(StepFacts {
                stage: r.get(0)?,
                subscription: r.get(1)?,
                record_id: r.get(2)?,
                kind: r.get(3)?,
                outcome: r.get(4)?,
                patient: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let (status, subs) = status_of(&steps);
    let mut want: BTreeSet<(&'static str, String)> = BTreeSet::new();
    want.insert((facet::CONNECTOR, connector));
    want.insert((facet::FORMAT, format));
    want.insert((facet::STATUS, status.as_str().to_owned()));
    want.extend(sender.map(|v| (facet::SENDER, v)));
    want.extend(receiver.map(|v| (facet::RECEIVER, v)));
    want.extend(source_id.map(|v| (facet::SOURCE_ID, v)));
    for s in &steps {
        if s.stage == "normalised" && s.outcome == "normalised" {
            want.extend(s.kind.clone().map(|v| (facet::KIND, v)));
        }
        want.extend(s.patient.clone().map(|v| (facet::PATIENT, v)));
    }
    let values = |name: &str| -> Vec<String> {
        want.iter()
            .filter(|(f, _)| *f == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let mut pairs = Vec::new();
    for (first, second, name) in facet::PAIRS {
        for a in values(first) {
            for b in values(second) {
                pairs.push((name, facet::pair(&a, &b)));
            }
        }
    }
    want.extend(pairs);
    for (sub, state) in subs {
        want.insert((facet::SUBSCRIPTION_STATUS, subscription_status(&sub, state)));
        want.insert((facet::SUBSCRIPTION, sub));
    }
    let have: BTreeSet<(String, String)> = tx
        .prepare_cached("SELECT facet, value FROM message_facets WHERE message_id = ?1")?
        .query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut count = tx.prepare_cached(
        "INSERT INTO facet_counts VALUES (?1, ?2, ?3)
         ON CONFLICT (facet, value) DO UPDATE SET n = n + excluded.n",
    )?;
    let mut gone = tx.prepare_cached(
        "DELETE FROM message_facets WHERE facet = ?1 AND value = ?2 AND message_id = ?3",
    )?;
    for (f, v) in &have {
        if !want.contains(&(f.as_str(), v.clone())) {
            gone.execute(params![f, v, id])?;
            count.execute(params![f, v, -1])?;
        }
    }
    let mut add =
        tx.prepare_cached("INSERT OR IGNORE INTO message_facets VALUES (?1, ?2, ?3, ?4)")?;
    for (f, v) in &want {
        if !have.contains(&((*f).to_owned(), v.clone()))
            && add.execute(params![f, v, received_at, id])? > 0
        {
            count.execute(params![f, v, 1])?;
        }
    }
    Ok(())
}

/// Which messages to list, as the API takes it (`GET /api/v1/messages?...`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Current status: received, normalised, pending, delivered, failed, dead_lettered.
    /// With `subscription`: that subscription's handling of the message.
    pub status: Option<String>,
    /// Messages a subscription has an outcome for (delivered, retrying, failed, dead
    /// letter; not those its filter let pass by).
    pub subscription: Option<String>,
    /// Sender party id, as the message names it (`mailbox:500001234`).
    pub sender: Option<String>,
    /// Receiver party id.
    pub receiver: Option<String>,
    /// Event kind the message was normalised into (`lab_result`).
    pub kind: Option<String>,
    /// Connector it came in by (`http`, `fhir`, `smtp`, `imap`, `inbox`).
    pub connector: Option<String>,
    /// Format (`edifact`, `fhir_json`, `fhir_xml`, `rfc822`).
    pub format: Option<String>,
    /// The id the message gives itself (UNB reference, MessageHeader or Bundle id,
    /// Message-ID).
    pub source_id: Option<String>,
    /// Patient BSN; the server searches by its pseudonym and never keeps the BSN.
    pub patient: Option<String>,
    /// Received at or after (RFC 3339).
    pub since: Option<String>,
    /// Received at or before (RFC 3339).
    pub until: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

/// Largest page.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when none is asked.
pub const DEFAULT_LIMIT: u32 = 100;

/// A parameter that does not hold a value it can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct BadParameter {
    /// The parameter.
    pub parameter: &'static str,
    /// What it must be (never the value given: it may be a BSN).
    pub message: String,
    /// The values it takes, when they are a closed set.
    pub allowed: Vec<&'static str>,
}

impl BadParameter {
    fn new(parameter: &'static str, message: impl Into<String>) -> BadParameter {
        BadParameter {
            parameter,
            message: message.into(),
            allowed: Vec::new(),
        }
    }
}

/// A checked search: every filter valid, the patient as its pseudonym.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Search {
    /// `(facet, value)` pairs, all of which a message must have.
    facets: Vec<(&'static str, String)>,
    since_ms: i64,
    until_ms: i64,
    limit: u32,
    after: Option<(i64, String)>,
}

fn rfc3339_ms(parameter: &'static str, text: &str) -> Result<i64, BadParameter> {
    let bad = || {
        BadParameter::new(
            parameter,
            "must be an RFC 3339 time, e.g. 2026-11-30T08:00:00Z",
        )
    };
    let t = humantime::parse_rfc3339_weak(text.trim()).map_err(|_| bad())?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_millis();
    i64::try_from(ms).map_err(|_| bad())
}

impl ListQuery {
    /// Check every parameter; the patient's BSN (query or header) is checked with the
    /// eleven-test and turned into its pseudonym by `pseudonym`, and is not kept.
    ///
    /// # Errors
    /// The first parameter that holds no value it can take.
    pub fn check(self, pseudonym: impl FnOnce(&str) -> String) -> Result<Search, BadParameter> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(BadParameter::new(
                "limit",
                format!("must be a whole number from 1 to {MAX_LIMIT}"),
            ));
        }
        let status = match self.status.as_deref() {
            None => None,
            Some(s) => Some(Status::parse(s).ok_or_else(|| BadParameter {
                allowed: Status::ALL.iter().map(|s| s.as_str()).collect(),
                ..BadParameter::new("status", "is not a status")
            })?),
        };
        let since_ms = self
            .since
            .as_deref()
            .map_or(Ok(0), |t| rfc3339_ms("since", t))?;
        let until_ms = self
            .until
            .as_deref()
            .map_or(Ok(i64::MAX), |t| rfc3339_ms("until", t))?;
        let after = match self.after.as_deref() {
            None => None,
            Some(c) => {
                let bad = || BadParameter::new("after", "is not a cursor from a previous page");
                let (at, id) = c.split_once('_').ok_or_else(bad)?;
                Some((at.parse().map_err(|_| bad())?, id.to_owned()))
            }
        };
        let mut facets = Vec::new();
        for (name, value) in [
            (facet::SENDER, self.sender),
            (facet::RECEIVER, self.receiver),
            (facet::KIND, self.kind),
            (facet::CONNECTOR, self.connector),
            (facet::FORMAT, self.format),
            (facet::SOURCE_ID, self.source_id),
        ] {
            if let Some(v) = value {
                if v.is_empty() {
                    return Err(BadParameter::new(name, "must not be empty"));
                }
                facets.push((name, v));
            }
        }
        if let Some(bsn) = self.patient {
            let bsn = bsn.trim();
            if !ketenbus_connectors::zib::bsn_is_valid(bsn) {
                return Err(BadParameter::new(
                    "patient",
                    "must be a BSN: nine digits that pass the eleven-test",
                ));
            }
            facets.push((facet::PATIENT, pseudonym(bsn)));
        }
        let given = |name: &str| facets.iter().find(|(f, _)| *f == name).map(|(_, v)| v);
        let pairs: Vec<(&'static str, String)> = facet::PAIRS
            .iter()
            .filter_map(|(first, second, name)| {
                Some((*name, facet::pair(given(first)?, given(second)?)))
            })
            .collect();
        facets.extend(pairs);
        match (self.subscription, status) {
            (Some(sub), Some(status)) => facets.push((
                facet::SUBSCRIPTION_STATUS,
                subscription_status(&sub, status),
            )),
            (Some(sub), None) => facets.push((facet::SUBSCRIPTION, sub)),
            (None, Some(status)) => facets.push((facet::STATUS, status.as_str().to_owned())),
            (None, None) => {}
        }
        Ok(Search {
            facets,
            since_ms,
            until_ms,
            limit,
            after,
        })
    }
}

const COLUMNS: &str = "m.id, m.received_at, m.connector, m.format, m.content_type, m.size, m.sender, \
     m.receiver, m.raw_partition, m.raw_offset, m.source_id";

/// One page of the messages that match `q`, newest first.
///
/// # Errors
/// When the database fails.
pub fn page(conn: &Connection, q: &Search) -> rusqlite::Result<Page> {
    use rusqlite::types::Value;
    // One upper bound on the time, so the index range starts there: the cursor when it lies
    // within `until` (ties broken by id), else `until` itself (every id at that time).
    let (upper, id_below) = match &q.after {
        Some((at, id)) if *at <= q.until_ms => (*at, id.clone()),
        _ => (q.until_ms, "\u{10FFFF}".to_owned()),
    };
    let mut args: Vec<Value> = vec![
        Value::Integer(q.since_ms),
        Value::Integer(upper),
        Value::Text(id_below),
        Value::Integer(i64::from(q.limit) + 1),
    ];
    let sql = if q.facets.is_empty() {
        format!(
            "SELECT {COLUMNS} FROM messages m
             WHERE m.received_at >= ?1 AND m.received_at <= ?2
               AND (m.received_at < ?2 OR m.id < ?3)
             ORDER BY m.received_at DESC, m.id DESC LIMIT ?4"
        )
    } else {
        // The rarest value drives; the others are probed by primary key.
        let mut ranked = Vec::with_capacity(q.facets.len());
        let mut counts = conn.prepare_cached(
            "SELECT coalesce((SELECT n FROM facet_counts WHERE facet = ?1 AND value = ?2), 0)",
        )?;
        for (f, v) in &q.facets {
            let n: i64 = counts.query_row(params![f, v], |r| r.get(0))?;
            if n <= 0 {
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
            ranked.push((n, *f, v.clone()));
        }
        ranked.sort();
        let mut probes = String::new();
        for (i, (_, f, v)) in ranked.iter().enumerate() {
            args.push(Value::Text((*f).to_owned()));
            args.push(Value::Text(v.clone()));
            let (fp, vp) = (5 + 2 * i, 6 + 2 * i);
            if i > 0 {
                probes.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM message_facets p WHERE p.facet = ?{fp} AND p.value = ?{vp}
                       AND p.received_at = d.received_at AND p.message_id = d.message_id)"
                ));
            }
        }
        format!(
            "SELECT {COLUMNS} FROM message_facets d JOIN messages m ON m.id = d.message_id
             WHERE d.facet = ?5 AND d.value = ?6
               AND d.received_at >= ?1 AND d.received_at <= ?2
               AND (d.received_at < ?2 OR d.message_id < ?3){probes}
             ORDER BY d.received_at DESC, d.message_id DESC LIMIT ?4"
        )
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut items: Vec<Received> = stmt
        .query_map(params_from_iter(args), received_row)?
        .collect::<Result<_, _>>()?;
    let next = if items.len() > q.limit as usize {
        items.truncate(q.limit as usize);
        items
            .last()
            .map(|m| format!("{}_{}", m.received_at_ms, m.id))
    } else {
        None
    };
    Ok(Page { items, next })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

    use super::*;

    fn step(stage: &str, sub: Option<&str>, outcome: &str) -> StepFacts {
        StepFacts {
            stage: stage.into(),
            subscription: sub.map(Into::into),
            record_id: sub.map(|_| "ev1".into()),
            outcome: outcome.into(),
            ..StepFacts::default()
        }
    }

    #[test]
    fn a_replayed_dead_letter_counts_as_what_came_after() {
        let mut steps = vec![
            step("received", None, "accepted"),
            step("normalised", None, "normalised"),
            step("delivery", Some("gp"), "retrying"),
            step("dead_lettered", Some("gp"), "dead_lettered"),
        ];
        assert_eq!(status_of(&steps).0, Status::DeadLettered);
        steps.push(step("delivery", Some("gp"), OUTCOME_REPLAYED));
        assert_eq!(status_of(&steps).0, Status::Pending);
        steps.push(step("delivery", Some("gp"), "delivered"));
        let (status, subs) = status_of(&steps);
        assert_eq!(status, Status::Delivered);
        assert_eq!(subs["gp"], Status::Delivered);
    }

    #[test]
    fn the_worst_subscription_decides_and_filtered_counts_for_nothing() {
        let steps = vec![
            step("normalised", None, "normalised"),
            step("delivery", Some("a"), "delivered"),
            step("delivery", Some("b"), "filtered"),
        ];
        let (status, subs) = status_of(&steps);
        assert_eq!(status, Status::Delivered);
        assert!(!subs.contains_key("b"), "{subs:?}");
        assert_eq!(status_of(&steps[..1]).0, Status::Normalised);
        assert_eq!(status_of(&[]).0, Status::Received);
        let refused = [step("normalise", None, "rejected")];
        assert_eq!(status_of(&refused).0, Status::Failed);
        let mut mixed = steps.clone();
        mixed.push(step("delivery", Some("c"), "retrying"));
        assert_eq!(status_of(&mixed).0, Status::Pending);
        mixed.push(step("dead_lettered", Some("a"), "dead_lettered"));
        assert_eq!(status_of(&mixed).0, Status::DeadLettered);
    }

    /// An index as release 0.1.0 wrote it: no facet tables, no `source_id`, no `patient`.
    #[test]
    fn an_index_of_the_previous_release_is_searchable_after_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lineage.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE messages (
                 id TEXT PRIMARY KEY, received_at INTEGER NOT NULL, connector TEXT NOT NULL, format TEXT NOT NULL,
                 content_type TEXT NOT NULL, size INTEGER NOT NULL, sender TEXT, receiver TEXT,
                 raw_partition INTEGER NOT NULL, raw_offset INTEGER NOT NULL);
             CREATE TABLE steps (
                 message_id TEXT NOT NULL, at INTEGER NOT NULL, stage TEXT NOT NULL, subscription TEXT,
                 record_id TEXT, kind TEXT, attempt INTEGER, outcome TEXT NOT NULL, reason TEXT, detail TEXT);
             INSERT INTO messages VALUES ('a', 1000, 'http', 'edifact', 'application/EDIFACT', 10, 'mailbox:1', 'mailbox:2', 0, 0);
             INSERT INTO messages VALUES ('b', 2000, 'smtp', 'rfc822', 'message/rfc822', 10, NULL, NULL, 0, 1);
             INSERT INTO steps VALUES ('a', 1000, 'received', NULL, NULL, NULL, NULL, 'accepted', NULL, NULL);
             INSERT INTO steps VALUES ('a', 1001, 'normalised', NULL, 'e1', 'lab_result', NULL, 'normalised', NULL, NULL);
             INSERT INTO steps VALUES ('a', 1002, 'dead_lettered', 'gp', 'e1', NULL, 1, 'dead_lettered', 'http_500', NULL);",
        )
        .unwrap();
        drop(old);
        let mut conn = crate::observe::lineage::open(&path).unwrap();
        let search = |q: ListQuery| {
            let page = page(&conn, &q.check(|_| unreachable!()).unwrap()).unwrap();
            page.items.into_iter().map(|m| m.id).collect::<Vec<_>>()
        };
        let q = |f: fn(&mut ListQuery)| {
            let mut q = ListQuery::default();
            f(&mut q);
            q
        };
        assert_eq!(search(q(|q| q.kind = Some("lab_result".into()))), ["a"]);
        assert_eq!(
            search(q(|q| q.status = Some("dead_lettered".into()))),
            ["a"]
        );
        assert_eq!(search(q(|q| q.status = Some("received".into()))), ["b"]);
        assert_eq!(search(q(|q| q.connector = Some("smtp".into()))), ["b"]);
        assert_eq!(search(q(|q| q.sender = Some("mailbox:1".into()))), ["a"]);
        assert_eq!(search(ListQuery::default()), ["b", "a"]);
        assert_eq!(
            search(q(|q| {
                q.connector = Some("http".into());
                q.kind = Some("lab_result".into());
            })),
            ["a"]
        );
        // Opening again changes nothing.
        migrate(&mut conn).unwrap();
        drop(conn);
        let conn = crate::observe::lineage::open(&path).unwrap();
        let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        // b: connector, format, status and the connector+format pair; a: those and sender,
        // receiver, kind, subscription, subscription status and the two pairs with its kind.
        assert_eq!(count("SELECT count(*) FROM message_facets"), 4 + 11);
        assert_eq!(count("SELECT sum(n) FROM facet_counts"), 4 + 11);
    }
}
