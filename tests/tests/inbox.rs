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
