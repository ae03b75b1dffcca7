//! Upgrades keep working data: each data directory in `tests/fixtures/upgrade/<version>/`,
//! written by that release (`tests/fixtures/upgrade/make.sh`), opens with the binary under
//! test, which delivers the records the release left undelivered and replays its dead letters
//! as before; its lineage and audit trail go on.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ketenbus_tests::{Broker, Receiver, lineage_until};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/upgrade");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/upgrade")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").exists())
        .collect();
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn subscription(name: &str, kinds: &str, url: &str) -> String {
    format!(
        "[[subscriptions]]\nname = \"{name}\"\nkinds = [{kinds}]\nsink = {{ type = \"webhook\", url = \"{url}\" }}\nretry = {{ initial = \"200ms\", max = \"1s\", give_up_after = \"3650days\" }}\n"
    )
}

/// The idempotency keys (event id, envelope id for raw) a receiver got.
fn keys(rx: &Receiver) -> Vec<String> {
    rx.received()
        .iter()
        .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn every_release_fixture_opens_delivers_its_pending_records_and_replays_its_dead_letters() {
    let all = fixtures();
    assert!(!all.is_empty(), "no upgrade fixture");
    for fixture in all {
        opens_and_goes_on(&fixture).await;
    }
}

async fn opens_and_goes_on(fixture: &Path) {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap())
            .unwrap();
    let version = expected["version"].as_str().unwrap();
    let messages = expected["messages"].as_array().unwrap();
    let envelopes: BTreeSet<String> = messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let events: BTreeSet<String> = messages
        .iter()
        .flat_map(|m| m["events"].as_array().unwrap())
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    assert!(!events.is_empty(), "{version}: a fixture with events");

    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture.join("data"), &tmp.path().join("data"));
    std::fs::copy(fixture.join("audit.key"), tmp.path().join("audit.key")).unwrap();
    let pending = Receiver::ok().await;
    let refused = Receiver::ok().await;
    let kinds = "\"lab_result\", \"letter\"";
    // Retention as for a fixture long past its age: whatever is finished may go at once.
    let extra = format!(
        "[audit]\nkey_file = {:?}\n[bus.embedded]\nretention_max_age = \"1s\"\nretention_interval = \"1s\"\n{}{}{}{}",
        tmp.path().join("audit.key"),
        subscription("pending", kinds, &pending.url()),
        subscription("pending-raw", "\"raw\"", &pending.url()),
        subscription("refused", kinds, &refused.url()),
        subscription("refused-raw", "\"raw\"", &refused.url()),
    );
    let mut broker = Broker::prepare(tmp.path(), &extra);
    broker.spawn();

    // What the release left undelivered is delivered: every event and every raw message.
    let want: BTreeSet<String> = events.union(&envelopes).cloned().collect();
    let got = pending.wait_for(want.len(), Duration::from_secs(30)).await;
    let got_keys: BTreeSet<String> = keys(&pending).into_iter().collect();
    assert_eq!(
        got_keys,
        want,
        "{version}: pending records delivered\n{}",
        broker.log_text()
    );
    for r in &got {
        let body: serde_json::Value = match serde_json::from_slice(&r.body) {
            Ok(v) => v,
            Err(_) => continue, // a raw message, delivered as it came
        };
        assert!(
            events.contains(body["header"]["id"].as_str().unwrap_or_default()),
            "{version}: an event as the release made it: {body}"
        );
    }
    // Its dead letters stay dead letters until replayed, also once retention has run.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        refused.received().is_empty(),
        "{version}: dead letters are not redelivered"
    );
    for (sub, ids) in [("refused", &events), ("refused-raw", &envelopes)] {
        let (ok, stdout, stderr) = broker.cli(&["dlq", "list", "--subscription", sub]);
        assert!(ok, "{version}: dlq list {sub}: {stderr}");
        let listed: BTreeSet<String> = stdout
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["record_id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(&listed, ids, "{version}: dead letters of {sub}");
        let (ok, _, stderr) = broker.cli(&["dlq", "replay", "--subscription", sub, "--all"]);
        assert!(ok, "{version}: dlq replay {sub}: {stderr}");
        assert!(
            stderr.contains(&format!("replayed {}", ids.len())),
            "{version}: {stderr}"
        );
    }
    refused.wait_for(want.len(), Duration::from_secs(30)).await;
    let replayed: BTreeSet<String> = keys(&refused).into_iter().collect();
    assert_eq!(
        replayed,
        want,
        "{version}: dead letters replayed\n{}",
        broker.log_text()
    );

    // The lineage the release kept goes on with the new steps.
    for id in &envelopes {
        lineage_until(&broker.url, id, |l| {
            let d = l["deliveries"].as_array().unwrap();
            ["pending-raw", "refused-raw"].iter().all(|s| {
                d.iter()
                    .any(|x| x["subscription"] == *s && x["outcome"] == "delivered")
            })
        })
        .await;
    }
    // What the release indexed can be searched: by kind from its old steps, by current status
    // once the replays are delivered.
    let c = reqwest::Client::new();
    let search = async |query: &str| -> BTreeSet<String> {
        let page: serde_json::Value = c
            .get(format!("{}/api/v1/messages?limit=1000&{query}", broker.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    broker
        .eventually(
            Duration::from_secs(30),
            "every message delivered",
            async || {
                let delivered = search("status=delivered").await;
                if delivered == envelopes {
                    Ok(())
                } else {
                    Err(format!("{delivered:?}"))
                }
            },
        )
        .await;
    let labs = search("kind=lab_result").await;
    assert!(
        !labs.is_empty() && labs.is_subset(&envelopes),
        "{version}: lab results by kind: {labs:?}"
    );
    // The audit trail the release began goes on in one chain under its key.
    let (ok, stdout, stderr) = broker.cli(&["audit", "verify"]);
    assert!(ok, "{version}: audit verify: {stdout}{stderr}");
    broker.kill();
}
