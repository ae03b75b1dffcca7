//! The FHIR R4 endpoints under `/fhir`: `POST /fhir/$process-message` and `POST /fhir`
//! (message, transaction or batch Bundles) and `POST /fhir/{ResourceType}`, in
//! `application/fhir+json` or `application/fhir+xml`; `GET /fhir/metadata`.
//!
//! A message is parsed and mapped with the FHIR normaliser *before* ingest, so the sender
//! hears `400`/`422` with an OperationOutcome naming the element path for what it can fix.
//! Only then is the original body handed to ingest, and the sender hears `202`/`200` only
//! after the envelope is durable (`503` with `Retry-After` when the log cannot take it).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ketenbus_connectors::IngestError;
use ketenbus_connectors::fhir::{self, Object, Value, inbound, outcome};
use ketenbus_connectors::party::{self, Declared};
use ketenbus_schemas::{Format, RawEnvelope};

use crate::http::auth::AuthenticatedSender;
use crate::http::idempotency::NotTaken;
use crate::http::state::ApiState;
use ketenbus_schemas::now_ms;

/// The `/fhir` routes, to merge into the API router (state: the API's).
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/fhir", post_whole(Interaction::Base))
        .route(
            "/fhir/$process-message",
            post_whole(Interaction::ProcessMessage),
        )
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/{resource_type}", post(post_resource))
}

/// Which interaction a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interaction {
    ProcessMessage,
    Base,
    Create,
}

/// The FHIR format of a media type; `application/json` and `application/xml` count too.
fn format_of(content_type: &str) -> Option<Format> {
    if let Some(f) = Format::from_media_type(content_type)
        .filter(|f| matches!(f, Format::FhirJson | Format::FhirXml))
    {
        return Some(f);
    }
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "text/json" => Some(Format::FhirJson),
        "application/xml" | "text/xml" => Some(Format::FhirXml),
        _ => None,
    }
}

/// The answer format: the `Accept` header's if it names one, else the request's.
pub(crate) fn answer_format(headers: &HeaderMap, request: Format) -> Format {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let json = accept.contains("json");
    let xml = accept.contains("xml");
    match (json, xml) {
        (true, false) => Format::FhirJson,
        (false, true) => Format::FhirXml,
        _ => request,
    }
}

pub(crate) fn respond(status: StatusCode, format: Format, body: &Value) -> Response {
    let (bytes, media) = match fhir::write(format, body) {
        Ok(b) if format == Format::FhirXml => (b, fhir::MEDIA_XML),
        Ok(b) => (b, fhir::MEDIA_JSON),
        Err(_) => (fhir::json::to_vec(body), fhir::MEDIA_JSON),
    };
    let mut resp = (status, bytes).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!("{media}; charset=utf-8")).expect("static media type"),
    );
    resp
}

pub(crate) fn issue(
    status: StatusCode,
    format: Format,
    severity: &str,
    code: &str,
    text: &str,
    at: Option<&str>,
) -> Response {
    respond(status, format, &outcome::outcome(severity, code, text, at))
}

/// Who posts, as the gate authenticated them (none when no senders are configured).
type Sender = Option<axum::Extension<AuthenticatedSender>>;

/// A write route without a resource type in its path: `POST /fhir` or
/// `POST /fhir/$process-message`.
fn post_whole(interaction: Interaction) -> axum::routing::MethodRouter<Arc<ApiState>> {
    post(
        move |State(st): State<Arc<ApiState>>, sender: Sender, headers: HeaderMap, body: Bytes| async move {
            let sender = sender.map(|s| s.0);
            handle(&st, sender.as_ref(), &headers, body, interaction, None).await
        },
    )
}

async fn post_resource(
    State(st): State<Arc<ApiState>>,
    sender: Sender,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let sender = sender.map(|s| s.0);
    handle(
        &st,
        sender.as_ref(),
        &headers,
        body,
        Interaction::Create,
        Some(&resource_type),
    )
    .await
}

async fn handle(
    st: &ApiState,
    authenticated: Option<&AuthenticatedSender>,
    headers: &HeaderMap,
    body: Bytes,
    interaction: Interaction,
    path_type: Option<&str>,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(format) = format_of(content_type) else {
        crate::observe::metrics::rejected("fhir", "unsupported_media_type");
        return issue(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Format::FhirJson,
            "error",
            "not-supported",
            "Content-Type must be application/fhir+json or application/fhir+xml",
            None,
        );
    };
    let out = answer_format(headers, format);
    if let Some(t) = path_type
        && fhir::parse::model::r4().resource(t).is_none()
    {
        crate::observe::metrics::rejected("fhir", "unknown_resource");
        return issue(
            StatusCode::NOT_FOUND,
            out,
            "error",
            "not-supported",
            &format!("{t} is not an R4 resource type"),
            None,
        );
    }
    if body.is_empty() {
        crate::observe::metrics::rejected("fhir", "empty_body");
        return issue(
            StatusCode::BAD_REQUEST,
            out,
            "error",
            "required",
            "the request body is empty",
            None,
        );
    }
    if body.len() > st.max_body {
        crate::observe::metrics::rejected("fhir", "too_large");
        return issue(
            StatusCode::PAYLOAD_TOO_LARGE,
            out,
            "error",
            "too-costly",
            &format!("the message is larger than {} bytes", st.max_body),
            None,
        );
    }

    // One parse, off the async workers: the sender check, the interaction's rules and the
    // mapping (so the sender hears now what it can fix) all read the same tree.
    let examined = {
        let body = body.clone();
        let path_type = path_type.map(str::to_owned);
        let authenticated = authenticated.cloned();
        tokio::task::spawn_blocking(move || {
            examine(
                format,
                &body,
                authenticated.as_ref(),
                interaction,
                path_type.as_deref(),
                out,
            )
        })
        .await
    };
    let Examined {
        tree,
        resource_type,
        bundle_type,
        declared,
        sender,
    } = match examined {
        Ok(Ok(e)) => e,
        Ok(Err(resp)) => return *resp,
        Err(e) => {
            tracing::error!(error = %e, "examining a FHIR message failed");
            return issue(
                StatusCode::INTERNAL_SERVER_ERROR,
                out,
                "fatal",
                "exception",
                "the message could not be read",
                None,
            );
        }
    };
    // A Notified Pull notification carries a credential: it goes to the pull inbox, never
    // into the log.
    if let Some(pull) = &st.pull
        && interaction == Interaction::Create
        && crate::deliver::pull::is_pull_notification(&tree)
    {
        return take_notification(pull, &tree, out);
    }
    // The same Task as the focus of a Backport notification Bundle, POSTed to the base.
    if interaction == Interaction::Base
        && let Some(notice) = crate::deliver::pull::backport_notice(&tree)
    {
        return take_backport(st.pull.as_deref(), notice, out);
    }
    let mut attributes = BTreeMap::new();
    if let Some(s) = authenticated {
        attributes.insert("authenticated_sender".to_owned(), s.0.name.clone());
    }

    // Durable before acknowledged.
    let kind = match (interaction, bundle_type.as_deref()) {
        (Interaction::Create, _) => "create",
        (_, Some("transaction")) => "transaction",
        (_, Some("batch")) => "batch",
        _ => "process-message",
    };
    attributes.insert("fhir_interaction".to_owned(), kind.to_owned());
    attributes.insert("fhir_resource_type".to_owned(), resource_type.clone());
    // A retry with the same Idempotency-Key gets the first answer's id.
    let scope = authenticated.map_or("anonymous", |s| s.0.name.as_str());
    let receiver = declared.receiver().map(str::to_owned);
    let taken = st
        .idempotency
        .accept_once(
            st.ingest.as_ref(),
            crate::http::idempotency::idempotency_key(headers),
            scope,
            crate::http::idempotency::Payload::Held(body),
            |id, body| RawEnvelope {
                id,
                received_at_ms: now_ms(),
                connector: "fhir".into(),
                format,
                content_type: content_type.to_owned(),
                sender,
                receiver,
                body,
                attributes,
            },
        )
        .await;
    let id = match taken {
        Ok(id) => id,
        Err(NotTaken::Key(e)) => {
            let (status, _) = crate::http::idempotency::idempotency_refusal(&e);
            return issue(status, out, "error", "invalid", &e.to_string(), None);
        }
        Err(NotTaken::Ingest(IngestError::Unavailable(e))) => {
            tracing::warn!(error = %e, "fhir ingest refused: log unavailable");
            let mut resp = issue(
                StatusCode::SERVICE_UNAVAILABLE,
                out,
                "error",
                "transient",
                "the log cannot take the message now; retry later",
                None,
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
        Err(NotTaken::Ingest(e)) => {
            tracing::error!(error = %e, "fhir ingest failed");
            return issue(
                StatusCode::INTERNAL_SERVER_ERROR,
                out,
                "fatal",
                "exception",
                "ingest failed",
                None,
            );
        }
    };
    let location = format!("/api/v1/messages/{id}");
    let text = format!("accepted as message {id}");
    let mut resp = match kind {
        "transaction" | "batch" => {
            respond(StatusCode::OK, out, &response_bundle(&tree, kind, &text))
        }
        _ => issue(
            StatusCode::ACCEPTED,
            out,
            "information",
            "informational",
            &text,
            None,
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Take a notification Task POSTed to `/fhir/Task`: 202 once it is durable, 403 from a
/// party that is no partner, 422 for a Task ketenbus cannot pull after.
fn take_notification(
    pull: &crate::deliver::pull::NotifiedPull,
    task: &Value,
    out: Format,
) -> Response {
    match pull.accept_task(task) {
        Ok(id) => issue(
            StatusCode::ACCEPTED,
            out,
            "information",
            "informational",
            &format!("notification accepted as {id}; the resources are pulled next"),
            None,
        ),
        Err(
            e @ (crate::deliver::pull::Refused::Partner | crate::deliver::pull::Refused::Requester),
        ) => {
            crate::observe::metrics::rejected("fhir", "pull_unknown_partner");
            issue(
                StatusCode::FORBIDDEN,
                out,
                "error",
                "forbidden",
                &e.to_string(),
                Some("Task.requester"),
            )
        }
        Err(crate::deliver::pull::Refused::Store(e)) => {
            tracing::error!(error = %e, "notified pull: storing a notification failed");
            issue(
                StatusCode::SERVICE_UNAVAILABLE,
                out,
                "error",
                "transient",
                "the notification cannot be stored now; retry later",
                None,
            )
        }
        Err(e) => {
            crate::observe::metrics::rejected("fhir", "pull_invalid_task");
            issue(
                StatusCode::UNPROCESSABLE_ENTITY,
                out,
                "error",
                "invalid",
                &e.to_string(),
                Some("Task.input"),
            )
        }
    }
}

/// Take a Backport notification Bundle POSTed to `/fhir`: its focus Task as
/// [`take_notification`] takes one; a handshake or heartbeat is answered 200 and pulls
/// nothing; a Bundle without a notification Task as its focus is 422.
fn take_backport(
    pull: Option<&crate::deliver::pull::NotifiedPull>,
    notice: crate::deliver::pull::BackportNotice,
    out: Format,
) -> Response {
    use crate::deliver::pull::BackportNotice;
    let Some(pull) = pull else {
        crate::observe::metrics::rejected("fhir", "pull_not_configured");
        return issue(
            StatusCode::UNPROCESSABLE_ENTITY,
            out,
            "error",
            "not-supported",
            "this node takes no Notified Pull notifications",
            None,
        );
    };
    match notice {
        BackportNotice::Task(task) => take_notification(pull, &task, out),
        BackportNotice::Nothing(_) => issue(
            StatusCode::OK,
            out,
            "information",
            "informational",
            "no event in this notification: nothing to pull",
            None,
        ),
        BackportNotice::Unusable(why) => {
            crate::observe::metrics::rejected("fhir", "pull_invalid_task");
            issue(
                StatusCode::UNPROCESSABLE_ENTITY,
                out,
                "error",
                "invalid",
                why,
                Some("Bundle.entry"),
            )
        }
    }
}

/// What one parse of a FHIR request gives the handler.
struct Examined {
    tree: Value,
    resource_type: String,
    bundle_type: Option<String>,
    declared: Declared,
    /// The envelope's sender: the declared party, checked against the authenticated one.
    sender: Option<String>,
}

/// Parse a request's body, check the senders it declares against `authenticated` (first, so
/// a message in another's name hears 403 whatever else is wrong with it), then the
/// interaction's rules and the mapping: what the sender can fix is the `Err` answer, in
/// format `out`.
fn examine(
    format: Format,
    body: &[u8],
    authenticated: Option<&AuthenticatedSender>,
    interaction: Interaction,
    path_type: Option<&str>,
    out: Format,
) -> Result<Examined, Box<Response>> {
    let tree = match fhir::parse(format, body) {
        Ok(t) => t,
        Err(e) => {
            let (position, what) = match &e {
                fhir::FhirError::Syntax { position, what }
                | fhir::FhirError::Write {
                    path: position,
                    what,
                } => (position.as_str(), what.as_str()),
            };
            crate::observe::metrics::rejected("fhir", "not_parseable");
            return Err(Box::new(issue(
                StatusCode::BAD_REQUEST,
                out,
                "error",
                "structure",
                &format!("fhir_syntax: {what}"),
                Some(position),
            )));
        }
    };
    let declared = party::fhir_tree(&tree);
    let sender = match authenticated {
        Some(s) => s.check(&declared).map_err(|e| {
            crate::observe::metrics::rejected("fhir", "sender_mismatch");
            Box::new(issue(
                StatusCode::FORBIDDEN,
                out,
                "error",
                "forbidden",
                &format!("sender_mismatch: {e}"),
                Some("MessageHeader.sender"),
            ))
        })?,
        None => declared.sender().map(str::to_owned),
    };
    let resource_type = tree
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let bundle_type = tree
        .get("type")
        .and_then(Value::as_str)
        .filter(|_| resource_type == "Bundle")
        .map(str::to_owned);
    let refuse = |text: &str, at: &str| {
        crate::observe::metrics::rejected("fhir", "invalid_message");
        Err(Box::new(issue(
            StatusCode::BAD_REQUEST,
            out,
            "error",
            "invalid",
            text,
            Some(at),
        )))
    };
    match interaction {
        // A Backport notification (Notified Pull) makes no events itself: the handler takes it.
        Interaction::Base
            if bundle_type.as_deref() == Some("history")
                && crate::deliver::pull::backport_notice(&tree).is_some() =>
        {
            return Ok(Examined {
                tree,
                resource_type,
                bundle_type,
                declared,
                sender,
            });
        }
        Interaction::ProcessMessage if bundle_type.as_deref() != Some("message") => {
            return refuse(
                "$process-message takes a Bundle of type message",
                "Bundle.type",
            );
        }
        Interaction::Base
            if !matches!(
                bundle_type.as_deref(),
                Some("message" | "transaction" | "batch")
            ) =>
        {
            return refuse(
                "POST to the base takes a Bundle of type message, transaction or batch",
                if resource_type == "Bundle" {
                    "Bundle.type"
                } else {
                    "resourceType"
                },
            );
        }
        Interaction::Create if path_type != Some(resource_type.as_str()) => {
            return refuse("resourceType does not match the URL", "resourceType");
        }
        _ => {}
    }
    if let Err(e) = inbound::events_from(&tree, "validation", format.as_str()) {
        crate::observe::metrics::rejected("fhir", "invalid_message");
        let (status, oo) = outcome::for_normalise_error(&e);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
        return Err(Box::new(respond(status, out, &oo)));
    }
    Ok(Examined {
        tree,
        resource_type,
        bundle_type,
        declared,
        sender,
    })
}

/// A transaction-response / batch-response: every entry accepted for forwarding.
fn response_bundle(request: &Value, kind: &str, text: &str) -> Value {
    let n = request
        .get("entry")
        .and_then(Value::as_array)
        .map_or(0, <[Value]>::len);
    let ok = outcome::outcome("information", "informational", text, None);
    let entries: Vec<Value> = (0..n)
        .map(|_| {
            Object::new()
                .with(
                    "response",
                    Object::new()
                        .with("status", "202 Accepted")
                        .with("outcome", ok.clone()),
                )
                .into()
        })
        .collect();
    Object::new()
        .with("resourceType", "Bundle")
        .with("type", format!("{kind}-response"))
        .with_array("entry", entries)
        .into()
}

/// `GET /fhir/metadata`: what this endpoint takes.
async fn metadata(headers: HeaderMap) -> Response {
    let create = |t: &str| -> Value {
        Object::new()
            .with("type", t)
            .with(
                "interaction",
                vec![Object::new().with("code", "create").into()],
            )
            .into()
    };
    let rest = Object::new()
        .with("mode", "server")
        .with(
            "resource",
            vec![
                create("Observation"),
                create("Task"),
                create("Bundle"),
                crate::http::subscription::capability(),
                crate::http::subscription::topics_capability(),
            ],
        )
        .with(
            "interaction",
            vec![
                Object::new().with("code", "transaction").into(),
                Object::new().with("code", "batch").into(),
            ],
        )
        .with(
            "operation",
            vec![
                Object::new()
                    .with("name", "process-message")
                    .with(
                        "definition",
                        "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message",
                    )
                    .into(),
            ],
        );
    let cs = Object::new()
        .with("resourceType", "CapabilityStatement")
        .with("status", "active")
        .with("date", "2026-11-24")
        .with("kind", "instance")
        .with(
            "software",
            Object::new()
                .with("name", "ketenbus")
                .with("version", env!("CARGO_PKG_VERSION")),
        )
        .with(
            "implementation",
            Object::new().with("description", "ketenbus FHIR intake"),
        )
        .with("fhirVersion", "4.0.1")
        .with("format", vec![Value::from("json"), Value::from("xml")])
        .with("rest", vec![rest.into()]);
    respond(
        StatusCode::OK,
        answer_format(&headers, Format::FhirJson),
        &cs.into(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ketenbus_schemas::{AvroRecord, topics};

    use ketenbus_connectors::BoxFuture;
    use ketenbus_connectors::{Accepted, Ingest};

    use super::*;
    use crate::bus::embedded::{EmbeddedBus, EmbeddedConfig};
    use crate::bus::{Bus, TopicSpec};
    use crate::ingest::BusIngest;
    use crate::observe::health::Health;
    use crate::observe::lineage::Lineage;

    const AZ: &str = include_str!(
        "../../../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
    );
    const OBS_XML: &str = include_str!(
        "../../../connectors/testdata/fhir/nictiz-r4-zib2020/nl-core-LaboratoryTestResult-LaboratoryTest-05.xml"
    );

    struct Server {
        base: String,
        bus: Arc<EmbeddedBus>,
        client: reqwest::Client,
        _dir: tempfile::TempDir,
    }

    /// The FHIR routes on a loopback port, taking messages into `ingest`; the base URL.
    async fn serve(ingest: Arc<dyn Ingest>, lineage: Lineage, dir: &std::path::Path) -> String {
        let state = Arc::new(ApiState {
            ingest,
            lineage,
            idempotency: crate::http::idempotency::Idempotency::open(dir).unwrap(),
            health: Arc::new(Health::default()),
            max_body: 1 << 20,
            mitz: None,
            keyer: crate::route::keys::PatientKeyer::new(b"0123456789abcdef".to_vec()),
            pull: None,
            resources: None,
        });
        let app = Router::new().merge(routes()).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    async fn server() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(EmbeddedBus::open(dir.path(), &EmbeddedConfig::default()).unwrap());
        bus.ensure_topics(&[TopicSpec {
            name: topics::RAW.into(),
            partitions: 1,
        }])
        .await
        .unwrap();
        let lineage = Lineage::open(dir.path()).unwrap();
        let ingest = Arc::new(BusIngest::new(
            Arc::clone(&bus),
            lineage.clone(),
            Duration::from_secs(5),
        ));
        Server {
            base: serve(ingest, lineage, dir.path()).await,
            bus,
            client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    impl Server {
        async fn post(
            &self,
            path: &str,
            content_type: &str,
            body: impl Into<reqwest::Body>,
        ) -> (u16, HeaderMap, Value) {
            let resp = self
                .client
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = resp.bytes().await.unwrap();
            let v = fhir::json::parse(&bytes)
                .or_else(|_| fhir::xml::parse(&bytes))
                .unwrap_or(Value::Null);
            (status, headers, v)
        }

        async fn raw(&self) -> Vec<RawEnvelope> {
            self.bus
                .read_all(topics::RAW)
                .await
                .unwrap()
                .iter()
                .map(|r| RawEnvelope::from_avro(&r.value).unwrap())
                .collect()
        }
    }

    fn issue_of(v: &Value) -> String {
        outcome::issue_text(v).unwrap_or_default()
    }

    #[tokio::test]
    async fn the_ambulance_referral_is_accepted_only_once_durable() {
        let s = server().await;
        let (status, headers, v) = s
            .post("/fhir/$process-message", "application/fhir+json", AZ)
            .await;
        assert_eq!(status, 202, "{}", issue_of(&v));
        assert!(issue_of(&v).starts_with("information informational: accepted as message "));
        let raw = s.raw().await;
        assert_eq!(raw.len(), 1);
        assert_eq!(
            (raw[0].connector.as_str(), raw[0].format),
            ("fhir", Format::FhirJson)
        );
        assert_eq!(raw[0].body, AZ.as_bytes());
        assert_eq!(
            raw[0]
                .attributes
                .get("fhir_interaction")
                .map(String::as_str),
            Some("process-message")
        );
        assert_eq!(
            headers.get("location").unwrap().to_str().unwrap(),
            format!("/api/v1/messages/{}", raw[0].id)
        );
        // The same message to the base is a message too.
        let (status, _, _) = s
            .post("/fhir", "application/fhir+json; charset=utf-8", AZ)
            .await;
        assert_eq!(status, 202);
    }

    #[tokio::test]
    async fn what_the_sender_can_fix_is_refused_with_the_element_path() {
        let s = server().await;
        let bad = AZ.replace("999999990", "999999991");
        let (status, _, v) = s
            .post("/fhir/$process-message", "application/fhir+json", bad)
            .await;
        assert_eq!(status, 422);
        assert_eq!(
            issue_of(&v),
            "error value: invalid_bsn: BSN fails the eleven-test @ Bundle.entry[3].resource.identifier[0]"
        );
        let (status, _, v) = s
            .post(
                "/fhir/$process-message",
                "application/fhir+json",
                "{\"resourceType\":",
            )
            .await;
        assert_eq!(status, 400);
        assert!(
            issue_of(&v).starts_with("error structure: fhir_syntax"),
            "{}",
            issue_of(&v)
        );
        let (status, _, _) = s.post("/fhir/$process-message", "text/plain", AZ).await;
        assert_eq!(status, 415);
        let (status, _, v) = s.post("/fhir/Task", "application/fhir+xml", OBS_XML).await;
        assert_eq!(status, 400, "{}", issue_of(&v));
        let (status, _, _) = s
            .post("/fhir/Nonsense", "application/fhir+json", "{}")
            .await;
        assert_eq!(status, 404);
        let patient = r#"{"resourceType":"Patient","id":"p"}"#;
        let (status, _, v) = s
            .post("/fhir/Patient", "application/fhir+json", patient)
            .await;
        assert_eq!(status, 422, "{}", issue_of(&v));
        assert!(s.raw().await.is_empty(), "nothing refused reaches the log");
    }

    #[tokio::test]
    async fn single_resources_and_transactions_are_taken_in_xml_and_json() {
        let s = server().await;
        let (status, headers, v) = s
            .post("/fhir/Observation", "application/fhir+xml", OBS_XML)
            .await;
        assert_eq!(status, 202, "{}", issue_of(&v));
        assert!(
            headers
                .get("content-type")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("application/fhir+xml")
        );
        let task = r#"{"resourceType":"Task","id":"t1","status":"requested","intent":"proposal"}"#;
        assert_eq!(
            s.post("/fhir/Task", "application/fhir+json", task).await.0,
            202
        );
        let tx = format!(
            r#"{{"resourceType":"Bundle","type":"transaction","entry":[{{"fullUrl":"urn:uuid:6f0c2a52-8c7e-4e8a-9d0f-2b1b8f3b2a11","resource":{task},"request":{{"method":"POST","url":"Task"}}}}]}}"#
        );
        let (status, _, v) = s.post("/fhir", "application/fhir+json", tx).await;
        assert_eq!(status, 200);
        assert_eq!(
            v.get("type").and_then(Value::as_str),
            Some("transaction-response")
        );
        let raw = s.raw().await;
        assert_eq!(raw.len(), 3);
        assert_eq!(raw[0].format, Format::FhirXml);
        assert_eq!(
            raw[2]
                .attributes
                .get("fhir_interaction")
                .map(String::as_str),
            Some("transaction")
        );
        let (status, _, _) = s
            .post(
                "/fhir",
                "application/fhir+json",
                r#"{"resourceType":"Bundle","type":"collection"}"#,
            )
            .await;
        assert_eq!(status, 400);
    }

    /// Ingest onto a log that cannot take anything now.
    struct Down;

    impl Ingest for Down {
        fn accept(&self, _: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>> {
            Box::pin(async { Err(IngestError::Unavailable("disk full".into())) })
        }
    }

    #[tokio::test]
    async fn a_log_that_cannot_take_it_means_503_and_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let lineage = Lineage::open(dir.path()).unwrap();
        let base = serve(Arc::new(Down), lineage, dir.path()).await;
        let resp = reqwest::Client::new()
            .post(format!("{base}/fhir/$process-message"))
            .header("content-type", "application/fhir+json")
            .body(AZ)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 503);
        assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
        let v = fhir::json::parse(&resp.bytes().await.unwrap()).unwrap();
        assert!(
            issue_of(&v).starts_with("error transient"),
            "{}",
            issue_of(&v)
        );
        assert!(
            !issue_of(&v).contains("disk full"),
            "the log's error stays in the log"
        );
    }

    #[tokio::test]
    async fn metadata_tells_what_is_taken() {
        let s = server().await;
        let resp = s
            .client
            .get(format!("{}/fhir/metadata", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let v = fhir::json::parse(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(v.get("fhirVersion").and_then(Value::as_str), Some("4.0.1"));
    }
}
