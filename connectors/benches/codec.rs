//! Avro single-object encode and decode of the events the router publishes and every
//! subscription reads: a MEDLAB lab result and a PDF letter from mail, made by the real
//! normalisers from the project's synthetic fixtures.
//!
//! Run: `cargo bench -p ketenbus-connectors --bench codec`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use ketenbus_connectors::Normalise;
use ketenbus_schemas::{Event, Format, RawEnvelope};

// The broker's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn event(format: Format, fixture: &str) -> Event {
    let body = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture)).expect("fixture");
    let envelope = RawEnvelope {
        id: "0193a1b2-0000-7000-8000-000000000001".into(),
        received_at_ms: 1_764_000_000_000,
        connector: "bench".into(),
        format,
        content_type: String::new(),
        sender: Some("mailbox:500001234".into()),
        receiver: Some("mailbox:500005678".into()),
        body,
        attributes: BTreeMap::new(),
    };
    let normaliser: Box<dyn Normalise> = match format {
        Format::Edifact => Box::new(ketenbus_connectors::edifact::EdifactNormaliser),
        _ => Box::new(ketenbus_connectors::mail::MailNormaliser::default()),
    };
    normaliser
        .normalise(&envelope)
        .expect("normalises")
        .into_iter()
        .next()
        .expect("one event")
}

fn codec(c: &mut Criterion) {
    let events = [
        (
            "lab_result",
            event(
                Format::Edifact,
                "testdata/edifact/ketenbus/medlab-standards-example.edi",
            ),
        ),
        (
            "letter",
            event(Format::Rfc822, "testdata/mail/letter-pdf.eml"),
        ),
    ];
    for (name, e) in &events {
        let bytes = e.to_avro().expect("encodes");
        c.bench_function(&format!("encode {name} ({} bytes)", bytes.len()), |b| {
            b.iter(|| black_box(e).to_avro().expect("encodes"));
        });
        c.bench_function(&format!("decode {name}"), |b| {
            b.iter(|| Event::from_avro(e.kind(), black_box(&bytes)).expect("decodes"));
        });
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
