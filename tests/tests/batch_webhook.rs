//! The batch webhook through real sockets against the `ketenbus` binary: events arrive in
//! signed JSON arrays within `max_events`, `max_bytes` and `max_wait`; per-event answers are
//! applied per event; a receiver that never answers, redirects, or answers with garbage
//! loses nothing and slows nobody else; a SIGKILL mid-batch loses nothing.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use ketenbus_tests::batch::{Batch, BatchReceiver, Reply};
use ketenbus_tests::{Broker, MEDLAB, Receiver, edifact_message, lineage_until, post_message};
use sha2::Sha256;

const SECRET: &str = "batch-secret-for-the-tests";

/// A subscription of raw messages to a batch webhook.
fn batch_sub(name: &str, url: &str, batch: &str, extra: &str) -> String {
    format!(
        "[[subscriptions]]\nname = \"{name}\"\nkinds = [\"raw\"]\n\
         sink = {{ type = \"webhook\", url = \"{url}\", secret_env = \"BATCH_SECRET\", batch = {batch} {extra} }}\n\
         [subscriptions.retry]\ninitial = \"100ms\"\nmax = \"500ms\"\n"
    )
}

fn start(config: &str) -> Broker {
    Broker::start_with_env(config, &[("BATCH_SECRET", SECRET)])
}

/// Post `n` messages at once (each its own envelope, so they spread over the lanes); their ids.
async fn post_many(broker: &Broker, n: usize, size: usize, from: usize) -> Vec<String> {
    let c = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in from..from + n {
        let (c, url) = (c.clone(), broker.url.clone());
        tasks.spawn(async move {
            let (s, j) = post_message(&c, &url, "application/EDIFACT", edifact_message(i, size))
                .await
                .unwrap();
            assert_eq!(s, 202, "{j}");
            j["id"].as_str().unwrap().to_owned()
        });
    }
    tasks.join_all().await
}

/// Every id of `want` among the events of `batches`, and how often each came.
fn counts(batches: &[Batch]) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for b in batches {
        for id in b.ids() {
            *c.entry(id).or_default() += 1;
        }
    }
    c
}

fn has_all(batches: &[Batch], want: &[String]) -> bool {
    let c = counts(batches);
    want.iter().all(|id| c.contains_key(id))
}

fn hmac_of(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The ids the broker's `dlq list` names for `subscription`, with their reasons.
fn dead_letters(broker: &Broker, subscription: &str) -> HashMap<String, String> {
    let (ok, out, err) = broker.cli(&["dlq", "list", "--subscription", subscription]);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|d| {
            (
                d["envelope_id"].as_str().unwrap().to_owned(),
                d["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// max_events and the signature: 40 messages at once come in POSTs of at most 10, each body
/// a JSON array signed as sent, each element the record with its id; nothing twice.
#[tokio::test]
async fn events_arrive_in_signed_batches_of_at_most_max_events() {
    let rx = BatchReceiver::ok().await;
    let broker = start(&batch_sub(
        "ten",
        &rx.url(),
        "{ max_events = 10, max_wait = \"2s\" }",
        "",
    ));
    let ids = post_many(&broker, 40, 300, 0).await;
    let got = rx
        .wait_until(Duration::from_secs(20), |b| has_all(b, &ids))
        .await;
    assert!(
        has_all(&got, &ids),
        "not all arrived: {} batches",
        got.len()
    );
    let c = counts(&got);
    assert!(c.values().all(|n| *n == 1), "nothing twice: {c:?}");
    assert!(
        got.iter().all(|b| b.elements.len() <= 10),
        "at most 10 each"
    );
    assert!(
        got.len() < 40 && got.iter().any(|b| b.elements.len() >= 5),
        "batched: {:?}",
        got.iter().map(|b| b.elements.len()).collect::<Vec<_>>()
    );
    for b in &got {
        assert_eq!(
            b.header("ketenbus-signature"),
            Some(hmac_of(&b.body).as_str())
        );
        assert_eq!(
            b.header("ketenbus-batch-size"),
            Some(b.elements.len().to_string().as_str())
        );
        assert_eq!(b.header("content-type"), Some("application/json"));
        for e in &b.elements {
            assert_eq!(e["kind"], "raw");
            assert_eq!(e["attempt"], 1);
            assert_eq!(e["envelope_id"], e["id"]);
            assert_eq!(e["content_type"], "application/EDIFACT");
            assert!(e["body_base64"].as_str().is_some_and(|s| s.len() > 300));
        }
    }
    // A batch whose signature a receiver checks over anything but the exact body fails.
    let b = &got[0];
    let reencoded = serde_json::to_vec_pretty(&b.elements).unwrap();
    assert_ne!(hmac_of(&reencoded), hmac_of(&b.body));
}

/// max_wait: one lone message waits for company no longer than max_wait, then goes alone.
#[tokio::test]
async fn a_batch_waits_no_longer_than_max_wait() {
    let rx = BatchReceiver::ok().await;
    let broker = start(&batch_sub(
        "slowfill",
        &rx.url(),
        "{ max_events = 50, max_wait = \"1500ms\" }",
        "",
    ));
    let t0 = Instant::now();
    let ids = post_many(&broker, 1, 300, 0).await;
    let got = rx
        .wait_until(Duration::from_secs(10), |b| has_all(b, &ids))
        .await;
    assert!(has_all(&got, &ids));
    let waited = got[0].at.duration_since(t0);
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(4000),
        "{waited:?}"
    );
    assert_eq!(got[0].elements.len(), 1);
}

/// max_bytes: with 3 KB messages (about 4 KB as base64) and max_bytes 10 KiB, no body is
/// longer than 10 KiB, so at most two events share one; nothing is lost.
#[tokio::test]
async fn no_batch_body_is_longer_than_max_bytes() {
    let rx = BatchReceiver::ok().await;
    let broker = start(&format!(
        "max_body = \"8 KiB\"\n{}",
        batch_sub(
            "small",
            &rx.url(),
            "{ max_events = 50, max_bytes = \"10 KiB\", max_wait = \"1s\" }",
            "",
        )
    ));
    let ids = post_many(&broker, 20, 3000, 0).await;
    let got = rx
        .wait_until(Duration::from_secs(20), |b| has_all(b, &ids))
        .await;
    assert!(has_all(&got, &ids));
    assert!(
        got.iter().all(|b| b.body.len() <= 10 * 1024),
        "{:?}",
        got.iter().map(|b| b.body.len()).collect::<Vec<_>>()
    );
    assert!(
        got.iter().any(|b| b.elements.len() == 2),
        "two share a body"
    );
    assert!(got.iter().all(|b| b.elements.len() <= 2));
    // max_bytes below the largest message accepted is refused at start-up.
    let (ok, err) = ketenbus_tests::check_config(
        &{
            let dir = broker.dir.join("refused.toml");
            std::fs::write(
                &dir,
                batch_sub("x", &rx.url(), "{ max_bytes = \"1 MiB\" }", ""),
            )
            .unwrap();
            dir
        },
        &[("BATCH_SECRET", SECRET)],
    );
    assert!(!ok);
    assert!(
        err.contains("subscriptions[0].sink.batch.max_bytes") && err.contains("http.max_body"),
        "{err}"
    );
}

/// Per-event outcomes: the receiver answers 207 with 503 for some events (retried, and only
/// they come again, with attempt 2), 422 for one (dead-lettered with the receiver's
/// detail), 200 for the rest (delivered once). The lineage and the metrics say so per event.
#[tokio::test]
async fn per_event_outcomes_retry_only_the_failed_and_dead_letter_the_refused() {
    // Decided on the first sight of each id: every third fails once, the fifth is refused.
    let seen: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let order = Arc::new(AtomicUsize::new(0));
    let refused: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let (s2, r2) = (Arc::clone(&seen), Arc::clone(&refused));
    let rx = BatchReceiver::start(move |b: &Batch| {
        let mut seen = s2.lock().unwrap();
        let outcomes: Vec<(String, u16)> = b
            .ids()
            .into_iter()
            .map(|id| {
                let first = !seen.contains_key(&id);
                let n = *seen
                    .entry(id.clone())
                    .or_insert_with(|| order.fetch_add(1, Ordering::SeqCst));
                let status = if n == 5 {
                    *r2.lock().unwrap() = Some(id.clone());
                    422
                } else if n.is_multiple_of(3) && first {
                    503
                } else {
                    200
                };
                (id, status)
            })
            .collect();
        Reply::per_event(&outcomes)
    })
    .await;
    let broker = start(&batch_sub(
        "partial",
        &rx.url(),
        "{ max_events = 20, max_wait = \"500ms\" }",
        "",
    ));
    let ids = post_many(&broker, 12, 300, 0).await;
    // Every id delivered or dead-lettered, as the lineage tells.
    let mut outcome = HashMap::new();
    for id in &ids {
        let l = lineage_until(&broker.url, id, |l| {
            l["deliveries"].as_array().is_some_and(|d| {
                d.iter().any(|d| {
                    d["subscription"] == "partial"
                        && (d["outcome"] == "delivered" || d["outcome"] == "dead_lettered")
                })
            })
        })
        .await;
        let d = l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["subscription"] == "partial")
            .unwrap()
            .clone();
        outcome.insert(id.clone(), d);
    }
    let refused_id = refused
        .lock()
        .unwrap()
        .clone()
        .expect("one event was refused");
    let seen = seen.lock().unwrap().clone();
    let got = rx.batches();
    let c = counts(&got);
    for id in &ids {
        let n = seen[id];
        let d = &outcome[id];
        if *id == refused_id {
            assert_eq!(d["outcome"], "dead_lettered", "{d}");
            assert_eq!(d["reason"], "http_422", "{d}");
            assert_eq!(c[id], 1, "a refused event is not retried");
        } else if n.is_multiple_of(3) {
            assert_eq!(d["outcome"], "delivered", "{d}");
            assert_eq!(c[id], 2, "failed once, sent again once: {id}");
            assert_eq!(d["attempts"], 2, "{d}");
        } else {
            assert_eq!(d["outcome"], "delivered", "{d}");
            assert_eq!(c[id], 1, "delivered ones are not sent again: {id}");
        }
    }
    // The retried ones came back with their attempt number.
    let second: Vec<&serde_json::Value> = got
        .iter()
        .flat_map(|b| &b.elements)
        .filter(|e| e["attempt"] == 2)
        .collect();
    assert_eq!(
        second.len(),
        ids.iter()
            .filter(|id| seen[*id].is_multiple_of(3) && **id != refused_id)
            .count()
    );
    let dl = dead_letters(&broker, "partial");
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[&refused_id], "http_422");
    let (_, out, _) = broker.cli(&["dlq", "list", "--subscription", "partial"]);
    assert!(
        out.contains("receiver says 422"),
        "the receiver's detail: {out}"
    );
    let m = broker.metrics().await;
    assert!(
        m.contains(
            "ketenbus_dispatch_dead_letters_total{reason=\"http_422\",subscription=\"partial\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "ketenbus_dispatch_delivery_retries_total{reason=\"http_503\",subscription=\"partial\"}"
        ),
        "per-event retries counted"
    );
}

/// A receiver that never answers: each batch times out and is retried whole, nothing is lost
/// once it answers again, and another subscription's events are not slowed meanwhile.
#[tokio::test]
async fn a_receiver_that_never_answers_slows_nobody_else_and_loses_nothing() {
    let stuck = BatchReceiver::start(|_| Reply {
        status: 200,
        delay: Duration::from_secs(3600),
        ..Reply::default()
    })
    .await;
    let healthy = Receiver::answering(204).await;
    let broker = start(&format!(
        "{}\n[[subscriptions]]\nname = \"healthy\"\nkinds = [\"raw\"]\nsink = {{ type = \"webhook\", url = \"{}\" }}\n",
        batch_sub(
            "stuck",
            &stuck.url(),
            "{ max_events = 10, max_wait = \"200ms\" }",
            ", timeout = \"1s\""
        ),
        healthy.url()
    ));
    let t0 = Instant::now();
    let ids = post_many(&broker, 30, 300, 0).await;
    let got = healthy.wait_for(30, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 30);
    let took = got.iter().map(|r| r.at).max().unwrap().duration_since(t0);
    assert!(
        took < Duration::from_secs(5),
        "the healthy one took {took:?}"
    );
    // The stuck receiver is being sent batches, again and again.
    let tried = stuck
        .wait_until(Duration::from_secs(10), |b| {
            counts(b).values().any(|n| *n >= 2)
        })
        .await;
    assert!(counts(&tried).values().any(|n| *n >= 2), "retried whole");
    let l = lineage_until(&broker.url, &ids[0], |l| {
        l["steps"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["subscription"] == "stuck" && s["reason"] == "timeout")
        })
    })
    .await;
    assert!(!l.to_string().contains("dead_lettered"), "{l}");
    // Answering again: every event arrives.
    stuck.answer_with(|_| Reply::status(200));
    for id in &ids {
        lineage_until(&broker.url, id, |l| {
            l["deliveries"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["subscription"] == "stuck" && d["outcome"] == "delivered")
            })
        })
        .await;
    }
    assert!(dead_letters(&broker, "stuck").is_empty());
}

/// A receiver that redirects: not followed (the target gets nothing), every event of the
/// batch dead-lettered with reason `redirect`, as for a single webhook.
#[tokio::test]
async fn a_redirecting_receiver_is_not_followed_and_its_events_are_dead_lettered() {
    let target = BatchReceiver::ok().await;
    let to = target.url();
    let rx = BatchReceiver::start(move |_| Reply {
        status: 307,
        location: Some(to.clone()),
        ..Reply::default()
    })
    .await;
    let broker = start(&batch_sub(
        "moved",
        &rx.url(),
        "{ max_events = 10, max_wait = \"300ms\" }",
        "",
    ));
    let ids = post_many(&broker, 6, 300, 0).await;
    for id in &ids {
        let l = lineage_until(&broker.url, id, |l| {
            l["deliveries"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["subscription"] == "moved" && d["outcome"] == "dead_lettered")
            })
        })
        .await;
        assert!(l.to_string().contains("redirect"), "{l}");
    }
    let dl = dead_letters(&broker, "moved");
    assert_eq!(dl.len(), 6);
    assert!(dl.values().all(|r| r == "redirect"), "{dl:?}");
    assert!(
        target.batches().is_empty(),
        "the redirect target got nothing"
    );
    assert_eq!(counts(&rx.batches()).len(), 6);
}

/// A SIGKILL while a batch is at the receiver (not answered yet): after the restart every
/// accepted message arrives (at least once, duplicates with the same id).
#[tokio::test]
async fn a_kill_mid_batch_loses_nothing() {
    let rx = BatchReceiver::start(|_| Reply {
        status: 200,
        delay: Duration::from_secs(3),
        ..Reply::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::prepare(
        dir.path(),
        &batch_sub(
            "killed",
            &rx.url(),
            "{ max_events = 8, max_wait = \"200ms\" }",
            "",
        ),
    );
    broker.set_env(&[("BATCH_SECRET", SECRET)]);
    broker.spawn();
    let ids = post_many(&broker, 24, 300, 0).await;
    // A batch is in flight: the receiver holds it unanswered.
    let inflight = rx
        .wait_until(Duration::from_secs(10), |b| !b.is_empty())
        .await;
    assert!(!inflight.is_empty());
    broker.kill();
    rx.answer_with(|_| Reply::status(200));
    broker.spawn();
    let got = rx
        .wait_until(Duration::from_secs(30), |b| {
            let c = counts(&b[1..]);
            ids.iter().all(|id| c.contains_key(id))
        })
        .await;
    let after = counts(&got[1..]);
    let missing: Vec<&String> = ids.iter().filter(|id| !after.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "lost: {missing:?}\n{}",
        broker.log_text()
    );
    // The batch that was in flight at the kill came again, same ids.
    for id in inflight[0].ids() {
        assert!(after.contains_key(&id));
    }
}

/// Hostile answers: a 207 of 5 MiB, a 207 that is not the answer's JSON, a 207 naming only
/// ids that were not in the batch. Each retries the batch (nothing delivered on their say-so,
/// nothing dead-lettered); then a plain 200 delivers each event once.
#[tokio::test]
async fn hostile_answers_retry_the_batch_and_deliver_nothing_on_their_say_so() {
    let rx = BatchReceiver::start(|b: &Batch| match b.index {
        0 => Reply {
            status: 207,
            body: {
                let mut v = b"{\"results\":[".to_vec();
                v.extend(std::iter::repeat_n(b' ', 5 << 20));
                v.extend_from_slice(b"]}");
                v
            },
            ..Reply::default()
        },
        1 => Reply {
            status: 207,
            body: b"{\"results\": [{\"id\": 7, \"status\": \"fine\"}".to_vec(),
            ..Reply::default()
        },
        2 => Reply::per_event(&[
            ("not-in-this-batch".to_owned(), 200),
            ("../../etc".to_owned(), 422),
        ]),
        _ => Reply::status(200),
    })
    .await;
    let broker = start(&batch_sub(
        "hostile",
        &rx.url(),
        "{ max_events = 10, max_wait = \"300ms\" }",
        "",
    ));
    let ids = post_many(&broker, 4, 300, 0).await;
    for id in &ids {
        lineage_until(&broker.url, id, |l| {
            l["deliveries"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["subscription"] == "hostile" && d["outcome"] == "delivered")
            })
        })
        .await;
    }
    let got = rx.batches();
    assert!(got.len() >= 4, "{} requests", got.len());
    // Nothing was delivered before the plain 200: every id was sent again after each answer.
    let c = counts(&got);
    for id in &ids {
        assert!(c[id] >= 2, "{id} sent {} times", c[id]);
    }
    assert!(dead_letters(&broker, "hostile").is_empty());
    let l = lineage_until(&broker.url, &ids[0], |_| true).await;
    let reasons: HashSet<String> = l["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["subscription"] == "hostile")
        .filter_map(|s| s["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(reasons.contains("batch_answer"), "{reasons:?}");
    let m = broker.metrics().await;
    assert!(
        m.contains("reason=\"batch_answer\"") && m.contains("reason=\"batch_unanswered\""),
        "retries counted by reason"
    );
}

/// Synthetic BSNs passing the eleven-test (never a real person's), one per patient.
const PATIENTS: [&str; 4] = ["999911120", "999912045", "999913001", "999914005"];

/// Events (not raw): the same JSON a single webhook sends, under `event`; each patient's
/// events arrive in the order of the log, the order a single webhook subscription on the
/// same events gets them in, while events of different patients share batches.
#[tokio::test]
async fn events_keep_their_json_and_each_patients_order() {
    let rx = BatchReceiver::ok().await;
    let single = Receiver::answering(204).await;
    let broker = start(&format!(
        "[[subscriptions]]\nname = \"labs\"\nkinds = [\"lab_result\"]\n\
         sink = {{ type = \"webhook\", url = \"{}\", batch = {{ max_events = 8, max_wait = \"100ms\" }} }}\n\
         [[subscriptions]]\nname = \"reference\"\nkinds = [\"lab_result\"]\n\
         sink = {{ type = \"webhook\", url = \"{}\" }}\n",
        rx.url(),
        single.url()
    ));
    let c = reqwest::Client::new();
    // Each patient's 10 lab results one after the other, the patients side by side.
    let mut tasks = tokio::task::JoinSet::new();
    for (p, bsn) in PATIENTS.iter().enumerate() {
        let (c, url) = (c.clone(), broker.url.clone());
        tasks.spawn(async move {
            for i in 0..10 {
                let n = p * 100 + i;
                let body = MEDLAB
                    .replace("999911120", bsn)
                    .replace("IC0042", &format!("IC{n:06}"))
                    .replace("M0042", &format!("M{n:06}"))
                    .into_bytes();
                let (s, j) = post_message(&c, &url, "application/EDIFACT", body)
                    .await
                    .unwrap();
                assert_eq!(s, 202, "{j}");
            }
        });
    }
    tasks.join_all().await;
    let n = PATIENTS.len() * 10;
    let got = rx
        .wait_until(Duration::from_secs(30), |b| {
            b.iter().map(|b| b.elements.len()).sum::<usize>() >= n
        })
        .await;
    let reference = single.wait_for(n, Duration::from_secs(30)).await;
    let elements: Vec<&serde_json::Value> = got.iter().flat_map(|b| &b.elements).collect();
    assert_eq!(elements.len(), n);
    assert!(
        got.iter().any(|b| b.elements.len() > 1),
        "patients share batches"
    );
    // Per patient key: the envelope ids in the order each subscription got them.
    let mut batched: HashMap<String, Vec<String>> = HashMap::new();
    for e in &elements {
        assert_eq!(e["kind"], "lab_result");
        assert!(
            e["id"]
                .as_str()
                .unwrap()
                .starts_with(e["envelope_id"].as_str().unwrap())
        );
        assert_eq!(e["event"]["header"]["envelope_id"], e["envelope_id"], "{e}");
        batched
            .entry(
                e["event"]["header"]["patient_key"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
            .or_default()
            .push(e["envelope_id"].as_str().unwrap().to_owned());
    }
    let mut singly: HashMap<String, Vec<String>> = HashMap::new();
    for r in &reference {
        let e: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            e,
            elements
                .iter()
                .find(|b| b["id"] == e["header"]["id"])
                .unwrap()["event"],
            "the same JSON as a single webhook's"
        );
        singly
            .entry(e["header"]["patient_key"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["header"]["envelope_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(batched.len(), PATIENTS.len());
    assert_eq!(batched, singly, "each patient's order, as in the log");
}
