//! An Avro binary datum read straight into a serde type, walking the writer's schema, and a
//! serde type written straight as a datum of its schema.
//!
//! apache-avro 0.21 decodes into its generic `Value` tree first (every record field's name
//! an owned `String`, every string and byte run copied once more) and only then into the
//! type; dropping that tree cost more than building the type. Measured at 1,000 msg/s, the
//! decode of lab result events took a third of the broker's CPU, most of it allocating and
//! freeing the tree. This reader visits the type's fields as it reads them: strings and
//! bytes are borrowed from the input and copied once, into the type.
//!
//! It maps the schema to serde as apache-avro's `from_value` does (records as maps by field
//! name, a union's branch as itself and `null` as `None`, an enum as its symbol, the
//! logical types as their underlying int or long), so a type reads the same either way:
//! `schemas_match_types` holds every shipped type to it. Fields the type does not name are
//! walked over without being built.
//!
//! Writing walks the schema beside the type's fields in the same way: a record's fields in
//! the schema's order (the types declare them in that order; a field out of order is an
//! error, never a wrong datum), `None` as the union's `null` branch, `Some` as its other one.
//! apache-avro's schema-aware serializer looked every field up by name in a map and went
//! through its container writer behind a lock: a tenth of the broker's CPU at full load.
//! `schemas_match_types` holds the bytes to apache-avro's own.
//!
//! Hostile input costs at most its length: every value takes at least one byte except
//! `null` and empty records, and a block of an array or map may not claim more items than
//! there are bytes left.

use std::collections::HashMap;
use std::fmt;

use apache_avro::Schema;
use apache_avro::schema::{Name, UnionSchema};
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};
use serde::ser::{self, Serialize};

/// Why a datum did not read: a text naming the schema position, never the value.
#[derive(Debug)]
pub(crate) struct DatumError(String);

impl fmt::Display for DatumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DatumError {}

impl de::Error for DatumError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DatumError(msg.to_string())
    }
}

impl ser::Error for DatumError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DatumError(msg.to_string())
    }
}

type Result<T> = std::result::Result<T, DatumError>;

fn err<T>(what: impl Into<String>) -> Result<T> {
    Err(DatumError(what.into()))
}

/// A schema with its named types, ready to read datums of it.
#[derive(Debug)]
pub(crate) struct DatumSchema {
    schema: Schema,
    names: HashMap<Name, Schema>,
}

impl DatumSchema {
    /// `schema` with every named type it defines.
    pub(crate) fn new(schema: &Schema) -> std::result::Result<DatumSchema, apache_avro::Error> {
        let resolved = apache_avro::schema::ResolvedSchema::try_from(schema)?;
        let names = resolved
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        Ok(DatumSchema {
            schema: inline(schema, &names, 0),
            names,
        })
    }

    /// Append the datum of `value` to `out`.
    pub(crate) fn write<T: Serialize + ?Sized>(&self, value: &T, out: &mut Vec<u8>) -> Result<()> {
        value.serialize(Writer {
            out,
            schema: &self.schema,
            names: &self.names,
        })
    }

    /// Read one datum (trailing bytes are left, as apache-avro's readers leave them).
    pub(crate) fn read<'de, T: de::Deserialize<'de>>(&self, bytes: &'de [u8]) -> Result<T> {
        let mut input = Input(bytes);
        T::deserialize(Datum {
            input: &mut input,
            schema: &self.schema,
            names: &self.names,
        })
    }
}

/// `schema` with each reference to a named type replaced by the type itself, so that reading
/// and writing never look a name up (hashing the name on every reference was a fifth of
/// walking a lab result). A type that refers to itself keeps its references past a depth;
/// [`resolve`] follows those.
fn inline(schema: &Schema, names: &HashMap<Name, Schema>, depth: usize) -> Schema {
    const DEEPEST: usize = 16;
    match schema {
        Schema::Ref { name } if depth < DEEPEST => names
            .get(name)
            .map_or_else(|| schema.clone(), |named| inline(named, names, depth + 1)),
        Schema::Array(a) => Schema::Array(apache_avro::schema::ArraySchema {
            items: Box::new(inline(&a.items, names, depth)),
            attributes: a.attributes.clone(),
        }),
        Schema::Map(m) => Schema::Map(apache_avro::schema::MapSchema {
            types: Box::new(inline(&m.types, names, depth)),
            attributes: m.attributes.clone(),
        }),
        Schema::Union(u) => {
            let variants = u.variants().iter().map(|v| inline(v, names, depth));
            UnionSchema::new(variants.collect()).map_or_else(|_| schema.clone(), Schema::Union)
        }
        Schema::Record(r) => {
            let mut r = r.clone();
            for f in &mut r.fields {
                f.schema = inline(&f.schema, names, depth);
            }
            Schema::Record(r)
        }
        other => other.clone(),
    }
}

/// The bytes not read yet.
struct Input<'de>(&'de [u8]);

impl<'de> Input<'de> {
    fn take(&mut self, n: usize) -> Result<&'de [u8]> {
        if n > self.0.len() {
            return err(format!("the datum ends {} bytes early", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// A zig-zag varint long (at most 10 bytes).
    fn long(&mut self) -> Result<i64> {
        let mut n: u64 = 0;
        for i in 0..10 {
            let b = self.take(1)?[0];
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                // Zig-zag: the low bit is the sign.
                let magnitude = i64::try_from(n >> 1).unwrap_or(i64::MAX);
                return Ok(if n & 1 == 0 {
                    magnitude
                } else {
                    -magnitude - 1
                });
            }
        }
        err("a varint longer than 10 bytes")
    }

    fn int(&mut self) -> Result<i32> {
        i32::try_from(self.long()?).map_err(|_| DatumError("an int out of range".into()))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.long()?;
        usize::try_from(n).map_err(|_| DatumError(format!("a negative length {n}")))
    }

    fn bytes(&mut self) -> Result<&'de [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'de str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DatumError("a string not UTF-8".into()))
    }

    fn index(&mut self, of: usize, what: &str) -> Result<usize> {
        let i = self.long()?;
        match usize::try_from(i) {
            Ok(i) if i < of => Ok(i),
            _ => err(format!("{what} index {i} of {of}")),
        }
    }

    /// Items in the next block of an array or map, 0 at the end. A negative count is
    /// followed by the block's size in bytes (Avro spec, "Complex Types: Arrays").
    fn block(&mut self) -> Result<usize> {
        let n = self.long()?;
        let n = if n < 0 {
            self.long()?; // the block's size, not needed to read it
            n.checked_neg()
                .ok_or_else(|| DatumError("a block count out of range".into()))?
        } else {
            n
        };
        let n = usize::try_from(n).map_err(|_| DatumError("a block count out of range".into()))?;
        if n > self.0.len() {
            return err(format!("a block of {n} items in {} bytes", self.0.len()));
        }
        Ok(n)
    }
}

/// A value of `schema` at the head of `input`.
struct Datum<'a, 'de> {
    input: &'a mut Input<'de>,
    schema: &'a Schema,
    names: &'a HashMap<Name, Schema>,
}

impl<'a, 'de> Datum<'a, 'de> {
    /// A value of `schema` at the same place.
    fn at<'b>(&'b mut self, schema: &'b Schema) -> Datum<'b, 'de> {
        Datum {
            input: self.input,
            schema,
            names: self.names,
        }
    }

    /// This datum read as `schema` instead (a union's branch, an array's items).
    fn with(self, schema: &'a Schema) -> Datum<'a, 'de> {
        Datum { schema, ..self }
    }

    /// The schema itself, or the named type a reference names.
    fn resolved(&self) -> Result<&'a Schema> {
        resolve(self.schema, self.names)
    }

    /// The branch a union's index picks.
    fn branch(&mut self, u: &'a UnionSchema) -> Result<&'a Schema> {
        let variants = u.variants();
        let i = self.input.index(variants.len(), "union branch")?;
        resolve(&variants[i], self.names)
    }

    /// Walk over a value without building it.
    fn skip(&mut self) -> Result<()> {
        match self.resolved()? {
            Schema::Null => {}
            Schema::Boolean => {
                self.input.take(1)?;
            }
            s if is_int(s) || is_long(s) || matches!(s, Schema::Enum(_)) => {
                self.input.long()?;
            }
            Schema::Float => {
                self.input.take(4)?;
            }
            Schema::Double => {
                self.input.take(8)?;
            }
            Schema::Bytes | Schema::String | Schema::Uuid => {
                self.input.bytes()?;
            }
            Schema::Fixed(f) => {
                self.input.take(f.size)?;
            }
            Schema::Array(a) => loop {
                let n = self.input.block()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.at(&a.items).skip()?;
                }
            },
            Schema::Map(m) => loop {
                let n = self.input.block()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.input.bytes()?;
                    self.at(&m.types).skip()?;
                }
            },
            Schema::Record(r) => {
                for f in &r.fields {
                    self.at(&f.schema).skip()?;
                }
            }
            Schema::Union(u) => {
                let branch = self.branch(u)?;
                self.at(branch).skip()?;
            }
            other => return unsupported(other),
        }
        Ok(())
    }
}

fn resolve<'a>(schema: &'a Schema, names: &'a HashMap<Name, Schema>) -> Result<&'a Schema> {
    match schema {
        Schema::Ref { name } => names
            .get(name)
            .ok_or_else(|| DatumError(format!("the schema names {name} but defines no such type"))),
        other => Ok(other),
    }
}

fn unsupported<T>(schema: &Schema) -> Result<T> {
    err(format!(
        "no reader for {:?} values",
        apache_avro::schema::SchemaKind::from(schema)
    ))
}

impl<'a, 'de> Deserializer<'de> for Datum<'a, 'de> {
    type Error = DatumError;

    fn deserialize_any<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value> {
        match self.resolved()? {
            Schema::Null => visitor.visit_unit(),
            Schema::Boolean => match self.input.take(1)?[0] {
                0 => visitor.visit_bool(false),
                1 => visitor.visit_bool(true),
                b => err(format!("a boolean byte {b}")),
            },
            s if is_int(s) => visitor.visit_i32(self.input.int()?),
            s if is_long(s) => visitor.visit_i64(self.input.long()?),
            Schema::Float => {
                let b = self.input.take(4)?;
                visitor.visit_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            Schema::Double => {
                let b = self.input.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                visitor.visit_f64(f64::from_le_bytes(a))
            }
            Schema::Bytes => visitor.visit_borrowed_bytes(self.input.bytes()?),
            Schema::Fixed(f) => visitor.visit_borrowed_bytes(self.input.take(f.size)?),
            Schema::String | Schema::Uuid => visitor.visit_borrowed_str(self.input.str()?),
            Schema::Enum(e) => {
                let i = self.input.index(e.symbols.len(), "enum symbol")?;
                visitor.visit_str(&e.symbols[i])
            }
            Schema::Union(u) => {
                let branch = self.branch(u)?;
                self.with(branch).deserialize_any(visitor)
            }
            Schema::Array(a) => visitor.visit_seq(Blocks::new(self.with(&a.items))),
            Schema::Map(m) => visitor.visit_map(Blocks::new(self.with(&m.types))),
            Schema::Record(r) => visitor.visit_map(Fields {
                datum: self,
                fields: r.fields.iter(),
                value: None,
            }),
            other => unsupported(other),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value> {
        match self.resolved()? {
            Schema::Null => visitor.visit_none(),
            Schema::Union(u) => match self.branch(u)? {
                Schema::Null => visitor.visit_none(),
                branch => visitor.visit_some(self.with(branch)),
            },
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        match self.resolved()? {
            Schema::Enum(e) => {
                let i = self.input.index(e.symbols.len(), "enum symbol")?;
                visitor.visit_enum(Symbol(&e.symbols[i]))
            }
            Schema::String => visitor.visit_enum(Symbol(self.input.str()?)),
            Schema::Union(u) => {
                let branch = self.branch(u)?;
                self.with(branch).deserialize_enum(name, variants, visitor)
            }
            other => err(format!(
                "an enum read from a {:?} value",
                apache_avro::schema::SchemaKind::from(other)
            )),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value> {
        self.skip()?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

/// The items of an array or the entries of a map (string keys), block by block.
struct Blocks<'a, 'de> {
    datum: Datum<'a, 'de>,
    left: usize,
    done: bool,
}

impl<'a, 'de> Blocks<'a, 'de> {
    fn new(datum: Datum<'a, 'de>) -> Self {
        Blocks {
            datum,
            left: 0,
            done: false,
        }
    }

    /// Whether another item follows (reading the next block's count when this one is used up).
    fn next_item(&mut self) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        if self.left == 0 {
            self.left = self.datum.input.block()?;
            if self.left == 0 {
                self.done = true;
                return Ok(false);
            }
        }
        self.left -= 1;
        Ok(true)
    }

    fn value<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value> {
        let schema = self.datum.schema;
        seed.deserialize(self.datum.at(schema))
    }
}

impl<'de> SeqAccess<'de> for Blocks<'_, 'de> {
    type Error = DatumError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if !self.next_item()? {
            return Ok(None);
        }
        self.value(seed).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> MapAccess<'de> for Blocks<'_, 'de> {
    type Error = DatumError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if !self.next_item()? {
            return Ok(None);
        }
        let key = self.datum.input.str()?;
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        self.value(seed)
    }
}

/// The fields of a record, in the schema's order, by name.
struct Fields<'a, 'de> {
    datum: Datum<'a, 'de>,
    fields: std::slice::Iter<'a, apache_avro::schema::RecordField>,
    value: Option<&'a Schema>,
}

impl<'de> MapAccess<'de> for Fields<'_, 'de> {
    type Error = DatumError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        let Some(field) = self.fields.next() else {
            return Ok(None);
        };
        self.value = Some(&field.schema);
        seed.deserialize(field.name.as_str().into_deserializer())
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        let schema = self
            .value
            .take()
            .ok_or_else(|| DatumError("a record field's value asked for twice".into()))?;
        seed.deserialize(self.datum.at(schema))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.fields.len())
    }
}

/// An enum symbol, as a unit variant.
struct Symbol<'s>(&'s str);

impl<'de> EnumAccess<'de> for Symbol<'_> {
    type Error = DatumError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let v = seed.deserialize(self.0.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for Symbol<'_> {
    type Error = DatumError;

    fn unit_variant(self) -> Result<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value> {
        err(format!("the enum symbol {} carries no value", self.0))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value> {
        err(format!("the enum symbol {} carries no value", self.0))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value> {
        err(format!("the enum symbol {} carries no value", self.0))
    }
}

/// Append a zig-zag varint long.
fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_long(out, i64::try_from(b.len()).unwrap_or(i64::MAX));
    out.extend_from_slice(b);
}

fn put_index(out: &mut Vec<u8>, i: usize) {
    put_long(out, i64::try_from(i).unwrap_or(i64::MAX));
}

fn is_int(s: &Schema) -> bool {
    matches!(s, Schema::Int | Schema::Date | Schema::TimeMillis)
}

fn is_long(s: &Schema) -> bool {
    matches!(
        s,
        Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
    )
}

/// Writes one value as a datum of `schema` at the end of `out`.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
    schema: &'a Schema,
    names: &'a HashMap<Name, Schema>,
}

impl<'a> Writer<'a> {
    /// The schema this value is written as: the schema itself, or in a union the first
    /// branch that `fits` (its index written first).
    fn target(&mut self, what: &str, fits: impl Fn(&Schema) -> bool) -> Result<&'a Schema> {
        let schema = resolve(self.schema, self.names)?;
        if fits(schema) {
            return Ok(schema);
        }
        if let Schema::Union(u) = schema {
            for (i, v) in u.variants().iter().enumerate() {
                let v = resolve(v, self.names)?;
                if fits(v) {
                    put_index(self.out, i);
                    return Ok(v);
                }
            }
        }
        err(format!(
            "a {what} written as a {:?} value",
            apache_avro::schema::SchemaKind::from(schema)
        ))
    }

    fn integer(mut self, n: i64) -> Result<()> {
        let schema = self.target("integer", |s| is_int(s) || is_long(s))?;
        if is_int(schema) {
            i32::try_from(n).map_err(|_| DatumError(format!("{n} written as an int")))?;
        }
        put_long(self.out, n);
        Ok(())
    }
}

/// `Serializer` methods for the integer types that fit an i64: each a [`Writer::integer`].
macro_rules! integers {
    ($($method:ident: $t:ty),*) => {
        $(
            fn $method(self, v: $t) -> Result<()> {
                self.integer(i64::from(v))
            }
        )*
    };
}

impl<'a> ser::Serializer for Writer<'a> {
    type Ok = ();
    type Error = DatumError;
    type SerializeSeq = WriteItems<'a>;
    type SerializeTuple = ser::Impossible<(), DatumError>;
    type SerializeTupleStruct = ser::Impossible<(), DatumError>;
    type SerializeTupleVariant = ser::Impossible<(), DatumError>;
    type SerializeMap = WriteItems<'a>;
    type SerializeStruct = WriteFields<'a>;
    type SerializeStructVariant = ser::Impossible<(), DatumError>;

    fn serialize_bool(mut self, v: bool) -> Result<()> {
        self.target("boolean", |s| matches!(s, Schema::Boolean))?;
        self.out.push(u8::from(v));
        Ok(())
    }

    integers!(serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_u8: u8, serialize_u16: u16, serialize_u32: u32);

    fn serialize_u64(self, v: u64) -> Result<()> {
        let n = i64::try_from(v).map_err(|_| DatumError(format!("{v} written as a long")))?;
        self.integer(n)
    }

    fn serialize_f32(mut self, v: f32) -> Result<()> {
        match self.target("float", |s| matches!(s, Schema::Float | Schema::Double))? {
            Schema::Float => self.out.extend_from_slice(&v.to_le_bytes()),
            _ => self.out.extend_from_slice(&f64::from(v).to_le_bytes()),
        }
        Ok(())
    }

    fn serialize_f64(mut self, v: f64) -> Result<()> {
        self.target("double", |s| matches!(s, Schema::Double))?;
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<()> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(mut self, v: &str) -> Result<()> {
        let fits = |s: &Schema| {
            matches!(
                s,
                Schema::String | Schema::Uuid | Schema::Bytes | Schema::Enum(_)
            )
        };
        match self.target("string", fits)? {
            Schema::Enum(e) => {
                let i = e
                    .symbols
                    .iter()
                    .position(|x| x == v)
                    .ok_or_else(|| DatumError(format!("{v} is not a symbol of {}", e.name)))?;
                put_index(self.out, i);
            }
            _ => put_bytes(self.out, v.as_bytes()),
        }
        Ok(())
    }

    fn serialize_bytes(mut self, v: &[u8]) -> Result<()> {
        let fits = |s: &Schema| matches!(s, Schema::Bytes | Schema::Fixed(_));
        match self.target("byte string", fits)? {
            Schema::Fixed(f) if f.size != v.len() => {
                return err(format!(
                    "{} bytes written as a fixed of {}",
                    v.len(),
                    f.size
                ));
            }
            Schema::Fixed(_) => self.out.extend_from_slice(v),
            _ => put_bytes(self.out, v),
        }
        Ok(())
    }

    fn serialize_none(mut self) -> Result<()> {
        self.target("None", |s| matches!(s, Schema::Null))?;
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        let Schema::Union(u) = resolve(self.schema, self.names)? else {
            return value.serialize(self);
        };
        let Some((i, branch)) = u
            .variants()
            .iter()
            .enumerate()
            .find(|(_, v)| !matches!(v, Schema::Null))
        else {
            return err("Some written as a union of null alone");
        };
        put_index(self.out, i);
        value.serialize(Writer {
            schema: branch,
            ..self
        })
    }

    fn serialize_unit(mut self) -> Result<()> {
        self.target("unit", |s| matches!(s, Schema::Null))?;
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<()> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<()> {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<()> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _value: &T,
    ) -> Result<()> {
        err(format!("{name}::{variant} carries a value: no Avro form"))
    }

    fn serialize_seq(mut self, len: Option<usize>) -> Result<WriteItems<'a>> {
        let Schema::Array(a) = self.target("sequence", |s| matches!(s, Schema::Array(_)))? else {
            return err("a sequence written as another kind of value");
        };
        WriteItems::start(self.out, self.names, &a.items, len)
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple> {
        err("a tuple: no Avro form")
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        err(format!("the tuple struct {name}: no Avro form"))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        err(format!("{name}::{variant} carries values: no Avro form"))
    }

    fn serialize_map(mut self, len: Option<usize>) -> Result<WriteItems<'a>> {
        let Schema::Map(m) = self.target("map", |s| matches!(s, Schema::Map(_)))? else {
            return err("a map written as another kind of value");
        };
        WriteItems::start(self.out, self.names, &m.types, len)
    }

    fn serialize_struct(mut self, name: &'static str, _len: usize) -> Result<WriteFields<'a>> {
        let Schema::Record(r) = self.target(name, |s| matches!(s, Schema::Record(_)))? else {
            return err(format!("{name} written as another kind of value"));
        };
        Ok(WriteFields {
            out: self.out,
            names: self.names,
            fields: r.fields.iter(),
        })
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        err(format!("{name}::{variant} carries fields: no Avro form"))
    }
}

/// An array's items or a map's entries: one block of all of them, then the end (as
/// apache-avro writes them).
struct WriteItems<'a> {
    out: &'a mut Vec<u8>,
    names: &'a HashMap<Name, Schema>,
    items: &'a Schema,
}

impl<'a> WriteItems<'a> {
    fn start(
        out: &'a mut Vec<u8>,
        names: &'a HashMap<Name, Schema>,
        items: &'a Schema,
        len: Option<usize>,
    ) -> Result<WriteItems<'a>> {
        let len = len.ok_or_else(|| DatumError("a sequence of unknown length".into()))?;
        if len > 0 {
            put_index(out, len);
        }
        Ok(WriteItems { out, names, items })
    }

    /// The end marker: a block of no items.
    fn finish(self) -> Result<()> {
        self.out.push(0);
        Ok(())
    }

    fn item<T: Serialize + ?Sized>(&mut self, schema: &Schema, value: &T) -> Result<()> {
        value.serialize(Writer {
            out: self.out,
            schema,
            names: self.names,
        })
    }
}

impl ser::SerializeSeq for WriteItems<'_> {
    type Ok = ();
    type Error = DatumError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.item(self.items, value)
    }

    fn end(self) -> Result<()> {
        self.finish()
    }
}

impl ser::SerializeMap for WriteItems<'_> {
    type Ok = ();
    type Error = DatumError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<()> {
        self.item(&Schema::String, key)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.item(self.items, value)
    }

    fn end(self) -> Result<()> {
        self.finish()
    }
}

/// A record's fields, in the schema's order.
struct WriteFields<'a> {
    out: &'a mut Vec<u8>,
    names: &'a HashMap<Name, Schema>,
    fields: std::slice::Iter<'a, apache_avro::schema::RecordField>,
}

impl ser::SerializeStruct for WriteFields<'_> {
    type Ok = ();
    type Error = DatumError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        match self.fields.next() {
            Some(f) if f.name == key => value.serialize(Writer {
                out: self.out,
                schema: &f.schema,
                names: self.names,
            }),
            Some(f) => err(format!(
                "field {key} where the schema has {}: the type's fields are not in the schema's order",
                f.name
            )),
            None => err(format!("field {key} is not in the schema")),
        }
    }

    fn end(mut self) -> Result<()> {
        match self.fields.next() {
            Some(f) => err(format!("field {} of the schema was not written", f.name)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::types::Value;
    use serde::{Deserialize, Serialize};

    use super::DatumSchema;

    /// Every kind of schema the reader knows, a named type used twice, and a field the
    /// narrow type below leaves out on either side of the one it reads.
    const SCHEMA: &str = r#"{"type": "record", "name": "All", "namespace": "t", "fields": [
        {"name": "n", "type": "null"},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "by", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "e", "type": {"type": "enum", "name": "Colour", "symbols": ["red", "green"]}},
        {"name": "fx", "type": {"type": "fixed", "name": "Two", "size": 2}},
        {"name": "a", "type": {"type": "array", "items": {"type": "record", "name": "Code",
            "fields": [{"name": "code", "type": "string"}, {"name": "colour", "type": "Colour"}]}}},
        {"name": "m", "type": {"type": "map", "values": "long"}},
        {"name": "u", "type": ["null", "string"]},
        {"name": "u2", "type": ["null", "Code"]},
        {"name": "r", "type": "Code"},
        {"name": "last", "type": "string"}
    ]}"#;

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    enum Colour {
        #[serde(rename = "red")]
        Red,
        #[serde(rename = "green")]
        Green,
    }

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    struct Code {
        code: String,
        colour: Colour,
    }

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    struct All {
        n: (),
        b: bool,
        i: i32,
        l: i64,
        ts: i64,
        f: f32,
        d: f64,
        #[serde(with = "apache_avro::serde_avro_bytes")]
        by: Vec<u8>,
        s: String,
        e: Colour,
        #[serde(with = "apache_avro::serde_avro_bytes")]
        fx: Vec<u8>,
        a: Vec<Code>,
        m: std::collections::BTreeMap<String, i64>,
        u: Option<String>,
        u2: Option<Code>,
        r: Code,
        last: String,
    }

    /// Only the last field: everything before it is walked over.
    #[derive(Debug, PartialEq, Deserialize)]
    struct Last {
        last: String,
    }

    fn code(c: &str, colour: u32) -> Value {
        let symbol = ["red", "green"][colour as usize];
        Value::Record(vec![
            ("code".into(), Value::String(c.into())),
            ("colour".into(), Value::Enum(colour, symbol.into())),
        ])
    }

    fn value(full: bool) -> Value {
        let n = if full { 3 } else { 0 };
        Value::Record(vec![
            ("n".into(), Value::Null),
            ("b".into(), Value::Boolean(full)),
            ("i".into(), Value::Int(-123_456)),
            ("l".into(), Value::Long(i64::MIN)),
            ("ts".into(), Value::TimestampMillis(1_764_000_000_000)),
            ("f".into(), Value::Float(1.5)),
            ("d".into(), Value::Double(-2.25)),
            ("by".into(), Value::Bytes(vec![0, 0xff, 7])),
            ("s".into(), Value::String("Zuiderziekenhuis \u{e9}".into())),
            ("e".into(), Value::Enum(1, "green".into())),
            ("fx".into(), Value::Fixed(2, vec![1, 2])),
            (
                "a".into(),
                Value::Array((0..n).map(|i| code(&format!("c{i}"), i % 2)).collect()),
            ),
            (
                "m".into(),
                Value::Map(
                    (0..n)
                        .map(|i| (format!("k{i}"), Value::Long(i64::from(i))))
                        .collect(),
                ),
            ),
            (
                "u".into(),
                if full {
                    Value::Union(1, Box::new(Value::String("u".into())))
                } else {
                    Value::Union(0, Box::new(Value::Null))
                },
            ),
            (
                "u2".into(),
                if full {
                    Value::Union(1, Box::new(code("x", 0)))
                } else {
                    Value::Union(0, Box::new(Value::Null))
                },
            ),
            ("r".into(), code("r", 1)),
            ("last".into(), Value::String("the end".into())),
        ])
    }

    fn datum(schema: &apache_avro::Schema, v: Value) -> Vec<u8> {
        apache_avro::to_avro_datum(schema, v.resolve(schema).unwrap()).unwrap()
    }

    #[test]
    fn reads_what_apache_avro_reads_and_walks_over_what_the_type_leaves_out() {
        let schema = apache_avro::Schema::parse_str(SCHEMA).unwrap();
        let reader = DatumSchema::new(&schema).unwrap();
        for full in [true, false] {
            let bytes = datum(&schema, value(full));
            let generic: All = apache_avro::from_value(
                &apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap(),
            )
            .unwrap();
            let direct: All = reader.read(&bytes).unwrap();
            assert_eq!(direct, generic, "full: {full}");
            let last: Last = reader.read(&bytes).unwrap();
            assert_eq!(last.last, "the end");
        }
    }

    #[test]
    fn writes_what_apache_avro_reads_back() {
        let schema = apache_avro::Schema::parse_str(SCHEMA).unwrap();
        let datum_schema = DatumSchema::new(&schema).unwrap();
        for full in [true, false] {
            let original: All = datum_schema.read(&datum(&schema, value(full))).unwrap();
            let mut bytes = Vec::new();
            datum_schema.write(&original, &mut bytes).unwrap();
            let generic: All = apache_avro::from_value(
                &apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap(),
            )
            .unwrap();
            assert_eq!(generic, original, "full: {full}");
        }
    }

    #[test]
    fn a_value_that_does_not_fit_its_schema_is_an_error_not_a_datum() {
        #[derive(Serialize)]
        struct Swapped {
            b: i64,
            a: i64,
        }
        #[derive(Serialize)]
        struct Short {
            a: i64,
        }
        #[derive(Serialize)]
        struct Wide {
            a: i64,
            b: i64,
        }
        let schema = apache_avro::Schema::parse_str(
            r#"{"type": "record", "name": "R", "fields": [
                {"name": "a", "type": "long"}, {"name": "b", "type": "int"}]}"#,
        )
        .unwrap();
        let s = DatumSchema::new(&schema).unwrap();
        let mut out = Vec::new();
        assert!(s.write(&Swapped { b: 1, a: 2 }, &mut out).is_err());
        assert!(s.write(&Short { a: 1 }, &mut out).is_err());
        assert!(
            s.write(&Wide { a: 1, b: 1 << 40 }, &mut out).is_err(),
            "int overflow"
        );
        out.clear();
        s.write(&Wide { a: -1, b: 64 }, &mut out).unwrap();
        assert_eq!(out, [0x01, 0x80, 0x01], "zig-zag varints");
    }

    #[test]
    fn a_type_that_refers_to_itself_reads_and_writes_past_the_inlined_depth() {
        #[derive(Debug, PartialEq, Deserialize, Serialize)]
        struct Node {
            v: i64,
            next: Option<Box<Node>>,
        }
        let schema = apache_avro::Schema::parse_str(
            r#"{"type": "record", "name": "Node", "fields": [
                {"name": "v", "type": "long"}, {"name": "next", "type": ["null", "Node"]}]}"#,
        )
        .unwrap();
        let s = DatumSchema::new(&schema).unwrap();
        let list = (0..24).fold(None, |next, v| Some(Box::new(Node { v, next })));
        let list = *list.unwrap();
        let mut bytes = Vec::new();
        s.write(&list, &mut bytes).unwrap();
        assert_eq!(s.read::<Node>(&bytes).unwrap(), list);
        let generic: Node = apache_avro::from_value(
            &apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap(),
        )
        .unwrap();
        assert_eq!(generic, list);
    }

    #[test]
    fn arrays_in_several_blocks_and_blocks_with_their_size() {
        // A block of 2 given with its size (count -2, then 2 bytes: longs 1 and 2), a block
        // of 1 (3), the end.
        let schema =
            apache_avro::Schema::parse_str(r#"{"type": "array", "items": "long"}"#).unwrap();
        let reader = DatumSchema::new(&schema).unwrap();
        let bytes = [3, 4, 2, 4, 2, 6, 0];
        let got: Vec<i64> = reader.read(&bytes).unwrap();
        assert_eq!(got, vec![1, 2, 3]);
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_an_error_or_a_value_never_a_panic() {
        let schema = apache_avro::Schema::parse_str(SCHEMA).unwrap();
        let reader = DatumSchema::new(&schema).unwrap();
        let bytes = datum(&schema, value(true));
        for cut in 0..bytes.len() {
            assert!(reader.read::<All>(&bytes[..cut]).is_err(), "cut at {cut}");
            assert!(reader.read::<Last>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                let _ = reader.read::<All>(&b);
                let _ = reader.read::<Last>(&b);
            }
        }
    }

    #[test]
    fn counts_and_lengths_past_the_input_are_refused_before_any_work() {
        let array =
            apache_avro::Schema::parse_str(r#"{"type": "array", "items": "null"}"#).unwrap();
        let reader = DatumSchema::new(&array).unwrap();
        // A block claiming 2^62 nulls (each zero bytes long) in a 10-byte datum.
        let mut huge = vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        huge.push(0);
        let started = std::time::Instant::now();
        assert!(reader.read::<Vec<()>>(&huge).is_err());
        assert!(reader.read::<serde::de::IgnoredAny>(&huge).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let string = apache_avro::Schema::parse_str(r#""string""#).unwrap();
        let reader = DatumSchema::new(&string).unwrap();
        // Length 2^40, and a negative length.
        assert!(
            reader
                .read::<String>(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x40, b'a'])
                .is_err()
        );
        assert!(reader.read::<String>(&[0x01, b'a']).is_err());
        // Not UTF-8.
        assert!(reader.read::<String>(&[0x02, 0xff]).is_err());
        let union = apache_avro::Schema::parse_str(r#"["null", "string"]"#).unwrap();
        let reader = DatumSchema::new(&union).unwrap();
        assert!(
            reader.read::<Option<String>>(&[0x04]).is_err(),
            "branch 2 of 2"
        );
        assert!(reader.read::<Option<String>>(&[0x01]).is_err(), "branch -1");
    }
}
