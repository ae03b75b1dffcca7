//! Every schema a release of ketenbus has written records with (`schemas/history/<version>/`).
//! A single-object value names its writer schema by fingerprint; when that is not the current
//! schema's, [`released_writer`] finds the released schema with that fingerprint so the codec
//! can resolve the value to the current reader schema (Avro schema resolution: fields the
//! writer lacks take their defaults, fields the reader lacks are skipped).

use std::sync::OnceLock;

use apache_avro::Schema;

use crate::codec::{parsing_canonical_form, rabin_fingerprint};

/// The schemas of one release.
#[derive(Debug)]
pub struct Release {
    /// The release's version, also its folder name under `schemas/history`.
    pub version: &'static str,
    /// Each `.avsc` file of the release: file name and text.
    pub schemas: &'static [(&'static str, &'static str)],
}

macro_rules! release {
    ($version:literal: $($file:literal),+ $(,)?) => {
        Release {
            version: $version,
            schemas: &[$(($file, include_str!(concat!("../history/", $version, "/", $file)))),+],
        }
    };
}

/// Every release, oldest first. Add one at each release (see `schemas/history/README.md`).
pub const RELEASES: &[Release] = &[release!("0.1.0":
    "dead_letter.avsc",
    "delivery_outcome.avsc",
    "envelope.avsc",
    "event_acute_handover.avsc",
    "event_handover_notification.avsc",
    "event_lab_result.avsc",
    "event_letter.avsc",
    "retry_record.avsc",
)];

/// A released schema, parsed.
#[derive(Debug)]
pub struct ReleasedSchema {
    /// Release version.
    pub version: &'static str,
    /// File name in the release's folder.
    pub file: &'static str,
    /// Full name of the record.
    pub name: String,
    /// Fingerprint of its parsing canonical form, as single-object encoding writes it.
    pub fingerprint: [u8; 8],
    /// The schema.
    pub schema: Schema,
}

/// Every released schema, parsed once.
///
/// # Panics
/// When a released file does not parse: they are part of the crate and a test parses them.
pub fn released() -> &'static [ReleasedSchema] {
    static ALL: OnceLock<Vec<ReleasedSchema>> = OnceLock::new();
    ALL.get_or_init(|| {
        RELEASES
            .iter()
            .flat_map(|r| r.schemas.iter().map(move |s| (r.version, s)))
            .map(|(version, &(file, text))| {
                let schema = Schema::parse_str(text).expect("released schema parses");
                let name = match &schema {
                    Schema::Record(r) => r.name.fullname(None),
                    _ => String::new(),
                };
                ReleasedSchema {
                    version,
                    file,
                    name,
                    fingerprint: rabin_fingerprint(&parsing_canonical_form(&schema)),
                    schema,
                }
            })
            .collect()
    })
}

/// The released schema of record `name` with `fingerprint`, if a release wrote it.
#[must_use]
pub fn released_writer(name: &str, fingerprint: &[u8]) -> Option<&'static Schema> {
    released()
        .iter()
        .find(|s| s.name == name && s.fingerprint == fingerprint)
        .map(|s| &s.schema)
}
