//! Avro single-object encoding: `C3 01`, the 8-byte little-endian CRC-64-AVRO (Rabin)
//! fingerprint of the schema's parsing canonical form, then the binary datum.

use apache_avro::Schema;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The two marker bytes of single-object encoding.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// Why a value could not be encoded or decoded. Texts name the schema, never the value.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value does not start with the single-object marker.
    #[error("not an avro single-object value (missing C3 01 marker)")]
    NoMarker,
    /// The fingerprint is neither the expected schema's nor a released version's of it.
    #[error("schema fingerprint {found} does not match {expected}")]
    WrongSchema {
        /// Fingerprint in the value, hex.
        found: String,
        /// Name of the schema the reader expected.
        expected: &'static str,
    },
    /// Avro could not encode or decode the datum.
    #[error("avro {op} of {schema} failed: {source}")]
    Avro {
        /// encode or decode.
        op: &'static str,
        /// Name of the schema.
        schema: &'static str,
        /// The library's error.
        #[source]
        source: Box<apache_avro::Error>,
    },
}

/// A compiled schema with its fingerprint, and its named types resolved once (apache-avro's
/// one-shot functions resolve them on every call) to write and read datums straight from and
/// into the types (see [`crate::datum`]).
pub struct CompiledSchema {
    /// The parsed schema.
    pub schema: Schema,
    /// Rabin fingerprint bytes (little-endian).
    pub fingerprint: [u8; 8],
    /// Full name of the record, for errors.
    pub name: &'static str,
    datum: crate::datum::DatumSchema,
}

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledSchema")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl CompiledSchema {
    /// Parse a schema text that ships with this crate.
    ///
    /// # Panics
    /// When the text is not a valid schema: the schema files are part of the crate and
    /// a test parses each of them.
    #[must_use]
    pub fn parse(json: &'static str) -> CompiledSchema {
        let schema = Schema::parse_str(json).expect("shipped schema parses");
        let fingerprint = rabin_fingerprint(&parsing_canonical_form(&schema));
        let name = match &schema {
            Schema::Record(r) => Box::leak(r.name.fullname(None).into_boxed_str()),
            _ => "schema",
        };
        let datum = crate::datum::DatumSchema::new(&schema).expect("shipped schema resolves");
        CompiledSchema {
            schema,
            fingerprint,
            name,
            datum,
        }
    }
}

/// The spec's Parsing Canonical Form. apache-avro 0.21 writes a primitive that carried a
/// logical type as `{"type":"long"}` where the spec's [PRIMITIVES] rule wants `"long"`, which
/// changes the fingerprint; this puts such primitives back in their simple form so the
/// fingerprint matches other Avro libraries (fastavro, Java).
#[must_use]
pub fn parsing_canonical_form(schema: &Schema) -> String {
    let mut pcf = schema.canonical_form();
    for p in [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ] {
        pcf = pcf.replace(&format!("{{\"type\":\"{p}\"}}"), &format!("\"{p}\""));
    }
    pcf
}

/// CRC-64-AVRO (Rabin) fingerprint of a canonical form, as the 8 little-endian bytes that
/// single-object encoding writes.
#[must_use]
pub fn rabin_fingerprint(canonical: &str) -> [u8; 8] {
    use apache_avro::rabin::Rabin;
    use digest::Digest;
    let mut d = Rabin::new();
    d.update(canonical.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&d.finalize()[..8]);
    out
}

/// A Rust type that mirrors one `.avsc` file.
pub trait AvroRecord: Serialize + DeserializeOwned {
    /// The schema text (the `.avsc` file).
    const SCHEMA_JSON: &'static str;

    /// The compiled schema, parsed once per type.
    fn compiled() -> &'static CompiledSchema;

    /// Encode in single-object encoding.
    ///
    /// # Errors
    /// When the value does not fit the schema (a bug: the types mirror the schemas).
    fn to_avro(&self) -> Result<Vec<u8>, CodecError> {
        encode(Self::compiled(), self)
    }

    /// Decode from single-object encoding, checking the fingerprint: the current schema's,
    /// or a released version's of it (see [`crate::history`]), resolved to the current one.
    ///
    /// # Errors
    /// When the marker or fingerprint is wrong or the datum does not decode.
    fn from_avro(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(Self::compiled(), bytes)
    }
}

/// Implement [`AvroRecord::compiled`] with a per-type cache.
#[macro_export]
macro_rules! compiled_schema {
    () => {
        fn compiled() -> &'static $crate::codec::CompiledSchema {
            static SCHEMA: ::std::sync::OnceLock<$crate::codec::CompiledSchema> =
                ::std::sync::OnceLock::new();
            SCHEMA.get_or_init(|| $crate::codec::CompiledSchema::parse(Self::SCHEMA_JSON))
        }
    };
}

fn avro_err(op: &'static str, schema: &'static str, e: apache_avro::Error) -> CodecError {
    CodecError::Avro {
        op,
        schema,
        source: Box::new(e),
    }
}

fn encode<T: Serialize>(c: &CompiledSchema, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&c.fingerprint);
    c.datum.write(value, &mut out).map_err(|e| {
        let e = apache_avro::error::Details::SerializeValue(e.to_string());
        avro_err("encode", c.name, apache_avro::Error::new(e))
    })?;
    Ok(out)
}

/// Where a single-object value's datum starts, and which schema wrote it: the current one,
/// or (`Some`) an earlier release's.
fn datum_of<'a>(
    c: &CompiledSchema,
    bytes: &'a [u8],
) -> Result<(Option<&'static Schema>, &'a [u8]), CodecError> {
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(CodecError::NoMarker);
    }
    let (found, datum) = (&bytes[2..HEADER_LEN], &bytes[HEADER_LEN..]);
    if found == c.fingerprint {
        return Ok((None, datum));
    }
    match crate::history::released_writer(c.name, found) {
        Some(writer) => Ok((Some(writer), datum)),
        None => Err(CodecError::WrongSchema {
            found: hex8(found),
            expected: c.name,
        }),
    }
}

fn decode<T: DeserializeOwned>(c: &CompiledSchema, bytes: &[u8]) -> Result<T, CodecError> {
    match datum_of(c, bytes)? {
        (None, datum) => c.datum.read(datum).map_err(|e| read_err(c.name, &e)),
        // Written by an earlier release: resolve its schema to the current one.
        (Some(writer), mut datum) => {
            let v = apache_avro::from_avro_datum(writer, &mut datum, Some(&c.schema))
                .map_err(|e| avro_err("decode", c.name, e))?;
            apache_avro::from_value(&v).map_err(|e| avro_err("decode", c.name, e))
        }
    }
}

/// Read a value of `T`'s schema as `N`, a type naming some of `T`'s fields (the others are
/// walked over without being built); `None` for a value of an earlier release's schema, which
/// only `T::from_avro` reads.
///
/// # Errors
/// When the marker or fingerprint is wrong or the datum does not read as `N`.
pub fn read_as<T: AvroRecord, N: DeserializeOwned>(bytes: &[u8]) -> Result<Option<N>, CodecError> {
    let c = T::compiled();
    match datum_of(c, bytes)? {
        (None, datum) => c
            .datum
            .read(datum)
            .map(Some)
            .map_err(|e| read_err(c.name, &e)),
        (Some(_), _) => Ok(None),
    }
}

fn read_err(schema: &'static str, e: &crate::datum::DatumError) -> CodecError {
    let e = apache_avro::error::Details::DeserializeValue(e.to_string());
    avro_err("decode", schema, apache_avro::Error::new(e))
}

/// The fingerprint of a single-object value, if it has the marker.
#[must_use]
pub fn fingerprint_of(bytes: &[u8]) -> Option<[u8; 8]> {
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return None;
    }
    let mut f = [0u8; 8];
    f.copy_from_slice(&bytes[2..HEADER_LEN]);
    Some(f)
}

fn hex8(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}
