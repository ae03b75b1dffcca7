//! Service characters (UNA), syntax identifiers and lenient text decoding.

use std::borrow::Cow;

use super::error::EdifactError;

/// The service characters of an interchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiters {
    /// Component data element separator (default `:`).
    pub component: u8,
    /// Data element separator (default `+`).
    pub element: u8,
    /// Decimal mark (default `.`); informational, never a separator.
    pub decimal: u8,
    /// Release character (default `?`); `None` when the UNA gives a space.
    pub release: Option<u8>,
    /// Repetition separator; only syntax version 4 has one (default `*`).
    pub repetition: Option<u8>,
    /// Segment terminator (default `'`).
    pub segment: u8,
}

/// Class of a byte in the tokenizer's lookup table.
pub(crate) const DATA: u8 = 0;
pub(crate) const COMPONENT: u8 = 1;
pub(crate) const ELEMENT: u8 = 2;
pub(crate) const SEGMENT: u8 = 3;
pub(crate) const RELEASE: u8 = 4;
pub(crate) const REPETITION: u8 = 5;

impl Delimiters {
    /// ISO 9735 defaults for syntax levels A and C (`:+.? '`), no repetition separator.
    pub const DEFAULT: Self = Self {
        component: b':',
        element: b'+',
        decimal: b'.',
        release: Some(b'?'),
        repetition: None,
        segment: b'\'',
    };

    /// ISO 9735 defaults for syntax level B (UNOB): information separators, no release.
    pub const LEVEL_B: Self = Self {
        component: 0x1F,
        element: 0x1D,
        decimal: b'.',
        release: None,
        repetition: None,
        segment: 0x1C,
    };

    /// Reads the six characters after `UNA`.
    ///
    /// # Errors
    /// [`EdifactError::InvalidUna`] when fewer than six characters follow or two service
    /// characters are the same.
    pub fn from_una(chars: &[u8], offset: usize) -> Result<(Self, u8), EdifactError> {
        let &[component, element, decimal, release, reserved, segment] = chars else {
            return Err(EdifactError::InvalidUna {
                offset,
                reason: "fewer than six service characters",
            });
        };
        let release = (release != b' ').then_some(release);
        let d = Self {
            component,
            element,
            decimal,
            release,
            repetition: None,
            segment,
        };
        let mut seps = vec![component, element, segment];
        seps.extend(release);
        let mut sorted = seps.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != seps.len() {
            return Err(EdifactError::InvalidUna {
                offset,
                reason: "two service characters are the same",
            });
        }
        if seps.iter().any(|c| c.is_ascii_alphanumeric()) {
            return Err(EdifactError::InvalidUna {
                offset,
                reason: "a service character is a letter or digit",
            });
        }
        Ok((d, reserved))
    }

    /// The six characters that follow `UNA` for these delimiters.
    #[must_use]
    pub fn una_chars(&self) -> [u8; 6] {
        [
            self.component,
            self.element,
            self.decimal,
            self.release.unwrap_or(b' '),
            self.repetition.unwrap_or(b' '),
            self.segment,
        ]
    }

    /// Whether `b` must be released in a value.
    #[must_use]
    pub fn is_special(&self, b: u8) -> bool {
        b == self.component
            || b == self.element
            || b == self.segment
            || Some(b) == self.release
            || Some(b) == self.repetition
    }

    pub(crate) fn table(&self) -> [u8; 256] {
        let mut t = [DATA; 256];
        t[usize::from(self.component)] = COMPONENT;
        t[usize::from(self.element)] = ELEMENT;
        t[usize::from(self.segment)] = SEGMENT;
        if let Some(r) = self.repetition {
            t[usize::from(r)] = REPETITION;
        }
        if let Some(r) = self.release {
            t[usize::from(r)] = RELEASE;
        }
        t
    }
}

impl Default for Delimiters {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Character repertoire declared in UNB (S001/0001).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Charset {
    /// Upper case letters, digits, some punctuation.
    Unoa,
    /// Level B: upper and lower case.
    Unob,
    /// ISO 8859-1.
    Unoc,
    /// ISO 10646 (UTF-8 in practice).
    Unoy,
    /// Anything else (`UNOD`..`UNOK`, `IATB`, `ANSI`, ...); decoded the same lenient way.
    Other,
}

impl Charset {
    /// Classifies the syntax identifier.
    #[must_use]
    pub fn from_identifier(id: &[u8]) -> Self {
        match id {
            b"UNOA" => Self::Unoa,
            b"UNOB" => Self::Unob,
            b"UNOC" => Self::Unoc,
            b"UNOY" => Self::Unoy,
            _ => Self::Other,
        }
    }
}

/// Decodes bytes leniently: UTF-8 when they are valid UTF-8, else ISO-8859-1.
///
/// Files declare `UNOA` but carry lower case and accented letters in whatever the sending
/// system used; both readings are lossless, and the raw bytes stay available.
#[must_use]
pub fn decode(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect()),
    }
}

/// Same as [`decode`], for already owned bytes.
#[must_use]
pub(crate) fn decode_cow(bytes: Cow<'_, [u8]>) -> Cow<'_, str> {
    match bytes {
        Cow::Borrowed(b) => decode(b),
        Cow::Owned(v) => match String::from_utf8(v) {
            Ok(s) => Cow::Owned(s),
            Err(e) => Cow::Owned(e.into_bytes().iter().map(|&b| char::from(b)).collect()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn una_defaults_and_space_release() {
        let (d, reserved) = Delimiters::from_una(b":+.? '", 0).unwrap();
        assert_eq!(d, Delimiters::DEFAULT);
        assert_eq!(reserved, b' ');
        let (d, _) = Delimiters::from_una(b":+,  '", 0).unwrap();
        assert_eq!(d.release, None);
        assert_eq!(d.decimal, b',');
    }

    #[test]
    fn una_rejects_clashes_and_short_advice() {
        assert!(matches!(
            Delimiters::from_una(b":::? '", 7),
            Err(EdifactError::InvalidUna { offset: 7, .. })
        ));
        assert!(matches!(
            Delimiters::from_una(b":+.", 0),
            Err(EdifactError::InvalidUna { .. })
        ));
        assert!(Delimiters::from_una(b"A+.? '", 0).is_err());
    }

    #[test]
    fn lenient_decoding_prefers_utf8_then_latin1() {
        assert_eq!(decode("Hillerød".as_bytes()), "Hillerød");
        assert_eq!(decode(b"Hiller\xf8d"), "Hillerød");
        assert!(matches!(decode(b"plain"), Cow::Borrowed(_)));
        assert_eq!(decode_cow(Cow::Owned(b"caf\xe9".to_vec())), "café");
    }
}
