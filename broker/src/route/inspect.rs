//! `ketenbus inspect FILE`: what a partner's file looks like to ketenbus — the parsed
//! message and the events the router would make of it — without touching the log.

use ketenbus_connectors::{edifact, fhir};
use ketenbus_schemas::{Format, RawEnvelope};
use serde_json::{Value as Json, json};

use crate::route::normalise::Normalisers;

/// Guess the format from the first bytes: `UNA`/`UNB` EDIFACT, `{` FHIR JSON, `<` FHIR XML,
/// header lines RFC 5322.
#[must_use]
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |i| &text[i..]);
    if start.starts_with(b"UNA") || start.starts_with(b"UNB") {
        return Some(Format::Edifact);
    }
    match start.first() {
        Some(b'{') => return Some(Format::FhirJson),
        Some(b'<') => return Some(Format::FhirXml),
        _ => {}
    }
    let first_line = start.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let is_header = first_line
        .iter()
        .position(|b| *b == b':')
        .is_some_and(|colon| {
            colon > 0
                && first_line[..colon]
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        });
    is_header.then_some(Format::Rfc822)
}

/// Inspect `bytes` of `format`: `{format, parsed, events}` or `{.., rejected}`.
///
/// # Errors
/// A positioned parse error when the bytes are not valid in that format.
pub fn inspect(bytes: &[u8], format: Format, normalisers: &Normalisers) -> Result<Json, String> {
    let parsed = match format {
        Format::Edifact => {
            edifact::document_json(&edifact::parse(bytes).map_err(|e| e.to_string())?)
        }
        Format::FhirJson | Format::FhirXml => {
            let tree = fhir::parse(format, bytes).map_err(|e| e.to_string())?;
            serde_json::from_slice(
                &fhir::write(Format::FhirJson, &tree).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?
        }
        Format::Rfc822 => {
            ketenbus_connectors::mail::mime::describe(bytes).map_err(|e| e.to_string())?
        }
    };
    let envelope = RawEnvelope {
        id: "inspect".into(),
        received_at_ms: 0,
        connector: "inspect".into(),
        format,
        content_type: String::new(),
        sender: None,
        receiver: None,
        body: bytes.to_vec(),
        attributes: std::collections::BTreeMap::new(),
    };
    let mut out = json!({ "format": format.as_str(), "parsed": parsed });
    match normalisers.get(&format).map(|n| n.normalise(&envelope)) {
        Some(Ok(events)) => {
            out["events"] = serde_json::to_value(events).map_err(|e| e.to_string())?
        }
        Some(Err(e)) => out["rejected"] = json!({ "reason": e.reason(), "error": e.to_string() }),
        None => {
            out["rejected"] =
                json!({ "reason": "unsupported_format", "error": "no normaliser for this format" })
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_recognised() {
        assert_eq!(sniff(b"UNA:+.? 'UNB+UNOA:1"), Some(Format::Edifact));
        assert_eq!(sniff(b"\n UNB+UNOC:3"), Some(Format::Edifact));
        assert_eq!(
            sniff(b"{\"resourceType\":\"Bundle\"}"),
            Some(Format::FhirJson)
        );
        assert_eq!(
            sniff(b"<?xml version=\"1.0\"?><Bundle/>"),
            Some(Format::FhirXml)
        );
        assert_eq!(
            sniff(b"From: a@b.test\r\nSubject: x\r\n\r\nhi"),
            Some(Format::Rfc822)
        );
        assert_eq!(sniff(b"hello world"), None);
    }

    #[test]
    fn an_edifact_file_shows_its_segments_and_events() {
        let j = inspect(
            b"UNB+UNOA:1+500001234+500005678+261101:0815+IC1'UNH+M1+MEDLAB:1'PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN999911120'DET+26:11:01+07:40'IDE+J+L1+bloed'BEP+0+Kalium+5?.9++mmol/l+>+3.5+5.0+K'UNT+6+M1'UNZ+1+IC1'",
            Format::Edifact,
            &crate::route::normalise::normalisers(),
        )
        .unwrap();
        assert_eq!(j["format"], "edifact");
        assert_eq!(
            j["parsed"]["interchanges"][0]["messages"][0]["type"],
            "MEDLAB"
        );
        assert_eq!(j["events"][0]["header"]["kind"], "lab_result");
        assert_eq!(j["events"][0]["results"][0]["value_decimal"], "5.9");
    }

    #[test]
    fn a_broken_file_names_the_position() {
        let err = inspect(
            b"UNB+UNOA:1+A",
            Format::Edifact,
            &crate::route::normalise::normalisers(),
        )
        .unwrap_err();
        assert!(err.contains("segment") || err.contains("byte"), "{err}");
    }

    #[test]
    fn a_mail_shows_its_parts_and_events() {
        let eml =
            include_bytes!("../../../connectors/testdata/mail/lab-result-edifact-attachment.eml");
        assert_eq!(sniff(eml), Some(Format::Rfc822));
        let j = inspect(eml, Format::Rfc822, &crate::route::normalise::normalisers()).unwrap();
        assert_eq!(j["format"], "rfc822");
        assert!(j["parsed"].is_object(), "{j}");
        assert_eq!(j["events"][0]["header"]["kind"], "lab_result", "{j}");
    }
}
