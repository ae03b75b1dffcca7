//! The light generic resource tree: FHIR's JSON shape, with decimals kept as the exact text
//! the sender wrote and object members in the order they came.

use std::fmt;

/// A FHIR JSON value. `Number` keeps the literal text (`12.0` stays `12.0`).
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// `null` (only inside primitive arrays aligned with their `_name` twin).
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number exactly as written.
    Number(String),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object, members in order.
    Object(Object),
}

/// Object members in order; lookups are linear (FHIR objects are small).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Object {
    members: Vec<(String, Value)>,
}

impl Object {
    /// An empty object.
    #[must_use]
    pub fn new() -> Object {
        Object::default()
    }

    /// The member `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.members.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The member `key`, to change.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.members
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Whether `key` is present.
    #[must_use]
    pub fn contains(&self, key: &str) -> bool {
        self.members.iter().any(|(k, _)| k == key)
    }

    /// Set `key`, replacing a member of that name in place or appending.
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        if let Some(slot) = self.get_mut(&key) {
            *slot = value;
        } else {
            self.members.push((key, value));
        }
    }

    /// Set `key` right after the member `anchor` (or at the end when `anchor` is absent).
    pub fn insert_after(&mut self, anchor: &str, key: impl Into<String>, value: Value) {
        let key = key.into();
        self.remove(&key);
        match self.members.iter().position(|(k, _)| k == anchor) {
            Some(i) => self.members.insert(i + 1, (key, value)),
            None => self.members.push((key, value)),
        }
    }

    /// Rename member `from` to `to` in place.
    pub fn rename(&mut self, from: &str, to: impl Into<String>) {
        if let Some(m) = self.members.iter_mut().find(|(k, _)| k == from) {
            m.0 = to.into();
        }
    }

    /// Append without checking for a member of the same name (the parser checks).
    pub(crate) fn push(&mut self, key: String, value: Value) {
        self.members.push((key, value));
    }

    /// Remove and return `key`.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.members.iter().position(|(k, _)| k == key)?;
        Some(self.members.remove(i).1)
    }

    /// Members in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.members.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of members.
    #[must_use]
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Builder: with `key` set to `value`.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Object {
        self.insert(key, value.into());
        self
    }

    /// Builder: with `key` set when `value` is `Some`.
    #[must_use]
    pub fn with_opt<V: Into<Value>>(mut self, key: &str, value: Option<V>) -> Object {
        if let Some(v) = value {
            self.insert(key, v.into());
        }
        self
    }

    /// Builder: with `key` set to an array when `items` is not empty.
    #[must_use]
    pub fn with_array(mut self, key: &str, items: Vec<Value>) -> Object {
        if !items.is_empty() {
            self.insert(key, Value::Array(items));
        }
        self
    }

    /// The string member `key`.
    #[must_use]
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The object member `key`.
    #[must_use]
    pub fn obj(&self, key: &str) -> Option<&Object> {
        self.get(key).and_then(Value::as_object)
    }

    /// The array member `key`, or an empty slice.
    #[must_use]
    pub fn arr(&self, key: &str) -> &[Value] {
        self.get(key).and_then(Value::as_array).unwrap_or(&[])
    }
}

impl Value {
    /// The string, if this is one.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A number's literal or a string: how FHIR decimals are read tolerantly.
    #[must_use]
    pub fn as_literal(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::Number(s) => Some(s),
            _ => None,
        }
    }

    /// The object, if this is one.
    #[must_use]
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The array, if this is one.
    #[must_use]
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The member `key` of an object.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_object().and_then(|o| o.get(key))
    }

    /// The kind of JSON value, for error texts.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Value {
        Value::String(s.clone())
    }
}

impl From<Object> for Value {
    fn from(o: Object) -> Value {
        Value::Object(o)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Value {
        Value::Array(a)
    }
}

// Resources carry patient data: Debug shows the shape only.
impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Object(o) => o.fmt(f),
            Value::Array(a) => write!(f, "Array({} items)", a.len()),
            Value::String(s) => write!(f, "String({} bytes)", s.len()),
            Value::Number(n) => write!(f, "Number({} chars)", n.len()),
            other => f.write_str(other.type_name()),
        }
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.str("resourceType") {
            Some(t) => write!(f, "{t}({} members)", self.len()),
            None => write!(f, "Object({} members)", self.len()),
        }
    }
}
