//! The parsed interchange as JSON, for `ketenbus inspect`.

use serde_json::{Value as Json, json};

use super::map::normalise_document;
use super::parse::document::{Document, parse};
use super::parse::error::EdifactError;
use super::parse::syntax::Delimiters;
use super::parse::tokenize::Segment;

fn delimiters_json(d: &Delimiters) -> Json {
    let ch = |b: u8| Json::String(char::from(b).to_string());
    json!({
        "component": ch(d.component),
        "element": ch(d.element),
        "decimal": ch(d.decimal),
        "release": d.release.map(ch),
        "repetition": d.repetition.map(ch),
        "segment": ch(d.segment),
    })
}

/// One segment as JSON: tag, counters, byte offset, and elements as arrays of unescaped
/// component strings (a repeated element becomes `{"repetitions": [[...], ...]}`).
#[must_use]
pub fn segment_json(seg: &Segment<'_>) -> Json {
    let mut elements: Vec<Json> = Vec::with_capacity(seg.element_count());
    for occ in seg.occurrences() {
        let comps: Vec<Json> = occ
            .components()
            .map(|v| Json::String(v.text().into_owned()))
            .collect();
        if occ.is_repeat()
            && let Some(last) = elements.last_mut()
        {
            if let Json::Object(map) = last {
                if let Some(Json::Array(reps)) = map.get_mut("repetitions") {
                    reps.push(Json::Array(comps));
                }
            } else {
                let first = last.take();
                *last = json!({ "repetitions": [first, comps] });
            }
            continue;
        }
        elements.push(Json::Array(comps));
    }
    let counters: Vec<String> = seg.counters().map(|v| v.text().into_owned()).collect();
    json!({
        "tag": seg.tag(),
        "counters": counters,
        "offset": seg.offset(),
        "elements": elements,
    })
}

/// The parsed document as JSON: interchanges with their header fields, delimiters,
/// messages with their segments, and any control mismatches.
#[must_use]
pub fn document_json(doc: &Document<'_>) -> Json {
    let interchanges: Vec<Json> = doc
        .interchanges()
        .map(|ic| {
            let messages: Vec<Json> = ic
                .messages()
                .map(|m| {
                    json!({
                        "reference": m.reference(),
                        "type": m.message_type(),
                        "version": m.version(),
                        "release": m.release(),
                        "agency": m.agency(),
                        "association_code": m.association_code(),
                        "segments": m.segments().map(|s| segment_json(&s)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "number": ic.number(),
                "delimiters": delimiters_json(&ic.delimiters()),
                "syntax_identifier": ic.syntax_identifier(),
                "syntax_version": ic.syntax_version(),
                "sender": ic.sender(),
                "recipient": ic.recipient(),
                "control_reference": ic.control_reference(),
                "header": ic.header().map(|s| segment_json(&s)),
                "messages": messages,
                "trailer": ic.trailer().map(|s| segment_json(&s)),
            })
        })
        .collect();
    let issues: Vec<String> = doc
        .control_issues()
        .iter()
        .map(ToString::to_string)
        .collect();
    json!({
        "format": "edifact",
        "bytes": doc.input().len(),
        "interchanges": interchanges,
        "control_issues": issues,
    })
}

/// Parses `bytes` and returns the interchange(s) as JSON (see [`document_json`]) with the
/// events they normalise to (`"events"`, ids from envelope id `inspect`) or why they do not
/// (`"rejected": {"reason", "error"}`). Nothing is stored or sent.
///
/// # Errors
/// The positioned parse error when the input is not EDIFACT.
pub fn inspect(bytes: &[u8]) -> Result<Json, EdifactError> {
    let doc = parse(bytes)?;
    let mut j = document_json(&doc);
    match normalise_document("inspect", &doc) {
        Ok(events) => j["events"] = serde_json::to_value(events).unwrap_or(Json::Null),
        Err(e) => j["rejected"] = json!({ "reason": e.reason(), "error": e.to_string() }),
    }
    Ok(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_shows_unescaped_values() {
        let j = inspect(
            b"UNB+UNOA:1+A+B+261101:0815+IC'UNH+M+MEDLAB:1'BEP:1+0+Kalium+5?.9'UNT+3+M'UNZ+1+IC'",
        )
        .unwrap();
        let ic = &j["interchanges"][0];
        assert_eq!(ic["sender"], "A");
        assert_eq!(ic["delimiters"]["release"], "?");
        let m = &ic["messages"][0];
        assert_eq!(m["type"], "MEDLAB");
        assert_eq!(m["segments"][1]["tag"], "BEP");
        assert_eq!(m["segments"][1]["counters"], json!(["1"]));
        assert_eq!(
            m["segments"][1]["elements"],
            json!([["0"], ["Kalium"], ["5.9"]])
        );
        assert_eq!(j["control_issues"], json!([]));
        assert_eq!(j["rejected"]["reason"], "missing_element");
    }

    #[test]
    fn repetitions_are_grouped() {
        let j = inspect(b"UNB+UNOC:4+A+B+1:1+R'UNH+1+X'NAD+a*b:c+d'UNT+3+1'UNZ+1+R'").unwrap();
        assert_eq!(
            j["interchanges"][0]["messages"][0]["segments"][1]["elements"],
            json!([{"repetitions": [["a"], ["b", "c"]]}, ["d"]])
        );
    }
}
