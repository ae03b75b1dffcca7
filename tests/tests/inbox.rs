//! The inbox folder through the running broker: a MEDLAB file dropped into the folder reaches
//! a lab-result subscriber, the file moves to `done/`; a broken file lands in `failed/` with
//! its reason.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::time::Duration;

use ketenbus_tests::{Broker, MEDLAB, Receiver, webhook_subscription};

#[tokio::test]
async fn a_file_dropped_in_the_inbox_is_delivered_and_moved_to_done() {
    let rx = Receiver::answering(204).await;
    let inbox = tempfile::tempdir().unwrap();
    let config = format!(
        "[[inbox]]\npath = {:?}\npatterns = [\"*.edi\"]\npoll_interval = \"100ms\"\nsettle = \"200ms\"\n{}",
        inbox.path(),
        webhook_subscription("gp", "\"lab_result\"", &rx.url(), "")
    );
    // The first lines of the extra config land in [http]; start a new table first.
    let broker = Broker::start(&format!("\n{config}"));
    // Written in two steps, like a slow transfer: only the whole file is taken.
    let path = inbox.path().join("lab-0042.edi");
    std::fs::write(&path, &MEDLAB.as_bytes()[..40]).unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, &MEDLAB.as_bytes()[40..]).unwrap();
    drop(f);
    std::fs::write(inbox.path().join("broken.edi"), b"UNB+UNOA:1+5000").unwrap();

    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "{}", broker.log_text());
    let e: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(e["header"]["kind"], "lab_result");
    assert_eq!(e["results"][0]["local_name"], "Kalium");
    let moved = ["done/lab-0042.edi", "failed/broken.edi.reason"];
    let moved = async || moved.iter().all(|f| inbox.path().join(f).exists());
    broker
        .eventually(Duration::from_secs(5), "the files to be moved", moved)
        .await;
    assert_eq!(
        std::fs::read(inbox.path().join("done/lab-0042.edi")).unwrap(),
        MEDLAB.as_bytes()
    );
    let reason = std::fs::read_to_string(inbox.path().join("failed/broken.edi.reason")).unwrap();
    assert!(reason.contains("not EDIFACT"), "{reason}");
    // The lineage names the connector.
    let page: serde_json::Value = broker.get_json("/api/v1/messages").await;
    assert_eq!(page["items"][0]["connector"], "inbox");
}

/// The parties a message's UNB names are in its lineage and in the list, whether it came in
/// through the inbox or over HTTP; an inbox message's lineage names its file (the name, not
/// the path), and the log ties the file in `done/` to its message id. Every time in the
/// lineage is there in RFC 3339 too.
#[tokio::test]
async fn inbox_and_http_messages_carry_their_unb_parties_and_the_file_is_named() {
    let inbox = tempfile::tempdir().unwrap();
    let broker = Broker::start(&format!(
        "\n[[inbox]]\npath = {:?}\npatterns = [\"*.edi\"]\npoll_interval = \"100ms\"\nsettle = \"200ms\"\n",
        inbox.path()
    ));
    std::fs::write(inbox.path().join("lab-0042.edi"), MEDLAB).unwrap();
    std::fs::write(inbox.path().join("broken.edi"), b"UNB+UNOA:1+5000").unwrap();
    let done = async || inbox.path().join("done/lab-0042.edi").exists();
    broker
        .eventually(Duration::from_secs(10), "the file in done/", done)
        .await;
    let via_http = broker
        .accept(
            &reqwest::Client::new(),
            "application/EDIFACT",
            MEDLAB.as_bytes().to_vec(),
        )
        .await;

    let page: serde_json::Value = broker.get_json("/api/v1/messages").await;
    let items = page["items"].as_array().unwrap();
    let by = |connector: &str| {
        items
            .iter()
            .find(|m| m["connector"] == connector)
            .unwrap_or_else(|| panic!("no {connector} message in {page:#}"))
            .clone()
    };
    let (file_msg, http_msg) = (by("inbox"), by("http"));
    assert_eq!(http_msg["id"], via_http.as_str());
    for m in [&file_msg, &http_msg] {
        assert_eq!(m["sender"], "mailbox:500001234", "{m:#}");
        assert_eq!(m["receiver"], "mailbox:500005678", "{m:#}");
    }
    let file_id = file_msg["id"].as_str().unwrap();
    for id in [file_id, via_http.as_str()] {
        let l = broker.get_json(&format!("/api/v1/messages/{id}")).await;
        assert_eq!(l["sender"], "mailbox:500001234", "{l:#}");
        assert_eq!(l["receiver"], "mailbox:500005678", "{l:#}");
        // Times: epoch milliseconds and RFC 3339, the same instant.
        let ms = l["received_at_ms"].as_i64().unwrap();
        let at = l["received_at"].as_str().expect("received_at");
        let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap());
        assert_eq!(at, format_rfc3339_millis(t), "{l:#}");
        for step in l["steps"].as_array().unwrap() {
            assert!(
                step["at"].as_str().is_some_and(|a| a.ends_with('Z')),
                "{step}"
            );
            assert!(step["at_ms"].is_i64(), "{step}");
        }
    }
    let l = broker
        .get_json(&format!("/api/v1/messages/{file_id}"))
        .await;
    assert_eq!(l["steps"][0]["stage"], "received", "{l:#}");
    assert_eq!(l["steps"][0]["detail"], "file lab-0042.edi", "{l:#}");
    assert!(
        !l.to_string().contains(&inbox.path().display().to_string()),
        "the file's name, never its path: {l:#}"
    );

    // One log line per file names the file and, once taken, its message id.
    let log = broker.log_text();
    let taken: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("file=lab-0042.edi"))
        .collect();
    assert_eq!(taken.len(), 1, "{log}");
    assert!(taken[0].contains(" INFO "), "{}", taken[0]);
    assert!(
        taken[0].contains(&format!("message_id={file_id}")),
        "{}",
        taken[0]
    );
    assert!(taken[0].contains("done/"), "{}", taken[0]);
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("file=broken.edi") && l.contains("failed/"))
        .collect();
    assert_eq!(failed.len(), 1, "{log}");
}

/// RFC 3339 with milliseconds, UTC (`2026-11-30T21:00:00.000Z`), computed here without the
/// broker's code.
fn format_rfc3339_millis(t: std::time::SystemTime) -> String {
    let ms = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let secs = i64::try_from(ms / 1000).unwrap();
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        ms % 1000
    )
}
