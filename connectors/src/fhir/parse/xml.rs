//! FHIR XML read into the JSON shape and written back from it, per the R4 rules:
//! primitives carry `value` attributes (their `id` and extensions go to `_name`), element
//! ids and extension urls are attributes, repeating elements become arrays (the model
//! knows which), nested resources are wrapped in an element of their type, and the
//! narrative `div` travels as its XHTML text. Decimals keep their literal text.

use std::fmt::{self, Write as _};

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

use super::model::{self, JsonKind, Kind, Model, TypeDef};
use crate::fhir::FhirError;
use crate::fhir::value::{Object, Value};

/// The FHIR namespace.
pub const NAMESPACE: &str = "http://hl7.org/fhir";
const MAX_DEPTH: usize = 128;

/// Parse a FHIR XML resource into the JSON shape.
///
/// # Errors
/// [`FhirError::Syntax`] for malformed XML or elements R4 does not define, with the
/// element path.
pub fn parse(bytes: &[u8]) -> Result<Value, FhirError> {
    let text = std::str::from_utf8(bytes).map_err(|e| FhirError::Syntax {
        position: format!("byte {}", e.valid_up_to()),
        what: "XML is not UTF-8".into(),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // quick-xml would skip a second byte order mark without counting it, and the narrative
    // `div` (sliced from `text` by reader positions) would come out shifted.
    if text.starts_with('\u{feff}') {
        return Err(FhirError::Syntax {
            position: "byte 3".into(),
            what: "a second byte order mark".into(),
        });
    }
    let mut r = XmlReader {
        reader: Reader::from_str(text),
        text,
        model: model::r4(),
    };
    loop {
        let before = r.pos();
        match r.event(&Path::ROOT)? {
            Event::Start(e) => {
                let name = local(&e);
                let v = r.resource(
                    &name,
                    false,
                    &Path {
                        parent: None,
                        name: &name,
                    },
                    0,
                )?;
                r.expect_eof()?;
                return Ok(v);
            }
            Event::Empty(e) => {
                let name = local(&e);
                let v = r.resource(
                    &name,
                    true,
                    &Path {
                        parent: None,
                        name: &name,
                    },
                    0,
                )?;
                r.expect_eof()?;
                return Ok(v);
            }
            Event::Eof => {
                return Err(FhirError::Syntax {
                    position: format!("byte {before}"),
                    what: "no root element".into(),
                });
            }
            Event::Text(t) if !is_ws(&t) => {
                return Err(r.err(&Path::ROOT, "text outside the root element"));
            }
            Event::DocType(_) => return Err(r.err(&Path::ROOT, "DOCTYPE is not allowed")),
            _ => {}
        }
    }
}

/// Attribute names seen on one element: a scan while few, a set once many.
#[derive(Default)]
struct Names<'k> {
    few: Vec<&'k [u8]>,
    many: Option<std::collections::HashSet<&'k [u8]>>,
}

impl<'k> Names<'k> {
    /// `false` when `name` was seen before.
    fn insert(&mut self, name: &'k [u8]) -> bool {
        if let Some(set) = &mut self.many {
            return set.insert(name);
        }
        if self.few.contains(&name) {
            return false;
        }
        self.few.push(name);
        if self.few.len() > 8 {
            self.many = Some(self.few.drain(..).collect());
        }
        true
    }
}

fn is_ws(t: &[u8]) -> bool {
    t.iter().all(u8::is_ascii_whitespace)
}

fn local(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.local_name().as_ref()).into_owned()
}

/// An element path, built into text only when an error names it.
#[derive(Clone, Copy)]
struct Path<'p> {
    parent: Option<&'p Path<'p>>,
    name: &'p str,
}

impl Path<'_> {
    const ROOT: Path<'static> = Path {
        parent: None,
        name: "",
    };
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.parent {
            write!(f, "{p}.")?;
        }
        f.write_str(self.name)
    }
}

struct XmlReader<'a> {
    reader: Reader<&'a [u8]>,
    text: &'a str,
    model: &'static Model,
}

/// What a primitive element held.
struct Prim {
    value: Option<Value>,
    ext: Option<Object>,
}

impl<'a> XmlReader<'a> {
    fn pos(&self) -> u64 {
        self.reader.buffer_position()
    }

    fn err(&self, path: &Path<'_>, what: &str) -> FhirError {
        let path = path.to_string();
        let position = if path.is_empty() {
            format!("byte {}", self.pos())
        } else {
            path.to_owned()
        };
        FhirError::Syntax {
            position,
            what: what.to_owned(),
        }
    }

    fn event(&mut self, path: &Path<'_>) -> Result<Event<'a>, FhirError> {
        self.reader
            .read_event()
            .map_err(|e| self.err(path, &format!("malformed XML: {e}")))
    }

    fn expect_eof(&mut self) -> Result<(), FhirError> {
        loop {
            match self.event(&Path::ROOT)? {
                Event::Eof => return Ok(()),
                Event::Text(t) if is_ws(&t) => {}
                Event::Comment(_) | Event::PI(_) => {}
                _ => return Err(self.err(&Path::ROOT, "content after the root element")),
            }
        }
    }

    fn attrs(
        &self,
        e: &BytesStart<'_>,
        path: &Path<'_>,
    ) -> Result<Vec<(String, String)>, FhirError> {
        let mut out = Vec::new();
        // quick-xml's own duplicate check compares each attribute with every earlier one:
        // the square of a hostile element's attribute count. Names are checked here instead.
        let mut names = Names::default();
        for a in e.attributes().with_checks(false) {
            let a = a.map_err(|x| self.err(path, &format!("malformed attribute: {x}")))?;
            let key: &[u8] = a.key.into_inner();
            if !names.insert(key) {
                return Err(self.err(
                    path,
                    &format!(
                        "malformed attribute: {} appears twice",
                        String::from_utf8_lossy(key)
                    ),
                ));
            }
            if key == b"xmlns" || key.starts_with(b"xmlns:") {
                continue;
            }
            let name = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
            let value = a
                .decode_and_unescape_value(self.reader.decoder())
                .map_err(|x| self.err(path, &format!("malformed attribute {name}: {x}")))?
                .into_owned();
            out.push((name, value));
        }
        Ok(out)
    }

    /// A resource whose root element `name` was just read.
    fn resource(
        &mut self,
        name: &str,
        empty: bool,
        path: &Path<'_>,
        depth: usize,
    ) -> Result<Value, FhirError> {
        let Some(def) = self.model.resource(name) else {
            return Err(self.err(path, &format!("{name} is not an R4 resource type")));
        };
        let mut o = Object::new();
        o.push("resourceType".into(), Value::String(name.to_owned()));
        if !empty {
            self.children(def, &mut o, path, depth + 1)?;
        }
        Ok(Value::Object(o))
    }

    /// Child elements of a complex element until its end tag.
    fn children(
        &mut self,
        def: &'static TypeDef,
        o: &mut Object,
        path: &Path<'_>,
        depth: usize,
    ) -> Result<(), FhirError> {
        if depth > MAX_DEPTH {
            return Err(self.err(path, "nesting too deep"));
        }
        let mut prims: Vec<(&'static str, Vec<Prim>)> = Vec::new();
        loop {
            let before = self.pos();
            let (e, empty) = match self.event(path)? {
                Event::Start(e) => (e, false),
                Event::Empty(e) => (e, true),
                Event::End(_) => break,
                Event::Text(t) if is_ws(&t) => continue,
                Event::Comment(_) | Event::PI(_) => continue,
                Event::Eof => return Err(self.err(path, "unexpected end of document")),
                _ => return Err(self.err(path, "text is not allowed here")),
            };
            let name = local(&e);
            let child_path = Path {
                parent: Some(path),
                name: &name,
            };
            let Some(el) = def.element(&name) else {
                return Err(self.err(&child_path, "unknown element"));
            };
            if el.ty == "xhtml" {
                let div = if empty {
                    self.text[usize::try_from(before).unwrap_or(0)
                        ..usize::try_from(self.pos()).unwrap_or(0)]
                        .to_owned()
                } else {
                    let end = e.to_end().into_owned();
                    self.reader
                        .read_to_end(end.name())
                        .map_err(|x| self.err(&child_path, &format!("malformed XHTML: {x}")))?;
                    self.text[usize::try_from(before).unwrap_or(0)
                        ..usize::try_from(self.pos()).unwrap_or(0)]
                        .to_owned()
                };
                o.insert(el.name, Value::String(div.trim().to_owned()));
                continue;
            }
            if self.model.is_primitive(el.ty) {
                let p = self.primitive(&e, empty, el.ty, &child_path, depth)?;
                if let Some((_, list)) = prims.iter_mut().find(|(n, _)| *n == el.name) {
                    if !el.multiple {
                        return Err(self.err(&child_path, "element repeats but R4 allows one"));
                    }
                    list.push(p);
                } else {
                    // Reserve the member position; filled in once all repeats are read.
                    o.insert(el.name, Value::Null);
                    prims.push((el.name, vec![p]));
                }
                continue;
            }
            let v = if el.ty == "Resource" {
                if empty {
                    return Err(self.err(&child_path, "resource wrapper is empty"));
                }
                let inner = loop {
                    match self.event(&child_path)? {
                        Event::Start(r) => {
                            let n = local(&r);
                            break self.resource(
                                &n,
                                false,
                                &Path {
                                    parent: Some(&child_path),
                                    name: &n,
                                },
                                depth + 1,
                            )?;
                        }
                        Event::Empty(r) => {
                            let n = local(&r);
                            break self.resource(
                                &n,
                                true,
                                &Path {
                                    parent: Some(&child_path),
                                    name: &n,
                                },
                                depth + 1,
                            )?;
                        }
                        Event::Text(t) if is_ws(&t) => {}
                        Event::Comment(_) => {}
                        _ => return Err(self.err(&child_path, "expected a resource")),
                    }
                };
                loop {
                    match self.event(&child_path)? {
                        Event::End(_) => break,
                        Event::Text(t) if is_ws(&t) => {}
                        Event::Comment(_) => {}
                        _ => return Err(self.err(&child_path, "one resource expected")),
                    }
                }
                inner
            } else {
                let Some(cdef) = self.model.get(el.ty) else {
                    return Err(self.err(&child_path, "type unknown to the model"));
                };
                let mut co = Object::new();
                for (k, v) in self.attrs(&e, &child_path)? {
                    if k == "id" || (k == "url" && el.ty == "Extension") {
                        co.insert(k, Value::String(v));
                    } else {
                        return Err(self.err(&child_path, &format!("unexpected attribute {k}")));
                    }
                }
                if !empty {
                    self.children(cdef, &mut co, &child_path, depth + 1)?;
                }
                Value::Object(co)
            };
            if el.multiple {
                match o.get_mut(el.name) {
                    Some(Value::Array(a)) => a.push(v),
                    _ => o.insert(el.name, Value::Array(vec![v])),
                }
            } else if o.contains(el.name) {
                return Err(self.err(&child_path, "element repeats but R4 allows one"));
            } else {
                o.insert(el.name, v);
            }
        }
        for (name, list) in prims {
            let el = def.element(name).expect("read from this definition");
            let any_value = list.iter().any(|p| p.value.is_some());
            let any_ext = list.iter().any(|p| p.ext.is_some());
            let (values, exts): (Vec<Value>, Vec<Value>) = list
                .into_iter()
                .map(|p| {
                    (
                        p.value.unwrap_or(Value::Null),
                        p.ext.map_or(Value::Null, Value::Object),
                    )
                })
                .unzip();
            let pick = |mut v: Vec<Value>| {
                if el.multiple {
                    Value::Array(v)
                } else {
                    v.remove(0)
                }
            };
            let key = format!("_{name}");
            match (any_value, any_ext) {
                (true, true) => {
                    o.insert(name, pick(values));
                    // `_name` right after `name`.
                    o.insert_after(name, key, pick(exts));
                }
                (true, false) => o.insert(name, pick(values)),
                (false, true) => {
                    o.rename(name, key.clone());
                    o.insert(key, pick(exts));
                }
                (false, false) => {
                    o.remove(name);
                }
            }
        }
        Ok(())
    }

    fn primitive(
        &mut self,
        e: &BytesStart<'_>,
        empty: bool,
        ty: &str,
        path: &Path<'_>,
        depth: usize,
    ) -> Result<Prim, FhirError> {
        let mut value = None;
        let mut ext = Object::new();
        for (k, v) in self.attrs(e, path)? {
            match k.as_str() {
                "value" => value = Some(typed(ty, v, path)?),
                "id" => ext.insert("id", Value::String(v)),
                _ => return Err(self.err(path, &format!("unexpected attribute {k}"))),
            }
        }
        if !empty {
            let elem = self.model.get("Element").expect("Element is in the model");
            self.children(elem, &mut ext, path, depth + 1)?;
        }
        Ok(Prim {
            value,
            ext: (!ext.is_empty()).then_some(ext),
        })
    }
}

fn typed(ty: &str, v: String, path: &Path<'_>) -> Result<Value, FhirError> {
    match model::json_kind(ty) {
        JsonKind::String => Ok(Value::String(v)),
        JsonKind::Bool => match v.as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(FhirError::Syntax {
                position: path.to_string(),
                what: "boolean must be true or false".into(),
            }),
        },
        JsonKind::Number => {
            // The JSON reader checks the grammar; a number is its own document.
            match super::json::parse(v.trim().as_bytes()) {
                Ok(Value::Number(n)) => Ok(Value::Number(n)),
                _ => Err(FhirError::Syntax {
                    position: path.to_string(),
                    what: format!("{ty} is not a number"),
                }),
            }
        }
    }
}

/// Write a resource in the JSON shape as FHIR XML, elements in definition order.
///
/// # Errors
/// [`FhirError::Write`] when the value has members R4 does not define for its type.
pub fn to_string(resource: &Value) -> Result<String, FhirError> {
    let mut w = XmlWriter {
        out: String::with_capacity(4096),
        model: model::r4(),
    };
    w.out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    w.resource(resource, true, "")?;
    Ok(w.out)
}

/// [`to_string`] as bytes.
///
/// # Errors
/// As [`to_string`].
pub fn to_vec(resource: &Value) -> Result<Vec<u8>, FhirError> {
    to_string(resource).map(String::into_bytes)
}

struct XmlWriter {
    out: String,
    model: &'static Model,
}

fn write_err(path: &str, what: &str) -> FhirError {
    FhirError::Write {
        path: path.to_owned(),
        what: what.to_owned(),
    }
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
}

impl XmlWriter {
    fn resource(&mut self, v: &Value, root: bool, path: &str) -> Result<(), FhirError> {
        let o = v
            .as_object()
            .ok_or_else(|| write_err(path, "resource is not an object"))?;
        let ty = o
            .str("resourceType")
            .ok_or_else(|| write_err(path, "resourceType missing"))?;
        let def = self
            .model
            .resource(ty)
            .ok_or_else(|| write_err(path, "unknown resource type"))?;
        let path = if path.is_empty() {
            ty.to_owned()
        } else {
            format!("{path}.{ty}")
        };
        self.out.push('<');
        self.out.push_str(ty);
        if root {
            let _ = write!(self.out, " xmlns=\"{NAMESPACE}\"");
        }
        self.out.push('>');
        self.members(o, def, &path)?;
        let _ = write!(self.out, "</{ty}>");
        Ok(())
    }

    fn check_known(o: &Object, def: &TypeDef, path: &str) -> Result<(), FhirError> {
        for (k, _) in o.iter() {
            let base = k.strip_prefix('_').unwrap_or(k);
            if k == "resourceType" && def.kind == Kind::Resource {
                continue;
            }
            if def.element(base).is_none() {
                return Err(write_err(&format!("{path}.{k}"), "unknown element"));
            }
        }
        Ok(())
    }

    fn members(&mut self, o: &Object, def: &TypeDef, path: &str) -> Result<(), FhirError> {
        Self::check_known(o, def, path)?;
        let attrs_here = def.kind != Kind::Resource;
        for el in &def.elements {
            if attrs_here && (el.name == "id" || (el.name == "url" && def.name == "Extension")) {
                continue;
            }
            let main = o.get(el.name);
            let twin = o.get(&format!("_{}", el.name));
            if main.is_none() && twin.is_none() {
                continue;
            }
            let p = format!("{path}.{}", el.name);
            if self.model.is_primitive(el.ty) && el.ty != "xhtml" {
                let as_list = |v: Option<&Value>| -> Vec<Option<Value>> {
                    match v {
                        None => Vec::new(),
                        Some(Value::Array(a)) if el.multiple => a
                            .iter()
                            .map(|x| (!matches!(x, Value::Null)).then(|| x.clone()))
                            .collect(),
                        Some(x) => vec![Some(x.clone())],
                    }
                };
                let values = as_list(main);
                let exts = as_list(twin);
                for i in 0..values.len().max(exts.len()) {
                    self.primitive(
                        el.name,
                        values.get(i).cloned().flatten().as_ref(),
                        exts.get(i).cloned().flatten().as_ref(),
                        &p,
                    )?;
                }
                continue;
            }
            let items: Vec<&Value> = match main {
                Some(Value::Array(a)) if el.multiple => a.iter().collect(),
                Some(Value::Array(_)) => return Err(write_err(&p, "array where R4 allows one")),
                Some(v) => vec![v],
                None => Vec::new(),
            };
            for item in items {
                if el.ty == "xhtml" {
                    let s = item
                        .as_str()
                        .ok_or_else(|| write_err(&p, "narrative div must be a string"))?;
                    self.out.push_str(s);
                } else if el.ty == "Resource" {
                    let _ = write!(self.out, "<{}>", el.name);
                    self.resource(item, false, &p)?;
                    let _ = write!(self.out, "</{}>", el.name);
                } else {
                    let cdef = self
                        .model
                        .get(el.ty)
                        .ok_or_else(|| write_err(&p, "type unknown to the model"))?;
                    let co = item
                        .as_object()
                        .ok_or_else(|| write_err(&p, "expected an object"))?;
                    self.out.push('<');
                    self.out.push_str(el.name);
                    self.attr(co, "id", &p)?;
                    if el.ty == "Extension" {
                        self.attr(co, "url", &p)?;
                    }
                    self.out.push('>');
                    self.members(co, cdef, &p)?;
                    let _ = write!(self.out, "</{}>", el.name);
                }
            }
        }
        Ok(())
    }

    fn attr(&mut self, o: &Object, key: &str, path: &str) -> Result<(), FhirError> {
        if let Some(v) = o.get(key) {
            let s = v
                .as_str()
                .ok_or_else(|| write_err(path, &format!("{key} must be a string")))?;
            let _ = write!(self.out, " {key}=\"");
            escape_into(&mut self.out, s);
            self.out.push('"');
        }
        Ok(())
    }

    fn primitive(
        &mut self,
        name: &str,
        value: Option<&Value>,
        ext: Option<&Value>,
        path: &str,
    ) -> Result<(), FhirError> {
        self.out.push('<');
        self.out.push_str(name);
        let ext = match ext {
            Some(Value::Object(e)) => Some(e),
            None => None,
            Some(_) => return Err(write_err(path, "primitive extension must be an object")),
        };
        if let Some(e) = ext {
            self.attr(e, "id", path)?;
        }
        if let Some(v) = value {
            let text = match v {
                Value::Bool(b) => if *b { "true" } else { "false" }.to_owned(),
                Value::Number(n) | Value::String(n) => n.clone(),
                _ => {
                    return Err(write_err(
                        path,
                        "primitive must be a string, number or boolean",
                    ));
                }
            };
            self.out.push_str(" value=\"");
            escape_into(&mut self.out, &text);
            self.out.push('"');
        }
        let exts = ext.map(|e| e.arr("extension")).unwrap_or_default();
        if exts.is_empty() {
            self.out.push_str("/>");
            return Ok(());
        }
        self.out.push('>');
        let def = self.model.get("Element").expect("Element is in the model");
        let mut only_ext = Object::new();
        only_ext.insert("extension", Value::Array(exts.to_vec()));
        self.members(&only_ext, def, path)?;
        let _ = write!(self.out, "</{name}>");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::json;

    const OBS: &str = r#"<Observation xmlns="http://hl7.org/fhir"><id value="o1"/>
      <text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml"><p>a &amp; b</p></div></text>
      <status value="final"/><code><coding><system value="http://loinc.org"/><code value="718-7"/></coding></code>
      <valueQuantity><value value="12.0"/><unit value="mmol/l"/></valueQuantity>
      <referenceRange><low><value value="7.50"/></low></referenceRange></Observation>"#;

    /// Found by the `fhir_xml` fuzz target: behind a doubled byte order mark the narrative
    /// was cut three bytes early (`...</d`) and written back as XML that did not parse.
    #[test]
    fn a_second_byte_order_mark_is_refused_not_misread() {
        let doubled = format!("\u{feff}\u{feff}{OBS}");
        assert!(matches!(
            parse(doubled.as_bytes()),
            Err(FhirError::Syntax { .. })
        ));
        let single = format!("\u{feff}{OBS}");
        let v = parse(single.as_bytes()).unwrap();
        let div = v
            .get("text")
            .and_then(|t| t.get("div"))
            .and_then(Value::as_str);
        assert_eq!(
            div,
            Some(r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>a &amp; b</p></div>"#)
        );
        assert_eq!(parse(&to_vec(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn xml_becomes_the_json_shape() {
        let v = parse(OBS.as_bytes()).unwrap();
        let j = json::to_string(&v);
        assert!(
            j.contains(r#""coding":[{"system":"http://loinc.org","code":"718-7"}]"#),
            "{j}"
        );
        assert!(j.contains(r#""value":12.0"#), "{j}");
        assert!(
            j.contains(r#""referenceRange":[{"low":{"value":7.50}}]"#),
            "{j}"
        );
        assert!(j.contains(r#"<p>a &amp; b</p>"#), "{j}");
    }

    #[test]
    fn primitive_extensions_go_to_underscore_twins_and_back() {
        let src = r#"<Patient xmlns="http://hl7.org/fhir"><name><family value="Putten"><extension url="http://x/own"><valueString value="Putten"/></extension></family><given value="A"/><given id="g2"/></name><birthDate value="1934-04-28"/><deceasedBoolean value="false"/></Patient>"#;
        let v = parse(src.as_bytes()).unwrap();
        let j = json::to_string(&v);
        assert!(
            j.contains(r#""given":["A",null],"_given":[null,{"id":"g2"}]"#),
            "{j}"
        );
        assert!(
            j.contains(
                r#""_family":{"extension":[{"url":"http://x/own","valueString":"Putten"}]}"#
            ),
            "{j}"
        );
        assert!(j.contains(r#""deceasedBoolean":false"#), "{j}");
        let xml = to_string(&v).unwrap();
        assert_eq!(parse(xml.as_bytes()).unwrap(), v);
    }

    #[test]
    fn json_written_as_xml_reads_back_equal_and_in_definition_order() {
        let j = r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"status":"final","resourceType":"Observation","code":{"text":"x"},"valueQuantity":{"value":1.50}}}]}"#;
        let v = json::parse(j.as_bytes()).unwrap();
        let xml = to_string(&v).unwrap();
        assert!(
            xml.contains("<entry><resource><Observation><status value=\"final\"/><code>"),
            "{xml}"
        );
        let back = parse(xml.as_bytes()).unwrap();
        assert_eq!(
            json::to_string(&back),
            r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1.50}}}]}"#
        );
    }

    #[test]
    fn unknown_elements_are_named_by_path() {
        let err = parse(b"<Observation xmlns=\"http://hl7.org/fhir\"><code><bogus value=\"1\"/></code></Observation>").unwrap_err();
        assert!(err.to_string().contains("Observation.code.bogus"), "{err}");
        assert!(parse(b"<Nope/>").is_err());
        assert!(parse(b"<Observation><status value=\"final\"></Observation>").is_err());
        let v = json::parse(br#"{"resourceType":"Observation","bogus":1}"#).unwrap();
        assert!(
            to_string(&v)
                .unwrap_err()
                .to_string()
                .contains("Observation.bogus")
        );
    }
}

#[cfg(test)]
mod example_tests {
    use super::sorted;
    use super::*;
    use crate::fhir::json;

    fn testdata(rel: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/fhir")
            .join(rel);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn every_nictiz_example_reads_and_writes_back_identically() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/fhir/nictiz-r4-zib2020");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("xml") {
                continue;
            }
            let v = parse(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let again = parse(to_string(&v).unwrap().as_bytes()).unwrap();
            if json::to_string(&again) != json::to_string(&v) {
                std::fs::write("/tmp/a.json", json::to_string(&v)).unwrap();
                std::fs::write("/tmp/b.json", json::to_string(&again)).unwrap();
                panic!("{}", path.display());
            }
            let from_json = json::parse(json::to_string(&v).as_bytes()).unwrap();
            assert_eq!(from_json, v);
            n += 1;
        }
        assert!(n >= 11);
    }

    #[test]
    fn nictiz_patient_reads_into_the_json_shape() {
        let v = parse(&testdata("nictiz-r4-zib2020/nl-core-Patient-01.xml")).unwrap();
        let j = json::to_string(&v);
        assert!(j.starts_with(r#"{"resourceType":"Patient","id":"nl-core-Patient-01","meta":{"profile":["http://nictiz.nl/fhir/StructureDefinition/nl-core-Patient"]}"#), "{j}");
        assert!(j.contains(r#""identifier":[{"system":"http://fhir.nl/fhir/NamingSystem/bsn","value":"111222333"}]"#));
        assert!(j.contains(r#""given":["Johanna","Petronella","Maria"],"_given":[{"extension""#));
        assert!(j.contains(r#""multipleBirthBoolean":true"#));
    }

    #[test]
    fn acute_zorg_bundle_goes_to_xml_in_definition_order_and_back() {
        let v = json::parse(&testdata(
            "nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json",
        ))
        .unwrap();
        let xml = to_string(&v).unwrap();
        // `type` comes last in the JSON file but before `entry` in R4's order.
        let t = xml.find("<type value=\"message\"/>").unwrap();
        assert!(t < xml.find("<entry>").unwrap());
        let back = parse(xml.as_bytes()).unwrap();
        assert_eq!(sorted(&back), sorted(&v));
        assert_eq!(to_string(&back).unwrap(), xml);
    }
}

/// The same value with object members sorted by name, to compare regardless of order.
pub(crate) fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut members: Vec<(&str, &Value)> = o.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            let mut out = Object::new();
            for (k, x) in members {
                out.insert(k, sorted(x));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}
