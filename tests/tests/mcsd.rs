//! The address book from an mCSD directory, through real sockets: the broker replicates a
//! directory (`tests/mcsd/mcsd_peer.py`, written apart from the product code from the FHIR
//! R4 search / history interactions that IHE mCSD ITI-91 uses) and delivers each record to
//! the webhook endpoint its receiver's Organization lists; it follows changes made in the
//! directory, continues after a restart without loading everything again, and keeps
//! delivering from its replica while the directory is down.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ketenbus_tests::ca::Ca;
use ketenbus_tests::{Broker, Receiver, free_port};
use serde_json::{Value, json};

/// Nictiz Acute Zorg example (CC0, synthetic patient): an ambulance referral. Its
/// MessageHeader gets a receiver from the synthetic directory fixture (ura:90000001).
const AZ_REFERRAL: &str = include_str!(
    "../../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
);
const DIRECTORY: &str = include_str!("../fixtures/mcsd/directory.json");

struct Peer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Peer {
    fn start(dir: &Path, resources: &Value) -> Peer {
        Peer::start_with(dir, resources, &[])
    }

    /// With `tls` = [--cert, FILE, --key, FILE, --client-ca, FILE]: mTLS only.
    fn start_with(dir: &Path, resources: &Value, tls: &[&Path]) -> Peer {
        let load = dir.join("directory.json");
        std::fs::write(&load, resources.to_string()).unwrap();
        let port = free_port();
        let python = std::env::var("KETENBUS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/mcsd/mcsd_peer.py"))
            .args(["--port", &port.to_string()])
            .arg("--load")
            .arg(&load)
            .args(
                tls.iter()
                    .zip(["--cert", "--key", "--client-ca"])
                    .flat_map(|(f, a)| [std::ffi::OsStr::new(a), f.as_os_str()]),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("peer.stderr")).unwrap())
            .spawn()
            .expect("python3 runs the mCSD peer");
        let addr = format!("127.0.0.1:{port}");
        ketenbus_tests::eventually_blocking(
            Duration::from_secs(10),
            "the mCSD peer to listen",
            || std::net::TcpStream::connect(&addr).is_ok(),
        );
        Peer {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn put(&self, resource: &Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/_admin/put", self.url()))
            .body(resource.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    async fn down(&self, down: bool) {
        reqwest::Client::new()
            .post(format!("{}/_admin/down", self.url()))
            .body(if down { "1" } else { "0" })
            .send()
            .await
            .unwrap();
    }

    async fn requests(&self) -> Vec<String> {
        reqwest::get(format!("{}/_admin/requests", self.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
        let _ = &self.dir;
    }
}

/// The fixture with `ura:90000001`'s webhook endpoint at `hook`.
fn directory(hook: &str) -> Value {
    let mut all: Value = serde_json::from_str(DIRECTORY).unwrap();
    for r in all.as_array_mut().unwrap() {
        if r["id"] == "ep-linde-hook" {
            r["address"] = json!(hook);
        }
    }
    all
}

fn endpoint(all: &Value, id: &str) -> Value {
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap()
        .clone()
}

fn referral_to(ura: &str) -> Vec<u8> {
    let mut b: Value = serde_json::from_str(AZ_REFERRAL).unwrap();
    b["entry"][0]["resource"]["destination"][0]["receiver"] = json!({
        "identifier": {"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": ura}
    });
    b.to_string().into_bytes()
}

async fn post(broker: &Broker, ura: &str) {
    let (status, body) = ketenbus_tests::post_message(
        &reqwest::Client::new(),
        &broker.url,
        "application/fhir+json",
        referral_to(ura),
    )
    .await
    .unwrap();
    assert_eq!(status, 202, "{body}");
}

fn config(peer: &Peer) -> String {
    format!(
        "[[mcsd]]\nname = \"test\"\nbase_url = \"{}\"\npoll_interval = \"300ms\"\npage_size = 2\n\
         [[subscriptions]]\nname = \"by-directory\"\nkinds = [\"raw\"]\nsink = {{ type = \"webhook\" }}\n\
         [subscriptions.retry]\ninitial = \"200ms\"\nmax = \"500ms\"\n",
        peer.url()
    )
}

/// The value of `metric{directory="test"<more>}`.
async fn metric(broker: &Broker, name: &str, more: &str) -> f64 {
    let text = broker.metrics().await;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{directory=\"test\"{more}}}")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

/// Wait until the broker reports a successful sync.
async fn synced(broker: &Broker, what: &str) {
    broker
        .eventually(Duration::from_secs(20), what, async || {
            metric(
                broker,
                "ketenbus_dispatch_mcsd_last_sync_timestamp_seconds",
                "",
            )
            .await
                > 0.0
        })
        .await;
}

fn replica_holds(broker_dir: &Path, text: &str) -> bool {
    std::fs::read_to_string(broker_dir.join("data/mcsd/test.json")).is_ok_and(|t| t.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_follow_the_directory_across_changes_restarts_and_outages() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second, third) = (
        Receiver::ok().await,
        Receiver::ok().await,
        Receiver::ok().await,
    );
    let all = directory(&first.url());
    let peer = Peer::start(tmp.path(), &all);
    let mut broker = Broker::prepare(tmp.path(), &config(&peer));
    broker.spawn();

    // Initial load: paged searches, then the first delivery to the listed endpoint.
    synced(&broker, "the first sync").await;
    let searched = peer.requests().await;
    for t in ["Organization", "Endpoint", "HealthcareService", "Location"] {
        assert!(
            searched
                .iter()
                .any(|r| r.starts_with(&format!("/{t}?_count=2"))),
            "{searched:?}"
        );
    }
    assert!(
        searched.iter().any(|r| r.contains("_offset=")),
        "the next links were followed: {searched:?}"
    );
    post(&broker, "90000001").await;
    let got = first.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "first: {}", broker.log_text());

    // An incremental change: the endpoint's address moves; the next delivery goes there.
    let mut moved = endpoint(&all, "ep-linde-hook");
    moved["address"] = json!(second.url());
    peer.put(&moved).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "the change in the replica",
            async || replica_holds(tmp.path(), &second.url()),
        )
        .await;
    assert!(
        peer.requests()
            .await
            .iter()
            .any(|r| r.starts_with("/Endpoint/_history?_since=")),
        "updates are read from the history"
    );
    post(&broker, "90000001").await;
    let got = second.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "second: {}", broker.log_text());

    // The endpoint's period ends and a successor starts: deliveries go to the successor.
    let mut ended = moved.clone();
    ended["period"] = json!({"start": "2020-01-01", "end": "2026-01-01"});
    let mut successor = moved.clone();
    successor["id"] = json!("ep-linde-hook-2");
    successor["address"] = json!(third.url());
    successor["period"] = json!({"start": "2026-01-01"});
    peer.put(&successor).await;
    peer.put(&ended).await;
    let mut org = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "org-linde")
        .unwrap()
        .clone();
    org["endpoint"]
        .as_array_mut()
        .unwrap()
        .push(json!({"reference": "Endpoint/ep-linde-hook-2"}));
    peer.put(&org).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "the successor in the replica",
            async || {
                replica_holds(tmp.path(), "Endpoint/ep-linde-hook-2")
                    && replica_holds(tmp.path(), "2026-01-01\"}")
            },
        )
        .await;
    post(&broker, "90000001").await;
    let got = third.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "third: {}", broker.log_text());
    assert_eq!(
        second.received().len(),
        1,
        "the ended endpoint got nothing more"
    );

    // `address resolve` says where a record goes and why the others were passed over.
    let (ok, out, err) =
        broker.cli(&["address", "resolve", "ura:90000001", "--channel", "webhook"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("webhook: {}", third.url()))
            && out.contains("from: mcsd test: Organization/org-linde -> Endpoint/ep-linde-hook-2")
            && out
                .contains("skipped in mcsd test: Endpoint/ep-linde-hook: period ended 2026-01-01"),
        "{out}"
    );
    let (ok, out, _) = broker.cli(&["address", "resolve", "ura:90000001", "--channel", "fhir"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("fhir: https://fhir.linde.example.test/r4")
            && out.contains("Endpoint/ep-linde-fhir-stu3: payloadMimeType"),
        "{out}"
    );
    // A switch of FHIR version: the R4 endpoint now states STU3 only; nothing fits.
    let mut stu3 = endpoint(&all, "ep-linde-fhir");
    stu3["payloadMimeType"] = json!(["application/fhir+json; fhirVersion=3.0"]);
    peer.put(&stu3).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "the version switch in the replica",
            async || !replica_holds(tmp.path(), "fhirVersion=4.0"),
        )
        .await;
    let (ok, out, _) = broker.cli(&["address", "resolve", "ura:90000001", "--channel", "fhir"]);
    assert!(!ok, "nothing fits: {out}");
    assert!(
        out.contains("fhir: nothing fits")
            && out.contains("Endpoint/ep-linde-fhir: payloadMimeType"),
        "{out}"
    );
    let (ok, out, _) = broker.cli(&["address", "resolve", "ura:12345678"]);
    assert!(
        !ok && out.contains("no active Organization or HealthcareService"),
        "{out}"
    );

    // A restart continues with _since: no search without it.
    broker.kill();
    let before = peer.requests().await.len();
    broker.spawn();
    synced(&broker, "a sync after the restart").await;
    let after: Vec<String> = peer.requests().await[before..].to_vec();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|r| r.contains("/_history?_since=")),
        "a restart reads only the history: {after:?}"
    );

    // The directory is down: the failure is counted, deliveries use the replica.
    peer.down(true).await;
    broker
        .eventually(
            Duration::from_secs(20),
            "a counted sync failure",
            async || {
                metric(
                    &broker,
                    "ketenbus_dispatch_mcsd_sync_outcomes_total",
                    ",outcome=\"failed\"",
                )
                .await
                    >= 1.0
            },
        )
        .await;
    // (A record delivered just before the kill may come again after the restart.)
    let seen = third.received().len();
    post(&broker, "90000001").await;
    let got = third.wait_for(seen + 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), seen + 1, "third: {}", broker.log_text());
    assert!(broker.log_text().contains("mcsd sync failed"));
    peer.down(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_read_over_mtls_and_a_client_without_its_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server_ca = Ca::new(tmp.path(), "directory-server");
    let client_ca = Ca::new(tmp.path(), "directory-clients");
    let rogue_ca = Ca::new(tmp.path(), "rogue");
    let (cert, key) = server_ca.issue("directory", true);
    let client = client_ca.issue("ketenbus-party", false);
    let rogue = rogue_ca.issue("ketenbus-rogue", false);
    let hook = Receiver::ok().await;
    let peer = Peer::start_with(
        tmp.path(),
        &directory(&hook.url()),
        &[&cert, &key, &client_ca.file()],
    );
    let https = peer.url().replace("http://", "https://");
    let source = |name: &str, (c, k): &(PathBuf, PathBuf)| {
        format!(
            "[[mcsd]]\nname = \"{name}\"\nbase_url = \"{https}\"\ncert_file = {c:?}\nkey_file = {k:?}\n\
             ca_files = [{:?}]\npoll_interval = \"300ms\"\n",
            server_ca.file()
        )
    };
    let party = tmp.path().join("party");
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&party).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let mut good = Broker::prepare(
        &party,
        &format!(
            "{}[[subscriptions]]\nname = \"by-directory\"\nkinds = [\"raw\"]\nsink = {{ type = \"webhook\" }}\n",
            source("test", &client)
        ),
    );
    good.spawn();
    synced(&good, "a sync over mTLS").await;
    post(&good, "90000001").await;
    let got = hook.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", good.log_text());

    let mut refused = Broker::prepare(&other, &source("test", &rogue));
    refused.spawn();
    refused
        .eventually(Duration::from_secs(20), "a refused sync", async || {
            metric(
                &refused,
                "ketenbus_dispatch_mcsd_sync_outcomes_total",
                ",outcome=\"failed\"",
            )
            .await
                >= 1.0
        })
        .await;
    assert!(
        metric(
            &refused,
            "ketenbus_dispatch_mcsd_last_sync_timestamp_seconds",
            ""
        )
        .await
            == 0.0
    );
    assert!(!other.join("data/mcsd/test.json").exists());
}
