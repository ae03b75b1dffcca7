//! Forged delivery reports and metric labels, through the real binary.
//!
//! - A delivery status notification (DSN) changes a delivery only when it came through a
//!   source in `mail.bounce_sources` and carries the token the mail sink set in its
//!   envelope id. Forged ones (over unauthenticated SMTP, posted over HTTP, naming a webhook
//!   delivery, guessing a token) leave the delivery as it was: no dead letter, so no replay
//!   that would deliver it twice.
//! - After hostile input (forged DSNs with patient-like text in `Status:` and
//!   `Diagnostic-Code:`, odd content types, bad EDIFACT and FHIR) every label value of every
//!   series on `/metrics` is in its closed set, as `ketenbus::observe::metrics::closed_label_values`
//!   defines them; a label without a closed set fails the test.
//! - A fresh broker already exports every series the dashboard and the alert rules use, at
//!   zero, for every subscription and connector of its config.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ketenbus_tests::{Broker, MEDLAB, Receiver, free_port, lineage, lineage_until, post_message};

/// Patient-like text the hostile input carries; none of it may reach `/metrics`.
const PATIENT_TEXT: [&str; 3] = ["Jansen", "999911120", "INJECTED"];

fn config(smtp_port: u16, hook: &str, archive: &str) -> String {
    let closed = free_port();
    format!(
        "[mail.smtp]\nlisten = \"127.0.0.1:{smtp_port}\"\nhostname = \"ketenbus.test\"\n\
         [[subscriptions]]\nname = \"gp-webhook\"\nkinds = [\"lab_result\", \"letter\"]\nsink = {{ type = \"webhook\", url = \"{hook}\" }}\n\
         [[subscriptions]]\nname = \"archive\"\nkinds = [\"raw\"]\nsink = {{ type = \"webhook\", url = \"{archive}\" }}\n\
         [[subscriptions]]\nname = \"gp-mail\"\nkinds = [\"acute_handover\"]\n[subscriptions.sink]\ntype = \"mail\"\nhost = \"127.0.0.1\"\nport = {closed}\ntls = \"none\"\n\
         from = \"ketenbus@ketenbus.example.test\"\nto = \"huisarts@gp.example.test\"\n\
         [[mcsd]]\nname = \"lrza\"\nbase_url = \"http://127.0.0.1:{closed}/fhir\"\npoll_interval = \"1h\"\n"
    )
}

/// The connectors the config above has.
const CONNECTORS: [&str; 3] = ["http", "fhir", "smtp"];

/// A DSN as Postfix writes one, with the given envelope id (or none), status and answer.
fn dsn(envid: Option<&str>, message_id: &str, status: &str, diagnostic: &str) -> String {
    let envid = envid.map_or(String::new(), |e| format!("Original-Envelope-Id: {e}\r\n"));
    format!(
        "From: MAILER-DAEMON@relay.example.test\r\nTo: ketenbus@ketenbus.example.test\r\n\
         Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nPatient Jansen 999911120 could not be reached.\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.example.test\r\n{envid}\r\n\
         Final-Recipient: rfc822; huisarts@gp.example.test\r\nAction: failed\r\nStatus: {status}\r\n\
         Diagnostic-Code: {diagnostic}\r\n\r\n\
         --B\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <{message_id}>\r\nSubject: x\r\n\r\n--B--\r\n"
    )
}

/// Send `data` through the SMTP listener as an unauthenticated client; the `queued as` id.
fn smtp_send(port: u16, from: &str, data: &str) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect smtp");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("smtp reply");
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220"));
    let mut cmd = |c: &str, r: &mut dyn FnMut() -> String| {
        w.write_all(c.as_bytes()).unwrap();
        r()
    };
    assert!(cmd("EHLO attacker.test\r\n", &mut reply).starts_with("250"));
    assert!(cmd(&format!("MAIL FROM:<{from}>\r\n"), &mut reply).starts_with("250"));
    assert!(cmd("RCPT TO:<ketenbus@ketenbus.example.test>\r\n", &mut reply).starts_with("250"));
    assert!(cmd("DATA\r\n", &mut reply).starts_with("354"));
    let mut body = data.replace("\r\n.", "\r\n..");
    body.push_str(".\r\n");
    let done = cmd(&body, &mut reply);
    assert!(done.starts_with("250"), "{done}");
    let _ = cmd("QUIT\r\n", &mut reply);
    done.rsplit("queued as ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// One sample: metric name, labels, value.
type Series = (String, BTreeMap<String, String>, f64);

/// The samples of a text exposition, label values unescaped.
fn samples(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).expect("name");
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut key = String::new();
            let end;
            loop {
                let (i, c) = chars.next().expect("closing brace");
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line}");
                        let mut value = String::new();
                        loop {
                            let (_, c) = chars.next().expect("closing quote");
                            match c {
                                '\\' => match chars.next().expect("escape").1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                '"' => break,
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            rest = &inner[end..];
        }
        let value = rest.trim().parse::<f64>().unwrap_or_else(|_| {
            assert!(["+Inf", "-Inf", "NaN"].contains(&rest.trim()), "{line}");
            f64::NAN
        });
        out.push((name, labels, value));
    }
    out
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn closed_sets(
    broker: &Broker,
) -> BTreeMap<&'static str, BTreeMap<&'static str, BTreeSet<String>>> {
    let settings = ketenbus::config::Config::from_file(&broker.config)
        .expect("config")
        .validate(&ketenbus::config::Env::process())
        .expect("valid config");
    ketenbus::observe::metrics::closed_label_values(&settings.metric_labels())
}

/// The family a sample belongs to: histogram samples carry a suffix.
fn family<'a>(name: &'a str, sets: &BTreeMap<&'static str, impl Sized>) -> &'a str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|f| sets.contains_key(f)))
        .unwrap_or(name)
}

/// Every label of every series is in its closed set; a labelled series without sets fails.
fn assert_closed(
    text: &str,
    sets: &BTreeMap<&'static str, BTreeMap<&'static str, BTreeSet<String>>>,
) {
    let mut checked = 0;
    for (name, labels, _) in samples(text) {
        let fam = family(&name, sets);
        for (label, value) in &labels {
            let allowed = sets
                .get(fam)
                .and_then(|l| l.get(label.as_str()))
                .unwrap_or_else(|| {
                    panic!("{name} has label {label} without a closed set of values")
                });
            assert!(
                allowed.contains(value),
                "{name}{{{label}=\"{value}\"}}: not in its closed set {allowed:?}"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 100,
        "only {checked} label values checked:\n{text}"
    );
}

fn steps(l: &serde_json::Value) -> Vec<serde_json::Value> {
    l["steps"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_delivery_reports_change_nothing_and_metrics_stay_closed() {
    let hook = Receiver::ok().await;
    let archive = Receiver::ok().await;
    let smtp = free_port();
    let broker = Broker::start(&config(smtp, &hook.url(), &archive.url()));
    let c = reqwest::Client::new();

    // A lab result, delivered to the webhook subscription.
    let envelope = broker
        .accept(&c, "application/EDIFACT", MEDLAB.as_bytes().to_vec())
        .await;
    let record = format!("{envelope}.0");
    assert_eq!(hook.wait_for(1, Duration::from_secs(20)).await.len(), 1);
    lineage_until(&broker.url, &envelope, |l| {
        l["deliveries"].as_array().is_some_and(|d| {
            d.iter()
                .any(|d| d["subscription"] == "gp-webhook" && d["outcome"] == "delivered")
        })
    })
    .await;

    // Forged reports that the delivery failed, with patient-like text where a DSN has free
    // text, over unauthenticated SMTP: naming the webhook delivery as the sink once named
    // its deliveries, with a guessed token, by Message-ID only, and naming the mail
    // subscription.
    let status = "5.1.1-INJECTED-Jansen-999911120";
    let diagnostic = "smtp; 550 5.1.1 Jansen BSN 999911120 unknown";
    let message_id = format!("{record}@ketenbus.example.test");
    let forged = [
        dsn(
            Some(&format!("gp-webhook/{record}")),
            &message_id,
            status,
            diagnostic,
        ),
        dsn(
            Some(&format!("{record}/0123456789abcdef0123456789abcdef")),
            &message_id,
            status,
            diagnostic,
        ),
        dsn(None, &message_id, status, diagnostic),
        dsn(
            Some(&format!("gp-mail/{record}")),
            &message_id,
            "5.1.1",
            diagnostic,
        ),
    ];
    let mut smtp_reports = Vec::new();
    for f in &forged {
        smtp_reports.push(smtp_send(smtp, "", f));
    }
    // ...and the same posted over HTTP.
    let mut http_reports = Vec::new();
    for f in &forged {
        http_reports.push(
            broker
                .accept(&c, "message/rfc822", f.clone().into_bytes())
                .await,
        );
    }
    // Other hostile input: odd content types, bad EDIFACT and FHIR, odd mail.
    for (ct, body) in [
        ("application/x-jansen-999911120", b"x".to_vec()),
        ("text/plain; patient=Jansen", b"Jansen 999911120".to_vec()),
        ("application/EDIFACT", b"UNB+UNOA:1+Jansen999911120+x'garbage".to_vec()),
        ("application/EDIFACT", b"UNB+UNOA:1+500001234+500005678+261101:0815+IC1'UNH+1+JANSEN:999911120'UNT+2+1'UNZ+1+IC1'".to_vec()),
        ("application/fhir+json", br#"{"resourceType":"Jansen999911120"}"#.to_vec()),
        ("application/fhir+json", b"{not json Jansen".to_vec()),
        ("application/fhir+xml", b"<Jansen999911120/>".to_vec()),
        ("message/rfc822", b"Content-Type: application/x-jansen-999911120\r\n\r\nJansen".to_vec()),
        ("application/EDIFACT", Vec::new()),
    ] {
        let (s, b) = post_message(&c, &broker.url, ct, body).await.unwrap();
        assert!(s < 500, "{ct}: {s} {b}");
    }
    for _ in 0..2 {
        let resp = c
            .post(format!("{}/fhir/Jansen999911120", broker.url))
            .header("content-type", "application/fhir+json")
            .body(r#"{"resourceType":"Observation","status":"Jansen"}"#)
            .send()
            .await
            .unwrap();
        assert!(resp.status().as_u16() < 500);
    }
    let _ = smtp_send(
        smtp,
        "jansen@example.test",
        "Subject: Jansen 999911120\r\nContent-Type: multipart/mixed; boundary=\"X\"\r\n\r\n--X\r\nContent-Type: application/EDIFACT\r\n\r\nUNB+Jansen'\r\n--X--\r\n",
    );

    // Wait until the router has taken every report (its own lineage has a step).
    let mut routed = Vec::new();
    for (ids, reason) in [
        (&smtp_reports, "report_not_ours"),
        (&http_reports, "report_source_not_allowed"),
    ] {
        for id in ids {
            let l = lineage_until(&broker.url, id, |l| {
                steps(l)
                    .iter()
                    .any(|s| s["stage"] == "delivery_report" || s["stage"] == "normalised")
            })
            .await;
            routed.push((l, reason));
        }
    }
    // The delivery is as it was: delivered, no report in its lineage, no dead letter.
    let l = lineage(&c, &broker.url, &envelope).await.unwrap();
    let d: Vec<_> = l["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["subscription"] == "gp-webhook")
        .cloned()
        .collect();
    assert_eq!(d.len(), 1, "{l:#}");
    assert_eq!(d[0]["outcome"], "delivered", "{l:#}");
    assert!(
        steps(&l).iter().all(|s| s["stage"] != "delivery_report"),
        "a forged report reached the delivery's lineage: {l:#}"
    );
    for sub in ["gp-webhook", "gp-mail"] {
        let (ok, listed, err) = broker.cli(&["dlq", "list", "--subscription", sub]);
        assert!(ok, "{err}");
        assert!(
            !listed.contains(&record),
            "{sub} dead-lettered it: {listed}"
        );
    }
    assert_eq!(
        hook.received()
            .iter()
            .filter(|r| r.header("idempotency-key") == Some(record.as_str()))
            .count(),
        1,
        "delivered once"
    );

    // Metrics: no patient text, every label value from its closed set.
    let text = scrape(&broker.url).await;
    for p in PATIENT_TEXT {
        assert!(!text.contains(p), "{p} is on /metrics:\n{text}");
    }
    assert_closed(&text, &closed_sets(&broker));
    // Each report's own lineage says why it was ignored.
    for (l, reason) in routed {
        let report = steps(&l)
            .into_iter()
            .find(|s| s["stage"] == "delivery_report")
            .unwrap_or_else(|| panic!("no delivery_report step: {l:#}"));
        assert_eq!(report["outcome"], "ignored", "{l:#}");
        assert_eq!(report["reason"], reason, "{l:#}");
    }
}

/// Metric names (`ketenbus_…`, `process_…`) a dashboard or rules file refers to.
fn referenced_names(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).expect("read ops file");
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && (text[i..].starts_with("ketenbus_") || text[i..].starts_with("process_")) {
            let end = text[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| i + n);
            names.insert(text[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_broker_exports_every_series_the_dashboard_and_alerts_use_at_zero() {
    let hook = Receiver::ok().await;
    let smtp = free_port();
    let broker = Broker::start(&config(smtp, &hook.url(), &hook.url()));
    let text = scrape(&broker.url).await;
    let series = samples(&text);
    let present: BTreeSet<&str> = series.iter().map(|s| s.0.as_str()).collect();

    let mut files = vec![repo().join("ops/grafana/ketenbus.json")];
    for e in std::fs::read_dir(repo().join("ops/prometheus")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if (name.contains("rules") || name.starts_with("alerts"))
            && !name.contains("_test")
            && name.ends_with(".yml")
        {
            files.push(p);
        }
    }
    assert!(files.len() >= 2, "{files:?}");
    let mut used = BTreeSet::new();
    for f in &files {
        used.extend(referenced_names(f));
    }
    assert!(used.len() > 10, "{used:?}");
    for name in &used {
        assert!(
            present.contains(name.as_str()),
            "{name} (used in {files:?}) is not on a fresh broker's /metrics:\n{text}"
        );
    }

    // Every counter used there exists for every combination of its closed label values,
    // for each subscription and connector of the config, at zero.
    let sets = closed_sets(&broker);
    let mut expected = 0;
    for name in used.iter().filter(|n| n.ends_with("_total")) {
        let Some(labels) = sets.get(name.as_str()) else {
            continue;
        };
        let mut combos: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for (label, values) in labels {
            let values: Vec<&String> = values
                .iter()
                .filter(|v| *label != "connector" || CONNECTORS.contains(&v.as_str()))
                .collect();
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert((*label).to_owned(), (*v).clone());
                        c
                    })
                })
                .collect();
        }
        for combo in combos {
            expected += 1;
            let found = series
                .iter()
                .find(|(n, l, _)| n == name && *l == combo)
                .unwrap_or_else(|| panic!("{name}{combo:?} is missing at start-up:\n{text}"));
            assert!(found.2 == 0.0, "{name}{combo:?} is not 0 at start-up");
        }
    }
    assert!(expected > 100, "{expected}");
    for sub in ["gp-webhook", "archive", "gp-mail"] {
        assert!(
            series
                .iter()
                .any(|(n, l, v)| n == "ketenbus_dispatch_dead_letters_total"
                    && l.get("subscription").map(String::as_str) == Some(sub)
                    && l.get("reason").map(String::as_str) == Some("exhausted")
                    && *v == 0.0),
            "{sub}"
        );
    }
    assert_closed(&text, &sets);
}
