//! README's quick start, followed word for word: the commands are taken from README.md
//! itself (the `sh` blocks after the `<!-- quickstart: serve` and `<!-- quickstart: send`
//! markers), so the README and this test cannot drift apart. The event must reach the
//! example receiver (`ops/quickstart/receiver.py`) with a valid signature.
//!
//! What is substituted, and only that (each substitution must hit, or the test fails):
//! - `cargo run --release -p ketenbus --` becomes this build's `target/debug/ketenbus`
//!   (the release build would cost minutes; it is the same code);
//! - the ports `8080` and `8081` become free ports, in the commands and in the copy of
//!   `ops/quickstart/ketenbus.toml`, so tests can run side by side;
//! - the commands run in a temporary directory holding a copy of `ops/quickstart/` (the
//!   README runs them from the repository root), so the broker's `./data` lands there.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ketenbus_tests::{eventually, free_port, ketenbus_bin, lineage_until};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The lines of the `sh` block after the marker `<!-- quickstart: NAME`.
fn block(readme: &str, name: &str) -> Vec<String> {
    let marker = format!("<!-- quickstart: {name}");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker} marker"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let end = rest[start..].find("```").expect("the block ends");
    rest[start..start + end]
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `text` with `from` replaced by `to`, which must occur.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in {text:?}");
    text.replace(from, to)
}

/// Long-running commands, each in its own process group, stopped when dropped.
struct Serving(Vec<Child>);

impl Drop for Serving {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // The whole group: bash and what it started.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn the_readme_quick_start_delivers_a_signed_lab_result_to_the_example_receiver() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let (http, rx) = (free_port(), free_port());
    let ports = |line: &str| {
        line.replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
            .replace("8081", &rx.to_string())
    };
    let bin = ketenbus_bin();

    // The files, as the README's commands find them under ops/quickstart/.
    let dir = tempfile::tempdir().unwrap();
    let quickstart = dir.path().join("ops/quickstart");
    std::fs::create_dir_all(&quickstart).unwrap();
    for f in ["medlab.edi", "receiver.py", "ketenbus.toml"] {
        let text = std::fs::read_to_string(repo().join("ops/quickstart").join(f)).unwrap();
        let text = if f == "ketenbus.toml" {
            substitute(
                &substitute(&text, "127.0.0.1:8080", &format!("127.0.0.1:{http}")),
                "127.0.0.1:8081",
                &format!("127.0.0.1:{rx}"),
            )
        } else {
            text
        };
        std::fs::write(quickstart.join(f), text).unwrap();
    }

    let serve = block(&readme, "serve");
    assert_eq!(serve.len(), 2, "receiver and broker: {serve:?}");
    assert!(serve[0].contains("receiver.py 8081"), "{serve:?}");
    let mut serving = Serving(Vec::new());
    let mut outputs = Vec::new();
    for (i, line) in serve.iter().enumerate() {
        let mut line = ports(line);
        if line.contains("cargo run") {
            line = substitute(
                &line,
                "cargo run --release -p ketenbus --",
                bin.to_str().unwrap(),
            );
        }
        let out = dir.path().join(format!("serve-{i}.out"));
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new("bash")
            .arg("-c")
            .arg(&line)
            .current_dir(dir.path())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        serving.0.push(child);
        outputs.push((line, out));
    }
    let logs = || {
        outputs
            .iter()
            .map(|(line, out)| {
                format!(
                    "$ {line}\n{}",
                    std::fs::read_to_string(out).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let up = async || {
        let ready = reqwest::get(format!("http://127.0.0.1:{http}/readyz")).await;
        let rx_up = std::net::TcpStream::connect(("127.0.0.1", rx)).is_ok();
        ready.is_ok_and(|r| r.status() == 200) && rx_up
    };
    if ketenbus_tests::within(Duration::from_secs(30), up)
        .await
        .is_err()
    {
        panic!("receiver and broker did not come up:\n{}", logs());
    }

    // The third terminal: one bash script, as a reader would paste it.
    let send = block(&readme, "send").join("\n");
    assert!(send.contains("http://127.0.0.1:8080/"), "{send}");
    let send = ports(&send);
    let sent = Command::new("bash")
        .arg("-c")
        .arg(&send)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&sent.stdout).into_owned();
    assert!(
        sent.status.success(),
        "{send}\n{printed}\n{}\n{}",
        String::from_utf8_lossy(&sent.stderr),
        logs()
    );
    // It printed the lineage of the message it posted.
    let lineage: serde_json::Value = serde_json::from_str(&printed)
        .unwrap_or_else(|e| panic!("the lineage as JSON: {e}\n{printed}"));
    let id = lineage["id"].as_str().expect("an id").to_owned();
    assert_eq!(lineage["connector"], "http", "{lineage:#}");
    assert_eq!(lineage["sender"], "mailbox:500001234", "{lineage:#}");
    assert_eq!(lineage["receiver"], "mailbox:500005678", "{lineage:#}");

    // The receiver checked the signature and took the event.
    let receiver_out = &outputs[0].1;
    let wanted = format!("signature ok lab_result {id}.0");
    let got = eventually(
        Duration::from_secs(20),
        "the receiver to take the event",
        async || {
            let text = std::fs::read_to_string(receiver_out).unwrap_or_default();
            text.contains(&wanted).then_some(text)
        },
    )
    .await;
    assert!(!got.contains("BAD"), "{got}");
    let base = format!("http://127.0.0.1:{http}");
    lineage_until(&base, &id, |l| {
        l["deliveries"].as_array().is_some_and(|d| {
            d.iter()
                .any(|d| d["subscription"] == "quickstart" && d["outcome"] == "delivered")
        })
    })
    .await;

    // The receiver really checks: a forged signature is refused and printed as BAD.
    let forged = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{rx}/events"))
        .header("Ketenbus-Signature", format!("sha256={}", "0".repeat(64)))
        .header("Ketenbus-Kind", "lab_result")
        .header("Idempotency-Key", "forged")
        .body("{\"forged\":true}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let text = eventually(Duration::from_secs(5), "the BAD line", async || {
        let text = std::fs::read_to_string(receiver_out).unwrap_or_default();
        text.contains("signature BAD lab_result forged")
            .then_some(text)
    })
    .await;
    assert_eq!(text.matches("signature ok").count(), 1, "{text}");
}

/// The quick start's MEDLAB file is ketenbus's own fixture, byte for byte (its PROVENANCE).
#[test]
fn the_quick_start_medlab_is_the_project_fixture() {
    let ours = std::fs::read(repo().join("ops/quickstart/medlab.edi")).unwrap();
    let fixture = std::fs::read(
        repo().join("connectors/testdata/edifact/ketenbus/medlab-standards-example.edi"),
    )
    .unwrap();
    assert_eq!(ours, fixture);
}

/// The README says plainly what a start without a config delivers, and so do `--help` and
/// the broker's own log.
#[test]
fn no_config_means_no_subscriptions_and_every_place_says_so() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("Without a config file ketenbus has **no subscriptions**"));
    let guide = std::fs::read_to_string(repo().join("ops/OPERATING.md")).unwrap();
    assert!(guide.contains("`ketenbus run` without `--config` has **no subscriptions**"));
    assert!(guide.contains("ops/quickstart/ketenbus.toml"));
    let help = Command::new(ketenbus_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("no subscriptions"), "{help}");
    assert!(help.contains("delivers nothing"), "{help}");
    let run_help = Command::new(ketenbus_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let run_help = String::from_utf8_lossy(&run_help.stdout);
    assert!(
        run_help.contains("ops/quickstart/ketenbus.toml"),
        "{run_help}"
    );
    assert!(run_help.contains("nothing is delivered"), "{run_help}");
    let broker = ketenbus_tests::Broker::start("");
    let said = ketenbus_tests::within_blocking(Duration::from_secs(10), || {
        broker
            .log_text()
            .contains("no subscriptions configured: messages are taken in and normalised, nothing is delivered")
    });
    assert!(said.is_ok(), "{}", broker.log_text());
}
