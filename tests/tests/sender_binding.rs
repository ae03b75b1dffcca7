//! The sender-binding matrix: on every write route, for every media type the route takes,
//! for every way a message can declare a sender, a sender posting in another party's name
//! is refused (`403 sender_mismatch`, SMTP `550 5.7.1`) naming that party, and the party
//! that does own every declared sender is let through. Table-driven: a route that takes a
//! media type without a row here fails [`every_media_type_a_route_takes_has_rows`].

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::time::Duration;

use ketenbus_connectors::fhir;
use ketenbus_schemas::Format;
use ketenbus_tests::{Broker, MEDLAB, Swaks, free_port, lineage_until};
use serde_json::{Value, json};

const LAB_TOKEN: &str = "kb_matrix_lab_token_0123456789abcdef";
const HUB_TOKEN: &str = "kb_matrix_hub_token_0123456789abcdef";
const LAB_PASSWORD: &str = "lab-password-for-the-matrix";
const HUB_PASSWORD: &str = "hub-password-for-the-matrix";

/// The lab's own parties.
const LAB: &[&str] = &[
    "mailbox:500001234",
    "ura:00000099",
    "endpoint:https://lab.example.test/fhir",
];
/// The ambulance service's parties: what the lab may not send as.
const AMBULANCE: &[&str] = &[
    "mailbox:500007777",
    "ura:00000001",
    "endpoint:https://ambulance.example.nl/fhir",
];

const AZ: &str = include_str!(
    "../../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
);

fn sha(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn list(parties: &[&str]) -> String {
    let quoted: Vec<String> = parties.iter().map(|p| format!("{p:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// What a body is, for the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Edifact,
    FhirJson,
    FhirXml,
    Mail,
}

/// One way of declaring a sender: the body, the foreign party it names and whether the
/// message maps to events (a FHIR endpoint refuses what does not map, with 4xx).
struct Case {
    name: &'static str,
    kind: Kind,
    body: Vec<u8>,
    foreign: &'static str,
    maps: bool,
}

fn medlab_from(sender: &str) -> String {
    MEDLAB.replace("UNB+UNOA:1+500001234+", &format!("UNB+UNOA:1+{sender}+"))
}

fn az() -> Value {
    serde_json::from_str(AZ).unwrap()
}

fn ura(value: &str) -> Value {
    json!({ "identifier": { "system": "http://fhir.nl/fhir/NamingSystem/ura", "value": value } })
}

/// The FHIR ways to declare a sender, as `Value`s to write as JSON or XML.
fn fhir_variants() -> Vec<(&'static str, Value, &'static str, bool)> {
    let as_is = az();
    let mut by_identifier = az();
    by_identifier["entry"][0]["resource"]["sender"] = ura("00000001");
    let mut by_endpoint = az();
    by_endpoint["entry"][0]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("sender");
    // The lab's own message carrying the ambulance's message in one of its entries.
    let mut nested = az();
    nested["entry"][0]["resource"]["sender"] = ura("00000099");
    nested["entry"].as_array_mut().unwrap().push(
        json!({ "fullUrl": "urn:uuid:6f1c3f0e-8d2b-4a57-9a53-0a0c3e1b2d11", "resource": az() }),
    );
    // The ambulance's message with a BSN that fails the eleven-test: it maps to nothing.
    let unmappable: Value = serde_json::from_str(&AZ.replace("999999990", "999999991")).unwrap();
    vec![
        (
            "messageheader_sender_reference",
            as_is,
            "ura:00000001",
            true,
        ),
        (
            "messageheader_sender_identifier",
            by_identifier,
            "ura:00000001",
            true,
        ),
        (
            "messageheader_source_endpoint",
            by_endpoint,
            "endpoint:https://ambulance.example.nl/fhir",
            true,
        ),
        ("nested_bundle", nested, "ura:00000001", true),
        ("does_not_map", unmappable, "ura:00000001", false),
    ]
}

fn fhir_bytes(v: &Value, format: Format) -> Vec<u8> {
    let tree = fhir::json::parse(v.to_string().as_bytes()).unwrap();
    fhir::write(format, &tree).unwrap()
}

fn mail(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut m = b"From: lab@example.test\r\nTo: 500005678@lms.example.test\r\nSubject: uitslag\r\n\
Message-ID: <matrix@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"matrix-b\"\r\n\r\n\
--matrix-b\r\nContent-Type: text/plain\r\n\r\nzie bijlage\r\n"
        .to_vec();
    for (ty, body) in parts {
        m.extend_from_slice(format!("--matrix-b\r\nContent-Type: {ty}\r\n\r\n").as_bytes());
        m.extend_from_slice(body);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b"--matrix-b--\r\n");
    m
}

/// Every case of every kind.
fn cases() -> Vec<Case> {
    let foreign_medlab = medlab_from("500007777");
    let bad_count = foreign_medlab.replace("UNZ+1+", "UNZ+7+");
    let mut out = vec![
        Case {
            name: "unb",
            kind: Kind::Edifact,
            body: foreign_medlab.clone().into_bytes(),
            foreign: "mailbox:500007777",
            maps: true,
        },
        Case {
            name: "second_interchange",
            kind: Kind::Edifact,
            body: format!("{MEDLAB}{foreign_medlab}").into_bytes(),
            foreign: "mailbox:500007777",
            maps: true,
        },
        Case {
            name: "unb_with_wrong_control_count",
            kind: Kind::Edifact,
            body: bad_count.clone().into_bytes(),
            foreign: "mailbox:500007777",
            maps: false,
        },
    ];
    for (name, v, foreign, maps) in fhir_variants() {
        for (kind, format) in [
            (Kind::FhirJson, Format::FhirJson),
            (Kind::FhirXml, Format::FhirXml),
        ] {
            out.push(Case {
                name,
                kind,
                body: fhir_bytes(&v, format),
                foreign,
                maps,
            });
        }
    }
    let edifact_part = mail(&[("application/EDIFACT", foreign_medlab.as_bytes())]);
    out.extend([
        Case {
            name: "mail_edifact_part",
            kind: Kind::Mail,
            body: edifact_part.clone(),
            foreign: "mailbox:500007777",
            maps: true,
        },
        Case {
            name: "mail_fhir_part",
            kind: Kind::Mail,
            body: mail(&[("application/fhir+json", AZ.as_bytes())]),
            foreign: "ura:00000001",
            maps: true,
        },
        Case {
            name: "mail_in_a_mail",
            kind: Kind::Mail,
            body: mail(&[("message/rfc822", &edifact_part)]),
            foreign: "mailbox:500007777",
            maps: true,
        },
        Case {
            name: "mail_part_that_does_not_normalise",
            kind: Kind::Mail,
            body: mail(&[
                ("application/EDIFACT", bad_count.as_bytes()),
                ("application/fhir+json", b"{\"resourceType\": "),
            ]),
            foreign: "mailbox:500007777",
            maps: false,
        },
    ]);
    out
}

/// A way in.
#[derive(Debug, Clone, Copy)]
enum Route {
    Http(&'static str),
    Smtp,
}

/// Every write route with the media types it takes and the kind of body each carries.
const ROUTES: &[(Route, &[(&str, Kind)])] = &[
    (
        Route::Http("/api/v1/messages"),
        &[
            ("application/EDIFACT", Kind::Edifact),
            ("application/fhir+json", Kind::FhirJson),
            ("application/fhir+xml", Kind::FhirXml),
            ("message/rfc822", Kind::Mail),
        ],
    ),
    (Route::Http("/fhir"), FHIR_TYPES),
    (Route::Http("/fhir/$process-message"), FHIR_TYPES),
    (Route::Http("/fhir/Bundle"), FHIR_TYPES),
    (Route::Smtp, &[("message/rfc822", Kind::Mail)]),
];

const FHIR_TYPES: &[(&str, Kind)] = &[
    ("application/fhir+json", Kind::FhirJson),
    ("application/json", Kind::FhirJson),
    ("text/json", Kind::FhirJson),
    ("application/fhir+xml", Kind::FhirXml),
    ("application/xml", Kind::FhirXml),
    ("text/xml", Kind::FhirXml),
];

/// Media types a client might try; each route must refuse (415) those it has no row for.
const CANDIDATE_TYPES: &[&str] = &[
    "application/EDIFACT",
    "application/edifact; charset=UNOA",
    "application/edi-consent",
    "application/EDI-X12",
    "application/octet-stream",
    "text/plain",
    "application/fhir+json",
    "application/fhir+json; fhirVersion=4.0",
    "application/fhir+xml",
    "application/json",
    "application/json+fhir",
    "text/json",
    "application/xml",
    "application/xml+fhir",
    "text/xml",
    "message/rfc822",
    "message/global",
    "multipart/mixed; boundary=x",
    "multipart/related; boundary=x",
    "application/x-www-form-urlencoded",
    "application/pdf",
    "application/hl7-v2",
];

/// A broker with the lab (its own parties only), the hub (every party of both) and an
/// SMTP listener with STARTTLS and required AUTH for the same two.
struct Setup {
    broker: Broker,
    smtp: u16,
    _certs: tempfile::TempDir,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_file = dir.path().join("smtp.crt");
    let key_file = dir.path().join("smtp.key");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let all: Vec<&str> = LAB.iter().chain(AMBULANCE).copied().collect();
    let smtp = free_port();
    let extra = format!(
        "[[senders]]\nname = \"lab\"\ntoken_sha256 = \"{}\"\nparty_ids = {}\n\
         [[senders]]\nname = \"hub\"\ntoken_sha256 = \"{}\"\nparty_ids = {}\n\
         [mail.smtp]\nlisten = \"127.0.0.1:{smtp}\"\naccept_domains = [\"lms.example.test\"]\n\
         [mail.smtp.tls]\ncert_file = {cert_file:?}\nkey_file = {key_file:?}\n\
         [mail.smtp.auth]\nrequired = true\nusers = [\
         {{ username = \"lab\", password_env = \"MATRIX_LAB_PASSWORD\", party_ids = {} }}, \
         {{ username = \"hub\", password_env = \"MATRIX_HUB_PASSWORD\", party_ids = {} }}]\n",
        sha(LAB_TOKEN),
        list(LAB),
        sha(HUB_TOKEN),
        list(&all),
        list(LAB),
        list(&all),
    );
    let broker = Broker::start_with_env(
        &extra,
        &[
            ("MATRIX_LAB_PASSWORD", LAB_PASSWORD),
            ("MATRIX_HUB_PASSWORD", HUB_PASSWORD),
        ],
    );
    Setup {
        broker,
        smtp,
        _certs: dir,
    }
}

/// What a sender heard.
#[derive(Debug)]
struct Answer {
    accepted: bool,
    status: String,
    text: String,
}

async fn post(
    c: &reqwest::Client,
    base: &str,
    path: &str,
    media: &str,
    token: &str,
    body: &[u8],
) -> Answer {
    let r = c
        .post(format!("{base}{path}"))
        .header("content-type", media)
        .bearer_auth(token)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status();
    Answer {
        accepted: status.is_success(),
        status: status.as_str().to_owned(),
        text: r.text().await.unwrap_or_default(),
    }
}

fn swaks(port: u16, user: &str, password: &str, body: &[u8]) -> Answer {
    let (accepted, text) = Swaks::port(port)
        .from("lab@example.test")
        .to("500005678@lms.example.test")
        .tls()
        .auth("PLAIN", user, password)
        .data_bytes(body)
        .run();
    let status = if text.contains("550 5.7.1") {
        "550 5.7.1".to_owned()
    } else if text.contains(" 250 2.0.0") || text.contains("queued as") {
        "250".to_owned()
    } else {
        "other".to_owned()
    };
    Answer {
        accepted,
        status,
        text,
    }
}

async fn send(
    setup: &Setup,
    c: &reqwest::Client,
    route: Route,
    media: &str,
    as_hub: bool,
    body: &[u8],
) -> Answer {
    match route {
        Route::Http(path) => {
            let token = if as_hub { HUB_TOKEN } else { LAB_TOKEN };
            post(c, &setup.broker.url, path, media, token, body).await
        }
        Route::Smtp => {
            let (user, password) = if as_hub {
                ("hub", HUB_PASSWORD)
            } else {
                ("lab", LAB_PASSWORD)
            };
            let port = setup.smtp;
            let body = body.to_vec();
            let user = user.to_owned();
            tokio::task::spawn_blocking(move || swaks(port, &user, password, &body))
                .await
                .unwrap()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_one_posts_in_another_partys_name_on_any_route_in_any_media_type() {
    let setup = start();
    let c = reqwest::Client::new();
    let cases = cases();
    let mut cells = 0;
    let mut failures = Vec::new();
    for (route, types) in ROUTES {
        for (media, kind) in *types {
            for case in cases.iter().filter(|c| c.kind == *kind) {
                cells += 1;
                let at = format!("{route:?} {media} {}", case.name);
                // The lab posts a message that names the ambulance.
                let a = send(&setup, &c, *route, media, false, &case.body).await;
                let refused = match route {
                    Route::Http(_) => a.status == "403" && a.text.contains("sender_mismatch"),
                    Route::Smtp => a.status == "550 5.7.1",
                };
                if a.accepted || !refused || !a.text.contains(case.foreign) {
                    failures.push(format!("{at}: as lab: {} {}", a.status, a.text));
                }
                // The hub owns every party named: never refused for the sender, and let in
                // wherever the message is acceptable on that route.
                let a = send(&setup, &c, *route, media, true, &case.body).await;
                let must_accept =
                    case.maps || !matches!(route, Route::Http(p) if p.starts_with("/fhir"));
                if a.text.contains("sender_mismatch") || (must_accept && !a.accepted) {
                    failures.push(format!("{at}: as hub: {} {}", a.status, a.text));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cells} cells failed:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        setup.broker.log_text()
    );
    // Every route, every media type and every kind of case took part.
    assert!(cells >= 100, "{cells}");
    eprintln!("sender-binding matrix: {cells} cells, each as a foreign and as the owning sender");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_media_type_a_route_takes_has_rows() {
    let setup = start();
    let c = reqwest::Client::new();
    let mut wrong = Vec::new();
    for (route, types) in ROUTES {
        let Route::Http(path) = route else { continue };
        for media in CANDIDATE_TYPES {
            let a = post(&c, &setup.broker.url, path, media, HUB_TOKEN, b"x").await;
            let takes = a.status != "415";
            let essence = |m: &str| m.split(';').next().unwrap().trim().to_ascii_lowercase();
            let has_row = types.iter().any(|(t, _)| essence(t) == essence(media));
            if takes != has_row {
                wrong.push(format!(
                    "{path} {media}: answered {}, row: {has_row}",
                    a.status
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envelope_names_the_parties_the_message_declares() {
    // Raw subscribers filtered on a receiver get an EDIFACT interchange posted over HTTP.
    let rx = ketenbus_tests::Receiver::ok().await;
    let extra = format!(
        "[[subscriptions]]\nname = \"gp-raw\"\nkinds = [\"raw\"]\nfilter = {{ receivers = [\"mailbox:500005678\"] }}\n\
         sink = {{ type = \"webhook\", url = \"{}\" }}\n",
        rx.url()
    );
    let broker = Broker::start(&extra);
    let c = reqwest::Client::new();
    let (status, json) = ketenbus_tests::post_message(
        &c,
        &broker.url,
        "application/EDIFACT",
        MEDLAB.as_bytes().to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(status, 202, "{json}");
    let got = rx.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let id = json["id"].as_str().unwrap();
    let l = ketenbus_tests::lineage(&c, &broker.url, id).await.unwrap();
    assert_eq!(l["sender"], "mailbox:500001234", "{l}");
    assert_eq!(l["receiver"], "mailbox:500005678", "{l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_reference_to_a_document_of_another_message_is_refused_on_every_route() {
    // The ambulance's own referral, but its ECG points into ketenbus's content store (the
    // hash of a document someone else sent) instead of carrying the document.
    let mut pointer = az();
    let attachment = &mut pointer["entry"][8]["resource"]["content"][0]["attachment"];
    attachment.as_object_mut().unwrap().remove("data");
    attachment["url"] = json!(format!("urn:ketenbus:content:sha256:{}", "ab".repeat(32)));
    let rx = ketenbus_tests::Receiver::ok().await;
    let mut setup = start();
    setup.broker.kill();
    std::fs::write(
        &setup.broker.config,
        format!(
            "{}{}",
            std::fs::read_to_string(&setup.broker.config).unwrap(),
            ketenbus_tests::webhook_subscription("hap", "\"acute_handover\"", &rx.url(), "")
        ),
    )
    .unwrap();
    setup.broker.spawn();
    let c = reqwest::Client::new();
    let mut stored = Vec::new();
    for (route, types) in ROUTES {
        let Route::Http(path) = route else { continue };
        for (media, kind) in *types {
            let format = match kind {
                Kind::FhirJson => Format::FhirJson,
                Kind::FhirXml => Format::FhirXml,
                _ => continue,
            };
            let body = fhir_bytes(&pointer, format);
            let a = post(&c, &setup.broker.url, path, media, HUB_TOKEN, &body).await;
            if path.starts_with("/fhir") {
                // The FHIR endpoints map before they answer: 422 with the element path.
                assert_eq!(a.status, "422", "{path} {media}: {}", a.text);
                assert!(
                    a.text.contains(".attachment.url"),
                    "{path} {media}: {}",
                    a.text
                );
            } else {
                // The API stores first; the router refuses it with the path.
                assert_eq!(a.status, "202", "{path} {media}: {}", a.text);
                let j: Value = serde_json::from_str(&a.text).unwrap();
                stored.push(j["id"].as_str().unwrap().to_owned());
            }
        }
    }
    for id in &stored {
        let l = lineage_until(&setup.broker.url, id, |l| {
            l["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["outcome"] == "rejected"))
        })
        .await;
        let steps = l["steps"].as_array().unwrap();
        let s = steps.iter().find(|s| s["outcome"] == "rejected").unwrap();
        assert_eq!(s["reason"], "invalid_element", "{l}");
        assert!(
            s["detail"]
                .as_str()
                .unwrap_or("")
                .contains(".attachment.url"),
            "{l}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.received().is_empty(),
        "a handover with a borrowed document went out"
    );
}
