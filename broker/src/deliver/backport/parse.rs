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

/// The system of a patient filter's pseudonym, as a Subscription is read back
/// (`patient:identifier=urn:ketenbus:patient-key|<key>`).
pub const PATIENT_KEY_SYSTEM: &str = "urn:ketenbus:patient-key";

/// What a client asked for, checked; the server's parts (id, owner, error) left empty.
///
/// `limits`: the longest timeout in seconds and the shortest heartbeat period in seconds.
/// `pseudonym`: the patient key of a BSN (a patient filter is kept only as that).
///
/// # Errors
/// [`Refusal`] naming the element that is wrong.
pub fn registration(
    body: &Value,
    limits: (u32, u32),
    pseudonym: &dyn Fn(&str) -> String,
) -> Result<Registration, Refusal> {
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
    let (receiver, senders, patient) = filters(body, pseudonym)?;
    if patient.is_some() && !topic.patient {
        return Err(Refusal::new(
            422,
            "not-supported",
            "this topic's events name no patient: it takes no patient filter",
        )
        .at("Subscription.criteria.extension"));
    }
    let end = match body.get("end") {
        None => None,
        Some(e) => Some(
            e.as_str()
                .filter(|t| t.len() > 10 && crate::deliver::mcsd::instant(t).is_some())
                .ok_or_else(|| {
                    invalid(
                        "end must be an instant (2026-12-01T12:00:00Z)",
                        "Subscription.end",
                    )
                })?
                .to_owned(),
        ),
    };
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
        patient,
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
        end,
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

/// A patient filter's value as its pseudonym: a BSN (`999999990` or
/// `http://fhir.nl/fhir/NamingSystem/bsn|999999990`) through `pseudonym`, or a pseudonym as a
/// Subscription is read back (`urn:ketenbus:patient-key|<key>`). The value is never repeated
/// in a refusal.
fn patient_key(value: &str, pseudonym: &dyn Fn(&str) -> String) -> Result<String, Refusal> {
    let value = value.trim().replace("%7C", "|").replace("%7c", "|");
    if let Some(key) = value.strip_prefix(&format!("{PATIENT_KEY_SYSTEM}|")) {
        if key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(key.to_ascii_lowercase());
        }
        return Err(invalid(
            "a patient key is 32 hexadecimal characters",
            "Subscription.criteria.extension",
        ));
    }
    let bsn = value
        .strip_prefix(&format!("{}|", ketenbus_schemas::event::systems::BSN))
        .unwrap_or(&value);
    if !ketenbus_connectors::zib::bsn_is_valid(bsn) {
        return Err(invalid(
            "a patient filter is a BSN: nine digits that pass the eleven-test",
            "Subscription.criteria.extension",
        ));
    }
    Ok(pseudonym(bsn))
}

/// The checked filters: receiver, senders, patient key.
type Filters = (String, Vec<String>, Option<String>);

/// The receiver (exactly one), senders and patient (at most one, as its pseudonym) of the
/// `backport-filter-criteria` extensions. Each is `[Type?]name=value` (or
/// `[Type.]name=value`), several joined by `&`.
fn filters(body: &Value, pseudonym: &dyn Fn(&str) -> String) -> Result<Filters, Refusal> {
    const AT: &str = "Subscription.criteria.extension";
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    let mut patients = Vec::new();
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
                "patient" | "patient:identifier" => patients.push(patient_key(value, pseudonym)?),
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
    if patients.len() > 1 {
        return Err(invalid("one patient filter per Subscription", AT));
    }
    match receivers.as_slice() {
        [one] => Ok((one.clone(), senders, patients.pop())),
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
    if let Some(p) = &r.patient {
        criteria_ext.push(json!({
            "url": EXT_FILTER,
            "valueString": format!("{}?patient:identifier={PATIENT_KEY_SYSTEM}|{p}", topic.focus),
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

    fn reg(b: &Value, limits: (u32, u32)) -> Result<Registration, Refusal> {
        registration(b, limits, &|bsn| format!("{bsn:0>32}"))
    }

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
        let r = reg(
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
        let again = reg(&subscription(&r), (30, 1)).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn refusals_name_the_element() {
        let limits = (30, 1);
        let e = reg(&body("http://hap.example.test/n", "receiver=agb:1"), limits).unwrap_err();
        assert_eq!(e.at, Some("Subscription.channel.endpoint"));
        assert!(reg(&body("http://127.0.0.1:9/n", "receiver=agb:1"), limits).is_ok());
        let e = reg(&body("https://h.test/n", "colour=red"), limits).unwrap_err();
        assert_eq!(e.code, "not-supported");
        let e = reg(&body("https://h.test/n", "sender=agb:1"), limits).unwrap_err();
        assert!(e.text.contains("receiver filter is required"), "{e}");
        let mut b = body("https://h.test/n", "receiver=agb:1");
        b["criteria"] = json!("http://example.org/SubscriptionTopic/other");
        assert_eq!(
            reg(&b, limits).unwrap_err().at,
            Some("Subscription.criteria")
        );
        let mut b = body("https://h.test/n", "receiver=agb:1");
        b["channel"]["extension"][0]["valueUnsignedInt"] = json!(0);
        assert!(reg(&b, limits).is_err(), "heartbeat below the minimum");
    }

    #[test]
    fn a_patient_filter_is_kept_as_its_pseudonym_only() {
        let limits = (30, 1);
        for filter in [
            "ServiceRequest?receiver=agb:1&patient=999999990",
            "receiver=agb:1&patient:identifier=http://fhir.nl/fhir/NamingSystem/bsn%7C999999990",
        ] {
            let r = reg(&body("https://h.test/n", filter), limits).unwrap();
            assert_eq!(
                r.patient.as_deref(),
                Some("00000000000000000000000999999990")
            );
            let back = subscription(&r);
            assert!(back.to_string().contains(PATIENT_KEY_SYSTEM));
            assert_eq!(reg(&back, limits).unwrap(), r, "read back, put back");
            let kept = serde_json::to_string(&r).unwrap();
            assert!(!kept.contains("\"999999990") && !kept.contains("|999999990"));
        }
        for bad in [
            "patient=999999991",
            "patient=12345",
            "patient=urn:ketenbus:patient-key|zz",
        ] {
            let e = reg(
                &body("https://h.test/n", &format!("receiver=agb:1&{bad}")),
                limits,
            )
            .unwrap_err();
            assert_eq!(e.status, 422, "{bad}");
            assert!(
                !e.text.contains("99999999") && !e.text.contains("12345"),
                "{e}"
            );
        }
        let e = reg(
            &body(
                "https://h.test/n",
                "receiver=agb:1&patient=999999990&patient=123456782",
            ),
            limits,
        )
        .unwrap_err();
        assert!(e.text.contains("one patient filter"), "{e}");
        let mut b = body("https://h.test/n", "receiver=agb:1&patient=999999990");
        b["criteria"] = json!("urn:ketenbus:fhir:SubscriptionTopic:handover-notification");
        assert_eq!(reg(&b, limits).unwrap_err().code, "not-supported");
    }

    #[test]
    fn end_is_an_instant_and_known_when_passed() {
        let limits = (30, 1);
        let mut b = body("https://h.test/n", "receiver=agb:1");
        b["end"] = json!("tomorrow");
        assert_eq!(reg(&b, limits).unwrap_err().at, Some("Subscription.end"));
        b["end"] = json!("2026-12-01T12:00:00Z");
        let r = reg(&b, limits).unwrap();
        let noon = 1_796_126_400_000; // 2026-12-01T12:00:00Z
        assert!(!r.ended(noon - 1));
        assert!(r.ended(noon));
        b["end"] = json!("2026-12-01T13:00:00+01:00");
        assert!(reg(&b, limits).unwrap().ended(noon));
    }
}
