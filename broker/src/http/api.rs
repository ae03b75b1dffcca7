//! The REST API: message ingest, lineage, health.
//!
//! `POST /api/v1/messages` answers `202` only after the envelope is durable on the raw topic.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ketenbus_connectors::IngestError;
use ketenbus_connectors::party;
use ketenbus_schemas::{Format, RawEnvelope};
use serde_json::json;

use crate::http::auth::PatientSearched;
use crate::http::idempotency::{
    NotTaken, Payload, SpooledBody, idempotency_key, idempotency_refusal,
};
use crate::http::state::ApiState;
use crate::observe::lineage::{BadParameter, ListQuery};
use ketenbus_schemas::event::{Identifier, systems};
use ketenbus_schemas::now_ms;

/// The REST routes: messages, lineage, health.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/messages", post(post_message))
        .route("/api/v1/messages", get(list_messages))
        .route("/api/v1/messages/{id}", get(get_message))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Largest body whose parties are read on the ingest thread itself rather than the blocking
/// pool: reading 16 KiB takes about as long as the handoff.
const INLINE_READ: usize = 16 * 1024;

/// Most body MiB whose parties are being read at once. Reading a mail's parties parses it
/// whole, base64 attachments decoded (three quarters of its size again, held until the read
/// ends): four 25 MiB letters read side by side held 75 MiB of decoded PDFs on top of their
/// bodies. A body past [`INLINE_READ`] takes a permit per MiB (at most all of them, in
/// turn), so large ones are read one after another and smaller ones beside them.
const READING_MIB: u32 = 32;
static READING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(READING_MIB as usize);

fn problem(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

async fn post_message(
    State(st): State<Arc<ApiState>>,
    authenticated: Option<axum::Extension<crate::http::auth::AuthenticatedSender>>,
    spooled: Option<axum::Extension<SpooledBody>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(format) = Format::from_media_type(content_type) else {
        crate::observe::metrics::rejected("http", "unsupported_media_type");
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/EDIFACT, application/fhir+json, application/fhir+xml or message/rfc822",
        );
    };
    let body = match (spooled, body) {
        (Some(axum::Extension(SpooledBody(s))), _) => Payload::Spooled(s),
        (None, Ok(b)) => Payload::Held(b),
        (None, Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return too_large(st.max_body);
        }
        (None, Err(e)) => return problem(e.status(), "unreadable_body", &e.body_text()),
    };
    if body.is_empty() {
        crate::observe::metrics::rejected("http", "empty_body");
        return problem(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "the message body is empty",
        );
    }
    if body.len() > st.max_body {
        return too_large(st.max_body);
    }
    // One read of what the message declares (off the async workers: it may be large) gives
    // the parties for the envelope and, for an authenticated sender, the check that it posts
    // only in the name of its own parties.
    let declared = match &body {
        // Small: read here, on the ingest pool (a handoff costs more than the read).
        Payload::Held(b) if b.len() <= INLINE_READ => party::declared(format, b),
        _ => {
            let mib = u32::try_from(body.len().div_ceil(1 << 20))
                .unwrap_or(u32::MAX)
                .min(READING_MIB);
            let _reading = READING
                .acquire_many(mib)
                .await
                .expect("the semaphore is never closed");
            let read = match &body {
                Payload::Held(b) => {
                    let b = b.clone();
                    tokio::task::spawn_blocking(move || Ok(party::declared(format, &b))).await
                }
                Payload::Spooled(s) => {
                    let s = Arc::clone(s);
                    tokio::task::spawn_blocking(move || {
                        s.read().map(|b| party::declared(format, &b))
                    })
                    .await
                }
            };
            match read
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "reading the message's parties failed");
                    return problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "ingest_failed",
                        "the message could not be read",
                    );
                }
            }
        }
    };
    let mut attributes = BTreeMap::new();
    let mut scope = "anonymous".to_owned();
    let sender = match authenticated {
        Some(axum::Extension(s)) => {
            attributes.insert("authenticated_sender".to_owned(), s.0.name.clone());
            scope.clone_from(&s.0.name);
            match s.check(&declared) {
                Ok(party) => party,
                Err(e) => return crate::http::auth::sender_mismatch(&e),
            }
        }
        None => declared.sender().map(str::to_owned),
    };
    // A retry with the same Idempotency-Key gets the first answer's id.
    let receiver = declared.receiver().map(str::to_owned);
    let taken = st
        .idempotency
        .accept_once(
            st.ingest.as_ref(),
            idempotency_key(&headers),
            &scope,
            body,
            |id, body| RawEnvelope {
                id,
                received_at_ms: now_ms(),
                connector: "http".into(),
                format,
                content_type: content_type.to_owned(),
                sender,
                receiver,
                body,
                attributes,
            },
        )
        .await;
    match taken {
        Ok(id) => accepted(&id),
        Err(NotTaken::Key(e)) => {
            let (status, code) = idempotency_refusal(&e);
            problem(status, code, &e.to_string())
        }
        Err(NotTaken::Ingest(IngestError::Unavailable(e))) => unavailable(&e),
        Err(NotTaken::Ingest(IngestError::Refused {
            reason: "too_large",
            ..
        })) => too_large(st.max_body),
        Err(NotTaken::Ingest(e)) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ingest_failed",
            &e.to_string(),
        ),
    }
}

/// `202 {"id","location"}` with `Location`.
fn accepted(id: &str) -> Response {
    let location = format!("/api/v1/messages/{id}");
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "location": location })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// `413` for a message past `http.max_body` (`max` bytes).
pub(crate) fn too_large(max: usize) -> Response {
    crate::observe::metrics::rejected("http", "too_large");
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        &format!("the message is larger than {max} bytes (http.max_body)"),
    )
}

fn unavailable(e: &str) -> Response {
    tracing::warn!(error = %e, "ingest refused: log unavailable");
    let mut resp = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "log_unavailable",
        "the log cannot take the message now; retry later",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Header that may carry the BSN of a search by patient instead of the `patient` query
/// parameter, so it stays out of URLs (proxy logs, browser history).
pub const PATIENT_HEADER: &str = "ketenbus-patient";

async fn list_messages(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let Query(mut q) = match query {
        Ok(q) => q,
        Err(e) => return problem(StatusCode::BAD_REQUEST, "bad_query", &e.body_text()),
    };
    if let Some(h) = headers.get(PATIENT_HEADER) {
        if q.patient.is_some() {
            return bad_parameter(&BadParameter {
                parameter: "patient",
                message: format!(
                    "give it as the query parameter or the {PATIENT_HEADER} header, not both"
                ),
                allowed: Vec::new(),
            });
        }
        q.patient = Some(h.to_str().unwrap_or_default().to_owned());
    }
    search(&st, q).await
}

/// One page of the messages matching `q`, a search by patient with [`PatientSearched`] on
/// its answer: `GET /api/v1/messages` and the console's search (which takes the filters in a
/// request body, so a patient's BSN is never in a URL).
pub(crate) async fn search(st: &ApiState, q: ListQuery) -> Response {
    let mut patient = None;
    let search = q.check(|bsn| {
        let key = st.keyer.key_of(&Identifier {
            system: systems::BSN.into(),
            value: bsn.to_owned(),
        });
        patient = Some(key.clone());
        key
    });
    let search = match search {
        Ok(s) => s,
        Err(e) => return bad_parameter(&e),
    };
    match st.lineage.list(search).await {
        Ok(page) => {
            let mut resp = Json(page).into_response();
            if let Some(p) = patient {
                // The gate writes the audit record of this read of the patient.
                resp.extensions_mut().insert(PatientSearched(p));
            }
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "searching the lineage index failed");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "lineage",
                "the lineage index cannot be read",
            )
        }
    }
}

/// `400 {"error": "bad_query", "parameter", "message", "allowed"}`.
fn bad_parameter(e: &BadParameter) -> Response {
    let mut body =
        json!({ "error": "bad_query", "parameter": e.parameter, "message": e.to_string() });
    if !e.allowed.is_empty() {
        body["allowed"] = json!(e.allowed);
    }
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

async fn get_message(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match st.lineage.get(&id).await {
        Ok(Some(l)) => Json(l).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "not_found",
            "no message with that id",
        ),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "lineage", &e.to_string()),
    }
}

async fn healthz(State(st): State<Arc<ApiState>>) -> Response {
    let status = if st.health.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "healthy": status == StatusCode::OK, "components": st.health.snapshot() })),
    )
        .into_response()
}

async fn readyz(State(st): State<Arc<ApiState>>) -> Response {
    let status = if st.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": status == StatusCode::OK, "components": st.health.snapshot() })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    //! The search filters through the router and the gate, on a real lineage index.
    #![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

    use std::time::Duration;

    use ketenbus_schemas::lineage::{Stage, StepOutcome};
    use serde_json::Value;

    use super::*;
    use crate::bus::embedded::{EmbeddedBus, EmbeddedConfig};
    use crate::bus::{Bus, TopicSpec};
    use crate::ingest::BusIngest;
    use crate::observe::audit::{Audit, AuditKey};
    use crate::observe::health::Health;
    use crate::observe::lineage::{Lineage, Received, Step};
    use crate::route::keys::PatientKeyer;

    const SECRET: &[u8] = b"search-test-secret-0123456789";

    /// A BSN that passes the eleven-test, from eight digits.
    fn bsn(seed: u32) -> String {
        (seed..)
            .find_map(|n| {
                let first8 = format!("{:08}", 99_990_000 + n % 10_000);
                ketenbus_connectors::zib::bsn_check_digit(&first8).map(|c| format!("{first8}{c}"))
            })
            .unwrap()
    }

    fn pseudonym(bsn: &str) -> String {
        PatientKeyer::new(SECRET.to_vec()).key_of(&Identifier {
            system: systems::BSN.into(),
            value: bsn.into(),
        })
    }

    struct Api {
        base: String,
        lineage: Lineage,
        dir: tempfile::TempDir,
        client: reqwest::Client,
    }

    async fn api() -> Api {
        api_with(&[]).await
    }

    async fn api_with(operators: &[crate::http::auth::OperatorConfig]) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        bus.ensure_topics(&[TopicSpec {
            name: ketenbus_schemas::topics::RAW.into(),
            partitions: 1,
        }])
        .await
        .unwrap();
        let lineage = Lineage::open(dir.path()).unwrap();
        let state = Arc::new(ApiState {
            ingest: Arc::new(BusIngest::new(
                Arc::clone(&bus),
                lineage.clone(),
                Duration::from_secs(5),
            )),
            lineage: lineage.clone(),
            idempotency: crate::http::idempotency::Idempotency::open(dir.path()).unwrap(),
            health: Arc::new(Health::default()),
            max_body: 1 << 20,
            keyer: PatientKeyer::new(SECRET.to_vec()),
            mitz: None,
            pull: None,
            resources: None,
        });
        let audit = Audit::open(dir.path(), AuditKey::new(vec![7; 32]).unwrap()).unwrap();
        let app = crate::http::auth::protect(
            crate::http::router(state),
            crate::http::auth::Authenticator::new(&[], operators),
            Some(audit),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Api {
            base: format!("http://{addr}"),
            lineage,
            dir,
            client: reqwest::Client::new(),
        }
    }

    impl Api {
        async fn get(&self, query: &str) -> (u16, Value) {
            let resp = self
                .client
                .get(format!("{}/api/v1/messages?{query}", self.base))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (
                status,
                serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap(),
            )
        }

        /// The audit trail, and its records of searches by patient.
        fn patient_searches(&self) -> (String, Vec<Value>) {
            let audit = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap();
            let searches = audit
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|r| r["action"] == "patient_search")
                .collect();
            (audit, searches)
        }

        /// Ids of every page of `query`, walking the cursor with pages of `limit`.
        async fn ids(&self, query: &str, limit: u32) -> Vec<String> {
            let mut out = Vec::new();
            let mut after = String::new();
            loop {
                let (status, page) = self.get(&format!("{query}&limit={limit}{after}")).await;
                assert_eq!(status, 200, "{query}: {page}");
                let items = page["items"].as_array().unwrap();
                assert!(items.len() <= limit as usize);
                out.extend(items.iter().map(|m| m["id"].as_str().unwrap().to_owned()));
                match page["next"].as_str() {
                    Some(next) => after = format!("&after={next}"),
                    None => return out,
                }
            }
        }
    }

    /// What one synthetic message goes through.
    struct Msg {
        id: &'static str,
        at: i64,
        connector: &'static str,
        format: &'static str,
        sender: Option<&'static str>,
        receiver: Option<&'static str>,
        source_id: Option<&'static str>,
        /// Events made: (kind, patient BSN).
        events: Vec<(&'static str, Option<String>)>,
        /// Delivery outcomes in order: (subscription, outcome).
        deliveries: Vec<(&'static str, StepOutcome)>,
        rejected: bool,
    }

    async fn record(lineage: &Lineage, m: &Msg) {
        lineage
            .received(Received {
                id: m.id.into(),
                received_at_ms: m.at,
                connector: m.connector.into(),
                format: m.format.into(),
                content_type: "application/EDIFACT".into(),
                size: 100,
                sender: m.sender.map(Into::into),
                receiver: m.receiver.map(Into::into),
                raw: Some(crate::bus::Position {
                    partition: 0,
                    offset: 0,
                }),
                source_id: m.source_id.map(Into::into),
                file: None,
            })
            .await;
        if m.rejected {
            let step = Step::new(m.at + 1, Stage::Normalise, StepOutcome::Rejected);
            lineage.step(m.id, step).await;
        }
        for (i, (kind, patient)) in m.events.iter().enumerate() {
            let mut step = Step::new(m.at + 1, Stage::Normalised, StepOutcome::Normalised);
            step.record_id = Some(format!("{}-ev{i}", m.id));
            step.kind = Some((*kind).into());
            step.patient = patient.as_deref().map(pseudonym);
            lineage.step(m.id, step).await;
        }
        for (n, (sub, outcome)) in m.deliveries.iter().enumerate() {
            let stage = if *outcome == StepOutcome::DeadLettered {
                Stage::DeadLettered
            } else {
                Stage::Delivery
            };
            let mut step = Step::new(m.at + 2 + n as i64, stage, *outcome);
            step.subscription = Some((*sub).into());
            step.record_id = Some(format!("{}-ev0", m.id));
            step.attempt = Some(1);
            lineage.step(m.id, step).await;
        }
    }

    fn msg(id: &'static str, at: i64) -> Msg {
        Msg {
            id,
            at,
            connector: "http",
            format: "edifact",
            sender: Some("mailbox:500001111"),
            receiver: Some("mailbox:500002222"),
            source_id: None,
            events: Vec::new(),
            deliveries: Vec::new(),
            rejected: false,
        }
    }

    #[tokio::test]
    async fn each_filter_finds_what_matches_and_nothing_else() {
        let api = api().await;
        let (p1, p2) = (bsn(1), bsn(500));
        let messages = vec![
            Msg {
                source_id: Some("IC0001"),
                events: vec![("lab_result", Some(p1.clone()))],
                deliveries: vec![("gp", StepOutcome::Delivered)],
                ..msg("m1", 1_764_000_001_000)
            },
            Msg {
                connector: "smtp",
                format: "rfc822",
                sender: Some("mail:lab@example.org"),
                source_id: Some("abc@example.org"),
                events: vec![("letter", Some(p2.clone()))],
                deliveries: vec![
                    ("gp", StepOutcome::Retrying),
                    ("gp", StepOutcome::DeadLettered),
                ],
                ..msg("m2", 1_764_000_002_000)
            },
            Msg {
                connector: "inbox",
                format: "fhir_json",
                receiver: Some("ura:00001234"),
                ..msg("m3", 1_764_000_003_000)
            },
            Msg {
                events: vec![("lab_result", Some(p1.clone())), ("letter", None)],
                deliveries: vec![
                    ("gp", StepOutcome::Retrying),
                    ("archive", StepOutcome::Delivered),
                ],
                ..msg("m4", 1_764_000_004_000)
            },
            Msg {
                rejected: true,
                ..msg("m5", 1_764_000_005_000)
            },
            Msg {
                events: vec![("lab_result", None)],
                deliveries: vec![("gp", StepOutcome::Filtered)],
                ..msg("m6", 1_764_000_006_000)
            },
        ];
        for m in &messages {
            record(&api.lineage, m).await;
        }
        let cases: Vec<(String, &[&str])> = vec![
            (
                "sender=mailbox:500001111".into(),
                &["m6", "m5", "m4", "m3", "m1"],
            ),
            ("sender=mail:lab@example.org".into(), &["m2"]),
            ("receiver=ura:00001234".into(), &["m3"]),
            ("kind=lab_result".into(), &["m6", "m4", "m1"]),
            ("kind=letter".into(), &["m4", "m2"]),
            ("kind=acute_handover".into(), &[]),
            ("connector=smtp".into(), &["m2"]),
            ("format=fhir_json".into(), &["m3"]),
            ("status=received".into(), &["m3"]),
            ("status=normalised".into(), &["m6"]),
            ("status=delivered".into(), &["m1"]),
            ("status=pending".into(), &["m4"]),
            ("status=failed".into(), &["m5"]),
            ("status=dead_lettered".into(), &["m2"]),
            ("subscription=gp".into(), &["m4", "m2", "m1"]),
            ("subscription=archive".into(), &["m4"]),
            ("subscription=gp&status=pending".into(), &["m4"]),
            ("subscription=archive&status=delivered".into(), &["m4"]),
            ("subscription=gp&status=delivered".into(), &["m1"]),
            (
                "since=2025-11-24T16:00:03Z".into(),
                &["m6", "m5", "m4", "m3"],
            ),
            ("until=2025-11-24T16:00:02Z".into(), &["m2", "m1"]),
            (
                "since=2025-11-24T16:00:02Z&until=2025-11-24T16:00:04Z".into(),
                &["m4", "m3", "m2"],
            ),
            ("source_id=IC0001".into(), &["m1"]),
            ("source_id=abc@example.org".into(), &["m2"]),
            (format!("patient={p1}"), &["m4", "m1"]),
            (format!("patient={p2}"), &["m2"]),
            (format!("patient={}", bsn(900)), &[]),
            (format!("patient={p1}&kind=letter"), &["m4"]),
            (format!("patient={p1}&status=delivered"), &["m1"]),
            (
                "sender=mailbox:500001111&connector=inbox&format=fhir_json".into(),
                &["m3"],
            ),
            ("sender=mailbox:500001111&connector=smtp".into(), &[]),
            // Pairs of connector, format and kind are facets of their own.
            ("connector=smtp&format=rfc822".into(), &["m2"]),
            ("connector=smtp&format=edifact".into(), &[]),
            ("connector=http&kind=letter".into(), &["m4"]),
            ("format=edifact&kind=lab_result".into(), &["m6", "m4", "m1"]),
            (
                "connector=http&format=edifact&kind=lab_result".into(),
                &["m6", "m4", "m1"],
            ),
            ("connector=inbox&kind=lab_result".into(), &[]),
        ];
        for (query, want) in cases {
            assert_eq!(api.ids(&query, 100).await, want, "{query}");
            assert_eq!(api.ids(&query, 1).await, want, "{query}, one a page");
        }
        // The patient could be given in a header instead of the URL.
        let resp = api
            .client
            .get(format!("{}/api/v1/messages", api.base))
            .header(PATIENT_HEADER, &p2)
            .send()
            .await
            .unwrap();
        let page: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(page["items"][0]["id"], "m2", "{page}");
        assert_eq!(page["items"][0]["source_id"], "abc@example.org");
        // Each search by patient is a read of that patient in the audit trail, by pseudonym.
        let (audit, searches) = api.patient_searches();
        assert!(
            searches
                .iter()
                .any(|r| r["patient"] == pseudonym(&p1).as_str()),
            "{audit}"
        );
        assert!(
            searches
                .iter()
                .any(|r| r["patient"] == pseudonym(&p2).as_str()),
            "{audit}"
        );
        assert!(
            !audit.contains(&p1) && !audit.contains(&p2),
            "no BSN in the trail"
        );
        let db = std::fs::read(api.dir.path().join("lineage.db")).unwrap();
        for p in [&p1, &p2] {
            assert!(
                !db.windows(p.len()).any(|w| w == p.as_bytes()),
                "no BSN in lineage.db"
            );
        }
    }

    #[tokio::test]
    async fn status_follows_the_latest_outcome() {
        let api = api().await;
        let mut m = Msg {
            events: vec![("lab_result", None)],
            deliveries: vec![("gp", StepOutcome::Retrying)],
            ..msg("m1", 1_764_000_001_000)
        };
        record(&api.lineage, &m).await;
        assert_eq!(api.ids("status=pending", 10).await, ["m1"]);
        // Delivered on the next attempt: no longer pending.
        m.deliveries = vec![("gp", StepOutcome::Delivered)];
        m.events.clear();
        let mut step = Step::new(m.at + 10, Stage::Delivery, StepOutcome::Delivered);
        step.subscription = Some("gp".into());
        step.record_id = Some("m1-ev0".into());
        api.lineage.step("m1", step).await;
        assert!(api.ids("status=pending", 10).await.is_empty());
        assert_eq!(api.ids("status=delivered", 10).await, ["m1"]);
    }

    /// Steps may reach the index before their message does (lineage carried on a topic).
    #[tokio::test]
    async fn steps_that_arrive_before_their_message_are_found_with_it() {
        let api = api().await;
        let mut step = Step::new(
            1_764_000_001_500,
            Stage::Normalised,
            StepOutcome::Normalised,
        );
        step.record_id = Some("late-ev0".into());
        step.kind = Some("letter".into());
        api.lineage.step("late", step).await;
        assert!(api.ids("kind=letter", 10).await.is_empty());
        record(&api.lineage, &msg("late", 1_764_000_001_000)).await;
        assert_eq!(api.ids("kind=letter", 10).await, ["late"]);
        assert_eq!(api.ids("status=normalised", 10).await, ["late"]);
    }

    #[tokio::test]
    async fn paging_with_filters_walks_every_match_once() {
        let api = api().await;
        let mut want = Vec::new();
        for i in 0..57_i64 {
            let id: &'static str = Box::leak(format!("m{i:03}").into_boxed_str());
            // Two messages share each time, so the cursor must break ties by id.
            let mut m = msg(id, 1_764_000_000_000 + i / 2 * 1000);
            if i % 3 == 0 {
                m.connector = "smtp";
                want.push(id.to_owned());
            }
            record(&api.lineage, &m).await;
        }
        want.sort_by(|a, b| b.cmp(a));
        for limit in [1, 4, 7, 19, 1000] {
            assert_eq!(
                api.ids("connector=smtp", limit).await,
                want,
                "limit {limit}"
            );
        }
        let all = api.ids("", 10).await;
        assert_eq!(all.len(), 57);
        assert!(
            all.windows(2).all(|w| w[0] > w[1]),
            "newest first, each once"
        );
    }

    #[tokio::test]
    async fn only_operators_search_and_each_search_by_patient_names_the_operator() {
        let (token, hash) = crate::http::auth::new_token();
        let api = api_with(&[crate::http::auth::OperatorConfig {
            name: "alice".into(),
            token_sha256: Some(hash),
            cert_sha256: None,
        }])
        .await;
        record(
            &api.lineage,
            &Msg {
                events: vec![("lab_result", Some(bsn(3)))],
                ..msg("m1", 1_764_000_001_000)
            },
        )
        .await;
        let url = format!("{}/api/v1/messages?patient={}", api.base, bsn(3));
        let anonymous = api.client.get(&url).send().await.unwrap();
        assert_eq!(anonymous.status().as_u16(), 401);
        let resp = api
            .client
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let page: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(page["items"][0]["id"], "m1");
        let (audit, searches) = api.patient_searches();
        assert_eq!(
            searches.len(),
            1,
            "only the operator's search read: {audit}"
        );
        assert_eq!(searches[0]["actor"], "operator:alice");
        assert_eq!(searches[0]["patient"], pseudonym(&bsn(3)).as_str());
    }

    #[tokio::test]
    async fn bad_values_are_refused_naming_the_parameter() {
        let api = api().await;
        let bad_bsn = {
            let good = bsn(7);
            let last = good.as_bytes()[8] - b'0';
            format!("{}{}", &good[..8], (last + 1) % 10)
        };
        for (query, parameter) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("status=bogus", "status"),
            (&*format!("patient={bad_bsn}"), "patient"),
            ("patient=12345678", "patient"),
            ("patient=abcdefghi", "patient"),
            ("since=yesterday", "since"),
            ("until=2026-13-01T00:00:00Z", "until"),
            ("after=nonsense", "after"),
            ("sender=", "sender"),
        ] {
            let (status, body) = api.get(query).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert_eq!(body["parameter"], parameter, "{query}: {body}");
            assert_eq!(body["error"], "bad_query");
            assert!(
                !body.to_string().contains(&bad_bsn),
                "the BSN is not echoed"
            );
        }
        let (_, body) = api.get("status=bogus").await;
        let allowed: Vec<&str> = body["allowed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            allowed,
            [
                "received",
                "normalised",
                "pending",
                "delivered",
                "failed",
                "dead_lettered"
            ]
        );
        let (status, body) = api.get("colour=red").await;
        assert_eq!(status, 400, "unknown parameters are refused: {body}");
        // A refused search by patient reads nothing, so it leaves no read in the trail.
        let audit = std::fs::read_to_string(api.dir.path().join("audit.jsonl")).unwrap_or_default();
        assert!(!audit.contains("patient_search"), "{audit}");
    }
}
