//! Positioned syntax errors.

use std::fmt;

use crate::ErrorKind;

/// Where in the input something went wrong.
///
/// Counting follows the UN CONTRL message: numbers are 1-based, the UNA service string
/// advice is not counted as a segment, and the segment position inside a message starts
/// with UNH as 1. Element 1 is the first data element after the tag; component 1 is the
/// first component of that element. `offset` is the 0-based byte offset in the input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// Byte offset in the input (0-based).
    pub offset: usize,
    /// Interchange number in the input (1-based); `None` before the first one starts.
    pub interchange: Option<u32>,
    /// Message number inside the interchange (1-based); `None` outside a message.
    pub message: Option<u32>,
    /// Segment number in the input (1-based, UNA not counted).
    pub segment: Option<u32>,
    /// Segment position inside the message (UNH = 1).
    pub message_segment: Option<u32>,
    /// Segment tag, only when it is a well-formed tag (never a data value).
    pub tag: Option<String>,
    /// Data element position (1-based, the tag not counted).
    pub element: Option<u32>,
    /// Component position inside the element (1-based).
    pub component: Option<u32>,
}

impl Position {
    /// A position that only knows its byte offset.
    #[must_use]
    pub fn at(offset: usize) -> Self {
        Self {
            offset,
            ..Self::default()
        }
    }

    /// The same position narrowed to an element and optionally a component.
    #[must_use]
    pub fn with_element(mut self, element: u32, component: Option<u32>) -> Self {
        self.element = Some(element);
        self.component = component;
        self
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::with_capacity(6);
        if let Some(i) = self.interchange {
            parts.push(format!("interchange {i}"));
        }
        if let Some(m) = self.message {
            parts.push(format!("message {m}"));
        }
        match (&self.tag, self.message_segment, self.segment) {
            (Some(tag), Some(ms), _) => parts.push(format!("segment {tag} #{ms}")),
            (Some(tag), None, Some(s)) => parts.push(format!("segment {tag} #{s}")),
            (None, Some(ms), _) => parts.push(format!("segment #{ms}")),
            (None, None, Some(s)) => parts.push(format!("segment #{s}")),
            (Some(tag), None, None) => parts.push(format!("segment {tag}")),
            (None, None, None) => {}
        }
        if let Some(e) = self.element {
            parts.push(format!("element {e}"));
        }
        if let Some(c) = self.component {
            parts.push(format!("component {c}"));
        }
        parts.push(format!("byte {}", self.offset));
        f.write_str(&parts.join(", "))
    }
}

/// What went wrong reading or writing EDIFACT. Texts name positions and fields, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EdifactError {
    /// Nothing but line breaks in the input.
    #[error("input is empty")]
    Empty,
    /// Offsets are kept in 31 bits.
    #[error("input of {len} bytes is larger than the 2 GiB limit")]
    TooLarge {
        /// Input length.
        len: usize,
    },
    /// The UNA service string advice is short or defines clashing characters.
    #[error("service string advice (UNA) at byte {offset}: {reason}")]
    InvalidUna {
        /// Byte offset of `UNA`.
        offset: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The input ends right after a release character.
    #[error("{position}: release character at end of input")]
    DanglingRelease {
        /// Where.
        position: Position,
    },
    /// A segment does not start with a three-character alphanumeric tag.
    #[error("{position}: invalid segment tag")]
    InvalidTag {
        /// Where.
        position: Position,
    },
    /// A data segment between messages.
    #[error("{position}: segment outside a message")]
    SegmentOutsideMessage {
        /// Where.
        position: Position,
    },
    /// A service segment where it cannot be.
    #[error("{position}: unexpected segment, {reason}")]
    UnexpectedSegment {
        /// Where.
        position: Position,
        /// Why it cannot be there.
        reason: &'static str,
    },
    /// A trailer (UNT, UNE, UNZ) never came.
    #[error("{position}: {segment} missing")]
    MissingSegment {
        /// Where it was expected at the latest.
        position: Position,
        /// Which trailer.
        segment: &'static str,
    },
    /// A mandatory service data element is absent or empty.
    #[error("{position}: {field} is missing")]
    MissingValue {
        /// Where.
        position: Position,
        /// Which field.
        field: &'static str,
    },
    /// A count is not a number.
    #[error("{position}: {field} is not a number")]
    NotANumber {
        /// Where.
        position: Position,
        /// Which field.
        field: &'static str,
    },
    /// A trailer's count disagrees with what the parser counted.
    #[error("{position}: {count} declares {declared} but there are {actual}")]
    ControlCount {
        /// Where the count is.
        position: Position,
        /// Which count (`segment count`, `message count`, `group count`).
        count: &'static str,
        /// The number in the trailer.
        declared: u64,
        /// The number counted.
        actual: u64,
    },
    /// A trailer's reference disagrees with its header's.
    #[error("{position}: {reference} does not match the header")]
    ReferenceMismatch {
        /// Where the trailer reference is.
        position: Position,
        /// Which reference.
        reference: &'static str,
    },
    /// The writer was given a value it cannot encode with these delimiters.
    #[error("{position}: value holds a separator and the syntax has no release character")]
    Unrepresentable {
        /// Segment, element and component of the value (offset is the output offset).
        position: Position,
    },
    /// The writer was given a tag that is not three alphanumeric characters.
    #[error("writer: invalid segment tag")]
    InvalidWriterTag,
}

impl EdifactError {
    /// How the broker treats this error: malformed input is rejected (dead letter), never retried.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Rejected
    }

    /// Where it happened, when the error has a position.
    #[must_use]
    pub fn position(&self) -> Option<&Position> {
        match self {
            Self::Empty
            | Self::TooLarge { .. }
            | Self::InvalidUna { .. }
            | Self::InvalidWriterTag => None,
            Self::DanglingRelease { position }
            | Self::InvalidTag { position }
            | Self::SegmentOutsideMessage { position }
            | Self::UnexpectedSegment { position, .. }
            | Self::MissingSegment { position, .. }
            | Self::MissingValue { position, .. }
            | Self::NotANumber { position, .. }
            | Self::ControlCount { position, .. }
            | Self::ReferenceMismatch { position, .. }
            | Self::Unrepresentable { position } => Some(position),
        }
    }

    /// What went wrong, without the position prefix.
    #[must_use]
    pub fn what(&self) -> String {
        let full = self.to_string();
        match self.position() {
            Some(p) => {
                let prefix = format!("{p}: ");
                full.strip_prefix(&prefix)
                    .map_or(full.clone(), str::to_owned)
            }
            None => full,
        }
    }

    /// Byte offset of the error in the input, when known.
    #[must_use]
    pub fn offset(&self) -> Option<usize> {
        match self {
            Self::InvalidUna { offset, .. } => Some(*offset),
            other => other.position().map(|p| p.offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_reads_like_a_path() {
        let p = Position {
            offset: 312,
            interchange: Some(1),
            message: Some(2),
            segment: Some(14),
            message_segment: Some(4),
            tag: Some("BEP".into()),
            element: Some(3),
            component: None,
        };
        assert_eq!(
            p.to_string(),
            "interchange 1, message 2, segment BEP #4, element 3, byte 312"
        );
        let e = EdifactError::MissingValue {
            position: p,
            field: "result",
        };
        assert_eq!(
            e.to_string(),
            "interchange 1, message 2, segment BEP #4, element 3, byte 312: result is missing"
        );
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert_eq!(e.what(), "result is missing");
        assert_eq!(e.offset(), Some(312));
    }
}
