//! One record must not stall a subscription: through real sockets against the `ketenbus`
//! binary, with a webhook receiver that refuses one patient's records for a long time.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ketenbus_tests::{
    Broker, MEDLAB, Receiver, eventually, post_message, webhook_subscription, within,
};

/// Far below the retry horizon (`give_up_after`, 24 h by default) and the backoff cap.
const PROMPT: Duration = Duration::from_secs(10);

/// A BSN that passes the eleven-test, one per `n` (synthetic, never a real person's).
fn bsn(n: u32) -> String {
    let mut base = 20_000_000 + n * 1_009;
    loop {
        let digits: Vec<u32> = format!("{base:08}")
            .bytes()
            .map(|b| u32::from(b - b'0'))
            .collect();
        let sum: u32 = digits.iter().zip((2..=9).rev()).map(|(d, w)| d * w).sum();
        let check = sum % 11;
        if check < 10 {
            return format!("{base:08}{check}");
        }
        base += 1;
    }
}

/// The synthetic MEDLAB lab result for another (invented) patient, interchange `reference`.
fn lab_result(bsn: &str, reference: usize) -> Vec<u8> {
    MEDLAB
        .replace("BSN999911120", &format!("BSN{bsn}"))
        .replace("IC0042", &format!("IC{reference:06}"))
        .replace("M0042", &format!("M{reference:06}"))
        .into_bytes()
}

struct Posted {
    /// Envelope id -> when the sender heard 202.
    at: HashMap<String, Instant>,
    /// The failing patient's envelope ids, in the order they were accepted.
    failing: Vec<String>,
}

/// Post one lab result per other patient (`patients`), and one of the failing patient before
/// the first and after every tenth.
async fn post_round(
    c: &reqwest::Client,
    url: &str,
    patients: std::ops::Range<u32>,
    failing_bsn: &str,
    posted: &mut Posted,
) {
    let post = |body: Vec<u8>| {
        let c = c.clone();
        let url = url.to_owned();
        async move {
            let (s, j) = post_message(&c, &url, "application/EDIFACT", body)
                .await
                .unwrap();
            assert_eq!(s, 202, "{j}");
            j["id"].as_str().unwrap().to_owned()
        }
    };
    for (i, p) in patients.enumerate() {
        if i % 10 == 0 {
            let n = posted.failing.len();
            let id = post(lab_result(failing_bsn, 900_000 + n)).await;
            posted.at.insert(id.clone(), Instant::now());
            posted.failing.push(id);
        }
        let id = post(lab_result(&bsn(p), posted.at.len())).await;
        posted.at.insert(id, Instant::now());
    }
}

/// (how many of `others` arrived, the slowest of them from 202 to arrival).
fn arrivals(rx: &Receiver, posted: &Posted, others: &HashSet<String>) -> (usize, Duration) {
    let mut seen = HashSet::new();
    let mut slowest = Duration::ZERO;
    for r in rx.received() {
        let env = r.header("ketenbus-envelope-id").unwrap().to_owned();
        if others.contains(&env) && seen.insert(env.clone()) {
            slowest = slowest.max(r.at.saturating_duration_since(posted.at[&env]));
        }
    }
    (seen.len(), slowest)
}

async fn wait_for_others(
    rx: &Receiver,
    posted: &Posted,
    others: &HashSet<String>,
    round: &str,
) -> (usize, Duration) {
    let _ = within(PROMPT, async || {
        arrivals(rx, posted, others).0 == others.len()
    })
    .await;
    let (n, slowest) = arrivals(rx, posted, others);
    eprintln!(
        "stall figures, {round}: {n} of {} other patients' lab results arrived, slowest {slowest:?} after its 202",
        others.len()
    );
    (n, slowest)
}

#[tokio::test]
async fn one_patients_failing_record_holds_up_only_that_patients_later_records() {
    let rx = Receiver::answering(204).await;
    let failing_bsn = bsn(7_777);
    // This patient's receiver is down (503) until told otherwise. Three lanes over eight
    // partitions: before parking, about a third of the other patients waited behind the
    // failing record, and partition-mates in other lanes were delivered again after a restart.
    rx.fail_matching(Some((failing_bsn.as_bytes(), 503)));
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::prepare(
        dir.path(),
        &format!(
            "{}concurrency = 3\n[subscriptions.retry]\ninitial = \"100ms\"\nmax = \"1s\"\ngive_up_after = \"24h\"\n",
            webhook_subscription("gp", "\"lab_result\"", &rx.url(), "")
        ),
    );
    broker.spawn();
    let c = reqwest::Client::new();
    let mut posted = Posted {
        at: HashMap::new(),
        failing: Vec::new(),
    };

    // Round 1: 40 other patients among the failing patient's records.
    post_round(&c, &broker.url, 0..40, &failing_bsn, &mut posted).await;
    let others: HashSet<String> = posted
        .at
        .keys()
        .filter(|id| !posted.failing.contains(id))
        .cloned()
        .collect();
    let (n, slowest) = wait_for_others(&rx, &posted, &others, "round 1").await;
    assert_eq!(
        n,
        others.len(),
        "other patients' records waited behind the failing one:\n{}",
        broker.log_text()
    );
    assert!(slowest < PROMPT, "{slowest:?}");

    // Restart in the middle: SIGKILL while the failing patient's records are parked (give
    // the finished ones time to be committed, as any running broker has).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rx.received().iter().all(|r| {
            !posted
                .failing
                .iter()
                .any(|f| r.header("ketenbus-envelope-id") == Some(f.as_str()))
        }),
        "nothing of the failing patient arrived while its receiver refused"
    );
    // The parked records are undelivered: their age shows in the lab results' oldest age,
    // though their source offsets are committed.
    eventually(
        Duration::from_secs(12),
        "the parked records to show in the oldest undelivered age",
        async || {
            let text = broker.metrics().await;
            let age = text
                .lines()
                .find(|l| {
                    l.starts_with("ketenbus_dispatch_oldest_undelivered_age_seconds{")
                        && l.contains("subscription=\"gp\"")
                        && l.contains("kind=\"lab_result\"")
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if age >= 1.0 {
                Ok(())
            } else {
                Err(format!("age {age}"))
            }
        },
    )
    .await;
    let in_flight_at_kill = posted.failing.len();
    broker.kill();
    broker.spawn();
    let c = reqwest::Client::new(); // the old one pools connections to the killed process

    // Round 2: 40 more after the restart, with more of the failing patient's records.
    let before: HashSet<String> = posted.at.keys().cloned().collect();
    post_round(&c, &broker.url, 40..80, &failing_bsn, &mut posted).await;
    let others2: HashSet<String> = posted
        .at
        .keys()
        .filter(|id| !before.contains(*id) && !posted.failing.contains(id))
        .cloned()
        .collect();
    let (n, slowest) = wait_for_others(&rx, &posted, &others2, "round 2, after SIGKILL").await;
    assert_eq!(n, others2.len(), "{}", broker.log_text());
    assert!(slowest < PROMPT, "{slowest:?}");

    // The receiver recovers: the failing patient's records arrive, all of them, in order.
    rx.fail_matching(None);
    let failing_received = || -> Vec<String> {
        rx.received()
            .iter()
            .filter_map(|r| r.header("ketenbus-envelope-id").map(str::to_owned))
            .filter(|e| posted.failing.contains(e))
            .collect()
    };
    let _ = within(Duration::from_secs(20), async || {
        let got = failing_received();
        got.iter().collect::<HashSet<_>>().len() == posted.failing.len()
    })
    .await;
    let failing = failing_received();
    let mut firsts = Vec::new();
    for e in &failing {
        if !firsts.contains(e) {
            firsts.push(e.clone());
        }
    }
    assert_eq!(
        firsts, posted.failing,
        "the failing patient's records arrive after the failing one, in order"
    );

    // Duplicates (by Idempotency-Key): at most what was in flight at the kill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for r in rx.received() {
        *per_key
            .entry(r.header("idempotency-key").unwrap().to_owned())
            .or_default() += 1;
    }
    let duplicates: usize = per_key.values().map(|n| n - 1).sum();
    let of_others = per_key
        .iter()
        .filter(|(k, n)| **n > 1 && !posted.failing.iter().any(|f| k.starts_with(f.as_str())))
        .count();
    eprintln!(
        "stall figures: {} deliveries, {duplicates} duplicates ({of_others} of other patients), {in_flight_at_kill} records in flight at the kill",
        per_key.values().sum::<usize>()
    );
    assert_eq!(
        of_others, 0,
        "finished records of other patients were delivered again after the restart"
    );
    assert!(duplicates <= in_flight_at_kill, "{duplicates} duplicates");
    assert_eq!(per_key.len(), posted.at.len(), "every record arrived");
}
