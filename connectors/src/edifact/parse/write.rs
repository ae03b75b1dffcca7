//! Segments back to bytes, releasing service characters in values.

use std::fmt;

use super::document::Document;
use super::error::{EdifactError, Position};
use super::syntax::Delimiters;
use super::tokenize::Segment;

/// An owned segment: tag, repeat counters, and elements of unescaped component bytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct OwnedSegment {
    /// Three letters or digits.
    pub tag: String,
    /// Repeat counters after the tag (`BEP:1:1:5`), unescaped bytes.
    pub counters: Vec<Vec<u8>>,
    /// Data elements after the tag.
    pub elements: Vec<OwnedElement>,
}

/// An owned data element: one or more repetitions, each one or more components.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct OwnedElement {
    /// Repetitions (exactly one before syntax version 4), each a list of components.
    pub repetitions: Vec<Vec<Vec<u8>>>,
}

impl OwnedElement {
    /// A simple element of one component.
    #[must_use]
    pub fn simple(value: impl Into<Vec<u8>>) -> Self {
        Self {
            repetitions: vec![vec![value.into()]],
        }
    }

    /// A composite element of several components.
    #[must_use]
    pub fn composite<I, V>(components: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<Vec<u8>>,
    {
        Self {
            repetitions: vec![components.into_iter().map(Into::into).collect()],
        }
    }
}

impl fmt::Debug for OwnedSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Shape only: values may be patient data.
        let shape: Vec<Vec<usize>> = self
            .elements
            .iter()
            .map(|e| e.repetitions.iter().map(Vec::len).collect())
            .collect();
        f.debug_struct("OwnedSegment")
            .field("tag", &self.tag)
            .field("counters", &self.counters)
            .field("components_per_repetition", &shape)
            .finish()
    }
}

impl fmt::Debug for OwnedElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedElement")
            .field("repetitions", &self.repetitions.len())
            .finish()
    }
}

impl OwnedSegment {
    /// A segment with simple elements.
    #[must_use]
    pub fn new<I, V>(tag: &str, elements: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<Vec<u8>>,
    {
        Self {
            tag: tag.to_owned(),
            counters: Vec::new(),
            elements: elements.into_iter().map(OwnedElement::simple).collect(),
        }
    }

    /// Copies a parsed segment, unescaping its values.
    #[must_use]
    pub fn from_segment(seg: &Segment<'_>) -> Self {
        let mut elements: Vec<OwnedElement> = Vec::with_capacity(seg.element_count());
        for occ in seg.occurrences() {
            let comps: Vec<Vec<u8>> = occ.components().map(|v| v.bytes().into_owned()).collect();
            match elements.last_mut() {
                Some(last) if occ.is_repeat() => last.repetitions.push(comps),
                _ => elements.push(OwnedElement {
                    repetitions: vec![comps],
                }),
            }
        }
        Self {
            tag: seg.tag().to_owned(),
            counters: seg.counters().map(|v| v.bytes().into_owned()).collect(),
            elements,
        }
    }
}

/// Writes segments with a given set of delimiters.
#[derive(Debug, Clone)]
pub struct Writer {
    delimiters: Delimiters,
    line_break: Vec<u8>,
}

impl Writer {
    /// A writer for `delimiters` that puts nothing after segment terminators.
    #[must_use]
    pub fn new(delimiters: Delimiters) -> Self {
        Self {
            delimiters,
            line_break: Vec::new(),
        }
    }

    /// Puts `line_break` (e.g. `b"\r\n"`) after every segment terminator.
    #[must_use]
    pub fn with_line_break(mut self, line_break: &[u8]) -> Self {
        self.line_break = line_break.to_vec();
        self
    }

    /// The delimiters in use.
    #[must_use]
    pub fn delimiters(&self) -> &Delimiters {
        &self.delimiters
    }

    /// Writes a UNA service string advice for these delimiters.
    pub fn write_una(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"UNA");
        out.extend_from_slice(&self.delimiters.una_chars());
        out.extend_from_slice(&self.line_break);
    }

    /// Writes one value, releasing service characters.
    ///
    /// # Errors
    /// [`EdifactError::Unrepresentable`] when the value holds a separator and there is no
    /// release character (the position is filled in by the caller).
    pub fn write_value(&self, out: &mut Vec<u8>, value: &[u8]) -> Result<(), EdifactError> {
        let d = &self.delimiters;
        if !value.iter().any(|&b| d.is_special(b)) {
            out.extend_from_slice(value);
            return Ok(());
        }
        let Some(release) = d.release else {
            return Err(EdifactError::Unrepresentable {
                position: Position::at(out.len()),
            });
        };
        for &b in value {
            if d.is_special(b) {
                out.push(release);
            }
            out.push(b);
        }
        Ok(())
    }

    /// Writes a segment without terminator or line break.
    fn write_body(&self, out: &mut Vec<u8>, seg: &OwnedSegment) -> Result<(), EdifactError> {
        let d = self.delimiters;
        let tag = seg.tag.as_bytes();
        if tag.len() != 3 || !tag.iter().all(u8::is_ascii_alphanumeric) {
            return Err(EdifactError::InvalidWriterTag);
        }
        out.extend_from_slice(tag);
        for (c, counter) in seg.counters.iter().enumerate() {
            out.push(d.component);
            self.write_value(out, counter)
                .map_err(|_| EdifactError::Unrepresentable {
                    position: Position {
                        tag: Some(seg.tag.clone()),
                        ..Position::at(out.len())
                    }
                    .with_element(0, Some(u32::try_from(c + 2).unwrap_or(u32::MAX))),
                })?;
        }
        for (e, el) in seg.elements.iter().enumerate() {
            out.push(d.element);
            for (r, rep) in el.repetitions.iter().enumerate() {
                if r > 0 {
                    let Some(sep) = d.repetition else {
                        return Err(EdifactError::Unrepresentable {
                            position: self.value_position(out, seg, e, 0),
                        });
                    };
                    out.push(sep);
                }
                for (c, comp) in rep.iter().enumerate() {
                    if c > 0 {
                        out.push(d.component);
                    }
                    self.write_value(out, comp)
                        .map_err(|_| EdifactError::Unrepresentable {
                            position: self.value_position(out, seg, e, c),
                        })?;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::unused_self)]
    fn value_position(&self, out: &[u8], seg: &OwnedSegment, e: usize, c: usize) -> Position {
        Position {
            tag: Some(seg.tag.clone()),
            ..Position::at(out.len())
        }
        .with_element(
            u32::try_from(e + 1).unwrap_or(u32::MAX),
            Some(u32::try_from(c + 1).unwrap_or(u32::MAX)),
        )
    }

    /// Writes a segment with its terminator and the line break.
    ///
    /// # Errors
    /// An invalid tag, or a value that cannot be written with these delimiters.
    pub fn write_segment(&self, out: &mut Vec<u8>, seg: &OwnedSegment) -> Result<(), EdifactError> {
        self.write_body(out, seg)?;
        out.push(self.delimiters.segment);
        out.extend_from_slice(&self.line_break);
        Ok(())
    }

    /// Writes segments one after the other.
    ///
    /// # Errors
    /// As [`Writer::write_segment`].
    pub fn write_all(&self, out: &mut Vec<u8>, segs: &[OwnedSegment]) -> Result<(), EdifactError> {
        segs.iter().try_for_each(|s| self.write_segment(out, s))
    }
}

/// Writes a parsed document back: UNA as it was, every other segment re-encoded from its
/// unescaped values, with the original line breaks.
///
/// For input that releases exactly the service characters (as ISO 9735 asks) the result
/// is byte-identical to the input. Needless releases (`?.` for the decimal mark) are
/// dropped, so such input reads back to the same values but not the same bytes.
///
/// # Errors
/// Cannot fail for a document that parsed, except through [`EdifactError::Unrepresentable`]
/// when a value held a separator in a syntax without release character.
pub fn write_document(doc: &Document<'_>) -> Result<Vec<u8>, EdifactError> {
    let tokens = doc.tokens();
    let mut out = Vec::with_capacity(doc.input().len());
    out.extend_from_slice(tokens.leading());
    for seg in tokens.segments() {
        if seg.is_una() {
            out.extend_from_slice(seg.raw_bytes());
        } else {
            let w = Writer::new(*seg.delimiters());
            w.write_body(&mut out, &OwnedSegment::from_segment(&seg))?;
            if seg.is_terminated() {
                out.push(seg.delimiters().segment);
            }
        }
        out.extend_from_slice(seg.trail());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::document::parse;
    use super::*;

    #[test]
    fn escapes_service_characters() {
        let w = Writer::new(Delimiters::DEFAULT).with_line_break(b"\n");
        let mut out = Vec::new();
        let seg = OwnedSegment {
            tag: "BEP".into(),
            counters: vec![b"1".to_vec(), b"1".to_vec(), b"5".to_vec()],
            elements: vec![
                OwnedElement::simple("0"),
                OwnedElement::composite(["a:b", "c+d"]),
                OwnedElement::simple("it's ?"),
            ],
        };
        w.write_segment(&mut out, &seg).unwrap();
        assert_eq!(out, b"BEP:1:1:5+0+a?:b:c?+d+it?'s ??'\n");
        let doc = parse(b"UNH+1+X'BEP:1:1:5+0+a?:b:c?+d+it?'s ??'\nUNT+3+1'").unwrap();
        assert_eq!(OwnedSegment::from_segment(&doc.tokens().segment(1)), seg);
    }

    #[test]
    fn no_release_character_means_unrepresentable() {
        let w = Writer::new(Delimiters::LEVEL_B);
        let mut out = Vec::new();
        let err = w
            .write_segment(&mut out, &OwnedSegment::new("FTX", [&b"a\x1db"[..]]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "segment FTX, element 1, component 1, byte 4: value holds a separator and the syntax has no release character"
        );
        assert!(matches!(
            w.write_segment(&mut out, &OwnedSegment::new("FTXX", ["a"])),
            Err(EdifactError::InvalidWriterTag)
        ));
    }

    #[test]
    fn counters_are_bytes_and_get_released() {
        // Found by the fuzzer: a Latin-1 byte and a released `+` in a counter.
        let input: &[u8] = b"UNH+1+X'137:20:6?+\xd7+K'UNT+3+1'";
        let doc = parse(input).unwrap();
        let seg = OwnedSegment::from_segment(&doc.tokens().segment(1));
        assert_eq!(seg.counters, [b"20".to_vec(), b"6+\xd7".to_vec()]);
        assert_eq!(write_document(&doc).unwrap(), input);
    }

    #[test]
    fn parse_then_write_is_byte_identical() {
        let input: &[u8] = b"\r\nUNA:+.? '\r\nUNB+UNOA:1+A+B+261101:0815+IC'\r\n\
UNH+M+MEDLAB:1'ZKH+Lab?+Co+Weg:12::Stad'\nOPB+a?:b?'c??'\r\nUNT+4+M'\r\nUNZ+1+IC'\n\n";
        let doc = parse(input).unwrap();
        assert_eq!(write_document(&doc).unwrap(), input);
        let lax: &[u8] = b"UNH+M+X'FTX+Dr?. Max'UNT+3+M'";
        let doc = parse(lax).unwrap();
        assert_eq!(
            write_document(&doc).unwrap(),
            b"UNH+M+X'FTX+Dr. Max'UNT+3+M'"
        );
    }
}
