//! Schema evolution holds for every record, against every released schema
//! (`schemas/history/<version>/`): a record written under a released schema decodes with
//! today's reader (and through today's Rust type, as the broker reads its log, dead letters
//! and retry records after an upgrade), and a record written under today's schema decodes
//! with the released reader (a consumer that has not upgraded). The values are made from the
//! schemas themselves, so the test keeps holding, and keeps checking, as fields are added.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use apache_avro::Schema;
use apache_avro::types::Value;
use ketenbus_schemas::codec::{AvroRecord, MAGIC};
use ketenbus_schemas::event::{
    AcuteHandoverEvent, HandoverNotificationEvent, LabResultEvent, LetterEvent,
};
use ketenbus_schemas::history::{RELEASES, released};
use ketenbus_schemas::lineage::LineageRecord;
use ketenbus_schemas::{DeadLetter, DeliveryOutcome, RawEnvelope, RetryRecord};

/// Decodes single-object bytes through the Rust type and encodes the value again with
/// today's schema.
type ThroughType = fn(&[u8]) -> Vec<u8>;

fn through<T: AvroRecord>(bytes: &[u8]) -> Vec<u8> {
    let v = T::from_avro(bytes).unwrap_or_else(|e| panic!("{e}"));
    v.to_avro().expect("encodes with today's schema")
}

/// Every record file under `schemas/avro` and the type that mirrors it.
const RECORDS: &[(&str, ThroughType)] = &[
    ("envelope.avsc", through::<RawEnvelope>),
    ("dead_letter.avsc", through::<DeadLetter>),
    ("delivery_outcome.avsc", through::<DeliveryOutcome>),
    ("retry_record.avsc", through::<RetryRecord>),
    ("lineage_record.avsc", through::<LineageRecord>),
    ("event_lab_result.avsc", through::<LabResultEvent>),
    ("event_letter.avsc", through::<LetterEvent>),
    ("event_acute_handover.avsc", through::<AcuteHandoverEvent>),
    (
        "event_handover_notification.avsc",
        through::<HandoverNotificationEvent>,
    ),
];

fn dir(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn files_in(path: &Path) -> BTreeSet<String> {
    std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".avsc"))
        .collect()
}

fn current(file: &str) -> Schema {
    let text = std::fs::read_to_string(dir("avro").join(file)).unwrap_or_else(|e| {
        panic!("{file} is no longer in schemas/avro ({e}): never remove a record")
    });
    Schema::parse_str(&text).unwrap()
}

/// Named types of a schema by full name, to follow references.
fn names(schema: &Schema, out: &mut HashMap<String, Schema>) {
    match schema {
        Schema::Record(r) => {
            out.insert(r.name.fullname(None), schema.clone());
            for f in &r.fields {
                names(&f.schema, out);
            }
        }
        Schema::Enum(e) => {
            out.insert(e.name.fullname(None), schema.clone());
        }
        Schema::Fixed(f) => {
            out.insert(f.name.fullname(None), schema.clone());
        }
        Schema::Array(a) => names(&a.items, out),
        Schema::Map(m) => names(&m.types, out),
        Schema::Union(u) => u.variants().iter().for_each(|v| names(v, out)),
        _ => {}
    }
}

/// A value of `schema`: with `full`, every optional branch taken and two items in every
/// array and map; without, every union null and every array and map empty. Each scalar is
/// distinct so a value landing in the wrong field shows.
struct Sample<'a> {
    names: &'a HashMap<String, Schema>,
    full: bool,
    n: i32,
}

impl Sample<'_> {
    fn value(&mut self, schema: &Schema) -> Value {
        self.n += 1;
        let n = self.n;
        match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => Value::Boolean(n % 2 == 0),
            Schema::Int => Value::Int(n),
            Schema::Long => Value::Long(i64::from(n)),
            Schema::Float => Value::Float(n as f32),
            Schema::Double => Value::Double(f64::from(n)),
            Schema::Bytes => Value::Bytes(vec![0xC3, 0x01, n as u8]),
            Schema::String => Value::String(format!("s{n}")),
            Schema::TimestampMillis => Value::TimestampMillis(1_764_000_000_000 + i64::from(n)),
            Schema::TimestampMicros => Value::TimestampMicros(i64::from(n)),
            Schema::Date => Value::Date(n),
            Schema::Uuid => Value::Uuid(uuid::Uuid::nil()),
            Schema::Array(a) => {
                let k = if self.full { 2 } else { 0 };
                Value::Array((0..k).map(|_| self.value(&a.items)).collect())
            }
            Schema::Map(m) => {
                let k = if self.full { 2 } else { 0 };
                Value::Map(
                    (0..k)
                        .map(|i| (format!("k{n}.{i}"), self.value(&m.types)))
                        .collect(),
                )
            }
            Schema::Union(u) => {
                let variants = u.variants();
                let pick = if self.full {
                    variants.iter().position(|v| *v != Schema::Null)
                } else {
                    variants.iter().position(|v| *v == Schema::Null)
                }
                .unwrap_or(0);
                let inner = self.value(&variants[pick]);
                Value::Union(u32::try_from(pick).unwrap(), Box::new(inner))
            }
            Schema::Record(r) => Value::Record(
                r.fields
                    .iter()
                    .map(|f| (f.name.clone(), self.value(&f.schema)))
                    .collect(),
            ),
            Schema::Enum(e) => {
                let i = usize::try_from(n).unwrap() % e.symbols.len();
                Value::Enum(u32::try_from(i).unwrap(), e.symbols[i].clone())
            }
            Schema::Fixed(f) => Value::Fixed(f.size, vec![0; f.size]),
            Schema::Ref { name } => {
                let named = self.names[&name.fullname(None)].clone();
                self.value(&named)
            }
            other => panic!("no sample for {other:?}: extend Sample"),
        }
    }
}

fn sample(schema: &Schema, full: bool) -> Value {
    let mut named = HashMap::new();
    names(schema, &mut named);
    Sample {
        names: &named,
        full,
        n: 0,
    }
    .value(schema)
}

/// `read` (a value an older reader got) holds exactly what `written` (today's value) holds
/// in the fields the older reader knows.
fn same_in_known_fields(read: &Value, written: &Value, at: &str) {
    match (read, written) {
        (Value::Record(r), Value::Record(w)) => {
            for (name, v) in r {
                let (_, wv) = w
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap_or_else(|| panic!("{at}.{name} is gone from today's schema"));
                same_in_known_fields(v, wv, &format!("{at}.{name}"));
            }
        }
        (Value::Union(_, r), Value::Union(_, w)) => same_in_known_fields(r, w, at),
        (Value::Array(r), Value::Array(w)) => {
            assert_eq!(r.len(), w.len(), "{at}");
            for (i, (r, w)) in r.iter().zip(w).enumerate() {
                same_in_known_fields(r, w, &format!("{at}[{i}]"));
            }
        }
        (Value::Map(r), Value::Map(w)) => {
            assert_eq!(r.len(), w.len(), "{at}");
            for (k, v) in r {
                same_in_known_fields(v, &w[k], &format!("{at}[{k}]"));
            }
        }
        (r, w) => assert_eq!(r, w, "{at}"),
    }
}

fn decode(writer: &Schema, datum: &[u8], reader: &Schema, what: &str) -> Value {
    apache_avro::from_avro_datum(writer, &mut &datum[..], Some(reader))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn every_released_folder_is_known_to_the_codec_and_no_record_was_removed() {
    let on_disk = files_in_dirs(&dir("history"));
    let listed: BTreeSet<(String, String)> = RELEASES
        .iter()
        .flat_map(|r| {
            r.schemas
                .iter()
                .map(|(f, _)| (r.version.to_owned(), (*f).to_owned()))
        })
        .collect();
    assert_eq!(listed, on_disk, "schemas/history and history::RELEASES");
    let today = files_in(&dir("avro"));
    let typed: BTreeSet<String> = RECORDS.iter().map(|(f, _)| (*f).to_owned()).collect();
    assert_eq!(typed, today, "every record file has its row in RECORDS");
    for (version, file) in &listed {
        assert!(
            today.contains(file),
            "{version}/{file} was removed from schemas/avro"
        );
    }
}

fn files_in_dirs(root: &Path) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            let version = e.file_name().to_string_lossy().into_owned();
            for f in files_in(&e.path()) {
                out.insert((version.clone(), f));
            }
        }
    }
    out
}

#[test]
fn todays_reader_reads_every_released_record_and_released_readers_read_todays() {
    let mut checked = 0;
    for old in released() {
        let file = old.file;
        let new = current(file);
        let through = RECORDS
            .iter()
            .find(|(f, _)| *f == file)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("{file} has no row in RECORDS"));
        for full in [true, false] {
            let what = |dir: &str| format!("{}/{file} ({dir}, full {full})", old.version);

            // Old record, today's reader: what the old record holds is kept...
            let written = sample(&old.schema, full);
            let datum = apache_avro::to_avro_datum(&old.schema, written.clone()).unwrap();
            let read = decode(&old.schema, &datum, &new, &what("old record, new reader"));
            // ...and nothing of it is lost on the way back.
            let again = apache_avro::to_avro_datum(&new, read).unwrap();
            let back = decode(&new, &again, &old.schema, &what("old -> new -> old"));
            same_in_known_fields(&back, &written, &what("old -> new -> old"));

            // The same through the codec and the Rust type, as the broker reads its log:
            // the old fingerprint is recognised, the value decodes, and written again with
            // today's schema an old reader gets exactly what was written.
            let mut single = MAGIC.to_vec();
            single.extend_from_slice(&old.fingerprint);
            single.extend_from_slice(&datum);
            let today = through(&single);
            let back = decode(&new, &today[10..], &old.schema, &what("through the type"));
            same_in_known_fields(&back, &written, &what("through the type"));

            // Today's record, the released reader.
            let written = sample(&new, full);
            let datum = apache_avro::to_avro_datum(&new, written.clone()).unwrap();
            let read = decode(&new, &datum, &old.schema, &what("new record, old reader"));
            same_in_known_fields(&read, &written, &what("new record, old reader"));
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        2 * RELEASES.iter().map(|r| r.schemas.len()).sum::<usize>()
    );
}

#[test]
fn a_fingerprint_of_another_record_is_still_refused() {
    // A released envelope fingerprint does not make a dead letter.
    let env = released()
        .iter()
        .find(|s| s.file == "envelope.avsc")
        .unwrap();
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&env.fingerprint);
    bytes.extend_from_slice(&[0; 16]);
    assert!(DeadLetter::from_avro(&bytes).is_err());
}
