//! FHIR JSON reading and writing. A small hand-written reader rather than `serde_json`:
//! it keeps number literals exactly (FHIR decimals are not floats: `12.0` must stay
//! `12.0`) without turning on `arbitrary_precision` for the whole workspace.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::{BuildHasher as _, RandomState};

use crate::fhir::FhirError;
use crate::fhir::value::{Object, Value};

/// Deepest nesting accepted; real resources stay far below it.
const MAX_DEPTH: usize = 128;
/// Objects up to this many members check duplicate names by a scan.
const SMALL_OBJECT: usize = 16;

/// Parse a JSON document.
///
/// # Errors
/// [`FhirError::Syntax`] with the byte offset of what is wrong.
pub fn parse(bytes: &[u8]) -> Result<Value, FhirError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut p = Parser { b: bytes, i: 0 };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != p.b.len() {
        return Err(p.err("trailing characters after the document"));
    }
    Ok(v)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> FhirError {
        FhirError::Syntax {
            position: format!("byte {}", self.i),
            what: what.to_owned(),
        }
    }

    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn expect(&mut self, lit: &[u8], v: Value) -> Result<Value, FhirError> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(v)
        } else {
            Err(self.err("unexpected character"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, FhirError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        match self.b.get(self.i) {
            None => Err(self.err("unexpected end of input")),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.expect(b"true", Value::Bool(true)),
            Some(b'f') => self.expect(b"false", Value::Bool(false)),
            Some(b'n') => self.expect(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, FhirError> {
        self.i += 1;
        let mut o = Object::new();
        // Member names seen, once the object is large enough that a scan of its members for
        // each new name would cost the square of its size.
        // Only hashes are kept (small, no copies); a hash seen before is confirmed by a scan,
        // which only a real duplicate (an error) or a 64-bit collision ever needs.
        let mut names: Option<(RandomState, HashSet<u64>)> = None;
        self.ws();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(Value::Object(o));
        }
        loop {
            self.ws();
            if self.b.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a member name"));
            }
            let at = self.i;
            let key = self.string()?;
            let twice = match &mut names {
                Some((state, set)) => !set.insert(state.hash_one(&key)) && o.contains(&key),
                None if o.len() >= SMALL_OBJECT => {
                    let state = RandomState::new();
                    let mut set: HashSet<u64> = o.iter().map(|(k, _)| state.hash_one(k)).collect();
                    let twice = !set.insert(state.hash_one(&key)) && o.contains(&key);
                    names = Some((state, set));
                    twice
                }
                None => o.contains(&key),
            };
            if twice {
                self.i = at;
                return Err(self.err(&format!("member {key} appears twice")));
            }
            self.ws();
            if self.b.get(self.i) != Some(&b':') {
                return Err(self.err("expected ':'"));
            }
            self.i += 1;
            self.ws();
            let v = self.value(depth + 1)?;
            o.push(key, v);
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(o));
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, FhirError> {
        self.i += 1;
        let mut a = Vec::new();
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            return Ok(Value::Array(a));
        }
        loop {
            self.ws();
            a.push(self.value(depth + 1)?);
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Value::Array(a));
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn number(&mut self) -> Result<Value, FhirError> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.b.get(p.i).is_some_and(u8::is_ascii_digit) {
                p.i += 1;
            }
            p.i - s
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.b[int_start] == b'0') {
            return Err(self.err("invalid number"));
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(self.err("invalid number"));
            }
        }
        // Only ASCII was consumed.
        Ok(Value::Number(
            String::from_utf8_lossy(&self.b[start..self.i]).into_owned(),
        ))
    }

    fn string(&mut self) -> Result<String, FhirError> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let start = self.i;
            while let Some(&c) = self.b.get(self.i) {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            out.extend_from_slice(&self.b[start..self.i]);
            match self.b.get(self.i) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"));
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = *self
                        .b
                        .get(self.i)
                        .ok_or_else(|| self.err("unterminated string"))?;
                    self.i += 1;
                    let ch = match c {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(self.err("invalid escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                Some(_) => return Err(self.err("control character in string")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, FhirError> {
        let s = self
            .b
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("short \\u escape"))?;
        let s = std::str::from_utf8(s).map_err(|_| self.err("invalid \\u escape"))?;
        let v = u32::from_str_radix(s, 16).map_err(|_| self.err("invalid \\u escape"))?;
        self.i += 4;
        Ok(v)
    }

    fn unicode_escape(&mut self) -> Result<char, FhirError> {
        let hi = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&hi) {
            if !self.b[self.i..].starts_with(b"\\u") {
                return Err(self.err("unpaired surrogate"));
            }
            self.i += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return Err(self.err("unpaired surrogate"));
            }
            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
        } else {
            hi
        };
        char::from_u32(code).ok_or_else(|| self.err("invalid \\u escape"))
    }
}

/// Write compact JSON.
#[must_use]
pub fn to_string(v: &Value) -> String {
    let mut s = String::with_capacity(1024);
    write_value(v, &mut s);
    s
}

/// Write compact JSON as bytes.
#[must_use]
pub fn to_vec(v: &Value) -> Vec<u8> {
    to_string(v).into_bytes()
}

fn write_value(v: &Value, s: &mut String) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => s.push_str(n),
        Value::String(t) => write_string(t, s),
        Value::Array(a) => {
            s.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_value(x, s);
            }
            s.push(']');
        }
        Value::Object(o) => {
            s.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_string(k, s);
                s.push(':');
                write_value(x, s);
            }
            s.push('}');
        }
    }
}

fn write_string(t: &str, s: &mut String) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_text_and_strings_round_trip() {
        let src =
            r#"{"a":12.0,"b":[1,-0.50,1e3],"c":"x\"\\\n\u00e9\ud83d\ude00","d":null,"e":true}"#;
        let v = parse(src.as_bytes()).unwrap();
        assert_eq!(v.get("a"), Some(&Value::Number("12.0".into())));
        assert_eq!(v.get("c").and_then(Value::as_str), Some("x\"\\\né😀"));
        let again = parse(to_string(&v).as_bytes()).unwrap();
        assert_eq!(v, again);
        assert!(to_string(&v).contains("-0.50"));
    }

    #[test]
    fn a_name_twice_in_a_large_object_is_found() {
        let mut s = String::from("{");
        for i in 0..100 {
            s.push_str(&format!("\"m{i}\":{i},"));
        }
        assert!(parse(format!("{s}\"m100\":0}}").as_bytes()).is_ok());
        let err = parse(format!("{s}\"m7\":0}}").as_bytes()).unwrap_err();
        assert!(err.to_string().contains("m7 appears twice"), "{err}");
    }

    #[test]
    fn errors_name_the_offset() {
        for bad in [
            &b"{\"a\":}"[..],
            b"[1,]",
            b"{\"a\":1,\"a\":2}",
            b"01",
            b"\"abc",
            b"{} x",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.to_string().contains("byte"), "{err}");
        }
    }
}
