//! What an operator meets when deliveries fail, through the real binary: the WARN lines of
//! failed attempts and dead letters, the dead-letter command line (a missing log, secrets it
//! does not need, unknown names, replays that resolve their dead letter and count attempts
//! on), `ketenbus status` (retrying subscriptions with their reason, router and inbox
//! failures, across a restart) and the refusals of every way in in the metrics.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use ketenbus_tests::{AUDIT_KEY, Broker, edifact_message, ketenbus_bin, lineage_until};

/// A webhook receiver that answers every request with `status` and a long body of 3-byte
/// characters (so a cut at 1 KiB falls inside one); counts what it took (2xx).
#[derive(Clone)]
struct Talkative {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    taken: Arc<std::sync::Mutex<Vec<axum::http::HeaderMap>>>,
}

/// The body a [`Talkative`] receiver answers with: 3000 euro signs after a marker.
fn answer_body() -> String {
    format!("refused-by-receiver {}", "\u{20ac}".repeat(3000))
}

impl Talkative {
    async fn start(status: u16) -> Talkative {
        let t = Talkative {
            addr: "127.0.0.1:0".parse().unwrap(),
            status: Arc::new(AtomicU16::new(status)),
            taken: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = t.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let state = state.clone();
                async move {
                    let status = state.status.load(Ordering::SeqCst);
                    if (200..300).contains(&status) {
                        state.taken.lock().unwrap().push(headers);
                    }
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        answer_body(),
                    )
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Talkative { addr, ..t }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

/// Run `ketenbus args` in `cwd` with only the audit key (no sink secrets); (success,
/// stdout, stderr).
fn bare(cwd: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ketenbus_bin())
        .args(args)
        .current_dir(cwd)
        .env("KETENBUS_AUDIT_KEY", AUDIT_KEY)
        .env_remove("PICKY_SECRET")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `text` without ANSI escape sequences (the log may be coloured).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `dlq list` lines as JSON.
fn lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn the_dead_letter_command_line_refuses_what_it_cannot_do_and_replays_resolve() {
    let rx = Talkative::start(404).await;
    let subs = format!(
        "[[subscriptions]]\nname = \"picky\"\nkinds = [\"raw\"]\n\
         sink = {{ type = \"webhook\", url = \"{}\", secret_env = \"PICKY_SECRET\" }}\n",
        rx.url()
    );
    let broker = Broker::start_with_env(&subs, &[("PICKY_SECRET", "picky-secret-for-tests")]);
    let cfg = broker.config.to_str().unwrap().to_owned();
    // `ketenbus dlq ARGS --config FILE`, without the sink's secret.
    let dlq = |args: &[&str]| {
        let mut all = vec!["dlq"];
        all.extend(args);
        all.extend(["--config", cfg.as_str()]);
        bare(&broker.dir, &all)
    };
    let c = reqwest::Client::new();
    let id = broker
        .accept(&c, "application/EDIFACT", edifact_message(3, 200))
        .await;
    lineage_until(&broker.url, &id, |l| {
        l["deliveries"][0]["outcome"] == "dead_lettered"
    })
    .await;

    // Listing needs no sink secret, and the receiver's answer is in the detail, bounded.
    let (ok, out, err) = dlq(&["list", "--subscription", "picky"]);
    assert!(ok, "{err}");
    let listed = lines(&out);
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["reason"], "http_404");
    assert_eq!(listed[0]["attempt"], 1);
    let detail = listed[0]["detail"].as_str().unwrap();
    let excerpt = detail
        .strip_prefix("404 Not Found: ")
        .unwrap_or_else(|| panic!("{detail}"));
    assert!(
        excerpt.starts_with("refused-by-receiver \u{20ac}"),
        "{detail}"
    );
    assert!(excerpt.len() <= 1024, "{} bytes", excerpt.len());
    assert!(excerpt.len() > 1000, "{} bytes", excerpt.len());
    let dead_letter = listed[0]["id"].as_str().unwrap().to_owned();

    // Unknown names are errors that name the known ones, for every command.
    for cmd in [
        &["list", "--subscription", "pciky"][..],
        &["purge", "--subscription", "pciky", "--all"],
        &["replay", "--subscription", "pciky", "--all"],
    ] {
        let (ok, out, err) = dlq(cmd);
        assert!(!ok, "{cmd:?}: {out}");
        assert!(
            err.contains("no subscription named \"pciky\"") && err.contains("picky"),
            "{cmd:?}: {err}"
        );
    }

    // Without --config and without ./data: an error, and no empty log made.
    let elsewhere = tempfile::tempdir().unwrap();
    let (ok, out, err) = bare(
        elsewhere.path(),
        &["dlq", "list", "--subscription", "picky"],
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("no data directory") && err.contains("--config"),
        "{err}"
    );
    assert!(!elsewhere.path().join("data").exists(), "nothing created");

    // Replay (no secret needed either: the broker sends); delivered with the attempt count
    // going on, resolved, lineage and status say so.
    rx.status.store(200, Ordering::SeqCst);
    let (ok, _, err) = dlq(&["replay", "--subscription", "picky", "--id", &id]);
    assert!(ok, "{err}");
    let l = lineage_until(&broker.url, &id, |l| {
        l["deliveries"][0]["outcome"] == "delivered"
    })
    .await;
    assert_eq!(l["deliveries"][0]["attempts"], 2, "{l:#}");
    let replayed = l["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["outcome"] == "replayed")
        .unwrap_or_else(|| panic!("no replayed step: {l:#}"));
    assert_eq!(replayed["subscription"], "picky");
    assert_eq!(replayed["stage"], "dead_lettered");
    let taken = rx.taken.lock().unwrap().clone();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        taken[0]["ketenbus-attempt"], "2",
        "the attempt count goes on"
    );

    let resolved = broker
        .eventually(
            Duration::from_secs(10),
            "the dead letter resolved",
            async || {
                let (ok, out, err) = dlq(&["list", "--subscription", "picky"]);
                assert!(ok, "{err}");
                if out.trim().is_empty() {
                    Ok(())
                } else {
                    Err(out)
                }
            },
        )
        .await;
    let () = resolved;
    let (ok, out, err) = dlq(&["list", "--subscription", "picky", "--resolved"]);
    assert!(ok, "{err}");
    let listed = lines(&out);
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["id"], dead_letter.as_str());
    assert!(listed[0]["resolved_at_ms"].as_i64().unwrap() > 0, "{out}");
    // Nothing left to replay.
    let (ok, _, err) = dlq(&["replay", "--subscription", "picky", "--all"]);
    assert!(ok && err.contains("replayed 0"), "{err}");

    let in_status = async |status: &str| {
        let url = format!(
            "{}/api/v1/messages?status={status}&subscription=picky",
            broker.url
        );
        let page: serde_json::Value = c.get(url).send().await.unwrap().json().await.unwrap();
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == id.as_str())
    };
    assert!(in_status("delivered").await);
    assert!(!in_status("dead_lettered").await, "no longer dead-lettered");

    // The dead letter was a WARN line with ids and reason, never the receiver's answer.
    let log = plain(&broker.log_text());
    let warn = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("dead-lettered") && l.contains("picky"))
        .unwrap_or_else(|| panic!("no WARN line for the dead letter:\n{log}"));
    assert!(
        warn.contains(&format!("record_id={id}")) && warn.contains("reason=http_404"),
        "{warn}"
    );
    assert!(!log.contains("refused-by-receiver"), "{log}");
}

/// `ketenbus status --config FILE`, its output.
fn status(broker: &Broker) -> String {
    let (_, out, err) = broker.cli(&["status"]);
    format!("{out}{err}")
}

#[tokio::test]
async fn status_shows_retries_router_dead_letters_and_inbox_failures_across_a_restart() {
    let rx = ketenbus_tests::Receiver::answering(503).await;
    let inbox = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[inbox]]\npath = {:?}\npatterns = [\"*.edi\"]\npoll_interval = \"100ms\"\nsettle = \"200ms\"\n{}\
         [subscriptions.retry]\ninitial = \"300ms\"\nmax = \"1s\"\n",
        inbox.path(),
        ketenbus_tests::webhook_subscription("flaky", "\"raw\"", &rx.url(), ""),
    );
    let mut broker = Broker::start(&extra);
    let c = reqwest::Client::new();
    // One the receiver refuses for now, one the router cannot read, one file the inbox sets
    // aside.
    let id = broker
        .accept(
            &c,
            "application/EDIFACT",
            ketenbus_tests::MEDLAB.as_bytes().to_vec(),
        )
        .await;
    broker
        .accept(
            &c,
            "application/EDIFACT",
            b"UNB+UNOA:1+500001234+500005678+261101:0815+IC1'".to_vec(),
        )
        .await;
    std::fs::write(inbox.path().join("empty.edi"), b"").unwrap();
    lineage_until(&broker.url, &id, |l| {
        l["deliveries"][0]["outcome"] == "retrying"
    })
    .await;

    // Each failed attempt is a WARN line with subscription, record id, attempt and reason.
    broker
        .eventually(
            Duration::from_secs(10),
            "a WARN line per failed attempt",
            async || {
                let log = plain(&broker.log_text());
                log.lines()
                    .find(|l| {
                        l.contains("WARN")
                            && l.contains("delivery failed, retrying")
                            && l.contains("subscription=flaky")
                            && l.contains(&format!("record_id={id}"))
                            && l.contains("attempt=1")
                            && l.contains("reason=http_503")
                    })
                    .map(str::to_owned)
                    .ok_or_else(|| "no such line yet".to_owned())
            },
        )
        .await;
    // The inbox's and the FHIR endpoint's refusals are counted with the other refusals.
    let refused = c
        .post(format!("{}/fhir", broker.url))
        .header("content-type", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    broker
        .eventually(Duration::from_secs(10), "the refusals counted", async || {
            let m = broker.metrics().await;
            if m.contains(
                "ketenbus_ingest_rejected_messages_total{connector=\"inbox\",reason=\"empty_body\"} 1",
            ) && m.contains(
                "ketenbus_ingest_rejected_messages_total{connector=\"fhir\",reason=\"empty_body\"} 1",
            ) {
                Ok(())
            } else {
                Err(m)
            }
        })
        .await;

    for round in ["before", "after"] {
        let out = broker
            .eventually(
                Duration::from_secs(15),
                &format!("status {round} a restart"),
                async || {
                    let out = status(&broker);
                    let whole = out.contains("flaky is retrying")
                        && out.contains("last failure: http_503")
                        && out.contains(
                            "the router could not normalise 1 message(s), newest: edifact_syntax",
                        )
                        && out
                            .contains("set aside 1 file(s) in failed/, newest: the file is empty");
                    if whole { Ok(out) } else { Err(out) }
                },
            )
            .await;
        assert!(!out.contains("nothing is failing"), "{out}");
        assert!(!out.contains("NAME"), "{out}");
        assert!(
            out.contains(&format!(
                "ketenbus dlq list --subscription router --config {}",
                broker.config.display()
            )),
            "{out}"
        );
        if round == "before" {
            broker.kill();
            broker.spawn();
        }
    }
}
