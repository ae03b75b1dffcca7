//! The broker on the Kafka engine against a real Kafka-protocol broker (tansu, started by
//! `ops/test.sh`), with an independent reader: Python's confluent-kafka + fastavro decode the
//! topics with the published `.avsc` files. One test: the topic names are the broker's own,
//! so two brokers on one cluster at once would share them.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use ketenbus_tests::{
    Broker, Receiver, edifact_message, eventually, lineage, post_message, webhook_subscription,
};

/// `KETENBUS_TEST_KAFKA` and `KETENBUS_TEST_PYTHON`, set by `ops/test.sh`. Missing under CI is a
/// failure; missing on a developer's machine skips with a notice.
fn peers() -> Option<(String, String)> {
    match (
        std::env::var("KETENBUS_TEST_KAFKA"),
        std::env::var("KETENBUS_TEST_PYTHON"),
    ) {
        (Ok(k), Ok(p)) => Some((k, p)),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "CI must run the Kafka-engine tests: KETENBUS_TEST_KAFKA / KETENBUS_TEST_PYTHON not set (use ops/test.sh)"
            )
        }
        _ => {
            eprintln!(
                "skipping: KETENBUS_TEST_KAFKA / KETENBUS_TEST_PYTHON not set; run through ops/test.sh"
            );
            None
        }
    }
}

fn avro_read(
    python: &str,
    bootstrap: &str,
    topic: &str,
    schema: &str,
    count: usize,
) -> Vec<serde_json::Value> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(python)
        .arg(format!("{root}/tests/python/avro_read.py"))
        .args([
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--schema",
            &format!("{root}/schemas/avro/{schema}"),
        ])
        .args(["--count", &count.to_string(), "--timeout", "30"])
        .output()
        .expect("run avro_read.py");
    assert!(
        out.status.success(),
        "avro_read.py {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[tokio::test]
async fn kafka_engine_end_to_end_with_an_independent_avro_reader() {
    let Some((bootstrap, python)) = peers() else {
        return;
    };
    let rx = Receiver::answering(204).await;
    let config = format!(
        "[bus]\nengine = \"kafka\"\npartitions = 3\n[bus.kafka]\nbootstrap_servers = \"{bootstrap}\"\nreplication_factor = 1\nsession_timeout = \"60s\"\ninstance_id = \"kafka-test-node\"\n\
         properties = {{ \"batch.num.messages\" = \"1\", \"fetch.wait.max.ms\" = \"10\" }}\n{}",
        webhook_subscription("archive", "\"raw\"", &rx.url(), "")
    );
    let mut broker = Broker::start(&config);
    let c = reqwest::Client::new();
    let mut sent = Vec::new();
    for i in 0..20 {
        let body = edifact_message(i, 500);
        let id = broker.accept(&c, "application/EDIFACT", body.clone()).await;
        sent.push((id, body));
    }
    // Wait for every id sent here (a reused cluster may also hand over older records).
    let all_delivered = async || {
        let got = rx.received();
        let ids: HashSet<&str> = got
            .iter()
            .filter_map(|r| r.header("idempotency-key"))
            .collect();
        let missing: Vec<&String> = sent
            .iter()
            .map(|(id, _)| id)
            .filter(|id| !ids.contains(id.as_str()))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{missing:?} not delivered"))
        }
    };
    let what = "every message sent to be delivered";
    broker
        .eventually(Duration::from_secs(30), what, all_delivered)
        .await;
    let l = lineage(&c, &broker.url, &sent[0].0).await.unwrap();
    assert_eq!(l["format"], "edifact", "{l:#}");

    // The raw topic as any Avro library sees it.
    let raw = avro_read(&python, &bootstrap, "ketenbus.raw", "envelope.avsc", 0);
    assert!(raw.len() >= 20, "{} records on ketenbus.raw", raw.len());
    for (id, body) in &sent {
        let rec = raw
            .iter()
            .find(|r| r["value"]["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not on the raw topic"));
        assert_eq!(rec["key"], id.as_str());
        assert_eq!(rec["value"]["format"], "edifact");
        assert_eq!(rec["value"]["connector"], "http");
        let b64 = rec["value"]["body"].as_str().unwrap();
        assert_eq!(decode_base64(b64), *body, "body of {id}");
    }
    // A lab result becomes an event on its kind's topic, readable with the published schema.
    let lab_id = broker
        .accept(
            &c,
            "application/EDIFACT",
            ketenbus_tests::MEDLAB.as_bytes().to_vec(),
        )
        .await;
    // The router publishes the event shortly after the 202; read until it is there.
    // (Fifty reads with 200 ms between them before: each read takes a second or more.)
    let record = eventually(
        Duration::from_secs(180),
        "the lab_result event to reach its topic",
        async || {
            avro_read(
                &python,
                &bootstrap,
                "ketenbus.events.lab_result",
                "event_lab_result.avsc",
                0,
            )
            .into_iter()
            .find(|r| r["value"]["header"]["envelope_id"] == lab_id.as_str())
        },
    )
    .await;
    let e = &record["value"];
    assert_eq!(e["header"]["envelope_id"], lab_id.as_str());
    assert_eq!(e["header"]["id"], format!("{lab_id}.0"));
    assert_eq!(e["results"][0]["local_name"], "Kalium");
    assert_eq!(e["results"][0]["value_decimal"], "5.9");
    let key = e["header"]["patient_key"].as_str().unwrap();
    assert_eq!(record["key"], key, "the topic key is the patient key");
    assert!(!key.contains("999911120"), "no BSN in the key");

    // Proof of delivery on the outcomes topic.
    let outcomes = avro_read(
        &python,
        &bootstrap,
        "ketenbus.delivery-outcomes",
        "delivery_outcome.avsc",
        0,
    );
    for (id, _) in &sent {
        assert!(
            outcomes
                .iter()
                .any(|o| o["value"]["record_id"] == id.as_str()
                    && o["value"]["outcome"] == "delivered"),
            "no delivered outcome for {id}"
        );
    }

    // The lineage, one record per write, as any Avro library reads it.
    let writes = avro_read(
        &python,
        &bootstrap,
        "ketenbus.lineage",
        "lineage_record.avsc",
        0,
    );
    let first = sent[0].0.as_str();
    assert!(
        writes
            .iter()
            .any(|w| w["key"] == format!("{first}/")
                && w["value"]["received"]["connector"] == "http"),
        "no received write for {first}"
    );
    assert!(
        writes.iter().any(|w| w["value"]["message_id"] == first
            && w["value"]["step"]["stage"] == "delivery"
            && w["value"]["step"]["outcome"] == "delivered"),
        "no delivery step for {first}"
    );

    // Every size the listener takes fits the log: topics, producer and consumers are sized
    // from http.max_body (25 MiB by default; librdkafka's own default is about 1 MB).
    let mut big = Vec::new();
    for mib in [1, 10, 25] {
        let body = edifact_message(900 + mib, mib * 1024 * 1024 - 4096);
        let (s, j) = post_message(&c, &broker.url, "application/EDIFACT", body.clone())
            .await
            .unwrap();
        assert_eq!(s, 202, "{mib} MiB: {j}\n{}", broker.log_text());
        big.push((j["id"].as_str().unwrap().to_owned(), body.len()));
    }
    let all_whole = async || {
        let got = rx.received();
        for (id, len) in &big {
            let Some(r) = got
                .iter()
                .find(|r| r.header("idempotency-key") == Some(id.as_str()))
            else {
                return Err(format!("{id} ({len} bytes) not delivered"));
            };
            assert_eq!(r.body.len(), *len, "{id} arrives whole");
        }
        Ok(())
    };
    let what = "every large message to be delivered whole";
    broker
        .eventually(Duration::from_secs(60), what, all_whole)
        .await;

    // Killed and started again under the same instance_id (static membership), the node
    // takes its partitions back without waiting out the 60 s session timeout of the members
    // the kill left behind. tansu 0.6 pauses 3 s in JoinGroup and 3 s in SyncGroup for every
    // static member, so a rejoin takes at least 6 s there; 30 s leaves room for a loaded
    // machine and still tells a static rejoin from a wait for the session timeout.
    broker.kill();
    broker.spawn();
    let started = tokio::time::Instant::now();
    // A new client: the old one's pooled connections died with the process.
    let c = reqwest::Client::new();
    let id = broker
        .accept(&c, "application/EDIFACT", edifact_message(990, 500))
        .await;
    broker
        .eventually(
            Duration::from_secs(30).saturating_sub(started.elapsed()),
            "delivery within 30 s of the restart (the session timeout is 60 s)",
            async || {
                rx.received()
                    .iter()
                    .any(|r| r.header("idempotency-key") == Some(id.as_str()))
            },
        )
        .await;
    eprintln!(
        "after a SIGKILL and restart, delivered {} ms after the restart was ready",
        started.elapsed().as_millis()
    );
}

fn decode_base64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
