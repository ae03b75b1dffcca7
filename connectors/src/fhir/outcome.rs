//! OperationOutcome: what ketenbus answers senders, and how it reads receivers' answers.

use super::value::{Object, Value};
use crate::NormaliseError;

/// Longest issue text kept from a receiver's answer.
const MAX_DETAIL: usize = 500;

/// An OperationOutcome with one issue. `expression` is the element path.
#[must_use]
pub fn outcome(severity: &str, code: &str, text: &str, expression: Option<&str>) -> Value {
    let issue = Object::new()
        .with("severity", severity)
        .with("code", code)
        .with("diagnostics", text)
        .with_array(
            "expression",
            expression.map(Value::from).into_iter().collect(),
        );
    Object::new()
        .with("resourceType", "OperationOutcome")
        .with("issue", vec![issue.into()])
        .into()
}

/// The HTTP status and OperationOutcome for a message that did not map: `400` for
/// syntax, `422` for content the sender can fix; the issue names the element path.
#[must_use]
pub fn for_normalise_error(e: &NormaliseError) -> (u16, Value) {
    match e {
        NormaliseError::Syntax { position, what, .. } => (
            400,
            outcome(
                "error",
                "structure",
                &format!("{}: {what}", e.reason()),
                Some(position),
            ),
        ),
        NormaliseError::Invalid { path, what, reason } => {
            let code = if *reason == super::inbound::REASON_MISSING {
                "required"
            } else {
                "value"
            };
            (
                422,
                outcome("error", code, &format!("{reason}: {what}"), Some(path)),
            )
        }
        NormaliseError::UnsupportedMessageType { message_type } => (
            422,
            outcome(
                "error",
                "not-supported",
                &format!("unsupported_message_type: {message_type} carries nothing ketenbus maps"),
                None,
            ),
        ),
        NormaliseError::UnsupportedFormat { .. } => {
            (415, outcome("error", "not-supported", &e.to_string(), None))
        }
    }
}

/// The issues of an OperationOutcome as one line (`error processing: text @ path; ...`),
/// cut to a bounded length; `None` when `v` is not an OperationOutcome with issues.
#[must_use]
pub fn issue_text(v: &Value) -> Option<String> {
    if v.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome") {
        return None;
    }
    let parts: Vec<String> = v
        .get("issue")?
        .as_array()?
        .iter()
        .filter_map(Value::as_object)
        .map(|i| {
            let mut s = format!(
                "{} {}",
                i.str("severity").unwrap_or("error"),
                i.str("code").unwrap_or("unknown")
            );
            let text = i
                .str("diagnostics")
                .or_else(|| i.obj("details").and_then(|d| d.str("text")));
            if let Some(t) = text {
                s.push_str(": ");
                s.push_str(t);
            }
            let at: Vec<&str> = i
                .arr("expression")
                .iter()
                .chain(i.arr("location"))
                .filter_map(Value::as_str)
                .collect();
            if !at.is_empty() {
                s.push_str(" @ ");
                s.push_str(&at.join(", "));
            }
            s
        })
        .collect();
    if parts.is_empty() {
        return None;
    }
    let mut s = parts.join("; ");
    if s.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_content_is_422_with_the_path() {
        let e = NormaliseError::Invalid {
            reason: "invalid_bsn",
            path: "Bundle.entry[3].resource.identifier[0]".into(),
            what: "BSN fails the eleven-test".into(),
        };
        let (status, oo) = for_normalise_error(&e);
        assert_eq!(status, 422);
        assert_eq!(
            issue_text(&oo).unwrap(),
            "error value: invalid_bsn: BSN fails the eleven-test @ Bundle.entry[3].resource.identifier[0]"
        );
    }

    #[test]
    fn issue_text_reads_details_and_locations() {
        let v = crate::fhir::json::parse(br#"{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"invalid","details":{"text":"bad"},"location":["Bundle.entry[0]"]},{"severity":"warning","code":"x"}]}"#).unwrap();
        assert_eq!(
            issue_text(&v).unwrap(),
            "fatal invalid: bad @ Bundle.entry[0]; warning x"
        );
        assert!(issue_text(&Value::from("x")).is_none());
    }
}
