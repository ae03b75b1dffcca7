//! A client's `Subscription` checked into a [`Registration`], and a registration written
//! back as a Backport `Subscription`. Sans-IO: JSON in, values out.

use serde_json::{Value, json};

use super::topic::{FILTERS, Topic};
use super::{
    Content, EXT_CONTENT, EXT_FILTER, EXT_HEARTBEAT, EXT_MAX_COUNT, EXT_TIMEOUT,
    PROFILE_SUBSCRIPTION, Registration, Status,
};

/// Why a Subscription is refused: the HTTP status and what the OperationOutcome says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// `OperationOutcome.issue.code`.
    pub code: &'static str,
    /// What is wrong (names elements, never values of patient data).
    pub text: String,
    /// The element (FHIRPath-ish) it is about.
    pub at: Option<&'static str>,
}

impl Refusal {
    /// A refusal with status `status`.
    #[must_use]
    pub fn new(status: u16, code: &'static str, text: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            text: text.into(),
            at: None,
        }
    }

    /// The element the refusal names.
    #[must_use]
    pub fn at(mut self, at: &'static str) -> Refusal {
        self.at = Some(at);
        self
    }
}

fn invalid(text: impl Into<String>, at: &'static str) -> Refusal {
    Refusal::new(422, "invalid", text).at(at)
}

/// What a client asked for, checked; the server's parts (id, owner, error) left empty.
///
/// `limits`: the longest timeout in seconds and the shortest heartbeat period in seconds.
///
/// # Errors
/// [`Refusal`] naming the element that is wrong.
pub fn registration(body: &Value, limits: (u32, u32)) -> Result<Registration, Refusal> {
    let (max_timeout, min_heartbeat) = limits;
    if body.get("resourceType").and_then(Value::as_str) != Some("Subscription") {
        return Err(
            Refusal::new(400, "invalid", "the body is not a Subscription").at("resourceType"),
        );
    }
    let criteria = body
        .get("criteria")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "criteria is required: a topic canonical",
                "Subscription.criteria",
            )
        })?;
    let topic = Topic::by_canonical(criteria).ok_or_else(|| {
        Refusal::new(
            422,
            "not-supported",
            "criteria names no topic of this server: GET /fhir/Basic?code=SubscriptionTopic lists them",
        )
        .at("Subscription.criteria")
    })?;
    let (receiver, senders) = filters(body)?;
    let channel = body
        .get("channel")
        .ok_or_else(|| invalid("channel is required", "Subscription.channel"))?;
    if channel.get("type").and_then(Value::as_str) != Some("rest-hook") {
        return Err(Refusal::new(
            422,
            "not-supported",
            "only channel type rest-hook is served",
        )
        .at("Subscription.channel.type"));
    }
    let endpoint = channel
        .get("endpoint")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "channel.endpoint is required",
                "Subscription.channel.endpoint",
            )
        })?;
    crate::deliver::sink::endpoint_url(endpoint, false).map_err(|m| {
        invalid(
            format!("channel.endpoint: {m}"),
            "Subscription.channel.endpoint",
        )
    })?;
    match channel.get("payload").and_then(Value::as_str) {
        None | Some("application/fhir+json" | "application/json") => {}
        Some(_) => {
            return Err(Refusal::new(
                422,
                "not-supported",
                "channel.payload: notifications are sent as application/fhir+json",
            )
            .at("Subscription.channel.payload"));
        }
    }
    let content = match extension(channel.get("_payload"), EXT_CONTENT) {
        None => Content::IdOnly,
        Some(e) => e
            .get("valueCode")
            .and_then(Value::as_str)
            .and_then(Content::parse)
            .ok_or_else(|| {
                invalid(
                    "backport-payload-content must be empty, id-only or full-resource",
                    "Subscription.channel.payload",
                )
            })?,
    };
    let number = |url: &str, key: &str, at: &'static str| -> Result<Option<u32>, Refusal> {
        match extension(Some(channel), url) {
            None => Ok(None),
            Some(e) => e
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| invalid(format!("{key} must be a whole number"), at)),
        }
    };
    let heartbeat = number(
        EXT_HEARTBEAT,
        "valueUnsignedInt",
        "Subscription.channel.extension",
    )?;
    if let Some(h) = heartbeat
        && h < min_heartbeat
    {
        return Err(invalid(
            format!("backport-heartbeat-period must be at least {min_heartbeat} seconds"),
            "Subscription.channel.extension",
        ));
    }
    let timeout = number(
        EXT_TIMEOUT,
        "valueUnsignedInt",
        "Subscription.channel.extension",
    )?
    .unwrap_or(max_timeout);
    if timeout == 0 || timeout > max_timeout {
        return Err(invalid(
            format!("backport-timeout must be between 1 and {max_timeout} seconds"),
            "Subscription.channel.extension",
        ));
    }
    let max_count = number(
        EXT_MAX_COUNT,
        "valuePositiveInt",
        "Subscription.channel.extension",
    )?
    .unwrap_or(1);
    if max_count == 0 {
        return Err(invalid(
            "backport-max-count must be at least 1",
            "Subscription.channel.extension",
        ));
    }
    let mut headers = Vec::new();
    if let Some(list) = channel.get("header") {
        for h in list.as_array().into_iter().flatten() {
            let text = h.as_str().unwrap_or_default();
            let ok = text.split_once(':').is_some_and(|(name, value)| {
                reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).is_ok()
                    && reqwest::header::HeaderValue::from_str(value.trim()).is_ok()
            });
            if !ok {
                return Err(invalid(
                    "channel.header entries are 'Name: value'",
                    "Subscription.channel.header",
                ));
            }
            headers.push(text.to_owned());
        }
    }
    let status = match body.get("status").and_then(Value::as_str) {
        None | Some("requested" | "active") => Status::Requested,
        Some("off") => Status::Off,
        Some(_) => {
            return Err(invalid(
                "status may be requested, active or off",
                "Subscription.status",
            ));
        }
    };
    Ok(Registration {
        id: String::new(),
        kind: topic.kind,
        receiver,
        senders,
        endpoint: endpoint.to_owned(),
        content,
        headers,
        heartbeat_secs: heartbeat,
        timeout_secs: timeout,
        max_count,
        reason: body
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        end: body.get("end").and_then(Value::as_str).map(str::to_owned),
        status,
        error: None,
        owner: String::new(),
    })
}

/// The extension with `url` among `holder.extension`.
fn extension<'a>(holder: Option<&'a Value>, url: &str) -> Option<&'a Value> {
    holder?
        .get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

/// A filter's party id (`scheme:value`).
fn party(value: &str) -> Result<String, Refusal> {
    let value = value.trim();
    if value.is_empty() || !value.contains(':') {
        return Err(invalid(
            "a filter value is a party id (scheme:value)",
            "Subscription.criteria.extension",
        ));
    }
    Ok(value.to_owned())
}

/// The receiver (exactly one) and senders of the `backport-filter-criteria` extensions.
/// Each is `[Type?]name=value` (or `[Type.]name=value`), several joined by `&`.
fn filters(body: &Value) -> Result<(String, Vec<String>), Refusal> {
    const AT: &str = "Subscription.criteria.extension";
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    let list = body
        .get("_criteria")
        .and_then(|c| c.get("extension"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for e in list {
        if e.get("url").and_then(Value::as_str) != Some(EXT_FILTER) {
            continue;
        }
        let text = e
            .get("valueString")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("backport-filter-criteria takes a valueString", AT))?;
        let query = text.split_once('?').map_or(text, |(_, q)| q);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid("a filter is name=value", AT))?;
            let name = name.rsplit('.').next().unwrap_or(name);
            match name {
                "receiver" => receivers.push(party(value)?),
                "sender" => senders.push(party(value)?),
                _ => {
                    let known: Vec<&str> = FILTERS.iter().map(|(n, _)| *n).collect();
                    return Err(Refusal::new(
                        422,
                        "not-supported",
                        format!(
                            "unknown filter parameter; the topics filter by {}",
                            known.join(", ")
                        ),
                    )
                    .at(AT));
                }
            }
        }
    }
    match receivers.as_slice() {
        [one] => Ok((one.clone(), senders)),
        [] => Err(invalid(
            "a receiver filter is required (backport-filter-criteria receiver=<party id>)",
            AT,
        )),
        _ => Err(invalid("one receiver filter per Subscription", AT)),
    }
}

/// The registration as a Backport `Subscription`.
#[must_use]
pub fn subscription(r: &Registration) -> Value {
    let topic = Topic::of(r.kind);
    let mut criteria_ext = vec![json!({
        "url": EXT_FILTER,
        "valueString": format!("{}?receiver={}", topic.focus, r.receiver),
    })];
    for s in &r.senders {
        criteria_ext.push(json!({
            "url": EXT_FILTER,
            "valueString": format!("{}?sender={s}", topic.focus),
        }));
    }
    let mut channel_ext = vec![
        json!({ "url": EXT_TIMEOUT, "valueUnsignedInt": r.timeout_secs }),
        json!({ "url": EXT_MAX_COUNT, "valuePositiveInt": r.max_count }),
    ];
    if let Some(h) = r.heartbeat_secs {
        channel_ext.insert(0, json!({ "url": EXT_HEARTBEAT, "valueUnsignedInt": h }));
    }
    let mut channel = json!({
        "extension": channel_ext,
        "type": "rest-hook",
        "endpoint": r.endpoint,
        "payload": "application/fhir+json",
        "_payload": { "extension": [{ "url": EXT_CONTENT, "valueCode": r.content.code() }] },
    });
    if !r.headers.is_empty() {
        // Masked: they carry the subscriber's credentials (see `seal`).
        let shown: Vec<String> = r.headers.iter().map(|h| super::seal::masked(h)).collect();
        channel["header"] = json!(shown);
    }
    let mut s = json!({
        "resourceType": "Subscription",
        "id": r.id,
        "meta": { "profile": [PROFILE_SUBSCRIPTION] },
        "status": r.status.code(),
        "reason": if r.reason.is_empty() { "ketenbus notifications" } else { r.reason.as_str() },
        "criteria": topic.canonical(),
        "_criteria": { "extension": criteria_ext },
        "channel": channel,
    });
    if let Some(end) = &r.end {
        s["end"] = json!(end);
    }
    if let Some(e) = &r.error {
        s["error"] = json!(e);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(endpoint: &str, filter: &str) -> Value {
        json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "test",
            "criteria": "urn:ketenbus:fhir:SubscriptionTopic:acute-handover",
            "_criteria": { "extension": [{ "url": EXT_FILTER, "valueString": filter }] },
            "channel": {
                "extension": [{ "url": EXT_HEARTBEAT, "valueUnsignedInt": 5 }],
                "type": "rest-hook",
                "endpoint": endpoint,
                "payload": "application/fhir+json",
                "_payload": { "extension": [{ "url": EXT_CONTENT, "valueCode": "full-resource" }] },
            },
        })
    }

    #[test]
    fn a_subscription_round_trips_through_its_registration() {
        let r = registration(
            &body(
                "https://hap.example.test/notify",
                "ServiceRequest?receiver=agb:01234567&sender=ura:1",
            ),
            (30, 1),
        )
        .unwrap();
        assert_eq!(r.receiver, "agb:01234567");
        assert_eq!(r.senders, vec!["ura:1".to_owned()]);
        assert_eq!(r.content, Content::FullResource);
        assert_eq!(r.heartbeat_secs, Some(5));
        assert_eq!(r.timeout_secs, 30);
        let again = registration(&subscription(&r), (30, 1)).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn refusals_name_the_element() {
        let limits = (30, 1);
        let e =
            registration(&body("http://hap.example.test/n", "receiver=agb:1"), limits).unwrap_err();
        assert_eq!(e.at, Some("Subscription.channel.endpoint"));
        assert!(registration(&body("http://127.0.0.1:9/n", "receiver=agb:1"), limits).is_ok());
        let e = registration(&body("https://h.test/n", "patient=123"), limits).unwrap_err();
        assert_eq!(e.code, "not-supported");
        let e = registration(&body("https://h.test/n", "sender=agb:1"), limits).unwrap_err();
        assert!(e.text.contains("receiver filter is required"), "{e}");
        let mut b = body("https://h.test/n", "receiver=agb:1");
        b["criteria"] = json!("http://example.org/SubscriptionTopic/other");
        assert_eq!(
            registration(&b, limits).unwrap_err().at,
            Some("Subscription.criteria")
        );
        let mut b = body("https://h.test/n", "receiver=agb:1");
        b["channel"]["extension"][0]["valueUnsignedInt"] = json!(0);
        assert!(
            registration(&b, limits).is_err(),
            "heartbeat below the minimum"
        );
    }
}
