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
    /// The event (for its focus and resources).
    pub event: std::sync::Arc<Event>,
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

/// The status `Parameters` of a notification of type `kind` (`handshake`, `heartbeat`,
/// `event-notification`, `query-status`, `query-event`).
#[must_use]
pub fn status(base: &str, r: &Registration, kind: &str, since: u64, events: &[Notice]) -> Value {
    let mut parameter = vec![
        json!({ "name": "subscription", "valueReference": { "reference": format!("{base}/Subscription/{}", r.id) } }),
        json!({ "name": "topic", "valueCanonical": Topic::of(r.kind).canonical() }),
        json!({ "name": "status", "valueCode": r.status.code() }),
        json!({ "name": "type", "valueCode": kind }),
        json!({ "name": "events-since-subscription-start", "valueString": since.to_string() }),
    ];
    for n in events {
        let mut part = vec![
            json!({ "name": "event-number", "valueString": n.number.to_string() }),
            json!({ "name": "timestamp", "valueInstant": instant(n.at_ms) }),
        ];
        if r.content != Content::Empty
            && let Some(focus) = ketenbus_connectors::fhir::emit::served(&n.event)
                .ok()
                .and_then(|s| s.focus)
        {
            part.push(json!({ "name": "focus", "valueReference": { "reference": format!("{base}/{focus}") } }));
        }
        parameter.push(json!({ "name": "notification-event", "part": part }));
    }
    if let Some(e) = &r.error {
        parameter.push(json!({ "name": "error", "valueCodeableConcept": { "text": e } }));
    }
    json!({
        "resourceType": "Parameters",
        "id": new_uuid().to_string(),
        "meta": { "profile": [PROFILE_STATUS] },
        "parameter": parameter,
    })
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    let mut entry = vec![json!({
        "fullUrl": format!("urn:uuid:{}", new_uuid()),
        "resource": status(base, r, kind, since, events),
        "request": { "method": "GET", "url": format!("{base}/Subscription/{}/$status", r.id) },
        "response": { "status": "200" },
    })];
    if content != Content::Empty {
        for n in events {
            for (tid, resource) in resources(&n.event) {
                let mut e = json!({
                    "fullUrl": format!("{base}/{tid}"),
                    "request": { "method": "PUT", "url": tid },
                    "response": { "status": "200" },
                });
                if content == Content::FullResource {
                    e["resource"] = resource;
                }
                entry.push(e);
            }
        }
    }
    json!({
        "resourceType": "Bundle",
        "id": new_uuid().to_string(),
        "type": "history",
        "timestamp": instant(now),
        "entry": entry,
    })
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
