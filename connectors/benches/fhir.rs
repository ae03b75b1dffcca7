//! FHIR parse + map throughput on a lab Bundle made of the Nictiz nl-core examples
//! (Patient, Organization, Practitioner(Role), Specimen and five lab Observations,
//! about 29 kB as JSON and 32 kB as XML, narratives included).
//!
//! Run: `cargo bench -p ketenbus-connectors --bench fhir`
//! (criterion prints MiB/s; bundles/s = 1 / time per iteration).

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ketenbus_connectors::fhir::{self, Object, Value, inbound, json, xml};
use ketenbus_schemas::Format;

fn lab_bundle() -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/fhir/nictiz-r4-zib2020");
    let names = [
        "nl-core-Patient-01",
        "nl-core-HealthcareProvider-Organization-01",
        "nl-core-HealthProfessional-Practitioner-01",
        "nl-core-HealthProfessional-PractitionerRole-01",
        "nl-core-LaboratoryTestResult.Specimen-01",
        "nl-core-LaboratoryTestResult-01",
        "nl-core-LaboratoryTestResult-02",
        "nl-core-LaboratoryTestResult-03",
        "nl-core-LaboratoryTestResult-LaboratoryTest-05",
        "nl-core-LaboratoryTestResult-LaboratoryTest-06",
    ];
    let entries = names
        .iter()
        .map(|n| {
            let r = xml::parse(&std::fs::read(dir.join(format!("{n}.xml"))).expect("testdata"))
                .expect("parses");
            let ty = r
                .get("resourceType")
                .and_then(Value::as_str)
                .expect("typed")
                .to_owned();
            Object::new()
                .with("fullUrl", format!("https://lab.example.nl/fhir/{ty}/{n}"))
                .with("resource", r)
                .into()
        })
        .collect::<Vec<Value>>();
    Object::new()
        .with("resourceType", "Bundle")
        .with("type", "transaction")
        .with("entry", entries)
        .into()
}

fn bench(c: &mut Criterion) {
    let bundle = lab_bundle();
    for (name, format, bytes) in [
        ("json", Format::FhirJson, json::to_vec(&bundle)),
        (
            "xml",
            Format::FhirXml,
            xml::to_vec(&bundle).expect("writes"),
        ),
    ] {
        let mut g = c.benchmark_group(format!("fhir_lab_bundle_{name}"));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.sample_size(50);
        g.bench_function("parse", |b| {
            b.iter(|| black_box(fhir::parse(format, black_box(&bytes)).expect("parses")))
        });
        g.bench_function("parse_and_map", |b| {
            b.iter(|| {
                let tree = fhir::parse(format, black_box(&bytes)).expect("parses");
                let events = inbound::events_from(&tree, "bench", format.as_str()).expect("maps");
                black_box(events.len())
            });
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
