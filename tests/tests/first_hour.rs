//! What an integration engineer meets in the first hour, through the real binary:
//! `check-config` names every error at once, `inspect` says no to what the router would
//! refuse and stops quietly under `| head`, logs carry no terminal colours into files, and
//! the SMTP start-up line names its address plainly.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::process::Command;
use std::time::Duration;

use ketenbus_tests::{AUDIT_KEY, Broker, MEDLAB, check_config, free_port, ketenbus_bin};

fn stdout_of(args: &[&str], file: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(ketenbus_bin())
        .args(args)
        .arg(file)
        .env("KETENBUS_AUDIT_KEY", AUDIT_KEY)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_every_type_error_with_an_example_and_counts_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[http]\nlisten = \"localhost\"\ningest_timeout = \"soon\"\n\
         [[inbox]]\npath = \"/tmp\"\nmax_size = \"huge\"\n\
         [[subscriptions]]\nname = \"gp\"\nkinds = [\"lab_result\"]\n\
         sink = { type = \"webhook\", url = \"http://127.0.0.1:1/\" }\n\
         retry = { initial = \"soon\", max = \"later\" }\n",
    )
    .unwrap();
    let (ok, err) = check_config(&bad, &[]);
    assert!(!ok);
    let name = bad.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 6, "five errors and the count:\n{err}");
    for (line, (path, example)) in lines.iter().zip([
        ("http.listen", "\"127.0.0.1:8080\""),
        ("http.ingest_timeout", "\"30s\", \"5m\""),
        ("inbox[0].max_size", "\"25 MiB\""),
        ("subscriptions[0].retry.initial", "\"30s\", \"5m\""),
        ("subscriptions[0].retry.max", "\"30s\", \"5m\""),
    ]) {
        assert!(line.starts_with(&format!("{name}: {path}: ")), "{line}");
        assert!(line.contains(example), "{line}");
        assert!(line.contains("(line "), "{line}");
    }
    assert_eq!(lines[5], "5 problems");

    // A file that is not there is named once.
    let missing = dir.path().join("missing.toml");
    let (ok, err) = check_config(&missing, &[]);
    assert!(!ok);
    assert_eq!(err.matches("missing.toml").count(), 1, "{err}");
    assert!(err.contains("cannot read the file"), "{err}");
    assert!(err.ends_with("1 problem\n"), "{err}");

    // One subscription is one, not "1 subscriptions".
    for (n, said) in [(1, "(1 subscription,"), (2, "(2 subscriptions,")] {
        let good = dir.path().join(format!("good{n}.toml"));
        let subs: String = (0..n)
            .map(|i| {
                format!(
                    "[[subscriptions]]\nname = \"s{i}\"\nkinds = [\"raw\"]\nsink = {{ type = \"webhook\", url = \"http://127.0.0.1:1/\" }}\n"
                )
            })
            .collect();
        std::fs::write(&good, subs).unwrap();
        let (ok, out, err) = stdout_of(&["check-config", "--config"], &good);
        assert!(ok, "{err}");
        assert!(out.contains(said), "{out}");
    }
}

#[test]
fn inspect_exits_non_zero_for_what_the_router_would_reject() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.edi");
    std::fs::write(&good, MEDLAB).unwrap();
    let (ok, out, err) = stdout_of(&["inspect"], &good);
    assert!(ok, "{err}");
    assert!(out.contains("\"lab_result\""), "{out}");

    // It parses, but no normaliser takes an ORDERS message: the router dead-letters it.
    let orders = dir.path().join("orders.edi");
    std::fs::write(
        &orders,
        "UNB+UNOA:1+500001234+500005678+261101:0815+IC7'UNH+M7+ORDERS:D:96A:UN'BGM+220+PO7'UNT+3+M7'UNZ+1+IC7'",
    )
    .unwrap();
    let (ok, out, err) = stdout_of(&["inspect"], &orders);
    assert!(!ok, "{out}");
    assert!(
        out.contains("\"rejected\""),
        "what it read is still printed: {out}"
    );
    assert!(err.contains("the router would reject it"), "{err}");
}

#[test]
fn inspect_into_head_stops_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.edi");
    // A lab report with 3,000 results: far more JSON than a pipe holds.
    let mut text = String::from(
        "UNB+UNOA:1+500001234+500005678+261101:0815+IC9'UNH+M9+MEDLAB:1'PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN999911120'DET+26:11:01+07:40'IDE+J+L9+bloed'",
    );
    for _ in 0..3000 {
        text.push_str("BEP+0+Kalium+5.9++mmol/l+>+3.5+5.0+K'");
    }
    text.push_str(&format!("UNT+{}+M9'UNZ+1+IC9'", 3000 + 5));
    std::fs::write(&file, text).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg("\"$0\" inspect \"$1\" | head -1; echo \"exit=${PIPESTATUS[0]}\" >&2")
        .arg(ketenbus_bin())
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, "{\n");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim(), "exit=0", "{stderr}");
}

#[test]
fn logs_in_a_file_have_no_colours_and_the_smtp_line_names_its_address() {
    let port = free_port();
    let broker = Broker::start(&format!(
        "\n[mail.smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"ketenbus.test\"\naccept_domains = [\"example.test\"]\n"
    ));
    let wanted = format!("listen=127.0.0.1:{port}");
    let said = ketenbus_tests::within_blocking(Duration::from_secs(10), || {
        broker.log_text().contains("smtp listener running")
    });
    let log = broker.log_text();
    assert!(said.is_ok(), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("smtp listener running"))
        .unwrap();
    let plain = without_colours(line);
    assert!(plain.contains(&wanted), "{plain}");
    assert!(!plain.contains("Some("), "{plain}");
    assert!(
        !log.contains('\u{1b}'),
        "terminal colour codes in a log file:\n{log}"
    );
}

/// `line` without terminal colour codes (`ESC [ ... letter`).
fn without_colours(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(char::is_ascii_alphabetic);
        } else {
            out.push(c);
        }
    }
    out
}
