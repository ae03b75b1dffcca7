//! `ketenbus inspect --coverage FILE`: which of a message's source elements the events
//! carry, so a loss is visible rather than silent.
//!
//! Source elements are read from the parsed message ([`super::inspect::inspect`]'s `parsed`):
//! for FHIR every leaf element with a value, named by its path
//! (`Bundle.entry[2].resource.valueQuantity.value`); for EDIFACT every component with a value,
//! named by segment, occurrence, element and component (`m1/BEP[2]/3/1`: message 1, the
//! second BEP, element 3, component 1; `UNB/2/1` for the interchange header; a composite of
//! short numbers only, a date or time, is one element: `m1/PID[1]/1`). Matching by value
//! can count a short code as carried when another field holds the same text; the path list
//! shows what matched how. An element is
//! carried when its value is found among the values of the events' fields (see [`Match`]):
//! the report is generic, so it measures any field a mapping adds without knowing of it.
//! Elements that only give the message its shape (FHIR `resourceType`, `id`, `meta`,
//! narrative, references and extension URLs; EDIFACT `UNA`, `UNT`, `UNZ` and the syntax
//! identifier) are counted apart as structural and are not in the totals.

use serde::Serialize;
use serde_json::Value as Json;

/// How an element's value was found among the events' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// The same text (ignoring case and surrounding spaces).
    Equal,
    /// Within a longer value (three characters or more: a sender id in `mailbox:<id>`).
    Within,
    /// The events hold the value's main part, at least six characters and three fifths of
    /// it (a BSN without the `BSN` prefix that names its kind).
    Part,
    /// A date or time with the same digits in order (EDIFACT `26:11:01` in `2026-11-01`).
    Date,
    /// A code the mapping translates (EDIFACT gender `M` as `male`).
    Translated,
}

/// One source element.
#[derive(Debug, Clone, Serialize)]
pub struct Element {
    /// Where it is in the message.
    pub path: String,
    /// Its value as the message gives it.
    pub value: String,
    /// How the events carry it; `None` when they do not.
    pub carried: Option<Match>,
}

/// The report for one message.
#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    /// `edifact`, `fhir_json` or `fhir_xml`.
    pub format: String,
    /// Every source element with a value, in message order.
    pub elements: Vec<Element>,
    /// Elements carried.
    pub carried: usize,
    /// Elements counted.
    pub total: usize,
    /// `carried / total` in percent, one decimal (100 for a message without elements).
    pub percent: f64,
    /// Structural elements left out of the totals.
    pub structural: usize,
    /// Why the message made no events, when it made none.
    pub rejected: Option<Json>,
}

/// The coverage of a message from `inspect`'s output (`{format, parsed, events|rejected}`).
///
/// # Errors
/// For formats other than EDIFACT and FHIR (a mail is measured per part, by inspecting the
/// part).
pub fn coverage(inspected: &Json) -> Result<Coverage, String> {
    let format = inspected["format"].as_str().unwrap_or_default().to_owned();
    let parsed = &inspected["parsed"];
    let mut source = Vec::new();
    let mut structural = 0;
    match format.as_str() {
        "edifact" => edifact_elements(parsed, &mut source, &mut structural),
        "fhir_json" | "fhir_xml" => {
            let root = parsed["resourceType"]
                .as_str()
                .unwrap_or("Resource")
                .to_owned();
            fhir_elements(parsed, &root, &mut source, &mut structural);
        }
        other => {
            return Err(format!(
                "coverage is measured for EDIFACT and FHIR, not {other}"
            ));
        }
    }
    let mut values = Vec::new();
    if let Some(events) = inspected["events"].as_array() {
        for e in events {
            event_values(e, "", &mut values);
        }
    }
    let values: Vec<String> = values.iter().map(|v| v.trim().to_lowercase()).collect();
    let elements: Vec<Element> = source
        .into_iter()
        .map(|(path, value)| {
            let carried = find(&value, &values);
            Element {
                path,
                value,
                carried,
            }
        })
        .collect();
    let total = elements.len();
    let carried = elements.iter().filter(|e| e.carried.is_some()).count();
    let percent = if total == 0 {
        100.0
    } else {
        // Element counts are far below 2^52: exact in f64.
        #[allow(clippy::cast_precision_loss)]
        let p = carried as f64 * 100.0 / total as f64;
        (p * 10.0).round() / 10.0
    };
    Ok(Coverage {
        format,
        elements,
        carried,
        total,
        percent,
        structural,
        rejected: inspected.get("rejected").cloned(),
    })
}

/// The report as text: one line per element (`+` carried, `-` not), then the totals.
#[must_use]
pub fn render(c: &Coverage) -> String {
    use std::fmt::Write;
    let width = c.elements.iter().map(|e| e.path.len()).max().unwrap_or(0);
    let mut out = String::new();
    for e in &c.elements {
        let how = match e.carried {
            Some(m) => format!(
                "+ {}",
                serde_json::to_value(m)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or("")
            ),
            None => "- NOT CARRIED".to_owned(),
        };
        let mut value = e.value.replace(['\r', '\n'], " ");
        if value.chars().count() > 60 {
            value = value.chars().take(57).collect::<String>() + "...";
        }
        let _ = writeln!(out, "{:width$}  {how:16}  {value}", e.path);
    }
    if let Some(r) = &c.rejected {
        let _ = writeln!(out, "rejected: {r}");
    }
    let _ = writeln!(
        out,
        "carried {}/{} ({:.1}%), {} structural elements not counted",
        c.carried, c.total, c.percent, c.structural
    );
    out
}

/// Header fields the router makes itself rather than reading them from the message.
const MADE_BY_ROUTER: &[&str] = &[
    "header.id",
    "header.envelope_id",
    "header.index",
    "header.kind",
    "header.source_format",
    "header.patient_key",
];

fn event_values(v: &Json, path: &str, out: &mut Vec<String>) {
    match v {
        Json::Object(m) => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if !MADE_BY_ROUTER.contains(&p.as_str()) {
                    event_values(x, &p, out);
                }
            }
        }
        Json::Array(a) => a.iter().for_each(|x| event_values(x, path, out)),
        Json::String(s) => out.push(s.clone()),
        Json::Number(n) => out.push(n.to_string()),
        Json::Bool(b) => out.push(b.to_string()),
        Json::Null => {}
    }
}

/// Codes a mapping writes as words: EDIFACT and HL7 v2 administrative gender.
const TRANSLATED: &[(&str, &str)] = &[
    ("m", "male"),
    ("v", "female"),
    ("f", "female"),
    ("o", "other"),
    ("u", "unknown"),
];

fn find(value: &str, values: &[String]) -> Option<Match> {
    let s = value.trim().to_lowercase();
    if s.is_empty() {
        return None;
    }
    if values.contains(&s) {
        return Some(Match::Equal);
    }
    if s.chars().count() >= 3 && values.iter().any(|v| v.contains(&s)) {
        return Some(Match::Within);
    }
    let digits = |t: &str| t.chars().filter(char::is_ascii_digit).collect::<String>();
    let date_like = |t: &str| {
        t.chars()
            .all(|c| c.is_ascii_digit() || ":-T+ .Z/".contains(c.to_ascii_uppercase()))
    };
    // The value's main part, e.g. a BSN without the `BSN` that names its kind.
    if values.iter().any(|v| {
        v.chars().count() >= 6
            && 5 * v.chars().count() >= 3 * s.chars().count()
            && s.contains(v.as_str())
    }) {
        return Some(Match::Part);
    }
    let d = digits(&s);
    if d.len() >= 4
        && date_like(&s)
        && values
            .iter()
            .any(|v| date_like(v) && digits(v).contains(&d))
    {
        return Some(Match::Date);
    }
    let translated = TRANSLATED
        .iter()
        .filter(|(code, _)| *code == s)
        .any(|(_, word)| values.iter().any(|v| v == word));
    translated.then_some(Match::Translated)
}

/// FHIR keys that only give the message its shape.
const FHIR_STRUCTURAL: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "fullUrl",
    "request",
    "response",
];

fn fhir_elements(v: &Json, path: &str, out: &mut Vec<(String, String)>, structural: &mut usize) {
    match v {
        Json::Object(m) => {
            let is_reference = m.contains_key("reference");
            for (k, x) in m {
                let p = format!("{path}.{k}");
                let narrative = k == "text" && x.get("div").is_some();
                let shape = FHIR_STRUCTURAL.contains(&k.as_str())
                    || narrative
                    || (is_reference && (k == "reference" || k == "type"))
                    || (k == "url"
                        && path.ends_with(']')
                        && m.keys().any(|k| k.starts_with("value") || k == "extension"))
                    || k == "div";
                if shape {
                    *structural += leaves(x);
                } else {
                    fhir_elements(x, &p, out, structural);
                }
            }
        }
        Json::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                fhir_elements(x, &format!("{path}[{i}]"), out, structural);
            }
        }
        Json::String(s) => out.push((path.to_owned(), s.clone())),
        Json::Number(n) => out.push((path.to_owned(), n.to_string())),
        Json::Bool(b) => out.push((path.to_owned(), b.to_string())),
        Json::Null => {}
    }
}

fn leaves(v: &Json) -> usize {
    match v {
        Json::Object(m) => m.values().map(leaves).sum(),
        Json::Array(a) => a.iter().map(leaves).sum(),
        Json::Null => 0,
        _ => 1,
    }
}

/// EDIFACT segments that are syntax only.
const EDIFACT_STRUCTURAL: &[&str] = &["UNA", "UNT", "UNZ"];

fn edifact_elements(parsed: &Json, out: &mut Vec<(String, String)>, structural: &mut usize) {
    let Some(interchanges) = parsed["interchanges"].as_array() else {
        return;
    };
    let many = interchanges.len() > 1;
    for (i, ic) in interchanges.iter().enumerate() {
        let prefix = if many {
            format!("i{}/", i + 1)
        } else {
            String::new()
        };
        segment(&ic["header"], &format!("{prefix}UNB"), out, structural);
        for (m, msg) in ic["messages"].as_array().into_iter().flatten().enumerate() {
            let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
            for seg in msg["segments"].as_array().into_iter().flatten() {
                let tag = seg["tag"].as_str().unwrap_or("?");
                let n = seen.entry(tag).or_default();
                *n += 1;
                segment(
                    seg,
                    &format!("{prefix}m{}/{tag}[{n}]", m + 1),
                    out,
                    structural,
                );
            }
        }
        segment(&ic["trailer"], &format!("{prefix}UNZ"), out, structural);
    }
}

fn segment(seg: &Json, name: &str, out: &mut Vec<(String, String)>, structural: &mut usize) {
    let tag = seg["tag"].as_str().unwrap_or_default();
    for (e, element) in seg["elements"].as_array().into_iter().flatten().enumerate() {
        let parts: Vec<&str> = element
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Json::as_str)
            .collect();
        // A composite of short numbers only (a date 1961:04:09, a time 07:40, a UNB
        // 261101:0815) is one value; a party id with its qualifier is not.
        if parts.len() > 1
            && parts
                .iter()
                .all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        {
            if EDIFACT_STRUCTURAL.contains(&tag) || (tag == "UNB" && e == 0) {
                *structural += 1;
            } else {
                out.push((format!("{name}/{}", e + 1), parts.join(":")));
            }
            continue;
        }
        for (c, component) in element.as_array().into_iter().flatten().enumerate() {
            let Some(value) = component.as_str().filter(|v| !v.is_empty()) else {
                continue;
            };
            if EDIFACT_STRUCTURAL.contains(&tag) || (tag == "UNB" && e == 0) {
                *structural += 1;
            } else {
                out.push((format!("{name}/{}/{}", e + 1, c + 1), value.to_owned()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::inspect::inspect;
    use crate::route::normalise::normalisers;
    use ketenbus_schemas::Format;

    fn measure(bytes: &[u8], format: Format) -> Coverage {
        coverage(&inspect(bytes, format, &normalisers()).unwrap()).unwrap()
    }

    /// Element `path` is carried as `how` (`None`: not carried).
    fn carried(c: &Coverage, path: &str, how: Option<Match>) {
        assert_eq!(element(c, path).carried, how, "{path} in\n{}", render(c));
    }

    fn element<'a>(c: &'a Coverage, path: &str) -> &'a Element {
        c.elements
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no {path} in\n{}", render(c)))
    }

    /// A MEDLAB message with one element the mapping deliberately leaves out: the fifth
    /// element of ZKH, which MEDLAB does not define (ZKH has name, address, phone).
    const MEDLAB: &[u8] = b"UNB+UNOA:1+500001234+500005678+261101:0815+IC0042'UNH+M0042+MEDLAB:1'ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567++QQ-NOT-CARRIED'PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN999911120'DET+26:11:01+07:40'IDE+J+L2611017+bloed'BEP+0+Kalium+5?.9++mmol/l+>+3.5+5.0+K'UNT+7+M0042'UNZ+1+IC0042'";

    #[test]
    fn an_edifact_message_lists_each_element_and_whether_the_event_carries_it() {
        let c = measure(MEDLAB, Format::Edifact);
        let text = render(&c);
        // Carried, in each way of finding it.
        carried(&c, "m1/PID[1]/3/1", Some(Match::Equal));
        assert_eq!(element(&c, "m1/BEP[1]/3/1").value, "5.9");
        carried(&c, "m1/BEP[1]/3/1", Some(Match::Equal));
        carried(&c, "UNB/2/1", Some(Match::Within));
        assert_eq!(element(&c, "m1/PID[1]/1").value, "1961:04:09");
        carried(&c, "m1/PID[1]/1", Some(Match::Date));
        carried(&c, "m1/DET[1]/1", Some(Match::Date));
        carried(&c, "m1/PID[1]/5/1", Some(Match::Part));
        carried(&c, "m1/PID[1]/2/1", Some(Match::Translated));
        // The element no mapping carries shows as lost, and counts.
        let lost = element(&c, "m1/ZKH[1]/5/1");
        assert_eq!(lost.value, "QQ-NOT-CARRIED");
        assert_eq!(lost.carried, None);
        assert!(
            text.contains("m1/ZKH[1]/5/1") && text.contains("NOT CARRIED"),
            "{text}"
        );
        // Totals: every element counted once; syntax (UNB/1, UNT, UNZ) apart.
        assert_eq!(c.total, c.elements.len());
        assert_eq!(
            c.carried,
            c.elements.iter().filter(|e| e.carried.is_some()).count()
        );
        assert!(c.carried < c.total);
        assert_eq!(c.structural, 2 + 2 + 2, "{text}");
        assert!(!c.elements.iter().any(|e| e.path.starts_with("m1/UNT")));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["total"], c.total);
        assert_eq!(json["elements"].as_array().unwrap().len(), c.total);
        assert!(json["percent"].as_f64().unwrap() < 100.0);
    }

    #[test]
    fn a_fhir_resource_lists_its_leaf_elements_with_paths() {
        let xml = include_bytes!(
            "../../../connectors/testdata/fhir/nictiz-r4-zib2020/nl-core-LaboratoryTestResult-01.xml"
        );
        let c = measure(xml, Format::FhirXml);
        let text = render(&c);
        assert_eq!(element(&c, "Observation.valueQuantity.value").value, "138");
        carried(&c, "Observation.valueQuantity.value", Some(Match::Equal));
        carried(&c, "Observation.code.coding[0].code", Some(Match::Equal));
        // Narrative, meta, id and references are structure, not counted.
        assert!(
            !c.elements.iter().any(|e| e.path.contains(".text.div")
                || e.path.contains("meta")
                || e.path.ends_with(".reference")),
            "{text}"
        );
        assert!(c.structural >= 4, "{text}");
    }

    #[test]
    fn an_unknown_extension_is_an_element_the_event_does_not_carry() {
        let json = br#"{"resourceType":"Observation","status":"final",
            "extension":[{"url":"http://example.test/fhir/StructureDefinition/not-carried","valueString":"QQ-NOT-CARRIED"}],
            "code":{"coding":[{"system":"http://loinc.org","code":"2947-0","display":"Sodium [Moles/volume] in Blood"}]},
            "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],
            "effectiveDateTime":"2021-06-12T13:15:00+02:00",
            "valueQuantity":{"value":138,"unit":"mmol/l","system":"http://unitsofmeasure.org","code":"mmol/l"}}"#;
        let c = measure(json, Format::FhirJson);
        let lost = element(&c, "Observation.extension[0].valueString");
        assert_eq!(lost.carried, None, "{}", render(&c));
        assert!(
            !c.elements
                .iter()
                .any(|e| e.path == "Observation.extension[0].url")
        );
        carried(&c, "Observation.effectiveDateTime", Some(Match::Equal));
        carried(&c, "Observation.valueQuantity.value", Some(Match::Equal));
        assert!(
            c.rejected.is_none() && c.carried < c.total,
            "{}",
            render(&c)
        );
    }

    /// Every message file of the project's testdata is measured: each element once, totals
    /// that add up, and a message that makes events has elements they carry.
    #[test]
    fn every_testdata_message_is_measured() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../connectors/testdata");
        let mut files = Vec::new();
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if ["edi", "xml", "json"]
                    .contains(&p.extension().and_then(|x| x.to_str()).unwrap_or(""))
                    && !p.to_string_lossy().ends_with(".events.json")
                {
                    files.push(p);
                }
            }
        }
        assert!(files.len() > 10);
        let mut measured = 0;
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            let Some(format) = crate::route::inspect::sniff(&bytes) else {
                continue;
            };
            let Ok(inspected) = inspect(&bytes, format, &normalisers()) else {
                continue; // does not parse: nothing to measure
            };
            let c = coverage(&inspected).unwrap();
            let paths: std::collections::HashSet<&str> =
                c.elements.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(paths.len(), c.total, "{}: each element once", f.display());
            assert_eq!(
                c.carried,
                c.elements.iter().filter(|e| e.carried.is_some()).count()
            );
            if c.rejected.is_none() {
                assert!(c.carried > 0, "{}\n{}", f.display(), render(&c));
            } else {
                assert_eq!(c.carried, 0, "{}: no events, nothing carried", f.display());
            }
            measured += 1;
        }
        assert!(measured > 10, "{measured}");
    }
}
