//! Retention never loses an unfinished record, through real sockets against the `ketenbus`
//! binary: subscribers down for many retention periods (and a broker restart in the middle)
//! get every record once they are back;
//! dead letters outlive retention until `ketenbus dlq purge` removes them (audited); a log
//! full of unfinished records refuses new messages (HTTP 503, SMTP 451) instead of losing one.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use ketenbus_tests::{
    Broker, MEDLAB, Receiver, edifact_message, eventually, free_port, post_message,
    webhook_subscription,
};

const FAST_RETRY: &str = "[subscriptions.retry]\ninitial = \"50ms\"\nmax = \"200ms\"\n";

/// A short retention, run often.
fn short_retention(extra: &str) -> String {
    format!("[bus.embedded]\nretention_max_age = \"1s\"\nretention_interval = \"200ms\"\n{extra}\n")
}

/// A MEDLAB lab result for patient `n` (an invented BSN passing the eleven-test).
fn lab_result(n: usize) -> Vec<u8> {
    let bsn = bsn(n);
    MEDLAB
        .replace("IC0042", &format!("IC{n:04}"))
        .replace("BSN999911120", &format!("BSN{bsn}"))
        .into_bytes()
}

/// The `n`th nine-digit number from 100000000 on that passes the eleven-test.
fn bsn(n: usize) -> String {
    let mut found = 0;
    let mut v = 100_000_000u64;
    loop {
        let digits: Vec<u64> = v.to_string().bytes().map(|b| u64::from(b - b'0')).collect();
        let sum: i64 = digits[..8]
            .iter()
            .zip((2..=9).rev())
            .map(|(d, w)| i64::try_from(d * w).unwrap())
            .sum::<i64>()
            - i64::try_from(digits[8]).unwrap();
        if sum % 11 == 0 {
            if found == n {
                return v.to_string();
            }
            found += 1;
        }
        v += 1;
    }
}

fn ids(got: &[ketenbus_tests::Received], header: &str) -> HashSet<String> {
    got.iter()
        .filter_map(|r| r.header(header).map(str::to_owned))
        .collect()
}

fn dead_letters(broker: &Broker, subscription: &str) -> Vec<serde_json::Value> {
    let (ok, stdout, stderr) = broker.cli(&["dlq", "list", "--subscription", subscription]);
    assert!(ok, "{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn subscribers_down_past_retention_lose_nothing_and_dead_letters_stay() {
    let gp = Receiver::answering(503).await;
    let archive = Receiver::answering(503).await;
    let picky = Receiver::answering(404).await;
    // One lane each: at most 32 records in flight, the rest wait on the log (where the
    // issue's reproduction lost them).
    let config = format!(
        "{}concurrency = 1\n{FAST_RETRY}{}concurrency = 1\n{FAST_RETRY}{}{}",
        webhook_subscription("gp", "\"lab_result\"", &gp.url(), ""),
        webhook_subscription("archive", "\"raw\"", &archive.url(), ""),
        webhook_subscription("picky", "\"raw\"", &picky.url(), ""),
        short_retention(""),
    );
    let mut broker = Broker::start(&config);
    let c = reqwest::Client::new();
    let n = 120;
    let mut accepted = HashSet::new();
    for i in 0..n {
        accepted.insert(
            broker
                .accept(&c, "application/EDIFACT", lab_result(i))
                .await,
        );
    }
    // Both subscribers stay down for many retention periods (1 s, a pass every 200 ms), and
    // the broker is killed and restarted in the middle: what was in flight in memory is
    // gone, so everything must come from the log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.kill();
    broker.spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    gp.set_status(204);
    archive.set_status(204);
    let got_gp = gp.wait_for(n, Duration::from_secs(60)).await;
    let got_archive = archive.wait_for(n, Duration::from_secs(60)).await;
    let gp_envelopes = ids(&got_gp, "ketenbus-envelope-id");
    let archive_ids = ids(&got_archive, "idempotency-key");
    let dead = dead_letters(&broker, "picky");
    let dead_ids: HashSet<String> = dead
        .iter()
        .map(|d| d["envelope_id"].as_str().unwrap().to_owned())
        .collect();
    eprintln!(
        "accepted {}, lab results delivered to gp {}, raw delivered to archive {}, dead-lettered by picky {}",
        accepted.len(),
        gp_envelopes.len(),
        archive_ids.len(),
        dead_ids.len()
    );
    assert_eq!(gp_envelopes, accepted, "every lab result reached gp");
    assert_eq!(archive_ids, accepted, "every message reached archive");
    assert_eq!(
        dead_ids, accepted,
        "every message is a dead letter of picky"
    );
    // Dead letters outlive many more retention periods.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        dead_letters(&broker, "picky").len(),
        n,
        "dead letters expired"
    );
    // What every reader finished goes: the log shrinks back (nothing holds it any more).
    let ready: serde_json::Value = broker.get_json("/readyz").await;
    assert_eq!(ready["components"]["log"]["state"], "ready", "{ready}");
}

#[tokio::test]
async fn dlq_purge_removes_dead_letters_and_audits_each() {
    let picky = Receiver::answering(404).await;
    let config = format!(
        "{}{}",
        webhook_subscription("picky", "\"raw\"", &picky.url(), ""),
        short_retention("")
    );
    let broker = Broker::start(&config);
    let c = reqwest::Client::new();
    for i in 0..5 {
        broker
            .accept(&c, "application/EDIFACT", edifact_message(i, 200))
            .await;
    }
    // (A hundred looks 100 ms apart before, each running the CLI.)
    let dead = eventually(Duration::from_secs(30), "five dead letters", async || {
        let dead = dead_letters(&broker, "picky");
        if dead.len() == 5 {
            Ok(dead)
        } else {
            Err(format!("{} dead letters", dead.len()))
        }
    })
    .await;
    assert_eq!(dead.len(), 5);
    let (ok, _, stderr) = broker.cli(&["dlq", "purge", "--subscription", "picky"]);
    assert!(
        !ok && stderr.contains("--all"),
        "a purge needs a selection: {stderr}"
    );
    let first = dead[0]["id"].as_str().unwrap();
    let (ok, _, stderr) = broker.cli(&["dlq", "purge", "--subscription", "picky", "--id", first]);
    assert!(ok && stderr.contains("purged 1 "), "{stderr}");
    assert_eq!(dead_letters(&broker, "picky").len(), 4);
    let (ok, _, stderr) = broker.cli(&[
        "dlq",
        "purge",
        "--subscription",
        "picky",
        "--before",
        "2000-01-01T00:00:00Z",
    ]);
    assert!(
        ok && stderr.contains("purged 0 "),
        "nothing that old: {stderr}"
    );
    let (ok, _, stderr) = broker.cli(&[
        "dlq",
        "purge",
        "--subscription",
        "picky",
        "--before",
        "2999-01-01T00:00:00Z",
    ]);
    assert!(ok && stderr.contains("purged 4 "), "{stderr}");
    assert!(dead_letters(&broker, "picky").is_empty());
    // One audit record per purged dead letter, in one chain with the broker's own records
    // (it kept writing beside the command).
    let (ok, stdout, stderr) = broker.cli(&["audit", "verify"]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = broker.cli(&["audit", "export", "--since", "2000-01-01T00:00:00Z"]);
    assert!(ok, "{stderr}");
    let purges: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "dlq_purge")
        .collect();
    assert_eq!(purges.len(), 5, "{stdout}");
    let audited: HashSet<&str> = purges
        .iter()
        .map(|r| r["envelope_id"].as_str().unwrap())
        .collect();
    let listed: HashSet<&str> = dead
        .iter()
        .map(|d| d["envelope_id"].as_str().unwrap())
        .collect();
    assert_eq!(audited, listed);
    assert!(purges.iter().all(|r| r["actor"] == "anonymous"));
}

/// One SMTP reply (multi-line aware): its code.
fn smtp_reply(r: &mut BufReader<TcpStream>) -> u16 {
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.len() >= 4, "SMTP reply {line:?}");
        if line.as_bytes()[3] == b' ' {
            return line[..3].parse().unwrap();
        }
    }
}

/// Send one small mail over plain SMTP; the reply code to the end of DATA.
fn smtp_send(port: u16) -> u16 {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    assert_eq!(smtp_reply(&mut r), 220);
    for (cmd, want) in [
        ("EHLO tests.example.test", 250),
        ("MAIL FROM:<lab@lab.example.test>", 250),
        ("RCPT TO:<gp@ketenbus.example.test>", 250),
        ("DATA", 354),
    ] {
        write!(w, "{cmd}\r\n").unwrap();
        assert_eq!(smtp_reply(&mut r), want, "{cmd}");
    }
    write!(
        w,
        "From: lab@lab.example.test\r\nTo: gp@ketenbus.example.test\r\nSubject: test\r\n\r\nhello\r\n.\r\n"
    )
    .unwrap();
    let code = smtp_reply(&mut r);
    let _ = write!(w, "QUIT\r\n");
    code
}

#[tokio::test]
async fn a_log_full_of_unfinished_records_refuses_new_messages_instead_of_losing_one() {
    let gp = Receiver::answering(503).await;
    let smtp = free_port();
    let config = format!(
        "{}{FAST_RETRY}{}[mail.smtp]\nlisten = \"127.0.0.1:{smtp}\"\nhostname = \"ketenbus.test\"\n",
        webhook_subscription("gp", "\"raw\"", &gp.url(), ""),
        short_retention("retention_max_bytes = \"20 KB\"\nretention_refuse_margin = \"20 KB\"")
    );
    let broker = Broker::start(&config);
    let c = reqwest::Client::new();
    let mut accepted = HashSet::new();
    let mut refused = None;
    for i in 0..400 {
        let (status, j) = post_message(
            &c,
            &broker.url,
            "application/EDIFACT",
            edifact_message(i, 2000),
        )
        .await
        .unwrap();
        match status {
            202 => {
                accepted.insert(j["id"].as_str().unwrap().to_owned());
            }
            503 => {
                refused = Some(j);
                break;
            }
            other => panic!("{other} {j}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("never refused: records would have been deleted unfinished");
    assert_eq!(refused["error"], "log_unavailable", "{refused}");
    let n = accepted.len();
    assert!(
        n >= 20,
        "refused after {n} messages of 2 KB (limit 20 KB + 20 KB)"
    );
    assert_eq!(smtp_send(smtp), 451, "SMTP hears try again too");
    let ready: serde_json::Value = broker.get_json("/readyz").await;
    let log = &ready["components"]["log"];
    assert_eq!(log["state"], "degraded", "{ready}");
    assert!(
        log["reason"]
            .as_str()
            .unwrap()
            .contains("refusing new messages")
            // The fullest topic the subscriber has not finished: the raw topic, or its retry
            // topic once the failing deliveries are parked there.
            && ["ketenbus.raw", "ketenbus.retry.gp"]
                .iter()
                .any(|t| log["reason"].as_str().unwrap().contains(t)),
        "{ready}"
    );
    let metrics = broker.metrics().await;
    let excess: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ketenbus_log_retention_excess_bytes "))
        .expect("excess metric")
        .parse()
        .unwrap();
    assert!(excess > 20_000.0, "{excess}");
    // The subscriber comes back: every accepted message arrives, and messages are taken again.
    gp.set_status(204);
    let got = gp.wait_for(n, Duration::from_secs(60)).await;
    assert_eq!(
        ids(&got, "idempotency-key"),
        accepted,
        "every accepted message arrived"
    );
    // (A hundred tries 100 ms apart before.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    eventually(
        Duration::from_secs(15),
        "a message to be taken again after the subscriber caught up",
        async || {
            let (status, _) = post_message(
                &c,
                &broker.url,
                "application/EDIFACT",
                edifact_message(9999, 2000),
            )
            .await
            .unwrap();
            if status == 202 {
                Ok(())
            } else {
                Err(format!("still refusing: {status}"))
            }
        },
    )
    .await;
    eprintln!(
        "accepted {n} (2 KB each) before 503; all {n} delivered after the subscriber came back"
    );
}
