//! Search benchmark: a lineage index of synthetic messages (1,000,000 by default), then
//! p50/p99 of each filter of `GET /api/v1/messages` and some combinations, through the same
//! `Lineage::list` the API answers with (first page of 50, and a page deep in the cursor).
//!
//! ```text
//! nice cargo build --release -p ketenbus-tests --bin ketenbus-search-bench
//! target/release/ketenbus-search-bench --dir /tmp/search-bench --messages 1000000
//! target/release/ketenbus-search-bench --dir /tmp/search-bench --reuse   # query only
//! ```
//! The index is filled through the broker's own lineage path (received, normalised and
//! delivery steps published on `ketenbus.lineage` of an embedded log in `dir`, and applied to
//! the index from there), with skew: a few senders, receivers, subscriptions and patients have most
//! of the messages, lab results outnumber letters, and most messages end delivered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ketenbus::bus::{Bus, BusConfig, TopicSpec, WithBus};
use ketenbus::observe::lineage::{Lineage, ListQuery, Received, Status, Step};
use ketenbus::route::keys::PatientKeyer;
use ketenbus_schemas::event::{Identifier, systems};
use ketenbus_schemas::lineage::{Stage, StepOutcome};

#[derive(Parser)]
struct Args {
    /// Directory of the lineage index (`lineage.db`).
    #[arg(long)]
    dir: PathBuf,
    /// Messages to fill it with.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Use the index already in `dir` instead of filling a new one.
    #[arg(long)]
    reuse: bool,
    /// Timed queries per case.
    #[arg(long, default_value_t = 200)]
    samples: usize,
}

/// A small deterministic generator (xorshift64*), so every run builds the same index.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// 0 <= x < n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A rank from 0 to n-1, rank r about as likely as 1/(r+1): a few values have most.
    fn zipf(&mut self, n: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        // Inverse of the continuous 1/x law on [1, n+1).
        (((n as f64 + 1.0).powf(u)) as u64)
            .saturating_sub(1)
            .min(n - 1)
    }
}

const SENDERS: u64 = 300;
const RECEIVERS: u64 = 1_000;
const SUBSCRIPTIONS: u64 = 30;
const PATIENTS: u64 = 200_000;
const SECRET: &[u8] = b"search-bench-patient-key-secret!";
/// Start of the synthetic month, 2026-11-01T00:00:00Z.
const START_MS: i64 = 1_793_491_200_000;
const MONTH_MS: i64 = 30 * 24 * 3_600_000;

fn sender(r: u64) -> String {
    format!("mailbox:5000{r:05}")
}
fn receiver(r: u64) -> String {
    format!("mailbox:6000{r:05}")
}
fn subscription(r: u64) -> String {
    format!("sub-{r:02}")
}
/// A BSN-shaped number passing the eleven-test for patient `r`.
fn bsn(r: u64) -> String {
    (r..)
        .find_map(|n| {
            let first8 = format!("{:08}", 90_000_000 + n % 10_000_000);
            ketenbus_connectors::zib::bsn_check_digit(&first8).map(|c| format!("{first8}{c}"))
        })
        .expect("some number passes")
}

struct Synthetic {
    rng: Rng,
    keyer: PatientKeyer,
}

impl Synthetic {
    fn kind(&mut self) -> &'static str {
        match self.rng.below(100) {
            0..70 => "lab_result",
            70..90 => "letter",
            90..98 => "acute_handover",
            _ => "handover_notification",
        }
    }

    fn connector(&mut self) -> (&'static str, &'static str) {
        match self.rng.below(100) {
            0..50 => ("http", "edifact"),
            50..60 => ("fhir", "fhir_json"),
            60..85 => ("smtp", "rfc822"),
            85..95 => ("inbox", "edifact"),
            _ => ("imap", "rfc822"),
        }
    }

    async fn message(&mut self, lineage: &Lineage, n: u64, total: u64) {
        let at = START_MS + (n as i64 * MONTH_MS / total as i64);
        let id = format!("{at:013x}-{n:08x}");
        let (connector, format) = self.connector();
        let r = &mut self.rng;
        lineage
            .received(Received {
                id: id.clone(),
                received_at_ms: at,
                connector: connector.into(),
                format: format.into(),
                content_type: "application/EDIFACT".into(),
                size: 1_000 + r.below(4_000),
                sender: Some(sender(r.zipf(SENDERS))),
                receiver: (r.below(100) < 97).then(|| receiver(r.zipf(RECEIVERS))),
                raw: Some(ketenbus::bus::Position {
                    partition: 0,
                    offset: n as i64,
                }),
                source_id: Some(format!("IC{n:08}")),
                file: None,
            })
            .await;
        let fate = self.rng.below(1_000);
        if fate < 3 {
            return; // received: not routed yet
        }
        if fate < 8 {
            let mut step = Step::new(at + 5, Stage::Normalise, StepOutcome::Rejected);
            step.reason = Some("syntax".into());
            lineage.step(&id, step).await;
            return;
        }
        let events = 1 + usize::from(self.rng.below(10) == 0);
        let patient = self.rng.zipf(PATIENTS);
        let key = self.keyer.key_of(&Identifier {
            system: systems::BSN.into(),
            value: bsn(patient),
        });
        for e in 0..events {
            let mut step = Step::new(at + 5, Stage::Normalised, StepOutcome::Normalised);
            step.record_id = Some(format!("{id}-{e}"));
            step.kind = Some(self.kind().into());
            step.patient = Some(key.clone());
            lineage.step(&id, step).await;
        }
        let subs = 1 + self.rng.below(3);
        for s in 0..subs {
            let sub = subscription(self.rng.zipf(SUBSCRIPTIONS));
            let end = self.rng.below(1_000);
            let outcomes: &[StepOutcome] = match end {
                0..15 => &[StepOutcome::Retrying],
                15..25 => &[StepOutcome::Retrying, StepOutcome::DeadLettered],
                25..60 => &[StepOutcome::Retrying, StepOutcome::Delivered],
                60..80 => &[StepOutcome::Filtered],
                _ => &[StepOutcome::Delivered],
            };
            for (a, outcome) in outcomes.iter().enumerate() {
                let stage = if *outcome == StepOutcome::DeadLettered {
                    Stage::DeadLettered
                } else {
                    Stage::Delivery
                };
                let mut step = Step::new(at + 10 + s as i64 + a as i64, stage, *outcome);
                step.subscription = Some(sub.clone());
                step.record_id = Some(format!("{id}-0"));
                step.attempt = Some(a as u32 + 1);
                lineage.step(&id, step).await;
            }
        }
    }
}

/// Milliseconds at the `p`th percentile of sorted samples.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    if !args.reuse {
        for file in ["lineage.db", "log.db"] {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(args.dir.join(format!("{file}{suffix}")));
            }
        }
    }
    let dir = args.dir.clone();
    let env = ketenbus::env::Env::empty();
    ketenbus::bus::open(&BusConfig::default(), &dir, 1 << 20, &env, Bench(args)).await?
}

/// The benchmark, run on the embedded log of its directory.
struct Bench(Args);

impl WithBus for Bench {
    type Output = anyhow::Result<()>;

    async fn with<B: Bus>(self, bus: B) -> anyhow::Result<()> {
        let bus = Arc::new(bus);
        bus.ensure_topics(&[TopicSpec {
            name: ketenbus_schemas::topics::LINEAGE.to_owned(),
            partitions: 4,
        }])
        .await?;
        let lineage = Lineage::start(&self.0.dir, bus).await?;
        bench(self.0, lineage).await
    }
}

async fn bench(args: Args, lineage: Lineage) -> anyhow::Result<()> {
    let keyer = PatientKeyer::new(SECRET.to_vec());
    if !args.reuse {
        let mut synthetic = Synthetic {
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            keyer: keyer.clone(),
        };
        let started = Instant::now();
        for n in 0..args.messages {
            synthetic.message(&lineage, n, args.messages).await;
            if n % 100_000 == 99_999 {
                lineage.flush().await;
                eprintln!("{} messages in {:.0?}", n + 1, started.elapsed());
            }
        }
        lineage.flush().await;
        let size = std::fs::metadata(args.dir.join("lineage.db"))?.len();
        println!(
            "filled {} messages in {:.1?} ({:.0} messages/s), lineage.db {} MiB",
            args.messages,
            started.elapsed(),
            args.messages as f64 / started.elapsed().as_secs_f64(),
            size >> 20
        );
    }
    let total = args.messages;
    let mut rng = Rng(42);
    let day = |rng: &mut Rng| {
        let from = START_MS + rng.below(29) as i64 * 24 * 3_600_000;
        (rfc3339(from), rfc3339(from + 24 * 3_600_000))
    };
    // Each case draws its values afresh per sample, by the same skew as the data.
    type Case = (&'static str, Box<dyn Fn(&mut Rng) -> String>);
    let cases: Vec<Case> = vec![
        ("no filter", Box::new(|_| String::new())),
        (
            "sender",
            Box::new(|r| format!("sender={}", sender(r.zipf(SENDERS)))),
        ),
        (
            "receiver",
            Box::new(|r| format!("receiver={}", receiver(r.zipf(RECEIVERS)))),
        ),
        (
            "kind",
            Box::new(|r| {
                [
                    "kind=lab_result",
                    "kind=letter",
                    "kind=acute_handover",
                    "kind=handover_notification",
                ][r.below(4) as usize]
                    .into()
            }),
        ),
        (
            "connector",
            Box::new(|r| {
                [
                    "connector=http",
                    "connector=smtp",
                    "connector=imap",
                    "connector=fhir",
                    "connector=inbox",
                ][r.below(5) as usize]
                    .into()
            }),
        ),
        (
            "format",
            Box::new(|r| {
                ["format=edifact", "format=rfc822", "format=fhir_json"][r.below(3) as usize].into()
            }),
        ),
        (
            "status",
            Box::new(|r| {
                let all = Status::ALL;
                format!(
                    "status={}",
                    all[r.below(all.len() as u64) as usize].as_str()
                )
            }),
        ),
        (
            "subscription",
            Box::new(|r| format!("subscription={}", subscription(r.zipf(SUBSCRIPTIONS)))),
        ),
        (
            "since+until (one day)",
            Box::new(move |r| {
                let (a, b) = day(r);
                format!("since={a}&until={b}")
            }),
        ),
        (
            "source_id",
            Box::new(move |r| format!("source_id=IC{:08}", r.below(total))),
        ),
        (
            "patient (BSN)",
            Box::new(|r| format!("patient={}", bsn(r.zipf(PATIENTS)))),
        ),
        (
            "subscription+status=dead_lettered",
            Box::new(|r| {
                format!(
                    "subscription={}&status=dead_lettered",
                    subscription(r.zipf(SUBSCRIPTIONS))
                )
            }),
        ),
        (
            "sender+kind",
            Box::new(|r| format!("sender={}&kind=letter", sender(r.zipf(SENDERS)))),
        ),
        (
            "kind+status=dead_lettered+one day",
            Box::new(move |r| {
                let (a, b) = day(r);
                format!("kind=lab_result&status=dead_lettered&since={a}&until={b}")
            }),
        ),
        (
            "patient+kind",
            Box::new(|r| format!("patient={}&kind=lab_result", bsn(r.zipf(PATIENTS)))),
        ),
        (
            "connector+status=failed",
            Box::new(|r| {
                format!(
                    "connector={}&status=failed",
                    ["http", "smtp", "inbox"][r.below(3) as usize]
                )
            }),
        ),
        (
            "sender+receiver (common pair)",
            Box::new(|r| {
                format!(
                    "sender={}&receiver={}",
                    sender(r.zipf(3)),
                    receiver(r.zipf(3))
                )
            }),
        ),
        // Worst case: two common values that never meet, so the rarer is read to its end.
        (
            "connector=smtp+format=edifact (none)",
            Box::new(|_| "connector=smtp&format=edifact".into()),
        ),
    ];
    println!(
        "{:<38} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "filter", "first p50", "first p99", "deep p50", "deep p99", "hits"
    );
    for (name, make) in &cases {
        let (mut first, mut deep) = (Vec::new(), Vec::new());
        let mut hits = 0usize;
        for _ in 0..args.samples {
            let query = make(&mut rng);
            let (t, page) = timed(&lineage, &keyer, &query, 50, None).await?;
            first.push(t);
            hits += page.items.len();
            // Deep: the cursor after the first 2,000 matches (untimed), then a page of 50.
            let mut cursor = page.next.clone();
            for _ in 0..2 {
                let Some(c) = cursor else { break };
                cursor = timed(&lineage, &keyer, &query, 1_000, Some(c))
                    .await?
                    .1
                    .next;
            }
            if let Some(c) = cursor {
                deep.push(timed(&lineage, &keyer, &query, 50, Some(c)).await?.0);
            }
        }
        first.sort();
        deep.sort();
        let d = |p| {
            if deep.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", pct(&deep, p))
            }
        };
        println!(
            "{:<38} {:>9.2} {:>9.2} {:>9} {:>9} {:>7.1}",
            name,
            pct(&first, 0.5),
            pct(&first, 0.99),
            d(0.5),
            d(0.99),
            hits as f64 / args.samples as f64
        );
    }
    println!(
        "(milliseconds; hits = mean items on the first page of 50; deep = after 2,050 matches, when there are that many)"
    );
    Ok(())
}

async fn timed(
    lineage: &Lineage,
    keyer: &PatientKeyer,
    query: &str,
    limit: u32,
    after: Option<String>,
) -> anyhow::Result<(Duration, ketenbus::observe::lineage::Page)> {
    let started = Instant::now();
    let mut q: ListQuery = serde_urlencoded_like(query)?;
    q.limit = Some(limit);
    q.after = after;
    let search = q
        .check(|bsn| {
            keyer.key_of(&Identifier {
                system: systems::BSN.into(),
                value: bsn.into(),
            })
        })
        .map_err(|e| anyhow::anyhow!("{query}: {e}"))?;
    let page = lineage.list(search).await.map_err(anyhow::Error::msg)?;
    Ok((started.elapsed(), page))
}

/// A query string as the API reads it (the values here need no escaping).
fn serde_urlencoded_like(query: &str) -> anyhow::Result<ListQuery> {
    let map: serde_json::Map<String, serde_json::Value> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
        .collect();
    Ok(serde_json::from_value(serde_json::Value::Object(map))?)
}
