//! Parse and map cost is linear in the input (ARCHITECTURE.md, principle 6): for each format
//! a large synthetic input is made at two sizes, and four times the input may take at most
//! six times as long. Timings are the thread's CPU time, the best of several runs, and the sizes keep a debug build
//! well under a second per run, so the test runs with every `cargo test`. The smaller input
//! is already past the 4 MiB L2 cache where memory is what costs, so that the step from
//! cache to memory is not taken for a worse algorithm.
//!
//! The shapes are the ones that cost the square of the input before: FHIR references
//! resolved by a scan of every entry, lab results grouped by a scan of every group, duplicate
//! member and attribute names checked by a scan, narrative entities looked up to the next
//! `;`, specimens and PractitionerRoles found by a scan per observation.

use std::time::Duration;

use ketenbus_schemas::{Format, RawEnvelope};

use crate::Normalise;
use crate::fhir::{Object, Value, json, xml};

/// Most time four times the input may take, as a multiple of the time for one.
const MAX_RATIO: f64 = 6.0;
/// Runs per size; the fastest counts (the others met a busy machine).
const RUNS: usize = 3;
/// Rounds of measuring before a ratio past [`MAX_RATIO`] counts as a failure.
const ROUNDS: usize = 4;

/// One cost test at a time: they would otherwise slow each other down unevenly.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// CPU time this thread used: what other processes on a shared machine take is not counted.
fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

fn best_of(runs: usize, f: &dyn Fn()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = cpu_time();
            f();
            cpu_time().saturating_sub(t)
        })
        .min()
        .expect("at least one run")
}

/// Time `run` on `make(n)` and `make(4 n)`; panics naming `what` when the larger takes more
/// than [`MAX_RATIO`] times as long. Returns the ratio.
fn assert_linear<T>(what: &str, n: usize, make: &dyn Fn(usize) -> T, run: &dyn Fn(&T)) -> f64 {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // `KETENBUS_COST_SCALE=4 cargo test --release ...` measures larger inputs (for figures).
    let n = n * std::env::var("KETENBUS_COST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let small = make(n);
    let large = make(4 * n);
    // Warm up (allocator, lazily built tables such as the FHIR model).
    run(&small);
    let mut ratio = 0.0;
    // A busy machine can still spoil one round: measure again before calling it quadratic.
    for _ in 0..ROUNDS {
        let t_small = best_of(RUNS, &|| run(&small));
        let t_large = best_of(RUNS, &|| run(&large));
        ratio = t_large.as_secs_f64() / t_small.as_secs_f64().max(1e-9);
        eprintln!("{what}: n={n} {t_small:?}, 4n {t_large:?}, ratio {ratio:.2}");
        if ratio <= MAX_RATIO {
            return ratio;
        }
    }
    panic!("{what}: 4x the input took {ratio:.1}x the time (at most {MAX_RATIO})");
}

fn envelope(format: Format, body: Vec<u8>) -> RawEnvelope {
    RawEnvelope {
        id: "cost".into(),
        received_at_ms: 0,
        connector: "test".into(),
        format,
        content_type: String::new(),
        sender: None,
        receiver: None,
        body,
        attributes: std::collections::BTreeMap::new(),
    }
}

const BSN: &str = "999911120";

fn reference(r: &str) -> Value {
    Object::new().with("reference", r).into()
}

/// A transaction Bundle of `units` patients, each with a Specimen, a PractitionerRole and a
/// lab Observation pointing at all three (by `fullUrl`, by `Type/id` and by `#id`) and a
/// DiagnosticReport holding the Observation, plus one lab Organization they all share: about
/// 5 entries per unit.
fn lab_bundle(units: usize) -> Value {
    let mut entries = vec![
        Object::new()
            .with("fullUrl", "https://lab.example.test/fhir/Organization/lab")
            .with(
                "resource",
                Object::new()
                    .with("resourceType", "Organization")
                    .with("id", "lab")
                    .with(
                        "identifier",
                        vec![Value::from(
                            Object::new()
                                .with("system", "http://fhir.nl/fhir/NamingSystem/ura")
                                .with("value", "00000001"),
                        )],
                    )
                    .with("name", "Regiolab"),
            )
            .into(),
    ];
    for i in 0..units {
        let entry = |url: String, res: Object| -> Value {
            Object::new()
                .with("fullUrl", url)
                .with("resource", res)
                .into()
        };
        entries.push(entry(
            format!("urn:uuid:00000000-0000-0000-0000-{i:012}"),
            Object::new()
                .with("resourceType", "Patient")
                .with("id", format!("p{i}"))
                .with(
                    "identifier",
                    vec![Value::from(
                        Object::new()
                            .with("system", "http://fhir.nl/fhir/NamingSystem/bsn")
                            .with("value", BSN),
                    )],
                )
                .with(
                    "name",
                    vec![Value::from(
                        Object::new().with("family", format!("Test{i}")),
                    )],
                ),
        ));
        entries.push(entry(
            format!("https://lab.example.test/fhir/Specimen/s{i}"),
            Object::new()
                .with("resourceType", "Specimen")
                .with("id", format!("s{i}"))
                .with("type", Object::new().with("text", "bloed")),
        ));
        entries.push(entry(
            format!("https://lab.example.test/fhir/PractitionerRole/r{i}"),
            Object::new()
                .with("resourceType", "PractitionerRole")
                .with("id", format!("r{i}"))
                .with(
                    "code",
                    vec![Value::from(Object::new().with("text", "copy-to"))],
                ),
        ));
        entries.push(entry(
            format!("https://lab.example.test/fhir/Observation/o{i}"),
            Object::new()
                .with("resourceType", "Observation")
                .with("id", format!("o{i}"))
                .with(
                    "contained",
                    vec![Value::from(
                        Object::new()
                            .with("resourceType", "ServiceRequest")
                            .with("id", "order")
                            .with("status", "active"),
                    )],
                )
                .with("status", "final")
                .with(
                    "category",
                    vec![Value::from(Object::new().with(
                        "coding",
                        vec![Value::from(
                            Object::new()
                                .with(
                                    "system",
                                    "http://terminology.hl7.org/CodeSystem/observation-category",
                                )
                                .with("code", "laboratory"),
                        )],
                    ))],
                )
                .with(
                    "code",
                    Object::new().with(
                        "coding",
                        vec![Value::from(
                            Object::new()
                                .with("system", "http://loinc.org")
                                .with("code", "2345-7")
                                .with("display", "Glucose"),
                        )],
                    ),
                )
                .with(
                    "subject",
                    reference(&format!("urn:uuid:00000000-0000-0000-0000-{i:012}")),
                )
                .with("basedOn", vec![reference("#order")])
                .with("specimen", reference(&format!("Specimen/s{i}")))
                .with(
                    "performer",
                    vec![
                        reference("Organization/lab"),
                        reference(&format!("PractitionerRole/r{i}")),
                    ],
                )
                .with("effectiveDateTime", "2026-11-01T08:00:00+01:00")
                .with(
                    "valueQuantity",
                    Object::new()
                        .with("value", Value::Number("5.4".into()))
                        .with("unit", "mmol/L"),
                ),
        ));
        entries.push(entry(
            format!("https://lab.example.test/fhir/DiagnosticReport/d{i}"),
            Object::new()
                .with("resourceType", "DiagnosticReport")
                .with("id", format!("d{i}"))
                .with(
                    "identifier",
                    vec![Value::from(
                        Object::new()
                            .with("system", "urn:oid:2.16.840.1.113883.2.4.3.999.1.5")
                            .with("value", format!("RPT-{i}")),
                    )],
                )
                .with("issued", "2026-11-01T09:00:00+01:00")
                .with("result", vec![reference(&format!("Observation/o{i}"))]),
        ));
    }
    Object::new()
        .with("resourceType", "Bundle")
        .with("type", "transaction")
        .with("entry", entries)
        .into()
}

fn normalise(format: Format, body: &[u8]) {
    let n: Box<dyn Normalise> = match format {
        Format::Edifact => Box::new(crate::edifact::EdifactNormaliser),
        Format::Rfc822 => Box::new(crate::mail::MailNormaliser::default()),
        _ => Box::new(crate::fhir::FhirNormaliser),
    };
    let env = envelope(format, body.to_vec());
    let _ = std::hint::black_box(n.normalise(&env));
}

#[test]
fn the_synthetic_lab_bundle_maps_to_one_event_per_patient() {
    // The inputs below measure the real mapping, not an early error.
    let body = json::to_vec(&lab_bundle(3));
    let events = crate::fhir::FhirNormaliser
        .normalise(&envelope(Format::FhirJson, body))
        .expect("maps");
    assert_eq!(events.len(), 3);
    // Each patient's event holds its own report only (indexed, not scanned per patient).
    let ketenbus_schemas::Event::LabResult(second) = &events[1] else {
        panic!("a lab event")
    };
    assert_eq!(second.report_identifiers.len(), 1);
    assert_eq!(second.report_identifiers[0].value, "RPT-1");
    let xml_body = xml::to_vec(&lab_bundle(3)).expect("writes");
    let events = crate::fhir::FhirNormaliser
        .normalise(&envelope(Format::FhirXml, xml_body))
        .expect("maps");
    assert_eq!(events.len(), 3);
}

#[test]
fn fhir_json_cost_is_linear() {
    assert_linear(
        "fhir json transaction bundle",
        500,
        &|n| json::to_vec(&lab_bundle(n)),
        &|b| normalise(Format::FhirJson, b),
    );
    assert_linear(
        "fhir json object with many members",
        20_000,
        &|n| {
            let mut s = String::from("{\"resourceType\":\"Basic\"");
            for i in 0..n {
                s.push_str(&format!(",\"m{i}\":{i}"));
            }
            s.push('}');
            s.into_bytes()
        },
        &|b| normalise(Format::FhirJson, b),
    );
}

#[test]
fn fhir_xml_cost_is_linear() {
    assert_linear(
        "fhir xml transaction bundle",
        300,
        &|n| xml::to_vec(&lab_bundle(n)).expect("writes"),
        &|b| normalise(Format::FhirXml, b),
    );
    assert_linear(
        "fhir xml element with many attributes",
        16_000,
        &|n| {
            let mut s = String::from("<Basic xmlns=\"http://hl7.org/fhir\"><id value=\"b\"");
            for i in 0..n {
                s.push_str(&format!(" xmlns:a{i}=\"urn:x\""));
            }
            s.push_str("/></Basic>");
            s.into_bytes()
        },
        &|b| normalise(Format::FhirXml, b),
    );
}

#[test]
fn fhir_narrative_cost_is_linear() {
    assert_linear(
        "narrative full of '&'",
        40_000,
        &|n| format!("<div>{}</div>", "&".repeat(n)),
        &|d| {
            std::hint::black_box(crate::fhir::inbound::narrative_text(d));
        },
    );
}

/// One MEDLAB message whose patient has `groups` specimens, each with results and remarks.
fn big_medlab_message(groups: usize) -> Vec<u8> {
    let mut segs = vec![
        "UNH+M1+MEDLAB:1".to_owned(),
        "ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567+LAB01".to_owned(),
        format!("PID+19700101+M+Jansen::Bakker::Pieter:P.++BSN{BSN}"),
        "ART+H+01234567+A. de Vries+Markt:1::Haren:9751AB+050-1234567".to_owned(),
    ];
    for g in 0..groups {
        segs.push(format!("DET+26:11:{:02}+07:{:02}", 1 + g % 28, g % 60));
        segs.push(format!("IDE+J+L{g:07}+bloed"));
        segs.push("SEC+CHEMIE".to_owned());
        segs.push(format!("BEP:1:{g}:1+0+Kalium+5.9++mmol/l+>+3.5+5.0+K"));
        segs.push(format!("OPB:1:{g}:1:1+Hemolytisch monster?: herhalen"));
        segs.push("KOP+Dr. B. Kopie".to_owned());
    }
    let count = segs.len() + 1;
    segs.push(format!("UNT+{count}+M1"));
    let mut s = String::from("UNB+UNOA:1+500001234+500005678+261101:0815+IC1'");
    for seg in segs {
        s.push_str(&seg);
        s.push('\'');
    }
    s.push_str("UNZ+1+IC1'");
    s.into_bytes()
}

#[test]
fn edifact_cost_is_linear() {
    assert!(
        crate::edifact::EdifactNormaliser
            .normalise(&envelope(Format::Edifact, big_medlab_message(3)))
            .is_ok(),
        "the synthetic message maps"
    );
    assert_linear(
        "edifact interchange of many messages",
        300,
        &crate::edifact::synthetic_medlab,
        &|b| normalise(Format::Edifact, b),
    );
    assert_linear(
        "edifact message with many segments",
        2_000,
        &big_medlab_message,
        &|b| normalise(Format::Edifact, b),
    );
}

/// A `multipart/mixed` mail of `parts` parts: EDIFACT attachments and text documents.
fn many_part_mail(parts: usize) -> Vec<u8> {
    let edi = String::from_utf8(big_medlab_message(1)).expect("ascii");
    let mut s = String::from(
        "From: lab@example.test\r\nTo: 500005678@lms.example.test\r\nSubject: uitslagen\r\n\
         Message-ID: <cost@example.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n",
    );
    for p in 0..parts {
        s.push_str("--b0\r\n");
        if p % 2 == 0 {
            s.push_str(&format!(
                "Content-Type: application/EDIFACT\r\nContent-Disposition: attachment; filename=\"l{p}.edi\"\r\n\r\n{edi}\r\n"
            ));
        } else {
            s.push_str(&format!(
                "Content-Type: text/plain\r\nContent-Disposition: attachment; filename=\"n{p}.txt\"\r\n\r\nnote {p}\r\n"
            ));
        }
    }
    s.push_str("--b0--\r\n");
    s.into_bytes()
}

/// A mail with one long text body of `lines` lines that look like boundaries but are not.
fn long_body_mail(lines: usize) -> Vec<u8> {
    let mut s = String::from(
        "From: lab@example.test\r\nTo: 500005678@lms.example.test\r\nSubject: brief\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n--b0\r\n\
         Content-Type: text/plain\r\n\r\n",
    );
    for i in 0..lines {
        s.push_str(&format!("--b{i} regel {i} van de brief\r\n"));
    }
    s.push_str("--b0--\r\n");
    s.into_bytes()
}

#[test]
fn mime_cost_is_linear() {
    assert_linear("mime message of many parts", 300, &many_part_mail, &|b| {
        normalise(Format::Rfc822, b)
    });
    assert_linear(
        "mime message with a long body",
        160_000,
        &long_body_mail,
        &|b| normalise(Format::Rfc822, b),
    );
}
