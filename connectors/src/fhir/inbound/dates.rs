//! FHIR R4 `date`, `dateTime` and `instant` checked against the specification's regular
//! expressions (datatypes.html), so a template placeholder (`${DATE, T, M, -1}`) or a
//! local format never reaches an event's times. Elements are known by name: `*Instant`,
//! `issued`, `lastUpdated` and `timestamp` are instants; `*Date`, `*DateTime`, `date`,
//! `start`, `end`, `authoredOn`, `receivedTime`, `created` and `recorded` are dates or
//! dateTimes (the dateTime grammar, which holds every date). One walk, linear in the
//! document; the element path is written only for a refusal.

use super::{Object, REASON_INVALID, Value};
use crate::NormaliseError;

/// Which grammar an element follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    DateTime,
    Instant,
}

fn kind_of(key: &str) -> Option<Kind> {
    if key.ends_with("Instant") || matches!(key, "issued" | "lastUpdated" | "timestamp") {
        Some(Kind::Instant)
    } else if key.ends_with("DateTime")
        || key.ends_with("Date")
        || matches!(
            key,
            "date" | "start" | "end" | "authoredOn" | "receivedTime" | "created" | "recorded"
        )
    {
        Some(Kind::DateTime)
    } else {
        None
    }
}

fn digits(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(u8::is_ascii_digit)
}

fn two(b: &[u8], max: u8) -> bool {
    b.len() == 2 && digits(b) && (b[0] - b'0') * 10 + (b[1] - b'0') <= max
}

/// `YYYY(-MM(-DD)?)?`: year 0001-9999, month 01-12, day 01-31.
fn date(b: &[u8]) -> bool {
    if b.len() < 4 || !digits(&b[..4]) || &b[..4] == b"0000" {
        return false;
    }
    match b.len() {
        4 => true,
        7 => b[4] == b'-' && two(&b[5..7], 12) && &b[5..7] != b"00",
        10 => {
            b[4] == b'-'
                && two(&b[5..7], 12)
                && &b[5..7] != b"00"
                && b[7] == b'-'
                && two(&b[8..10], 31)
                && &b[8..10] != b"00"
        }
        _ => false,
    }
}

/// `hh:mm:ss(.f+)?(Z|(+|-)hh:mm)` with the offset at most 14:00.
fn time_zone(b: &[u8]) -> bool {
    if b.len() < 9 || !two(&b[..2], 23) || b[2] != b':' || !two(&b[3..5], 59) || b[5] != b':' {
        return false;
    }
    if !two(&b[6..8], 60) {
        return false;
    }
    let mut rest = &b[8..];
    if rest.first() == Some(&b'.') {
        let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &rest[1 + n..];
    }
    match rest {
        b"Z" => true,
        [b'+' | b'-', h @ .., b':', m1, m2] if h.len() == 2 => {
            (two(h, 13) && two(&[*m1, *m2], 59)) || (h == b"14" && [*m1, *m2] == *b"00")
        }
        _ => false,
    }
}

fn valid(kind: Kind, s: &str) -> bool {
    let b = s.as_bytes();
    match b.iter().position(|&c| c == b'T') {
        None => kind == Kind::DateTime && date(b),
        Some(t) => t == 10 && date(&b[..10]) && time_zone(&b[11..]),
    }
}

/// Every date, dateTime and instant below `root`, checked.
///
/// # Errors
/// `invalid_element` naming the first element that is not what FHIR allows.
pub(super) fn check(root: &Object) -> Result<(), NormaliseError> {
    let mut path: Vec<String> = vec![root.str("resourceType").unwrap_or("document").to_owned()];
    walk_object(root, &mut path)
}

fn walk_object(o: &Object, path: &mut Vec<String>) -> Result<(), NormaliseError> {
    for (k, child) in o.iter() {
        if let (Some(kind), Some(s)) = (kind_of(k), child.as_str())
            && !valid(kind, s)
        {
            return Err(NormaliseError::Invalid {
                        reason: REASON_INVALID,
                        path: format!("{}.{k}", path.join("")),
                        what: match kind {
                            Kind::Instant => "not a FHIR instant (YYYY-MM-DDThh:mm:ss with zone)",
                            Kind::DateTime => {
                                "not a FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with zone)"
                            }
                        }
                        .into(),
                    });
        }
        path.push(format!(".{k}"));
        let r = walk(child, path);
        path.pop();
        r?;
    }
    Ok(())
}

fn walk(v: &Value, path: &mut Vec<String>) -> Result<(), NormaliseError> {
    match v {
        Value::Object(o) => walk_object(o, path)?,
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(format!("[{i}]"));
                let r = walk(item, path);
                path.pop();
                r?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_r4_grammars_hold() {
        for ok in [
            "2026",
            "2026-11",
            "2026-11-01",
            "2026-11-01T07:40:00Z",
            "2026-11-01T07:40:00.123+01:00",
            "2026-11-01T23:59:60-14:00",
        ] {
            assert!(valid(Kind::DateTime, ok), "{ok}");
        }
        for bad in [
            "${DATE, T, M, -1}",
            "26-11-01",
            "2026-13",
            "2026-11-00",
            "2026-11-01T07:40",
            "2026-11-01T07:40:00",
            "2026-11-01T24:00:00Z",
            "2026-11-01T07:40:00+15:00",
            "2026-11-01 07:40:00Z",
            "",
        ] {
            assert!(!valid(Kind::DateTime, bad), "{bad}");
        }
        assert!(valid(Kind::Instant, "2026-11-01T07:40:00+01:00"));
        assert!(!valid(Kind::Instant, "2026-11-01"));
    }
}
