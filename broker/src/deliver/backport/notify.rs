//! Notifications: `history` Bundles whose first entry is the Backport status `Parameters`
//! (handshake, heartbeat, event-notification, query-status, query-event), with each
//! event's nl-core resources (the resources of `ketenbus_connectors::fhir::to_bundle`), their
//! `fullUrl`s only, or nothing, as the Subscription asked; and the POST that sends one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ketenbus_schemas::Event;
use serde_json::{Value, json};

use super::topic::Topic;
use super::{Content, PROFILE_STATUS, Registration};

/// One event in a notification.
#[derive(Debug, Clone)]
pub struct Notice {
    /// Its number within the Subscription.
    pub number: u64,
    /// When it was numbered, ms since the epoch.
    pub at_ms: i64,
    /// The event, as far as it is at hand (for its focus and resources).
    pub event: Held,
}

/// What a notification has of an event.
#[derive(Debug, Clone)]
pub enum Held {
    /// The event, read from the log.
    Event(std::sync::Arc<Event>),
    /// Not read: nothing of it is carried (`empty`, or a kind without a FHIR form).
    Unread,
    /// The log no longer holds it (retention removed it): listed by number and time, with
    /// an entry that answers `410` with an OperationOutcome saying so.
    Gone,
}

impl Held {
    fn event(&self) -> Option<&Event> {
        match self {
            Held::Event(e) => Some(e),
            Held::Unread | Held::Gone => None,
        }
    }
}

/// The entry of an event the log no longer holds: no resource, a `410` response whose
/// OperationOutcome says which event and why.
fn gone_entry(subscription: &str, number: u64) -> Value {
    let id = subscription.rsplit('/').next().unwrap_or_default();
    json!({
        "request": {
            "method": "GET",
            "url": format!("Subscription/{id}/$events?eventsSinceNumber={number}&eventsUntilNumber={number}"),
        },
        "response": {
            "status": "410",
            "outcome": {
                "resourceType": "OperationOutcome",
                "issue": [{
                    "severity": "warning",
                    "code": "deleted",
                    "diagnostics": format!("event {number} of this Subscription is no longer in the log (removed by retention): its number and time are listed, its resources cannot be sent"),
                }],
            },
        },
    })
}

/// A fresh random UUID (for `Bundle.id`, `Parameters.id` and `urn:uuid:` full URLs).
#[must_use]
pub fn new_uuid() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

/// An instant (`2026-12-01T01:02:03.456Z`) from ms since the epoch.
#[must_use]
pub fn instant(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// The resources of an event as served at `/fhir/{Type}/{id}`, each as (`Type/id`,
/// resource).
#[must_use]
pub fn resources(event: &Event) -> Vec<(String, Value)> {
    let Ok(served) = ketenbus_connectors::fhir::emit::resources(event) else {
        return Vec::new(); // letters: no FHIR form yet
    };
    served
        .into_iter()
        .filter_map(|r| {
            let r: Value =
                serde_json::from_slice(&ketenbus_connectors::fhir::json::to_vec(&r)).ok()?;
            let tid = format!("{}/{}", r["resourceType"].as_str()?, r["id"].as_str()?);
            Some((tid, r))
        })
        .collect()
}

/// What the status `Parameters` of a notification say.
#[derive(Debug, Clone)]
pub struct StatusOf<'a> {
    /// The Subscription's reference (`<base>/Subscription/<id>`).
    pub subscription: String,
    /// The topic canonical.
    pub topic: String,
    /// The Subscription's status code.
    pub status: &'a str,
    /// The notification type (`handshake`, `heartbeat`, `event-notification`, ...).
    pub kind: &'a str,
    /// `events-since-subscription-start`.
    pub since: u64,
    /// Each event: number, when it was numbered (ms since the epoch) and its focus reference.
    pub events: Vec<(u64, i64, Option<String>)>,
    /// The numbers of events the log no longer holds (each gets a `410` entry).
    pub gone: Vec<u64>,
    /// Why the status is `error`.
    pub error: Option<&'a str>,
}

impl StatusOf<'_> {
    /// As a `backport-subscription-status-r4` Parameters.
    #[must_use]
    pub fn parameters(&self) -> Value {
        let mut parameter = vec![
            json!({ "name": "subscription", "valueReference": { "reference": self.subscription } }),
            json!({ "name": "topic", "valueCanonical": self.topic }),
            json!({ "name": "status", "valueCode": self.status }),
            json!({ "name": "type", "valueCode": self.kind }),
            json!({ "name": "events-since-subscription-start", "valueString": self.since.to_string() }),
        ];
        for (number, at_ms, focus) in &self.events {
            let mut part = vec![
                json!({ "name": "event-number", "valueString": number.to_string() }),
                json!({ "name": "timestamp", "valueInstant": instant(*at_ms) }),
            ];
            if let Some(focus) = focus {
                part.push(json!({ "name": "focus", "valueReference": { "reference": focus } }));
            }
            parameter.push(json!({ "name": "notification-event", "part": part }));
        }
        if let Some(e) = self.error {
            parameter.push(json!({ "name": "error", "valueCodeableConcept": { "text": e } }));
        }
        json!({
            "resourceType": "Parameters",
            "id": new_uuid(),
            "meta": { "profile": [PROFILE_STATUS] },
            "parameter": parameter,
        })
    }

    /// A `history` notification Bundle: these Parameters first, then `entries` (full URL,
    /// `Type/id`, the resource when it is carried).
    #[must_use]
    pub fn history(&self, entries: Vec<(String, String, Option<Value>)>) -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
        let mut entry = vec![json!({
            "fullUrl": format!("urn:uuid:{}", new_uuid()),
            "resource": self.parameters(),
            "request": { "method": "GET", "url": format!("{}/$status", self.subscription) },
            "response": { "status": "200" },
        })];
        for (url, tid, resource) in entries {
            let mut e = json!({
                "fullUrl": url,
                "request": { "method": "PUT", "url": tid },
                "response": { "status": "200" },
            });
            if let Some(r) = resource {
                e["resource"] = r;
            }
            entry.push(e);
        }
        for number in &self.gone {
            entry.push(gone_entry(&self.subscription, *number));
        }
        json!({
            "resourceType": "Bundle",
            "id": new_uuid(),
            "type": "history",
            "timestamp": instant(now),
            "entry": entry,
        })
    }
}

/// The status of a notification of type `kind` (`handshake`, `heartbeat`,
/// `event-notification`, `query-status`, `query-event`) about the Subscription `r`.
#[must_use]
pub fn status_of<'a>(
    base: &str,
    r: &'a Registration,
    kind: &'a str,
    since: u64,
    events: &[Notice],
) -> StatusOf<'a> {
    StatusOf {
        subscription: format!("{base}/Subscription/{}", r.id),
        topic: Topic::of(r.kind).canonical(),
        status: r.status.code(),
        kind,
        since,
        events: events
            .iter()
            .map(|n| {
                let focus = (r.content != Content::Empty)
                    .then(|| {
                        ketenbus_connectors::fhir::emit::served(n.event.event()?)
                            .ok()?
                            .focus
                    })
                    .flatten()
                    .map(|f| format!("{base}/{f}"));
                (n.number, n.at_ms, focus)
            })
            .collect(),
        gone: events
            .iter()
            .filter(|n| matches!(n.event, Held::Gone))
            .map(|n| n.number)
            .collect(),
        error: r.error.as_deref(),
    }
}

/// The status `Parameters` of a notification of type `kind`.
#[must_use]
pub fn status(base: &str, r: &Registration, kind: &str, since: u64, events: &[Notice]) -> Value {
    status_of(base, r, kind, since, events).parameters()
}

/// A `history` notification Bundle of type `kind`, with `events` carried as `content` says.
#[must_use]
pub fn bundle(
    base: &str,
    r: &Registration,
    kind: &str,
    since: u64,
    events: &[Notice],
    content: Content,
) -> Value {
    let mut entries = Vec::new();
    if content != Content::Empty {
        for n in events {
            let Some(event) = n.event.event() else {
                continue;
            };
            for (tid, resource) in resources(event) {
                let carried = (content == Content::FullResource).then_some(resource);
                entries.push((format!("{base}/{tid}"), tid, carried));
            }
        }
    }
    status_of(base, r, kind, since, events).history(entries)
}

/// A `searchset` Bundle of `found` (full URL, resource), each a match.
#[must_use]
pub fn searchset(found: Vec<(String, Value)>) -> Value {
    let total = found.len();
    let entry: Vec<Value> = found
        .into_iter()
        .map(|(url, resource)| {
            json!({ "fullUrl": url, "resource": resource, "search": { "mode": "match" } })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "id": new_uuid(),
        "type": "searchset",
        "total": total,
        "entry": entry,
    })
}

/// POST `bundle` to the Subscription's endpoint with its headers, within its timeout;
/// redirects are failures, never followed.
///
/// # Errors
/// What went wrong, without payload: the status, a timeout, a refused connection.
pub async fn send(
    client: &reqwest::Client,
    r: &Registration,
    bundle: &Value,
) -> Result<String, String> {
    let mut req = client
        .post(&r.endpoint)
        .timeout(Duration::from_secs(u64::from(r.timeout_secs)))
        .header("content-type", "application/fhir+json; charset=utf-8")
        .body(serde_json::to_vec(bundle).unwrap_or_default());
    for h in &r.headers {
        if let Some((name, value)) = h.split_once(':') {
            req = req.header(name.trim(), value.trim());
        }
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => Ok(resp.status().to_string()),
        Ok(resp) => Err(format!("the endpoint answered {}", resp.status())),
        Err(e) if e.is_timeout() => Err("the endpoint did not answer in time".into()),
        Err(e) if e.is_connect() => Err("the endpoint refused the connection".into()),
        Err(_) => Err("the notification could not be sent".into()),
    }
}

/// The client notifications go out with: no redirects.
///
/// # Errors
/// When the TLS setup fails.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
}
