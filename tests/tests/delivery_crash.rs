//! The delivery path under a kill: a subscription's outcomes, lineage steps and audit records
//! are written in one go before its records are acknowledged. Killed right after that write
//! and before the acknowledgement (`KETENBUS_FAULT=finish_kill_after:N`, an abort as SIGKILL
//! would leave it), a restarted broker delivers every accepted message again or for the
//! first time, each patient's in the order sent, records every delivery in the lineage, and
//! keeps an unbroken audit trail. Debug builds only honour `KETENBUS_FAULT`.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use ketenbus_tests::{Broker, Receiver, lineage, medlab, post_message, webhook_subscription};

const PATIENTS: [&str; 3] = ["999911120", "999990019", "999990007"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_write_and_the_ack_loses_nothing_and_keeps_each_patients_order() {
    let rx = Receiver::ok().await;
    let sub = webhook_subscription("gp", "\"lab_result\"", &rx.url(), "");
    let mut broker = Broker::start_with_env(
        &format!("{sub}concurrency = 4\n"),
        &[("KETENBUS_FAULT", "finish_kill_after:30")],
    );
    let c = reqwest::Client::new();
    // Message id -> (patient, place in that patient's sequence).
    let mut sent: HashMap<String, (usize, usize)> = HashMap::new();
    let mut per_patient = [0usize; 3];
    for n in 0..300 {
        let p = n % PATIENTS.len();
        match post_message(
            &c,
            &broker.url,
            "application/EDIFACT",
            medlab(n, "500001234", PATIENTS[p]),
        )
        .await
        {
            Ok((202, j)) => {
                sent.insert(j["id"].as_str().unwrap().to_owned(), (p, per_patient[p]));
                per_patient[p] += 1;
            }
            _ => break, // killed: nothing answers any more
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = broker
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no kill after finish_kill_after:\n{}", broker.log_text()));
    assert!(!status.success(), "exit status {status}");
    assert!(
        broker
            .log_text()
            .contains("injected fault finish_kill_after:30"),
        "{}",
        broker.log_text()
    );
    let before_kill = rx.received().len();
    assert!(
        before_kill > 0 && sent.len() > 10,
        "the kill came before anything was delivered ({before_kill}) or accepted ({})",
        sent.len()
    );

    broker.set_env(&[]);
    broker.spawn();
    let ids: BTreeSet<String> = sent.keys().cloned().collect();
    let arrived = |rx: &Receiver| -> BTreeSet<String> {
        rx.received()
            .iter()
            .filter_map(|r| r.header("ketenbus-envelope-id").map(str::to_owned))
            .collect()
    };
    broker
        .eventually(
            Duration::from_secs(60),
            "every accepted message delivered after the restart",
            async || {
                let got = arrived(&rx);
                let missing = ids.difference(&got).count();
                if missing == 0 {
                    Ok(())
                } else {
                    Err(format!("{missing} of {} not delivered", ids.len()))
                }
            },
        )
        .await;

    // Each patient's messages first arrived in the order they were sent: a record is never
    // handed out ahead of an earlier one of its key, before the kill or after it.
    let mut firsts: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for r in rx.received() {
        let Some(id) = r.header("ketenbus-envelope-id") else {
            continue;
        };
        if let Some((p, place)) = sent.get(id)
            && seen.insert(id.to_owned())
        {
            firsts.entry(*p).or_default().push(*place);
        }
    }
    for (p, order) in &firsts {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, &sorted, "patient {p}'s messages out of order");
    }

    // Before the kill, nothing went out twice: redelivery is what the restart does.
    let first_run: Vec<String> = rx.received()[..before_kill]
        .iter()
        .filter_map(|r| r.header("ketenbus-envelope-id").map(str::to_owned))
        .collect();
    let unique: BTreeSet<&String> = first_run.iter().collect();
    assert_eq!(
        unique.len(),
        first_run.len(),
        "a message delivered twice before the kill"
    );

    // Every delivery is in the lineage: the steps written with the outcomes before the kill,
    // and the ones written after the restart.
    for id in &ids {
        let l = ketenbus_tests::lineage_until(&broker.url, id, |l| {
            l["deliveries"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["subscription"] == "gp" && d["outcome"] == "delivered")
            })
        })
        .await;
        assert!(l["steps"].as_array().is_some_and(|s| !s.is_empty()));
    }
    let _ = lineage(&c, &broker.url, ids.first().unwrap())
        .await
        .unwrap();

    // The audit trail holds together across the kill.
    broker.kill();
    let (ok, out, err) = broker.cli(&["audit", "verify"]);
    assert!(ok, "audit verify after the kill: {out}\n{err}");
}
