//! mCSD replica benchmark: an LRZa-sized directory (30,000 synthetic Organizations with one
//! FHIR R4 Endpoint each, served by the test peer `tests/mcsd/mcsd_peer.py`), replicated
//! through the broker's own [`Replica`]; then the time of the initial load, of a poll with
//! no change and with a few changes (each writes only the resources it reads), and p50 /
//! p99 of a lookup.
//!
//! ```text
//! nice cargo build --release -p ketenbus-tests --bin ketenbus-mcsd-bench
//! target/release/ketenbus-mcsd-bench --organizations 30000
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use ketenbus::deliver::mcsd::Replica;
use ketenbus_connectors::address_book::Channel;
use ketenbus_tests::mcsd::Peer;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Synthetic Organizations (each with one Endpoint) in the directory.
    #[arg(long, default_value_t = 30_000)]
    organizations: u32,
    /// Resources per page (`_count`).
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Timed lookups.
    #[arg(long, default_value_t = 2_000)]
    lookups: u32,
    /// Endpoints changed before the second poll.
    #[arg(long, default_value_t = 10)]
    changes: u32,
}

/// Bytes of the replica's files (database and write-ahead log).
fn bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("mcsd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let n = args.organizations.to_string();
    let peer = Peer::start_with(tmp.path(), &json!([]), &[], &["--synthetic", &n]);
    let data = tmp.path().join("data");
    let replica = Replica::open(&data, "bench")?;
    let client = reqwest::Client::new();

    let t = Instant::now();
    let taken = replica.sync(&client, &peer.url(), args.page_size).await?;
    println!(
        "initial load: {taken} resources in {} ({} bytes on disk)",
        ms(t.elapsed()),
        bytes(&data)
    );

    let t = Instant::now();
    let taken = replica.sync(&client, &peer.url(), args.page_size).await?;
    println!(
        "poll, no change: {taken} resources written in {}",
        ms(t.elapsed())
    );

    for i in 0..args.changes {
        peer.put(
            &json!({"resourceType": "Endpoint", "id": format!("ep-syn-{i}"),
            "status": "active", "connectionType": {"code": "hl7-fhir-rest"},
            "payloadMimeType": ["application/fhir+json; fhirVersion=4.0"],
            "address": format!("https://moved-{i}.example.test/r4")}),
        )
        .await;
    }
    let t = Instant::now();
    let taken = replica.sync(&client, &peer.url(), args.page_size).await?;
    println!(
        "poll, {} changed endpoints: {taken} resources written in {}",
        args.changes,
        ms(t.elapsed())
    );

    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    )?;
    let mut times = Vec::with_capacity(args.lookups as usize);
    let mut state = 0x2545_f491_u64;
    for _ in 0..args.lookups {
        // xorshift: parties spread over the whole directory
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let i = state % u64::from(args.organizations);
        let party = format!("ura:7{i:07}");
        let t = Instant::now();
        let found = replica.explain(&party, Channel::Fhir, now);
        times.push(t.elapsed());
        anyhow::ensure!(found.chosen.is_some(), "{party} resolves to nothing");
    }
    times.sort();
    let pick = |q: f64| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let at = ((times.len() - 1) as f64 * q) as usize;
        times[at]
    };
    println!(
        "lookup ({} parties): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        args.lookups,
        pick(0.5).as_secs_f64() * 1000.0,
        pick(0.99).as_secs_f64() * 1000.0,
        pick(1.0).as_secs_f64() * 1000.0
    );
    drop(peer);
    Ok(())
}
