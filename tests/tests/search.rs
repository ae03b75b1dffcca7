//! Message search by what people ask (`GET /api/v1/messages?...`) against the `ketenbus`
//! binary: found by patient BSN, sender, source id, status and kind; the BSN never in the
//! broker's log nor in the lineage index; every search by patient in the audit trail.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use ketenbus_tests::{Broker, Receiver, lineage_until, medlab, webhook_subscription};
use serde_json::Value;

/// Two synthetic patients (test BSNs passing the eleven-test).
const BSN_A: &str = "999911120";
const BSN_B: &str = "999912045";

async fn search(c: &reqwest::Client, broker: &Broker, query: &str) -> (u16, Value) {
    let resp = c
        .get(format!("{}/api/v1/messages?{query}", broker.url))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn ids(page: &Value) -> Vec<&str> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn search_by_patient_is_audited_and_leaves_no_bsn_behind() {
    for bsn in [BSN_A, BSN_B] {
        assert!(
            ketenbus_connectors::zib::bsn_is_valid(bsn),
            "{bsn} is no valid test BSN"
        );
    }
    let rx = Receiver::answering(204).await;
    let broker = Broker::start(&webhook_subscription("gp", "\"lab_result\"", &rx.url(), ""));
    let c = reqwest::Client::new();
    let a = broker
        .accept(&c, "application/EDIFACT", medlab(1, "500001234", BSN_A))
        .await;
    let b = broker
        .accept(&c, "application/EDIFACT", medlab(2, "500009999", BSN_B))
        .await;
    for id in [&a, &b] {
        lineage_until(&broker.url, id, |l| {
            l["deliveries"][0]["outcome"] == "delivered"
        })
        .await;
    }
    for (query, want) in [
        (format!("patient={BSN_A}"), vec![a.as_str()]),
        (format!("patient={BSN_B}"), vec![b.as_str()]),
        (format!("patient={BSN_A}&sender=mailbox:500009999"), vec![]),
        ("sender=mailbox:500009999".into(), vec![b.as_str()]),
        ("source_id=IC0001".into(), vec![a.as_str()]),
        (
            "kind=lab_result&status=delivered".into(),
            vec![b.as_str(), a.as_str()],
        ),
        (
            "subscription=gp&status=delivered".into(),
            vec![b.as_str(), a.as_str()],
        ),
        ("status=pending".into(), vec![]),
        (
            "connector=http&format=edifact".into(),
            vec![b.as_str(), a.as_str()],
        ),
    ] {
        let (status, page) = search(&c, &broker, &query).await;
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(ids(&page), want, "{query}: {page}");
    }
    let (status, page) = search(&c, &broker, "limit=1").await;
    assert_eq!((status, ids(&page)), (200, vec![b.as_str()]));
    let next = page["next"].as_str().unwrap();
    let (_, page) = search(&c, &broker, &format!("limit=1&after={next}")).await;
    assert_eq!(ids(&page), [a.as_str()]);
    assert!(page["next"].is_null());
    for query in [
        "limit=0",
        "status=bogus",
        "patient=999911121",
        "since=yesterday",
    ] {
        let (status, body) = search(&c, &broker, query).await;
        assert_eq!(status, 400, "{query}: {body}");
    }

    // The audit trail holds a read of each patient searched for, by pseudonym.
    let (ok, export, err) = broker.cli(&["audit", "export", "--since", "2000-01-01T00:00:00Z"]);
    assert!(ok, "{err}");
    for bsn in [BSN_A, BSN_B] {
        let (ok, pseudonym, err) = broker.cli(&["consent", "pseudonym", "--bsn", bsn]);
        assert!(ok, "{err}");
        let pseudonym = pseudonym.trim();
        let found = export
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .any(|r| r["action"] == "patient_search" && r["patient"] == pseudonym);
        assert!(found, "no patient_search of {pseudonym} in\n{export}");
        assert!(!export.contains(bsn), "a BSN in the audit export");
    }

    // No BSN in the broker's log (stderr, debug level) nor in any file of the lineage index.
    let log = broker.log_text();
    for bsn in [BSN_A, BSN_B] {
        assert!(!log.contains(bsn), "the BSN {bsn} is in the log:\n{log}");
    }
    let data = broker.dir.join("data");
    let mut checked = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("lineage.db")
        {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for bsn in [BSN_A, BSN_B] {
            assert!(
                !bytes.windows(9).any(|w| w == bsn.as_bytes()),
                "the BSN {bsn} is in {}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no lineage.db in {}", data.display());
}
