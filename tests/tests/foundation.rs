//! The foundation's guarantees, through real sockets against the `ketenbus` binary.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use ketenbus_tests::{
    Behaviour, Broker, MEDLAB, Receiver, check_config, edifact_message, eventually, lineage,
    lineage_until, post_message, webhook_subscription, within,
};
use sha2::Sha256;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test]
async fn a_raw_message_reaches_a_signed_webhook_with_its_lineage() {
    let rx = Receiver::answering(204).await;
    let sub = webhook_subscription(
        "archive",
        "\"raw\"",
        &rx.url(),
        ", secret_env = \"TEST_ARCHIVE_SECRET\"",
    );
    let broker =
        Broker::start_with_env(&sub, &[("TEST_ARCHIVE_SECRET", "archive-secret-for-tests")]);
    let body = edifact_message(1, 600);
    let (status, json) = post_message(&client(), &broker.url, "application/EDIFACT", body.clone())
        .await
        .unwrap();
    assert_eq!(status, 202, "{json}");
    let id = json["id"].as_str().unwrap().to_owned();
    assert_eq!(json["location"], format!("/api/v1/messages/{id}"));

    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let r = &got[0];
    assert_eq!(
        r.body.as_ref(),
        body.as_slice(),
        "raw subscribers get the original bytes"
    );
    assert_eq!(r.header("content-type"), Some("application/EDIFACT"));
    assert_eq!(r.header("idempotency-key"), Some(id.as_str()));
    assert_eq!(r.header("ketenbus-kind"), Some("raw"));
    let mut mac = Hmac::<Sha256>::new_from_slice(b"archive-secret-for-tests").unwrap();
    mac.update(&body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.header("ketenbus-signature"), Some(want.as_str()));

    let l = lineage_until(&broker.url, &id, |l| {
        l["deliveries"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["outcome"] == "delivered"))
    })
    .await;
    assert_eq!(l["format"], "edifact");
    assert_eq!(l["connector"], "http");
    let d = &l["deliveries"][0];
    assert_eq!(d["subscription"], "archive");
    assert_eq!(d["record_id"], id.as_str());
    assert_eq!(d["attempts"], 1);
    let stages: Vec<&str> = l["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert!(stages.contains(&"received"), "{stages:?}");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_nothing_is_kept() {
    let rx = Receiver::answering(204).await;
    let sub = webhook_subscription("archive", "\"raw\"", &rx.url(), "");
    // The first lines of the extra config land in [http].
    let broker = Broker::start(&format!("max_body = \"1 KiB\"\n{sub}"));
    let c = client();
    let (s, j) = post_message(&c, &broker.url, "text/plain", b"hello".to_vec())
        .await
        .unwrap();
    assert_eq!(s, 415);
    assert_eq!(j["error"], "unsupported_media_type");
    let (s, j) = post_message(&c, &broker.url, "application/EDIFACT", Vec::new())
        .await
        .unwrap();
    assert_eq!(s, 400);
    assert_eq!(j["error"], "empty_body");
    let (s, j) = post_message(&c, &broker.url, "application/fhir+json", vec![b' '; 2048])
        .await
        .unwrap();
    assert_eq!(s, 413, "{j}");
    assert_eq!(j["error"], "too_large");
    // A good one afterwards is the only thing delivered.
    let id = broker
        .accept(&c, "application/fhir+json; charset=utf-8", b"{}".to_vec())
        .await;
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.received().len(),
        1,
        "rejected messages left nothing behind"
    );
    assert_eq!(got[0].header("idempotency-key"), Some(id.as_str()));
    // `{}` is no FHIR resource: the router dead-letters it, and raw subscribers still got it.
    let l = lineage_until(&broker.url, &id, |l| {
        l["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["stage"] == "normalise")
    })
    .await;
    let step = l["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "normalise")
        .unwrap();
    assert_eq!(step["outcome"], "rejected", "{l:#}");
    let (ok, out, err) = broker.cli(&["dlq", "list", "--subscription", "router"]);
    assert!(ok, "{err}");
    assert!(out.contains(&id), "router dead letter listed: {out}");
    // Unknown ids are a clear 404.
    let resp = c
        .get(format!("{}/api/v1/messages/nope", broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

#[tokio::test]
async fn max_body_is_configurable() {
    let broker = Broker::start("max_body = \"1 KiB\"\n");
    let c = client();
    let (s, j) = post_message(&c, &broker.url, "application/EDIFACT", vec![b'A'; 2000])
        .await
        .unwrap();
    assert_eq!(s, 413, "{j}");
    broker
        .accept(&c, "application/EDIFACT", vec![b'A'; 1000])
        .await;
}

#[test]
fn check_config_names_every_problem_and_the_example_passes() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[bus]\npartitions = 0\n[[subscriptions]]\nname = \"x y\"\nkinds = [\"pizza\"]\nsink = { type = \"webhook\", url = \"nope\" }\n",
    )
    .unwrap();
    let (ok, err) = check_config(&bad, &[]);
    assert!(!ok);
    for path in [
        "bus.partitions",
        "subscriptions[0].name",
        "subscriptions[0].kinds[0]",
        "subscriptions[0].sink.url",
    ] {
        assert!(err.contains(path), "{path} missing from:\n{err}");
    }
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/ketenbus.example.toml");
    let (ok, err) = check_config(
        Path::new(example),
        &[
            ("KETENBUS_GP_WEBHOOK_SECRET", "s3cret-for-the-example"),
            ("KETENBUS_PATIENT_KEY", "0123456789abcdef0123456789"),
        ],
    );
    assert!(ok, "{err}");
    // A broken config does not start the broker.
    let out = std::process::Command::new(ketenbus_tests::ketenbus_bin())
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("subscriptions[0].sink.url"));
}

#[tokio::test]
async fn a_failing_subscriber_does_not_delay_another() {
    let good = Receiver::answering(204).await;
    let bad = Receiver::start(Behaviour {
        status: 500,
        delay: Duration::from_millis(200),
    })
    .await;
    let subs = format!(
        "{}\n{}\n[subscriptions.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n",
        webhook_subscription("healthy", "\"raw\"", &good.url(), ""),
        webhook_subscription("failing", "\"raw\"", &bad.url(), ""),
    );
    let broker = Broker::start(&subs);
    let c = client();
    let mut ids = HashSet::new();
    for i in 0..200 {
        ids.insert(
            broker
                .accept(&c, "application/EDIFACT", edifact_message(i, 300))
                .await,
        );
    }
    let got = good.wait_for(200, Duration::from_secs(10)).await;
    let delivered: HashSet<String> = got
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(
        delivered, ids,
        "the healthy subscriber got everything while the other failed"
    );
    assert!(bad.received().is_empty());
    // The failing one is retrying, visible in the lineage. A retrying record holds its lane
    // (one patient's records stay in order), so look for the ones being tried.
    let step = eventually(
        Duration::from_secs(10),
        "a retrying step for the failing subscription",
        async || {
            for id in &ids {
                let l = lineage(&c, &broker.url, id).await.unwrap();
                let steps = l["steps"].as_array().unwrap();
                if let Some(step) = steps
                    .iter()
                    .find(|s| s["subscription"] == "failing" && s["outcome"] == "retrying")
                {
                    return Some(step.clone());
                }
            }
            None
        },
    )
    .await;
    assert_eq!(step["reason"], "http_500");
    assert!(step["attempt"].as_u64().unwrap() >= 1);
}

/// A broker with two subscriptions to raw messages: "picky", whose receiver (the first)
/// answers 404, and `other`, whose receiver (the second) takes everything.
async fn picky_and(other: &str) -> (Receiver, Receiver, Broker) {
    let picky = Receiver::answering(404).await;
    let rx = Receiver::answering(204).await;
    let subs = format!(
        "{}\n{}",
        webhook_subscription("picky", "\"raw\"", &picky.url(), ""),
        webhook_subscription(other, "\"raw\"", &rx.url(), "")
    );
    let broker = Broker::start(&subs);
    (picky, rx, broker)
}

/// The lineage shows a delivery to "picky" that ended `outcome`.
fn picky_is(outcome: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |l| {
        l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["subscription"] == "picky" && d["outcome"] == outcome)
    }
}

#[tokio::test]
async fn rejected_deliveries_go_to_dead_letters_and_replay_to_that_subscription_only() {
    let (rx, other, broker) = picky_and("other").await;
    let c = client();
    let id = broker
        .accept(&c, "application/EDIFACT", edifact_message(7, 200))
        .await;
    let l = lineage_until(&broker.url, &id, picky_is("dead_lettered")).await;
    let d = l["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["subscription"] == "picky")
        .unwrap();
    assert_eq!(d["reason"], "http_404");
    // Dead-lettered on its first attempt, which the summary counts.
    assert_eq!(d["attempts"], 1, "{d}");
    assert_eq!(other.wait_for(1, Duration::from_secs(5)).await.len(), 1);

    let (ok, stdout, stderr) = broker.cli(&["dlq", "list", "--subscription", "picky"]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(lines[0]["reason"], "http_404");
    assert_eq!(lines[0]["envelope_id"], id.as_str());
    assert_eq!(lines[0]["source_topic"], "ketenbus.raw");
    let (ok, stdout, _) = broker.cli(&[
        "dlq",
        "list",
        "--subscription",
        "picky",
        "--since",
        "2999-01-01T00:00:00Z",
    ]);
    assert!(ok && stdout.trim().is_empty(), "nothing since the future");

    // Replay needs a selection; then goes to "picky" only.
    let (ok, _, stderr) = broker.cli(&["dlq", "replay", "--subscription", "picky"]);
    assert!(!ok && stderr.contains("--all"), "{stderr}");
    rx.set_status(200);
    let (ok, _, stderr) = broker.cli(&["dlq", "replay", "--subscription", "picky", "--id", &id]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("replayed 1"), "{stderr}");
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    assert_eq!(
        got[0].header("idempotency-key"),
        Some(id.as_str()),
        "same id after replay"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        other.received().len(),
        1,
        "the other subscription did not get it twice"
    );
    lineage_until(&broker.url, &id, picky_is("delivered")).await;
    // Listing and replaying dead letters are in the audit trail, by whom and which.
    let (ok, stdout, stderr) = broker.cli(&["audit", "export", "--since", "2000-01-01T00:00:00Z"]);
    assert!(ok, "{stderr}");
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for action in ["dlq_list", "dlq_replay"] {
        assert!(
            records.iter().any(|r| r["action"] == action
                && r["envelope_id"] == id.as_str()
                && r["actor"] == "anonymous"),
            "no {action} record for {id}:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn exhausted_retries_become_dead_letters() {
    let rx = Receiver::answering(503).await;
    let sub = format!(
        "{}[subscriptions.retry]\ninitial = \"50ms\"\nmax = \"100ms\"\ngive_up_after = \"600ms\"\n",
        webhook_subscription("flaky", "\"raw\"", &rx.url(), "")
    );
    let broker = Broker::start(&sub);
    let id = broker
        .accept(&client(), "application/EDIFACT", edifact_message(1, 200))
        .await;
    let l = lineage_until(&broker.url, &id, |l| {
        l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["outcome"] == "dead_lettered")
    })
    .await;
    let d = &l["deliveries"][0];
    assert_eq!(d["reason"], "exhausted");
    assert!(d["attempts"].as_u64().unwrap() >= 3, "{d}");
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_when_the_process_is_killed() {
    let rx = Receiver::answering(204).await;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::prepare(
        dir.path(),
        &webhook_subscription("archive", "\"raw\"", &rx.url(), ""),
    );
    broker.spawn();
    let url = broker.url.clone();
    let c = client();
    // Senders post continuously; the process is killed under them and restarted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..8 {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                if let Ok((202, j)) = post_message(
                    &c,
                    &url,
                    "application/EDIFACT",
                    edifact_message(s * 100_000 + i, 400),
                )
                .await
                {
                    acked.push(j["id"].as_str().unwrap().to_owned());
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.spawn();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(s.await.unwrap());
    }
    assert!(
        acked.len() > 50,
        "only {} messages were acknowledged",
        acked.len()
    );
    let want: HashSet<&String> = acked.iter().collect();
    let all_arrived = async || {
        let got = rx.received();
        let ids: HashSet<String> = got
            .iter()
            .map(|r| r.header("idempotency-key").unwrap().to_owned())
            .collect();
        let missing = want.iter().filter(|id| !ids.contains(id.as_str())).count();
        if missing == 0 {
            Ok(got)
        } else {
            Err(format!(
                "{missing} of {} acknowledged messages never arrived",
                want.len()
            ))
        }
    };
    let what = "every acknowledged message to arrive";
    let got = broker
        .eventually(Duration::from_secs(30), what, all_arrived)
        .await;
    // Duplicates are allowed, but each carries the same id as its original.
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *per_id
            .entry(r.header("idempotency-key").unwrap().to_owned())
            .or_default() += 1;
    }
    eprintln!(
        "{} acknowledged, {} deliveries, {} duplicates",
        acked.len(),
        got.len(),
        got.len() - per_id.len()
    );
}

#[tokio::test]
async fn an_edifact_lab_result_reaches_an_event_subscriber_as_a_zib_event() {
    let events = Receiver::answering(204).await;
    let raw = Receiver::answering(204).await;
    let subs = format!(
        "{}\n{}",
        webhook_subscription("gp", "\"lab_result\"", &events.url(), ""),
        webhook_subscription("archive", "\"raw\"", &raw.url(), "")
    );
    let broker = Broker::start(&subs);
    let id = broker
        .accept(&client(), "application/EDIFACT", MEDLAB.as_bytes().to_vec())
        .await;
    let got = events.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let r = &got[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("ketenbus-kind"), Some("lab_result"));
    assert_eq!(
        r.header("idempotency-key"),
        Some(format!("{id}.0").as_str())
    );
    let e: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["header"]["id"], format!("{id}.0"));
    assert_eq!(e["header"]["envelope_id"], id);
    assert_eq!(e["header"]["kind"], "lab_result");
    let key = e["header"]["patient_key"].as_str().unwrap();
    assert_eq!(key.len(), 32);
    assert!(!r.body.windows(9).any(|w| w == key.as_bytes()) || !key.contains("999911120"));
    let result = &e["results"][0];
    assert_eq!(result["local_name"], "Kalium");
    assert_eq!(result["value_decimal"], "5.9");
    assert_eq!(result["unit"], "mmol/l");
    assert_eq!(result["reference_low"], "3.5");
    assert_eq!(result["reference_high"], "5.0");
    assert_eq!(result["interpretation_raw"], ">");
    assert_eq!(
        result["comments"][0],
        "Hemolytisch monster: herhalen aanbevolen"
    );
    assert_eq!(e["patient"]["identifiers"][0]["value"], "999911120");
    // The raw subscriber got the original bytes; the lineage shows the event and both deliveries.
    assert_eq!(
        raw.wait_for(1, Duration::from_secs(5)).await[0]
            .body
            .as_ref(),
        MEDLAB.as_bytes()
    );
    let l = lineage_until(&broker.url, &id, |l| {
        l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["outcome"] == "delivered")
            .count()
            == 2
    })
    .await;
    assert_eq!(l["events"][0]["id"], format!("{id}.0"));
    assert_eq!(l["events"][0]["kind"], "lab_result");
}

#[tokio::test]
async fn a_log_that_cannot_take_writes_answers_503_with_retry_after() {
    let rx = Receiver::answering(204).await;
    let broker = Broker::start(&format!(
        "ingest_timeout = \"1s\"\n{}",
        webhook_subscription("archive", "\"raw\"", &rx.url(), "")
    ));
    // Another process holds the database's write lock, as a stuck disk or a backup would.
    let mut holder = broker.lock_log(4);
    let c = client();
    let resp = c
        .post(format!("{}/api/v1/messages", broker.url))
        .header("content-type", "application/EDIFACT")
        .body(edifact_message(1, 100))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let j: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(j["error"], "log_unavailable");
    holder.wait().unwrap();
    // Once the lock is gone the same message is taken.
    let id = broker
        .accept(&c, "application/EDIFACT", edifact_message(1, 100))
        .await;
    // Only the acknowledged one is delivered: the refused write was not kept.
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.received().len(), 1);
    assert_eq!(got[0].header("idempotency-key"), Some(id.as_str()));
}

#[tokio::test]
async fn operators_list_messages_by_status_and_see_a_status_summary() {
    let (_bad, _good, broker) = picky_and("archive").await;
    let c = client();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            broker
                .accept(&c, "application/EDIFACT", edifact_message(i, 200))
                .await,
        );
    }
    for id in &ids {
        lineage_until(&broker.url, id, picky_is("dead_lettered")).await;
    }
    let list = |q: String| {
        let c = c.clone();
        let url = format!("{}/api/v1/messages?{q}", broker.url);
        async move {
            let resp = c.get(url).send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (s, page) = list("status=dead_lettered&subscription=picky".into()).await;
    assert_eq!(s, 200, "{page}");
    let listed: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let mut newest_first = ids.iter().map(String::as_str).collect::<Vec<_>>();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert!(page["next"].is_null());
    let (_, page) = list("status=dead_lettered&subscription=archive".into()).await;
    assert!(
        page["items"].as_array().unwrap().is_empty(),
        "archive delivered everything"
    );
    // Paging: one at a time, following the cursor.
    let (_, p1) = list("status=dead_lettered&limit=2".into()).await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    let next = p1["next"].as_str().unwrap().to_owned();
    let (_, p2) = list(format!("status=dead_lettered&limit=2&after={next}")).await;
    assert_eq!(p2["items"].as_array().unwrap().len(), 1);
    assert_eq!(p2["items"][0]["id"], ids[0].as_str());
    let (s, err) = list("since=yesterday".into()).await;
    assert_eq!(s, 400, "{err}");

    // The terminal summary points at the failing subscription.
    tokio::time::sleep(Duration::from_secs(6)).await; // one telemetry sampling round
    let out = std::process::Command::new(ketenbus_tests::ketenbus_bin())
        .args(["status", "--url", &broker.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(": ready"), "{text}");
    assert!(text.contains("needs attention:"), "{text}");
    assert!(
        text.contains("picky has 3 dead letter(s): ketenbus dlq list --subscription picky"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("archive") && l.contains(" 3 ")),
        "{text}"
    );
}

#[tokio::test]
async fn the_address_book_sends_each_record_to_its_receivers_own_endpoint() {
    let linde = Receiver::answering(204).await;
    let hap = Receiver::answering(204).await;
    let config = format!(
        "\n[[subscriptions]]\nname = \"by-receiver\"\nkinds = [\"lab_result\"]\nsink = {{ type = \"webhook\" }}\n\
         [subscriptions.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n\
         [address_book.\"mailbox:500005678\"]\nname = \"Huisartsenpraktijk De Linde (synthetisch)\"\nwebhook = \"{}\"\n\
         [address_book.\"mailbox:500009999\"]\nwebhook = \"{}\"\n\
         [address_book.\"mailbox:500000001\"]\nmail = \"alleen-mail@lms.example.test\"\n\
         [audit]\nenabled = true\n",
        linde.url(),
        hap.url()
    );
    let broker = Broker::start(&config);
    let c = client();
    let mut ids = Vec::new();
    for receiver in ["500005678", "500009999", "500000001"] {
        let body = MEDLAB.replace("+500005678+", &format!("+{receiver}+"));
        ids.push(
            broker
                .accept(&c, "application/EDIFACT", body.into_bytes())
                .await,
        );
    }
    let to_linde = linde.wait_for(1, Duration::from_secs(10)).await;
    let to_hap = hap.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(to_linde.len(), 1);
    assert_eq!(to_hap.len(), 1);
    assert_eq!(
        to_linde[0].header("ketenbus-envelope-id"),
        Some(ids[0].as_str())
    );
    assert_eq!(
        to_hap[0].header("ketenbus-envelope-id"),
        Some(ids[1].as_str())
    );
    // The third receiver takes only mail: its record is a dead letter saying so.
    let l = lineage_until(&broker.url, &ids[2], |l| {
        l["deliveries"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["outcome"] == "dead_lettered"))
    })
    .await;
    assert_eq!(l["deliveries"][0]["reason"], "no_address", "{l:#}");
    let (ok, out, err) = broker.cli(&["dlq", "list", "--subscription", "by-receiver"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("mailbox:500000001 has no webhook address"),
        "{out}"
    );
    assert_eq!(linde.received().len() + hap.received().len(), 2);
    // The audit trail names who got each one: the receiver the address book sent it to.
    // (Appended just before each delivery is acknowledged: wait for both.)
    let path = broker.dir.join("data/audit.jsonl");
    let read = || {
        let audit = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parties: Vec<String> = audit
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["action"] == "delivery")
            .map(|r| r["party"].as_str().unwrap_or("none").to_owned())
            .collect();
        parties.sort();
        (parties, audit)
    };
    let _ = within(Duration::from_secs(10), async || read().0.len() >= 2).await;
    let (parties, audit) = read();
    assert_eq!(
        parties,
        ["mailbox:500005678", "mailbox:500009999"],
        "{audit}"
    );
}
