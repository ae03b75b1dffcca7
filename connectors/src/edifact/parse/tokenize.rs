//! Splitting bytes into segments, elements and components without copying.
//!
//! The tokenizer makes one pass over the input with a 256-entry byte-class table and
//! records spans into three flat vectors (segments, elements, components), so a
//! multi-megabyte interchange costs a handful of vector growths and no per-value
//! allocation. Values are unescaped only when asked for ([`Value::bytes`]).

use std::borrow::Cow;
use std::fmt;

use super::error::{EdifactError, Position};
use super::syntax::{self, COMPONENT, Delimiters, ELEMENT, RELEASE, REPETITION, SEGMENT};

/// A component's span; the top bit of `end` says whether it holds release characters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawComponent {
    start: u32,
    end: u32,
}

const FLAG: u32 = 1 << 31;

impl RawComponent {
    #[inline]
    fn new(start: usize, end: usize, escaped: bool) -> Self {
        Self {
            start: u32_of(start),
            end: u32_of(end) | if escaped { FLAG } else { 0 },
        }
    }
    #[inline]
    fn start(self) -> usize {
        self.start as usize
    }
    #[inline]
    fn end(self) -> usize {
        (self.end & !FLAG) as usize
    }
    #[inline]
    fn escaped(self) -> bool {
        self.end & FLAG != 0
    }
}

/// An element occurrence: its first component and how many; the top bit of `count` says
/// it repeats the element before it (syntax version 4).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawElement {
    first: u32,
    count: u32,
}

impl RawElement {
    #[inline]
    fn new(first: usize, count: usize, repeat: bool) -> Self {
        Self {
            first: u32_of(first),
            count: u32_of(count) | if repeat { FLAG } else { 0 },
        }
    }
    #[inline]
    fn count(self) -> u32 {
        self.count & !FLAG
    }
    #[inline]
    fn repeat(self) -> bool {
        self.count & FLAG != 0
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RawSegment {
    start: u32,
    /// End of the segment's data (the terminator is not included).
    end: u32,
    /// End of the line breaks that follow the terminator.
    trail_end: u32,
    first: u32,
    count: u32,
    delimiters: u16,
    terminated: bool,
    una: bool,
    repeats: bool,
}

/// A tokenized input: every segment, element and component as spans of the input.
#[derive(Clone)]
pub struct Tokens<'a> {
    input: &'a [u8],
    leading: u32,
    segments: Vec<RawSegment>,
    elements: Vec<RawElement>,
    components: Vec<RawComponent>,
    delimiters: Vec<Delimiters>,
}

impl fmt::Debug for Tokens<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("bytes", &self.input.len())
            .field("segments", &self.segments.len())
            .finish_non_exhaustive()
    }
}

fn is_line_break(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

/// Skips line breaks after a terminator; junk whitespace at the very end is eaten too.
fn skip_trail(input: &[u8], mut i: usize) -> usize {
    while i < input.len() && is_line_break(input[i]) {
        i += 1;
    }
    if input[i..]
        .iter()
        .all(|&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0x1A | 0))
    {
        input.len()
    } else {
        i
    }
}

#[allow(clippy::cast_possible_truncation)] // lengths are checked against u32::MAX up front
fn u32_of(n: usize) -> u32 {
    n as u32
}

/// Splits `input` into segments, elements and components.
///
/// Honours `UNA` (anywhere a segment may start), the level-B defaults when the input starts
/// `UNB` followed by IS3, and the repetition separator once a UNB declares syntax version 4.
///
/// # Errors
/// An empty input, a bad UNA, a release character at the very end, or a segment whose tag
/// is not three letters or digits.
pub fn tokenize(input: &[u8]) -> Result<Tokens<'_>, EdifactError> {
    tokenize_through(input, None)
}

/// [`tokenize`] up to and including the first segment tagged `last` (all of `input` when
/// there is none, or for `None`): what reads only the start of an interchange, such as its
/// UNB, costs that start rather than the whole input.
///
/// # Errors
/// As [`tokenize`], for the part it reads.
#[allow(clippy::too_many_lines)]
pub fn tokenize_through<'a>(
    input: &'a [u8],
    last: Option<&[u8]>,
) -> Result<Tokens<'a>, EdifactError> {
    if input.len() >= FLAG as usize {
        return Err(EdifactError::TooLarge { len: input.len() });
    }
    let len = input.len();
    let leading = skip_trail(input, 0);
    if leading == len {
        return Err(EdifactError::Empty);
    }
    // Room for the whole input's tokens, or for a head's.
    let room = if last.is_some() { len.min(1024) } else { len };
    let mut t = Tokens {
        input,
        leading: u32_of(leading),
        segments: Vec::with_capacity(room / 32 + 4),
        elements: Vec::with_capacity(room / 8 + 4),
        components: Vec::with_capacity(room / 6 + 4),
        delimiters: Vec::with_capacity(2),
    };
    let mut delims = if !input[leading..].starts_with(b"UNA")
        && input[leading..].starts_with(b"UNB")
        && input.get(leading + 3) == Some(&Delimiters::LEVEL_B.element)
    {
        Delimiters::LEVEL_B
    } else {
        Delimiters::DEFAULT
    };
    // The UNA's fifth character: the repetition separator once UNB says version 4.
    let mut una_reserved: Option<u8> = None;
    t.delimiters.push(delims);
    let mut table = delims.table();
    let mut pos = leading;

    while pos < len {
        if input[pos..].starts_with(b"UNA") {
            let chars = input.get(pos + 3..pos + 9).unwrap_or(&input[pos + 3..]);
            let (d, reserved) = Delimiters::from_una(chars, pos)?;
            delims = d;
            una_reserved = Some(reserved);
            t.delimiters.push(delims);
            table = delims.table();
            let end = pos + 9;
            let trail_end = skip_trail(input, end);
            t.segments.push(RawSegment {
                start: u32_of(pos),
                end: u32_of(end),
                trail_end: u32_of(trail_end),
                first: u32_of(t.elements.len()),
                count: 0,
                delimiters: delimiter_index(&t),
                terminated: false,
                una: true,
                repeats: false,
            });
            pos = trail_end;
            continue;
        }

        let first_element = t.elements.len();
        let mut element_first = t.components.len();
        let mut comp_start = pos;
        let mut escaped = false;
        let mut repeat_next = false;
        let mut repeats = false;
        let mut i = pos;
        let (end, terminated) = loop {
            i += input[i..]
                .iter()
                .position(|&b| table[usize::from(b)] != 0)
                .unwrap_or(len - i);
            if i == len {
                t.components
                    .push(RawComponent::new(comp_start, len, escaped));
                t.elements.push(RawElement::new(
                    element_first,
                    t.components.len() - element_first,
                    repeat_next,
                ));
                break (len, false);
            }
            match table[usize::from(input[i])] {
                RELEASE => {
                    if i + 1 >= len {
                        return Err(EdifactError::DanglingRelease {
                            position: t.locate_new(i),
                        });
                    }
                    escaped = true;
                    i += 2;
                }
                COMPONENT => {
                    t.components.push(RawComponent::new(comp_start, i, escaped));
                    escaped = false;
                    i += 1;
                    comp_start = i;
                }
                REPETITION if t.elements.len() == first_element => {
                    return Err(EdifactError::InvalidTag {
                        position: t.locate_new(i),
                    });
                }
                class => {
                    t.components.push(RawComponent::new(comp_start, i, escaped));
                    t.elements.push(RawElement::new(
                        element_first,
                        t.components.len() - element_first,
                        repeat_next,
                    ));
                    escaped = false;
                    element_first = t.components.len();
                    if class == SEGMENT {
                        break (i, true);
                    }
                    repeat_next = class == REPETITION;
                    repeats |= repeat_next;
                    debug_assert!(class == ELEMENT || class == REPETITION);
                    i += 1;
                    comp_start = i;
                }
            }
        };
        let trail_end = if terminated {
            skip_trail(input, end + 1)
        } else {
            len
        };
        // The tag: first component of the first element, three letters or digits.
        let tag = t.components[t.elements[first_element].first as usize];
        let tag_bytes = &input[tag.start()..tag.end()];
        if tag.escaped()
            || tag_bytes.len() != 3
            || !tag_bytes.iter().all(u8::is_ascii_alphanumeric)
            || t.elements[first_element].repeat()
        {
            return Err(EdifactError::InvalidTag {
                position: t.locate_new(pos),
            });
        }
        t.segments.push(RawSegment {
            start: u32_of(pos),
            end: u32_of(end),
            trail_end: u32_of(trail_end),
            first: u32_of(first_element),
            count: u32_of(t.elements.len() - first_element),
            delimiters: delimiter_index(&t),
            terminated,
            una: false,
            repeats,
        });
        if tag_bytes == b"UNB" {
            let seg = t.segment(t.segments.len() - 1);
            let version = seg.text(0, 1).and_then(|v| v.trim().parse::<u8>().ok());
            if version.is_some_and(|v| v >= 4) {
                let rep = match una_reserved {
                    Some(b' ') => None,
                    Some(r) => Some(r),
                    None if delims == Delimiters::LEVEL_B => Some(0x19),
                    None => Some(b'*'),
                };
                if rep.is_some_and(|r| !delims.is_special(r) && !r.is_ascii_alphanumeric()) {
                    delims.repetition = rep;
                    t.delimiters.push(delims);
                    table = delims.table();
                }
            } else if delims.repetition.is_some() {
                delims.repetition = None;
                t.delimiters.push(delims);
                table = delims.table();
            }
        }
        if last == Some(tag_bytes) {
            break;
        }
        pos = trail_end;
    }
    Ok(t)
}

#[allow(clippy::cast_possible_truncation)]
fn delimiter_index(t: &Tokens<'_>) -> u16 {
    // A new entry is pushed per UNA or version-4 UNB; more than 65k of them is absurd input.
    (t.delimiters.len() - 1).min(usize::from(u16::MAX)) as u16
}

impl<'a> Tokens<'a> {
    /// The input these tokens point into.
    #[must_use]
    pub fn input(&self) -> &'a [u8] {
        self.input
    }

    /// Line breaks before the first segment.
    #[must_use]
    pub fn leading(&self) -> &'a [u8] {
        &self.input[..self.leading as usize]
    }

    /// Number of segments, UNA included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether there are no segments (never true for a successful tokenize).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Number of components (a measure of work done, used by the benchmark).
    #[must_use]
    pub fn component_count(&self) -> usize {
        self.components.len()
    }

    /// The segment at `index` (UNA included in the numbering).
    ///
    /// # Panics
    /// When `index` is out of range.
    #[must_use]
    pub fn segment(&self, index: usize) -> Segment<'_> {
        assert!(index < self.segments.len(), "segment index out of range");
        Segment {
            tokens: self,
            index: u32_of(index),
        }
    }

    /// All segments in input order, UNA included.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = Segment<'_>> + '_ {
        (0..self.segments.len()).map(move |i| self.segment(i))
    }

    /// Position of the segment being tokenized (not pushed yet).
    fn locate_new(&self, offset: usize) -> Position {
        let mut p = self.locate(self.segments.len());
        p.offset = offset;
        p
    }

    /// Position of segment `index`, or of a segment that would follow the last one:
    /// interchange, message and segment numbers counted up to it.
    pub(crate) fn locate(&self, index: usize) -> Position {
        let mut interchange = 0u32;
        let mut messages = 0u32;
        let mut in_message = false;
        let mut message_segment = 0u32;
        let mut segment = 0u32;
        for i in 0..index.min(self.segments.len()) {
            let s = self.segment(i);
            if s.is_una() {
                continue;
            }
            segment += 1;
            match s.tag() {
                "UNB" => {
                    interchange += 1;
                    messages = 0;
                    in_message = false;
                }
                "UNH" => {
                    interchange = interchange.max(1);
                    messages += 1;
                    in_message = true;
                    message_segment = 1;
                }
                "UNT" => in_message = false,
                _ => message_segment += 1,
            }
        }
        let mut p = Position {
            offset: self.input.len(),
            interchange: (interchange > 0).then_some(interchange),
            message: in_message.then_some(messages),
            segment: Some(segment + 1),
            message_segment: in_message.then_some(message_segment + 1),
            ..Position::default()
        };
        if index < self.segments.len() {
            let s = self.segment(index);
            p.offset = s.offset();
            if s.is_una() {
                p.segment = None;
                p.message_segment = None;
                p.tag = Some("UNA".to_owned());
            } else {
                p.tag = Some(s.tag().to_owned());
                match s.tag() {
                    "UNB" => {
                        p.interchange = Some(interchange + 1);
                        p.message = None;
                        p.message_segment = None;
                    }
                    "UNH" => {
                        p.interchange = Some(interchange.max(1));
                        p.message = Some(messages + 1);
                        p.message_segment = Some(1);
                    }
                    _ => {}
                }
            }
        }
        p
    }
}

/// One segment, borrowed from its [`Tokens`].
#[derive(Clone, Copy)]
pub struct Segment<'d> {
    tokens: &'d Tokens<'d>,
    index: u32,
}

impl fmt::Debug for Segment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tag and shape only: values may be patient data.
        f.debug_struct("Segment")
            .field("tag", &self.tag())
            .field("elements", &self.element_count())
            .field("offset", &self.offset())
            .finish()
    }
}

impl<'d> Segment<'d> {
    fn raw(&self) -> &'d RawSegment {
        &self.tokens.segments[self.index as usize]
    }

    /// Index among all tokenized segments (UNA included).
    #[must_use]
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Whether this is the UNA service string advice.
    #[must_use]
    pub fn is_una(&self) -> bool {
        self.raw().una
    }

    /// Byte offset of the tag in the input.
    #[must_use]
    pub fn offset(&self) -> usize {
        self.raw().start as usize
    }

    /// The segment's bytes as in the input, without terminator and line breaks.
    #[must_use]
    pub fn raw_bytes(&self) -> &'d [u8] {
        let r = self.raw();
        &self.tokens.input[r.start as usize..r.end as usize]
    }

    /// Line breaks (or end-of-input whitespace) that followed the terminator.
    #[must_use]
    pub fn trail(&self) -> &'d [u8] {
        let r = self.raw();
        let from = if r.terminated { r.end + 1 } else { r.end };
        &self.tokens.input[from as usize..r.trail_end as usize]
    }

    /// Whether a segment terminator ended this segment (the last one may lack it).
    #[must_use]
    pub fn is_terminated(&self) -> bool {
        self.raw().terminated
    }

    /// The service characters in force for this segment.
    #[must_use]
    pub fn delimiters(&self) -> &'d Delimiters {
        &self.tokens.delimiters[usize::from(self.raw().delimiters)]
    }

    fn tag_element(&self) -> Element<'d> {
        Element {
            tokens: self.tokens,
            index: self.raw().first,
            release: self.delimiters().release,
        }
    }

    /// The three-character tag (`UNA` for the service string advice).
    #[must_use]
    pub fn tag(&self) -> &'d str {
        if self.is_una() {
            return "UNA";
        }
        let c =
            self.tokens.components[self.tokens.elements[self.raw().first as usize].first as usize];
        // Checked ASCII alphanumeric by the tokenizer.
        std::str::from_utf8(&self.tokens.input[c.start()..c.end()]).unwrap_or("???")
    }

    /// Repeat counters after the tag (`BEP:1:1:5` gives `1`, `1`, `5`).
    pub fn counters(&self) -> impl Iterator<Item = Value<'d>> + 'd {
        let el = self.tag_element();
        let n = if self.is_una() { 0 } else { el.len() };
        (1..n).filter_map(move |i| el.component(i))
    }

    /// Whether this segment holds repeated elements (syntax version 4).
    #[must_use]
    pub fn has_repetitions(&self) -> bool {
        self.raw().repeats
    }

    /// Number of data elements after the tag (repetitions of one element count once).
    #[must_use]
    pub fn element_count(&self) -> usize {
        if self.is_una() {
            return 0;
        }
        let r = self.raw();
        if r.repeats {
            self.elements().count()
        } else {
            r.count as usize - 1
        }
    }

    /// Data element `n` (0-based, the tag not counted); its first repetition.
    #[must_use]
    pub fn element(&self, n: usize) -> Option<Element<'d>> {
        if self.is_una() {
            return None;
        }
        let r = self.raw();
        if r.repeats {
            return self.elements().nth(n);
        }
        (n + 1 < r.count as usize).then(|| Element {
            tokens: self.tokens,
            index: r.first + u32_of(n + 1),
            release: self.delimiters().release,
        })
    }

    /// Data elements after the tag, first repetition of each.
    pub fn elements(&self) -> impl Iterator<Item = Element<'d>> + 'd {
        self.occurrences().filter(|e| !e.is_repeat())
    }

    /// Every element occurrence after the tag, repetitions included, in input order.
    pub fn occurrences(&self) -> impl Iterator<Item = Element<'d>> + 'd {
        let r = *self.raw();
        let tokens = self.tokens;
        let release = self.delimiters().release;
        let n = if r.una { 0 } else { r.count };
        (1..n).map(move |k| Element {
            tokens,
            index: r.first + k,
            release,
        })
    }

    /// All repetitions of data element `n` (one entry before syntax version 4).
    #[must_use]
    pub fn repetitions(&self, n: usize) -> Vec<Element<'d>> {
        let mut out = Vec::new();
        let mut seen = 0usize;
        for e in self.occurrences() {
            if !e.is_repeat() {
                seen += 1;
            }
            if seen == n + 1 {
                out.push(e);
            } else if seen > n + 1 {
                break;
            }
        }
        out
    }

    /// Component `c` of element `e` (both 0-based).
    #[must_use]
    pub fn get(&self, e: usize, c: usize) -> Option<Value<'d>> {
        self.element(e)?.component(c)
    }

    /// Component `c` of element `e` as text, or `None` when absent or empty.
    #[must_use]
    pub fn text(&self, e: usize, c: usize) -> Option<Cow<'d, str>> {
        self.get(e, c).filter(|v| !v.is_empty()).map(|v| v.text())
    }
}

/// One data element (or one repetition of it).
#[derive(Clone, Copy)]
pub struct Element<'d> {
    tokens: &'d Tokens<'d>,
    index: u32,
    release: Option<u8>,
}

impl fmt::Debug for Element<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Element")
            .field("components", &self.len())
            .finish()
    }
}

impl<'d> Element<'d> {
    fn raw(&self) -> RawElement {
        self.tokens.elements[self.index as usize]
    }

    /// Number of components (at least one, possibly empty).
    #[must_use]
    pub fn len(&self) -> usize {
        self.raw().count() as usize
    }

    /// Whether the element is a single empty component.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.components().all(|c| c.is_empty())
    }

    /// Whether this occurrence repeats the element before it.
    #[must_use]
    pub fn is_repeat(&self) -> bool {
        self.raw().repeat()
    }

    /// Component `c` (0-based).
    #[must_use]
    pub fn component(&self, c: usize) -> Option<Value<'d>> {
        let r = self.raw();
        (c < r.count() as usize).then(|| {
            let rc = self.tokens.components[r.first as usize + c];
            Value {
                raw: &self.tokens.input[rc.start()..rc.end()],
                offset: rc.start,
                escaped: rc.escaped(),
                release: self.release,
            }
        })
    }

    /// All components.
    pub fn components(&self) -> impl ExactSizeIterator<Item = Value<'d>> + 'd {
        let this = *self;
        (0..self.len()).map(move |c| this.component(c).unwrap_or(Value::EMPTY))
    }

    /// First component: the whole value of a simple element.
    #[must_use]
    pub fn value(&self) -> Value<'d> {
        self.component(0).unwrap_or(Value::EMPTY)
    }
}

/// One component value, borrowed from the input with its release characters still in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Value<'d> {
    raw: &'d [u8],
    offset: u32,
    escaped: bool,
    release: Option<u8>,
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value")
            .field("len", &self.raw.len())
            .field("offset", &self.offset)
            .finish()
    }
}

impl<'d> Value<'d> {
    const EMPTY: Value<'static> = Value {
        raw: b"",
        offset: 0,
        escaped: false,
        release: None,
    };

    /// The bytes as they stand in the input (release characters included).
    #[must_use]
    pub fn raw(&self) -> &'d [u8] {
        self.raw
    }

    /// Byte offset in the input.
    #[must_use]
    pub fn offset(&self) -> usize {
        self.offset as usize
    }

    /// Whether the value has no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Whether the raw bytes hold release characters (so unescaping allocates).
    #[must_use]
    pub fn is_escaped(&self) -> bool {
        self.escaped
    }

    /// The value with release characters removed; borrows unless there were any.
    #[must_use]
    pub fn bytes(&self) -> Cow<'d, [u8]> {
        match (self.escaped, self.release) {
            (true, Some(rel)) => {
                // Copy the runs between release characters; each release keeps the byte
                // after it.
                let mut out = Vec::with_capacity(self.raw.len());
                let mut rest = self.raw;
                while let Some(at) = rest.iter().position(|&b| b == rel) {
                    out.extend_from_slice(&rest[..at]);
                    match rest.get(at + 1) {
                        Some(&b) => {
                            out.push(b);
                            rest = &rest[at + 2..];
                        }
                        None => {
                            // Cannot happen after tokenize; keep the byte rather than lose it.
                            out.push(rel);
                            rest = &[];
                        }
                    }
                }
                out.extend_from_slice(rest);
                Cow::Owned(out)
            }
            _ => Cow::Borrowed(self.raw),
        }
    }

    /// The unescaped value as text: UTF-8 if valid, else ISO-8859-1.
    #[must_use]
    pub fn text(&self) -> Cow<'d, str> {
        syntax::decode_cow(self.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &Tokens<'_>) -> Vec<String> {
        t.segments().map(|s| s.tag().to_owned()).collect()
    }

    #[test]
    fn tokenizing_through_a_tag_stops_after_its_first_segment() {
        let input = b"UNA:+.? 'UNB+UNOA:1+A+B+261101:0815+IC1'UNH+M1+MEDLAB:1'UNB+UNOA:1+C+D'";
        let head = tokenize_through(input, Some(b"UNB")).unwrap();
        let tags: Vec<_> = head.segments().map(|s| s.tag().to_owned()).collect();
        assert_eq!(tags, ["UNA", "UNB"]);
        assert_eq!(head.segment(1).text(4, 0).as_deref(), Some("IC1"));
        // The same segments as the whole input's, as far as it went; no such tag: all.
        let all = tokenize(input).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(head.segment(1).raw_bytes(), all.segment(1).raw_bytes());
        assert_eq!(tokenize_through(input, Some(b"ZZZ")).unwrap().len(), 4);
    }

    #[test]
    fn splits_segments_elements_components() {
        let t = tokenize(b"UNH+M1+MEDLAB:1'BEP:1:1:5+0+Ht+0.40++l/l'UNT+3+M1'").unwrap();
        assert_eq!(tags(&t), ["UNH", "BEP", "UNT"]);
        let bep = t.segment(1);
        let counters: Vec<_> = bep.counters().map(|v| v.text().into_owned()).collect();
        assert_eq!(counters, ["1", "1", "5"]);
        assert_eq!(bep.element_count(), 5);
        assert_eq!(bep.text(1, 0).as_deref(), Some("Ht"));
        assert_eq!(bep.text(3, 0), None, "empty element reads as None");
        assert_eq!(bep.get(3, 0).map(|v| v.is_empty()), Some(true));
        assert_eq!(bep.text(4, 0).as_deref(), Some("l/l"));
        assert!(bep.get(5, 0).is_none());
        assert_eq!(t.segment(0).text(1, 1).as_deref(), Some("1"));
    }

    #[test]
    fn release_character_escapes_and_borrows_otherwise() {
        let t = tokenize(b"OPB+Hemolytisch?: herhalen?+ ?'x?? ok+plain'").unwrap();
        let s = t.segment(0);
        let v = s.get(0, 0).unwrap();
        assert!(v.is_escaped());
        assert_eq!(v.raw(), b"Hemolytisch?: herhalen?+ ?'x?? ok");
        assert_eq!(v.text(), "Hemolytisch: herhalen+ 'x? ok");
        assert!(matches!(s.get(1, 0).unwrap().bytes(), Cow::Borrowed(_)));
        assert_eq!(s.element_count(), 2);
    }

    #[test]
    fn line_breaks_after_terminators_are_skipped_inside_kept() {
        let t =
            tokenize(b"\r\nFTX+BFD++line one\r\nline two'\r\nFTX+BFD++'\n\nUNT+2+1'\n").unwrap();
        assert_eq!(tags(&t), ["FTX", "FTX", "UNT"]);
        assert_eq!(t.leading(), b"\r\n");
        assert_eq!(
            t.segment(0).text(2, 0).as_deref(),
            Some("line one\r\nline two")
        );
        assert_eq!(t.segment(0).trail(), b"\r\n");
        assert_eq!(t.segment(1).trail(), b"\n\n");
        assert_eq!(t.segment(2).trail(), b"\n");
    }

    #[test]
    fn una_changes_delimiters() {
        let t = tokenize(b"UNA|^,! ~\nUNB^UNOC|3^A^B~TXT^a|b^c!~d~").unwrap();
        assert_eq!(tags(&t), ["UNA", "UNB", "TXT"]);
        assert!(t.segment(0).is_una());
        assert_eq!(t.segment(0).raw_bytes(), b"UNA|^,! ~");
        let txt = t.segment(2);
        assert_eq!(txt.text(0, 1).as_deref(), Some("b"));
        assert_eq!(txt.text(1, 0).as_deref(), Some("c~d"));
        assert_eq!(txt.delimiters().decimal, b',');
    }

    #[test]
    fn unterminated_last_segment_is_kept() {
        let t = tokenize(b"UNZ+1+1").unwrap();
        assert!(!t.segment(0).is_terminated());
        assert_eq!(t.segment(0).text(1, 0).as_deref(), Some("1"));
    }

    #[test]
    fn version_4_repetition_separator() {
        let t = tokenize(b"UNB+UNOC:4+A+B+260101:1200+R1'NAD+BY+a*b:c*d+x'").unwrap();
        let nad = t.segment(1);
        assert!(nad.has_repetitions());
        assert_eq!(nad.element_count(), 3);
        let reps = nad.repetitions(1);
        assert_eq!(reps.len(), 3);
        assert_eq!(reps[1].component(1).unwrap().text(), "c");
        assert_eq!(nad.text(2, 0).as_deref(), Some("x"));
        // A tag cannot repeat (found by the fuzzer).
        let err = tokenize(b"UNB+UNOC:4+A+B+1:1+R'UNH*1+X'").unwrap_err();
        assert!(matches!(err, EdifactError::InvalidTag { .. }), "{err}");
        assert_eq!(err.offset(), Some(24));
        // Version 3: the star is data.
        let t = tokenize(b"UNB+UNOC:3+A+B+260101:1200+R1'PNA+NVV:J*de'").unwrap();
        assert_eq!(t.segment(1).text(0, 1).as_deref(), Some("J*de"));
    }

    #[test]
    fn level_b_defaults() {
        let t = tokenize(b"UNB\x1dUNOB\x1f1\x1dA\x1dB\x1c\nUNH\x1dM1\x1dX\x1fY\x1c").unwrap();
        assert_eq!(tags(&t), ["UNB", "UNH"]);
        assert_eq!(t.segment(1).text(1, 1).as_deref(), Some("Y"));
    }

    #[test]
    fn bad_tags_and_dangling_release_are_positioned() {
        let err = tokenize(b"UNB+UNOA:1+A+B+1:2+R'\nH`not`edifact\nUNZ+1+R'").unwrap_err();
        assert!(matches!(err, EdifactError::InvalidTag { .. }), "{err}");
        let p = err.position().unwrap();
        assert_eq!(p.offset, 22);
        assert_eq!(p.segment, Some(2));
        assert_eq!(p.interchange, Some(1));
        assert!(p.tag.is_none());
        let err = tokenize(b"UNH+1+X'FTX+abc?").unwrap_err();
        assert!(matches!(err, EdifactError::DanglingRelease { .. }));
        assert_eq!(err.offset(), Some(15));
        assert_eq!(err.position().unwrap().message_segment, Some(2));
        assert!(matches!(tokenize(b"\r\n"), Err(EdifactError::Empty)));
        assert!(matches!(
            tokenize(b"''"),
            Err(EdifactError::InvalidTag { .. })
        ));
    }
}
