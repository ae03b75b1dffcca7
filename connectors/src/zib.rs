//! zib building blocks every mapping shares (zib 2020 / nl-core), whatever the source format:
//! the BSN and its eleven-test, the system of the EDIFACT reference number a specimen
//! carries, and names kept as text. The lab-result record itself is built with
//! [`LabTestResult::new`](ketenbus_schemas::event::LabTestResult::new).

use ketenbus_schemas::event::{HumanName, Identifier, LabResultEvent, systems};

use crate::NormaliseError;
use crate::contract::normalise::REASON_INVALID_BSN;

/// System of the EDIFACT reference number a specimen carries (MEDLAB IDE), as nl-core names
/// the extension that holds it; also the extension's URL in FHIR.
pub const EDIFACT_REFERENCE_NUMBER: &str =
    "http://nictiz.nl/fhir/StructureDefinition/ext-EdifactReferenceNumber";

/// The digit the eleven-test asks after eight BSN digits (weights 9 down to 2): the
/// weighted sum modulo 11; `None` when that is 10 (no BSN starts with these digits) or
/// `first8` is not eight ASCII digits.
#[must_use]
pub fn bsn_check_digit(first8: &str) -> Option<u8> {
    let b = first8.as_bytes();
    if b.len() != 8 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = b
        .iter()
        .zip((2..=9).rev())
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    u8::try_from(sum % 11).ok().filter(|&c| c < 10)
}

/// Whether a nine-digit number passes the BSN eleven-test.
#[must_use]
pub fn bsn_is_valid(bsn: &str) -> bool {
    match bsn.as_bytes() {
        [first8 @ .., last] if bsn.len() == 9 && last.is_ascii_digit() => {
            std::str::from_utf8(first8).ok().and_then(bsn_check_digit) == Some(last - b'0')
        }
        _ => false,
    }
}

/// The `invalid_bsn` rejection of a BSN at `path` that fails the eleven-test.
#[must_use]
pub fn invalid_bsn(path: String) -> NormaliseError {
    NormaliseError::Invalid {
        reason: REASON_INVALID_BSN,
        path,
        what: "BSN fails the eleven-test".to_owned(),
    }
}

/// A BSN identifier after the eleven-test, or an `invalid_bsn` rejection naming the place.
///
/// # Errors
/// [`invalid_bsn`] at `at()` when `value` fails the eleven-test.
pub fn bsn_identifier(
    value: &str,
    at: impl FnOnce() -> String,
) -> Result<Identifier, NormaliseError> {
    if bsn_is_valid(value) {
        Ok(Identifier {
            system: systems::BSN.to_owned(),
            value: value.to_owned(),
        })
    } else {
        Err(invalid_bsn(at()))
    }
}

/// A name the source gives only as one string (`Dr. A. de Boer`), kept as text.
#[must_use]
pub fn text_name(text: impl Into<String>) -> HumanName {
    HumanName {
        text: Some(text.into()),
        ..HumanName::default()
    }
}

/// A reference limit as a number; a decimal comma counts (EDIFACT senders write both).
fn decimal(v: &str) -> Option<f64> {
    v.trim().replace(',', ".").parse().ok()
}

/// Warnings on what was kept as sent although doubtful: a reversed reference range.
pub(crate) fn range_warnings(e: &mut LabResultEvent) {
    for r in &e.results {
        if let (Some(low), Some(high)) = (&r.reference_low, &r.reference_high)
            && let (Some(l), Some(h)) = (decimal(low), decimal(high))
            && l > h
        {
            e.warnings.push(format!(
                "result {}: reference range low {low} above high {high}, kept as sent",
                r.id
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eleven_test() {
        for valid in ["999911120", "123456782", "111222333", "999999990"] {
            assert!(bsn_is_valid(valid), "{valid}");
        }
        for invalid in [
            "999911121",
            "999999991",
            "12345678",
            "12345678a",
            "1234567890",
        ] {
            assert!(!bsn_is_valid(invalid), "{invalid}");
        }
        assert_eq!(bsn_check_digit("99991112"), Some(0));
        assert_eq!(bsn_check_digit("9999111a"), None);
    }
}
