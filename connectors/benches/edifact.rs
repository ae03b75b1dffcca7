//! EDIFACT throughput on a generated multi-MB MEDLAB interchange.
//!
//! Run: `cargo bench -p ketenbus-connectors --bench edifact`
//! (criterion prints MiB/s per stage: tokenize, parse with envelope checks, and
//! MEDLAB -> lab-result events).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ketenbus_connectors::edifact::{normalise_bytes, parse, synthetic_medlab, tokenize};

// The allocator of the `ketenbus` binary, so the figures are the broker's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn edifact(c: &mut Criterion) {
    // About 4 MB: 4,000 messages of about 1 kB.
    let input = synthetic_medlab(4_000);
    let mut g = c.benchmark_group("edifact");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.sample_size(30);
    g.bench_function("tokenize", |b| {
        b.iter(|| {
            let t = tokenize(black_box(&input)).expect("tokenizes");
            black_box(t.component_count())
        });
    });
    g.bench_function("parse", |b| {
        b.iter(|| {
            let d = parse(black_box(&input)).expect("parses");
            black_box(d.messages().len())
        });
    });
    g.bench_function("medlab_to_events", |b| {
        b.iter(|| {
            let events = normalise_bytes("bench", black_box(&input)).expect("normalises");
            black_box(events.len())
        });
    });
    g.finish();
}

criterion_group!(benches, edifact);
criterion_main!(benches);
