//! Faults, through real sockets: a task of the broker that ends unexpectedly stops the broker
//! cleanly with a non-zero exit and the cause at ERROR in its log, and once a supervisor
//! restarts it every accepted message is delivered. The panics are injected with
//! `KETENBUS_FAULT`, which only debug builds (the ones these tests run) honour.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::BTreeSet;
use std::time::Duration;

use ketenbus_tests::{Broker, Receiver, medlab, post_message, webhook_subscription};

/// Start a broker with `fault`, post until the fault stops it, check how it stopped, restart
/// it without the fault and check that every accepted message reached the subscriber.
async fn a_dead_task_stops_the_broker_and_nothing_is_lost(fault: &str, task: &str) {
    let rx = Receiver::ok().await;
    let sub = webhook_subscription("gp", "\"raw\", \"lab_result\"", &rx.url(), "");
    let mut broker = Broker::start_with_env(
        &format!("{sub}concurrency = 4\n"),
        &[("KETENBUS_FAULT", fault)],
    );
    let c = reqwest::Client::new();
    let mut accepted = BTreeSet::new();
    for n in 0..40 {
        // Posts stop being answered once the broker stops; only 202s count as accepted.
        match post_message(
            &c,
            &broker.url,
            "application/EDIFACT",
            medlab(n, "500001234", "999911120"),
        )
        .await
        {
            Ok((202, j)) => {
                accepted.insert(j["id"].as_str().unwrap().to_owned());
            }
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        accepted.len() > 5,
        "the fault fired before anything was accepted"
    );
    let status = broker
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running after {fault}:\n{}", broker.log_text()));
    assert!(!status.success(), "exit status {status} after {fault}");
    let log = plain(&broker.log_text());
    let cause = log
        .lines()
        .find(|l| l.contains("a task ended unexpectedly"))
        .unwrap_or_else(|| panic!("no cause logged:\n{log}"));
    assert!(cause.contains("ERROR"), "{cause}");
    assert!(cause.contains(task), "{cause}");
    assert!(
        cause.contains(&format!("injected fault {fault}")),
        "{cause}"
    );
    assert!(log.contains("ketenbus stopped after a failure"), "{log}");

    // A supervisor starts it again, without the fault.
    broker.set_env(&[]);
    broker.spawn();
    let all_arrived = async || {
        let got = rx.received();
        let of_kind = |kind: &str| -> BTreeSet<String> {
            got.iter()
                .filter(|r| r.header("ketenbus-kind") == Some(kind))
                .filter_map(|r| r.header("ketenbus-envelope-id").map(str::to_owned))
                .collect()
        };
        let (raw, lab) = (of_kind("raw"), of_kind("lab_result"));
        if accepted.is_subset(&raw) && accepted.is_subset(&lab) {
            Ok(())
        } else {
            Err(format!(
                "after {fault} and a restart, {} of {} raw and {} lab results arrived",
                raw.intersection(&accepted).count(),
                accepted.len(),
                lab.intersection(&accepted).count(),
            ))
        }
    };
    let what = "every accepted message to arrive after the restart";
    broker
        .eventually(Duration::from_secs(30), what, all_arrived)
        .await;
}

/// The log without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_panic_stops_the_broker_non_zero_and_a_restart_loses_nothing() {
    a_dead_task_stops_the_broker_and_nothing_is_lost("router_panic_after:5", "task=\"router\"")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_panic_stops_the_broker_non_zero_and_a_restart_loses_nothing() {
    a_dead_task_stops_the_broker_and_nothing_is_lost(
        "lane_panic_after:6",
        "task=\"subscription gp\"",
    )
    .await;
}
