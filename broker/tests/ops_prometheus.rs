//! Operations, checked against the real tools: the `ketenbus` binary runs with a temporary
//! data directory on a free loopback port; `promtool` checks its `/metrics` output and the
//! shipped rules; a real Prometheus scrapes it and answers queries; the shipped Grafana
//! dashboard and alert rules refer only to metrics the broker exports.
//!
//! Needs Debian's `prometheus` package; `ops/prometheus/setup.sh` installs it when missing.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn ops(path: &str) -> PathBuf {
    repo().join("ops").join(path)
}

/// Install `promtool` and `prometheus` through the project's script when they are missing.
fn tools() {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let have = |bin: &str| {
            Command::new(bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if have("promtool") && have("prometheus") {
            return;
        }
        let status = Command::new("sh")
            .arg(ops("prometheus/setup.sh"))
            .status()
            .expect("run ops/prometheus/setup.sh");
        assert!(status.success(), "ops/prometheus/setup.sh failed");
    });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A minimal HTTP/1.1 exchange: (status, content type, body).
fn http(
    method: &str,
    port: u16,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let ctype = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, ctype, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn get(port: u16, path: &str) -> Option<(u16, String, String)> {
    http("GET", port, path, "text/plain", b"")
}

/// A webhook receiver on loopback answering 200 to everything, counting requests.
fn receiver() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut want = None;
            while let Ok(n) = s.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if want.is_none()
                    && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
                {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    want = Some(end + 4 + len);
                }
                if want.is_some_and(|w| buf.len() >= w) {
                    break;
                }
            }
            seen.fetch_add(1, Ordering::SeqCst);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, count)
}

/// A `ketenbus run` process: subscription `archive` delivers raw envelopes to a working
/// receiver, `stuck` to a port where nobody listens (so it retries and falls behind).
struct Ketenbus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    delivered: Arc<AtomicUsize>,
}

impl Ketenbus {
    fn start() -> Ketenbus {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let (hook, delivered) = receiver();
        let closed = free_port();
        let smtp = free_port();
        let config = format!(
            r#"data_dir = {data:?}
[http]
listen = "127.0.0.1:{port}"

# A mail source, so that the dashboard's "sources up" panel has a series.
[mail.smtp]
listen = "127.0.0.1:{smtp}"
hostname = "ketenbus.test"

[[subscriptions]]
name = "archive"
kinds = ["raw"]
sink = {{ type = "webhook", url = "http://127.0.0.1:{hook}/in" }}

[[subscriptions]]
name = "stuck"
kinds = ["raw", "acute_handover"]
sink = {{ type = "webhook", url = "http://127.0.0.1:{closed}/in", timeout = "1s" }}
[subscriptions.retry]
initial = "100ms"
max = "500ms"
give_up_after = "1h"
"#,
            data = dir.path().join("data"),
        );
        let path = dir.path().join("ketenbus.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("ketenbus.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ketenbus"))
            .args(["run", "--config"])
            .arg(&path)
            .env("KETENBUS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ketenbus");
        let mut k = Ketenbus {
            child,
            port,
            dir,
            delivered,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = k.child.try_wait() {
                panic!("ketenbus exited with {status}:\n{}", k.log());
            }
            if get(port, "/readyz").is_some_and(|(s, _, _)| s == 200) {
                return k;
            }
            assert!(
                Instant::now() < deadline,
                "ketenbus not ready:\n{}",
                k.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ketenbus.log")).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        let (status, ctype, body) = get(self.port, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        assert!(
            ctype.starts_with("text/plain; version=0.0.4"),
            "content type {ctype}"
        );
        body
    }

    fn post(&self, content_type: &str, body: &[u8]) -> u16 {
        http("POST", self.port, "/api/v1/messages", content_type, body)
            .expect("POST")
            .0
    }
}

impl Drop for Ketenbus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `series` (name with labels exactly as exported), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Wait until `f` on a fresh scrape says yes.
fn eventually(k: &Ketenbus, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = k.metrics();
        if f(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never showed:\n{text}\n--- log\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    tools();
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write to promtool");
    }
    drop(input);
    let out = child.wait_with_output().expect("promtool output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Metric names a PromQL expression refers to (functions, keywords, label names, grouping
/// lists, Grafana variables and durations left out).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const WORDS: [&str; 20] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "atan2",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        let mut j = i;
        while j < chars.len() {
            if chars[j] == open {
                depth += 1;
            } else if chars[j] == close {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_to(i, '{', '}');
        } else if c == '[' {
            i = skip_to(i, '[', ']');
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let variable = start > 0 && chars[start - 1] == '$';
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = j < chars.len() && chars[j] == '(';
            if GROUPING.contains(&word.as_str()) {
                if call {
                    i = skip_to(j, '(', ')');
                }
            } else if !variable && !call && !WORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Sample names in an exposition, with histogram families and their `_bucket`/`_sum`/`_count`.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line");
            names.insert(name.to_owned());
            if ty == "histogram" || ty == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') {
            names.insert(line.split(['{', ' ']).next().unwrap_or_default().to_owned());
        }
    }
    names
}

/// Names the broker defines but that only show once their first labelled event happened
/// (e.g. router dead letters per reason).
fn defined() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = ketenbus::observe::metrics::NAMES
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
    names.insert(format!(
        "{}_bucket",
        ketenbus::observe::metrics::DISPATCH_DELIVERY_LATENCY
    ));
    names.insert(format!(
        "{}_sum",
        ketenbus::observe::metrics::DISPATCH_DELIVERY_LATENCY
    ));
    names.insert(format!(
        "{}_count",
        ketenbus::observe::metrics::DISPATCH_DELIVERY_LATENCY
    ));
    names
}

/// `up` is made by Prometheus for every scrape target.
const SYNTHETIC: [&str; 1] = ["up"];

fn dashboard() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(ops("grafana/ketenbus.json")).expect("read dashboard"),
    )
    .expect("dashboard is JSON")
}

/// Every PromQL expression of the dashboard: panel targets and variable queries.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().expect("variables") {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .expect("variable query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map_or(q, |(sel, _)| sel);
            out.push(inner.to_owned());
        }
    }
    out
}

/// Grafana's variables replaced by what an "All" selection and a 1-minute step give.
fn instantiate(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$job", ".*")
        .replace("$instance", ".*")
        .replace("$subscription", ".*")
}

const EDIFACT: &[u8] =
    b"UNA:+.? 'UNB+UNOA:1+500001234+500005678+261124:0842+1'UNH+1+MEDLAB:1'UNT+2+1'UNZ+1+1'";

#[test]
fn metrics_pass_promtool_and_count_what_happens() {
    let k = Ketenbus::start();
    let first = k.metrics();
    let (ok, out) = promtool(&["check", "metrics"], Some(&first));
    assert!(
        ok,
        "promtool check metrics on a fresh broker:\n{out}\n{first}"
    );
    for name in [
        "ketenbus_build_info",
        "ketenbus_ingest_last_received_timestamp_seconds",
        "ketenbus_dispatch_consumer_lag_records",
        "ketenbus_dispatch_oldest_undelivered_age_seconds",
        "ketenbus_log_disk_usage_bytes",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(
            first.contains(&format!("\n{name}")),
            "{name} missing:\n{first}"
        );
    }
    assert!(
        sample(&first, "ketenbus_log_disk_usage_bytes").is_some_and(|b| b > 0.0),
        "{first}"
    );

    assert_eq!(k.post("application/EDIFACT", EDIFACT), 202);
    assert_eq!(k.post("application/pdf", b"%PDF"), 415);
    assert_eq!(k.post("application/EDIFACT", b""), 400);

    let after = eventually(&k, "delivery to archive, retries and age of stuck", |t| {
        sample(t, r#"ketenbus_dispatch_delivery_outcomes_total{outcome="delivered",subscription="archive"}"#) == Some(1.0)
            && sample(t, r#"ketenbus_dispatch_delivery_retries_total{reason="connect",subscription="stuck"}"#).is_some_and(|n| n >= 1.0)
            && sample(t, r#"ketenbus_dispatch_oldest_undelivered_age_seconds{kind="raw",subscription="stuck"}"#).is_some_and(|a| a > 0.0)
    });
    assert_eq!(
        k.delivered.load(Ordering::SeqCst),
        1,
        "the receiver got the envelope once"
    );
    assert_eq!(
        sample(
            &after,
            r#"ketenbus_ingest_received_messages_total{connector="http",format="edifact"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"ketenbus_ingest_received_bytes_total{connector="http",format="edifact"}"#
        ),
        Some(EDIFACT.len() as f64)
    );
    assert_eq!(
        sample(
            &after,
            r#"ketenbus_ingest_rejected_messages_total{connector="http",reason="unsupported_media_type"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            r#"ketenbus_ingest_rejected_messages_total{connector="http",reason="empty_body"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            r#"ketenbus_dispatch_delivery_latency_seconds_count{subscription="archive"}"#
        ),
        Some(1.0)
    );
    // Outstanding: in the lag while it is tried, in the oldest-undelivered age once it is
    // parked on the subscription's retry topic (its source offset is committed then).
    assert!(
        sample(
            &after,
            r#"ketenbus_dispatch_consumer_lag_records{kind="raw",subscription="stuck"}"#
        )
        .is_some_and(|n| n >= 1.0)
            || sample(
                &after,
                r#"ketenbus_dispatch_oldest_undelivered_age_seconds{kind="raw",subscription="stuck"}"#
            )
            .is_some_and(|s| s > 0.0),
        "stuck has the envelope outstanding:\n{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"ketenbus_dispatch_consumer_lag_records{kind="acute_handover",subscription="stuck"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &after,
            r#"ketenbus_dispatch_oldest_undelivered_age_seconds{kind="acute_handover",subscription="stuck"}"#
        ),
        Some(0.0)
    );
    // A delivered record whose commit is still pending is not "undelivered", however long the
    // broker stays idle; the stuck one keeps ageing.
    let later = eventually(&k, "the stuck record ageing past 6 s", |t| {
        sample(
            t,
            r#"ketenbus_dispatch_oldest_undelivered_age_seconds{kind="raw",subscription="stuck"}"#,
        )
        .is_some_and(|a| a >= 6.0)
    });
    assert_eq!(
        sample(
            &later,
            r#"ketenbus_dispatch_oldest_undelivered_age_seconds{kind="raw",subscription="archive"}"#
        ),
        Some(0.0),
        "{later}"
    );
    let (ok, out) = promtool(&["check", "metrics"], Some(&after));
    assert!(ok, "promtool check metrics after traffic:\n{out}\n{after}");
    assert!(
        !after.contains("500001234") && !after.contains("500005678"),
        "party ids leaked into metrics"
    );
}

#[test]
fn shipped_rules_and_config_pass_promtool() {
    let (ok, out) = promtool(
        &[
            "check",
            "rules",
            ops("prometheus/alerts.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, out) = promtool(
        &[
            "check",
            "config",
            ops("prometheus/prometheus.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{out}");
    let (ok, out) = promtool(
        &[
            "test",
            "rules",
            ops("prometheus/alerts_test.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{out}");
    // One unit test per alert.
    let rules = std::fs::read_to_string(ops("prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(ops("prometheus/alerts_test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for a in alerts {
        assert!(
            tests.contains(&format!(
                "alertname: {a}\n        exp_alerts:\n          - exp_labels"
            )),
            "no firing test for {a}"
        );
    }
}

#[test]
fn dashboard_structure_and_names() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    assert!(
        d["uid"].is_string()
            && d["title"].is_string()
            && d["schemaVersion"].as_u64().is_some_and(|v| v >= 30)
    );

    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        for key in ["h", "w", "x", "y"] {
            assert!(
                p["gridPos"][key].is_u64(),
                "gridPos.{key} of {}",
                p["title"]
            );
        }
        assert!(
            p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24,
            "{} is wider than the grid",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        titles.push(p["title"].as_str().expect("title").to_lowercase());
        assert_eq!(
            p["datasource"]["uid"],
            ds_ref.as_str(),
            "panel {} must use the datasource variable",
            p["title"]
        );
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("{} has no targets", p["title"]));
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "duplicate refId in {}",
                p["title"]
            );
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str());
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "empty expr in {}",
                p["title"]
            );
        }
    }
    for topic in [
        "received per connector",
        "deliveries per subscription",
        "dead letters",
        "latency",
        "lag",
        "oldest undelivered",
        "memory",
        "cpu",
        "file descriptors",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no panel about {topic}: {titles:?}"
        );
    }

    let k = Ketenbus::start();
    let live = exported(&k.metrics());
    let known: BTreeSet<String> = live.union(&defined()).cloned().collect();
    let mut used = BTreeSet::new();
    for e in dashboard_exprs(&d) {
        let names = metric_names(&e);
        assert!(!names.is_empty(), "no metric in {e}");
        for n in names {
            assert!(
                known.contains(&n) || SYNTHETIC.contains(&n.as_str()),
                "dashboard uses {n}, which ketenbus does not export ({e})"
            );
            used.insert(n);
        }
    }
    for n in [
        "ketenbus_dispatch_oldest_undelivered_age_seconds",
        "ketenbus_dispatch_delivery_latency_seconds_bucket",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(n), "dashboard does not show {n}");
    }
}

#[test]
fn names_are_found_in_promql() {
    let n = metric_names(
        r#"histogram_quantile(0.95, sum by (subscription, le) (rate(ketenbus_dispatch_delivery_latency_seconds_bucket{job=~"$job", x="a{b}"}[$__rate_interval]))) / on (job) group_left (version) ketenbus_build_info and time() - up offset 5m > 1e3"#,
    );
    let want: BTreeSet<String> = [
        "ketenbus_dispatch_delivery_latency_seconds_bucket",
        "ketenbus_build_info",
        "up",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(n, want);
}

struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn query(port: u16, q: &str) -> Value {
    let mut enc = String::new();
    for b in q.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    let (status, _, body) =
        get(port, &format!("/api/v1/query?query={enc}")).expect("query Prometheus");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(status, 200, "query {q}: {body}");
    assert_eq!(v["status"], "success", "query {q}: {body}");
    v
}

#[test]
fn real_prometheus_scrapes_ketenbus() {
    tools();
    let k = Ketenbus::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // The shipped scrape config, pointed at this broker and scraping every second.
    let shipped =
        std::fs::read_to_string(ops("prometheus/prometheus.yml")).expect("read prometheus.yml");
    assert!(
        shipped.contains("\"127.0.0.1:8080\""),
        "the shipped config scrapes 127.0.0.1:8080"
    );
    let config = shipped
        .replace("\"127.0.0.1:8080\"", &format!("\"127.0.0.1:{}\"", k.port))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace(
            "  - alerts.yml",
            &format!("  - {}", ops("prometheus/alerts.yml").display()),
        );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).expect("write prometheus.yml");
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", path.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let log_path = dir.path().join("prometheus.log");
    let mut prom = Prometheus { child, _dir: dir };
    let plog = || std::fs::read_to_string(&log_path).unwrap_or_default();

    assert_eq!(k.post("application/EDIFACT", EDIFACT), 202);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(Some(status)) = prom.child.try_wait() {
            panic!("prometheus exited with {status}:\n{}", plog());
        }
        if get(port, "/-/ready").is_some_and(|(s, _, _)| s == 200) {
            let v = query(
                port,
                r#"ketenbus_ingest_received_messages_total{job="ketenbus",connector="http",format="edifact"}"#,
            );
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| r.len() == 1 && r[0]["value"][1] == "1")
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no ketenbus series in Prometheus:\n{}",
            plog()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let up = query(port, r#"up{job="ketenbus"}"#);
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let rss = query(port, r#"process_resident_memory_bytes{job="ketenbus"}"#);
    let bytes: f64 = rss["data"]["result"][0]["value"][1]
        .as_str()
        .expect("rss")
        .parse()
        .expect("number");
    assert!(bytes > 1e6, "resident memory {bytes}");
    let subs = query(
        port,
        r#"count by (subscription) (ketenbus_dispatch_delivery_outcomes_total{job="ketenbus"})"#,
    );
    assert_eq!(
        subs["data"]["result"].as_array().map(Vec::len),
        Some(2),
        "{subs}"
    );

    // Every dashboard expression returns data from this Prometheus scraping this broker: a
    // series with a number (not NaN), as each Grafana panel would draw it. Grafana itself is
    // not installable from the registries this project reaches (ops/OPERATING.md, Grafana).
    let exprs = dashboard_exprs(&dashboard());
    assert!(exprs.len() >= 25, "{exprs:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Traffic while Prometheus watches, so rates and latency percentiles have something.
        assert_eq!(k.post("application/EDIFACT", EDIFACT), 202);
        let empty: Vec<&String> = exprs
            .iter()
            .filter(|e| {
                let v = query(port, &instantiate(e));
                !v["data"]["result"].as_array().is_some_and(|r| {
                    r.iter()
                        .any(|s| s["value"][1].as_str().is_some_and(|n| n != "NaN"))
                })
            })
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard queries without data after 60 s: {empty:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The rules are loaded, healthy, and name only exported metrics.
    let (status, _, body) = get(port, "/api/v1/rules").expect("rules");
    assert_eq!(status, 200, "{body}");
    let rules: Value = serde_json::from_str(&body).expect("rules JSON");
    let known: BTreeSet<String> = exported(&k.metrics()).union(&defined()).cloned().collect();
    let mut count = 0;
    for g in rules["data"]["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            count += 1;
            assert_ne!(r["health"], "err", "{r}");
            for n in metric_names(r["query"].as_str().expect("query")) {
                assert!(
                    known.contains(&n) || SYNTHETIC.contains(&n.as_str()),
                    "rule {} uses {n}, which ketenbus does not export",
                    r["name"]
                );
            }
        }
    }
    assert!(count >= 6, "{rules}");
}
