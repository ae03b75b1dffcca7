//! Consent from Mitz, through real sockets: the broker asks a Mitz test peer
//! (`tests/mitz/mitz_peer.py`, written apart from the product code, Python standard library)
//! the closed question over mTLS, follows its answers, subscribes to consent changes and
//! takes the peer's change notification, and waits (retries) while the peer is slow or down.
//! Certificates are made here at run time with rcgen; no key material is committed.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ketenbus_tests::ca::Ca;
use ketenbus_tests::{Broker, Receiver, eventually, free_port, lineage_until, medlab};

const PATIENT_KEY_SECRET: &str = "patient-key-secret-for-the-mitz-tests-0123";
const NOTIFY_SECRET: &str = "mitz-notify-secret-for-the-tests-0123456789";
/// Synthetic patients (BSNs passing the eleven-test): A, B, C.
const BSN_A: &str = "999990007";
const BSN_B: &str = "999990019";
const BSN_C: &str = "999990020";

/// The Mitz test peer: a Python process on its own port, its behaviour in a state file.
struct MitzPeer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Mitz's server CA (what ketenbus trusts).
    server_ca: PathBuf,
    /// The client certificate the peer accepts (ketenbus's party certificate).
    client: (PathBuf, PathBuf),
    /// A client certificate from a CA the peer does not accept.
    rogue: (PathBuf, PathBuf),
}

impl MitzPeer {
    /// Certificates and state in `dir`; not started.
    fn prepare(dir: &Path, state: &serde_json::Value) -> MitzPeer {
        let server_ca = Ca::new(dir, "mitz-server");
        let client_ca = Ca::new(dir, "mitz-clients");
        let rogue_ca = Ca::new(dir, "rogue");
        server_ca.issue("mitz", true);
        let peer = MitzPeer {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            server_ca: server_ca.file(),
            client: client_ca.issue("ketenbus-holder", false),
            rogue: rogue_ca.issue("ketenbus-rogue", false),
        };
        peer.set(state);
        peer
    }

    /// Prepared and started.
    fn running(dir: &Path, state: &serde_json::Value) -> MitzPeer {
        let mut peer = MitzPeer::prepare(dir, state);
        peer.start();
        peer
    }

    fn set(&self, state: &serde_json::Value) {
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, state.to_string()).unwrap();
        std::fs::rename(tmp, self.dir.join("state.json")).unwrap();
    }

    fn start(&mut self) {
        let python = std::env::var("KETENBUS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/mitz/mitz_peer.py");
        let child = Command::new(python)
            .arg(script)
            .args(["--port", &self.port.to_string()])
            .arg("--cert")
            .arg(self.dir.join("mitz.crt"))
            .arg("--key")
            .arg(self.dir.join("mitz.key"))
            .arg("--client-ca")
            .arg(self.dir.join("mitz-clients-ca.pem"))
            .arg("--state")
            .arg(self.dir.join("state.json"))
            .arg("--log")
            .arg(self.dir.join("peer.jsonl"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("peer.stderr")).unwrap())
            .spawn()
            .expect("python3 runs the Mitz peer");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        ketenbus_tests::eventually_blocking(
            Duration::from_secs(10),
            "the Mitz peer to listen",
            || std::net::TcpStream::connect(&addr).is_ok(),
        );
    }

    /// Down: the process is gone, its port refuses connections.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("peer.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn questions(&self) -> Vec<serde_json::Value> {
        self.log()
            .into_iter()
            .filter(|r| r["kind"] == "question")
            .collect()
    }

    /// `[consent.mitz]` for this peer; `notify_url` filled in once the broker's port is known.
    fn config(&self, extra: &str) -> String {
        format!(
            "[keys]\npatient_key_secret_env = \"TEST_PATIENT_KEY\"\n\
             [consent.mitz]\nbase_url = \"https://127.0.0.1:{}\"\ncert_file = {:?}\nkey_file = {:?}\n\
             ca_files = [{:?}]\nprovider_id = \"ura:00000659\"\nprovider_type = \"Z3\"\n\
             party_types = {{ \"ura:12345678\" = \"Z3\" }}\ncache_time = \"1h\"\ntimeout = \"1s\"\n\
             notify_url = \"NOTIFY_URL\"\nnotify_secret_env = \"TEST_MITZ_SECRET\"\n{extra}",
            self.port, self.client.0, self.client.1, self.server_ca
        )
    }
}

impl Drop for MitzPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A broker in `dir` with `extra`, its notify_url pointing at its own notification endpoint.
fn broker(dir: &Path, extra: &str) -> Broker {
    let mut b = Broker::prepare(dir, extra);
    let text = std::fs::read_to_string(&b.config)
        .unwrap()
        .replace("NOTIFY_URL", &format!("{}/consent/mitz/notify", b.url));
    std::fs::write(&b.config, text).unwrap();
    b.set_env(&[
        ("TEST_PATIENT_KEY", PATIENT_KEY_SECRET),
        ("TEST_MITZ_SECRET", NOTIFY_SECRET),
    ]);
    b.spawn();
    b
}

fn subscription(name: &str, url: &str, default: &str) -> String {
    format!(
        "{}consent = {{ party = \"ura:12345678\", purpose = \"treatment\", default = \"{default}\" }}\n\
         [subscriptions.retry]\ninitial = \"200ms\"\nmax = \"500ms\"\n",
        ketenbus_tests::webhook_subscription(name, "\"lab_result\"", url, "")
    )
}

async fn post_lab(base: &str, n: usize, bsn: &str) -> String {
    let (status, body) = ketenbus_tests::post_message(
        &reqwest::Client::new(),
        base,
        "application/EDIFACT",
        medlab(n, "500001234", bsn),
    )
    .await
    .unwrap();
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// The last delivery step of `subscription` in a lineage: (outcome, reason).
fn last_step(l: &serde_json::Value, subscription: &str) -> Option<(String, Option<String>)> {
    l["steps"].as_array()?.iter().rev().find_map(|s| {
        (s["stage"] == "delivery" && s["subscription"] == subscription).then(|| {
            (
                s["outcome"].as_str().unwrap_or("").to_owned(),
                s["reason"].as_str().map(str::to_owned),
            )
        })
    })
}

fn is(l: &serde_json::Value, subscription: &str, outcome: &str, reason: Option<&str>) -> bool {
    last_step(l, subscription).is_some_and(|(o, r)| o == outcome && r.as_deref() == reason)
}

fn assert_no_bsn(what: &str, text: &str) {
    for bsn in [BSN_A, BSN_B, BSN_C] {
        assert!(!text.contains(bsn), "{what} holds a BSN:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mitz_answers_decide_delivery_and_a_change_notification_takes_effect() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peer = MitzPeer::prepare(
        tmp.path(),
        &serde_json::json!({"decision": "not_applicable",
            "patients": {BSN_A: "deny", BSN_B: "permit"}}),
    );
    peer.start();
    let (gp, archive) = (Receiver::ok().await, Receiver::ok().await);
    let extra = peer.config(&format!(
        "{}{}",
        subscription("gp", &gp.url(), "deny"),
        subscription("archive", &archive.url(), "allow")
    ));
    let bdir = tempfile::tempdir().unwrap();
    let b = broker(bdir.path(), &extra);

    let a = post_lab(&b.url, 1, BSN_A).await;
    let bb = post_lab(&b.url, 2, BSN_B).await;
    let c = post_lab(&b.url, 3, BSN_C).await;
    // Permit delivers; Deny filters; NotApplicable follows the default (deny / allow).
    let done = |l: &serde_json::Value| {
        last_step(l, "gp").is_some_and(|(o, _)| o != "retrying")
            && last_step(l, "archive").is_some_and(|(o, _)| o != "retrying")
    };
    let la = lineage_until(&b.url, &a, done).await;
    assert!(is(&la, "gp", "filtered", Some("no_consent")), "{la:#}");
    assert!(is(&la, "archive", "filtered", Some("no_consent")), "{la:#}");
    let lb = lineage_until(&b.url, &bb, done).await;
    assert!(is(&lb, "gp", "delivered", None), "{lb:#}");
    assert!(is(&lb, "archive", "delivered", None), "{lb:#}");
    let lc = lineage_until(&b.url, &c, done).await;
    assert!(is(&lc, "gp", "filtered", Some("no_consent")), "{lc:#}");
    assert!(is(&lc, "archive", "delivered", None), "{lc:#}");

    // The questions were XACML over mTLS with ketenbus's party certificate, naming the
    // patient by BSN, the holder, the requesting party, category and purpose.
    let qs = peer.questions();
    let q = qs
        .iter()
        .find(|q| q["bsn"] == BSN_A)
        .expect("a question about A");
    assert_eq!(q["client"], "ketenbus-holder");
    assert_eq!(q["holder"][1], "00000659");
    assert_eq!(q["holder_type"][0], "Z3");
    assert_eq!(q["party"][1], "12345678");
    assert_eq!(q["category"][0], "GGC002");
    assert_eq!(q["purpose"][0], "TREAT");
    // Each patient was subscribed to, with this holder in the criteria.
    eventually(
        Duration::from_secs(10),
        "a subscription per patient",
        async || {
            let subs: Vec<_> = peer
                .log()
                .into_iter()
                .filter(|r| r["kind"] == "subscription")
                .collect();
            (subs.len() == 3
                && subs
                    .iter()
                    .all(|s| s["providerid"] == "00000659" && s["providertype"] == "Z3"))
            .then_some(())
        },
    )
    .await;

    // A notification without the secret is refused and changes nothing.
    let r = reqwest::Client::new()
        .post(format!("{}/consent/mitz/notify", b.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // The next event about A is answered from the cache: no new question.
    let asked_about_a = || {
        peer.questions()
            .iter()
            .filter(|q| q["bsn"] == BSN_A)
            .count()
    };
    let before = asked_about_a();
    let a2 = post_lab(&b.url, 4, BSN_A).await;
    let l = lineage_until(&b.url, &a2, done).await;
    assert!(
        is(&l, "gp", "filtered", Some("no_consent")),
        "cached deny: {l:#}"
    );
    assert_eq!(asked_about_a(), before, "the cached answer was not used");

    // A changes their mind: Mitz notifies, and without a restart the next event goes out
    // (the cached deny would hold for an hour otherwise).
    peer.set(&serde_json::json!({"decision": "not_applicable",
        "patients": {BSN_A: "permit", BSN_B: "permit"}, "notify": 1}));
    eventually(
        Duration::from_secs(10),
        "the peer's notification taken",
        async || {
            peer.log()
                .iter()
                .any(|r| r["kind"] == "notified" && r["patientid"] == BSN_A && r["status"] == 200)
        },
    )
    .await;
    let a3 = post_lab(&b.url, 5, BSN_A).await;
    let l = lineage_until(&b.url, &a3, done).await;
    assert!(
        is(&l, "gp", "delivered", None),
        "after the notification: {l:#}"
    );

    // The audit trail holds every question and answer, by pseudonym, never the BSN.
    let audit = std::fs::read_to_string(b.dir.join("data").join("audit.jsonl")).unwrap();
    assert_no_bsn("the audit trail", &audit);
    let questions: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| {
            r["action"]
                .as_str()
                .unwrap_or("")
                .starts_with("consent_question:")
        })
        .collect();
    for answer in ["permit", "deny", "not_applicable"] {
        assert!(
            questions
                .iter()
                .any(|r| r["action"] == format!("consent_question:{answer}")
                    && r["party"] == "ura:12345678"
                    && r["purpose"] == "treatment"
                    && r["patient"].as_str().is_some_and(|p| p.len() == 32)),
            "no {answer} question in {questions:#?}"
        );
    }
    // The export an auditor gets holds them too, still without a BSN.
    let (ok, out, err) = b.cli(&["audit", "export", "--since", "1970-01-01T00:00:00Z"]);
    assert!(ok, "{err}");
    assert!(out.contains("consent_question:deny"), "{out}");
    assert_no_bsn("the audit export", &out);
    assert_no_bsn("the broker's log", &b.log_text());
    assert_eq!(gp.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mitz_slow_or_down_with_default_deny_retries_and_delivers_once_it_answers() {
    let tmp = tempfile::tempdir().unwrap();
    // Slow: answers after 3 s, the broker waits 1 s.
    let mut peer = MitzPeer::prepare(
        tmp.path(),
        &serde_json::json!({"decision": "permit", "delay": 3}),
    );
    peer.start();
    let gp = Receiver::ok().await;
    let extra = peer.config(&subscription("gp", &gp.url(), "deny"));
    let bdir = tempfile::tempdir().unwrap();
    let mut b = broker(bdir.path(), &extra);
    let id = post_lab(&b.url, 1, BSN_B).await;
    // The detail of the newest retry for want of an answer.
    let retry_detail = |l: &serde_json::Value| {
        let s = l["steps"].as_array()?.iter().rev().find(|s| {
            s["stage"] == "delivery" && s["subscription"] == "gp" && s["outcome"] != "retrying"
                || s["reason"] == "consent_unavailable"
        })?;
        (s["reason"] == "consent_unavailable")
            .then(|| s["detail"].as_str().unwrap_or("").to_owned())
    };
    let waits_with = async |b: &Broker, what: &str| {
        let l = lineage_until(&b.url, &id, |l| {
            retry_detail(l).is_some_and(|d| d.contains(what))
        })
        .await;
        assert_no_bsn("the retry detail", &retry_detail(&l).unwrap());
        assert!(
            last_step(&l, "gp").is_some_and(|(o, _)| o == "retrying"),
            "nothing is final while Mitz cannot answer: {l:#}"
        );
    };
    waits_with(&b, "timeout").await;
    // An HTTP error, then an Indeterminate decision: still waiting.
    peer.set(&serde_json::json!({"decision": "error"}));
    waits_with(&b, "http_503").await;
    peer.set(&serde_json::json!({"decision": "indeterminate"}));
    waits_with(&b, "indeterminate").await;
    // Down: connection refused; still waiting, also across a broker restart.
    peer.stop();
    waits_with(&b, "connection refused").await;
    b.kill();
    b.spawn();
    waits_with(&b, "connection refused").await;
    assert!(gp.received().is_empty());
    let metrics = b.metrics().await;
    assert!(
        metrics.lines().any(|m| m.starts_with(
            "ketenbus_dispatch_consent_unavailable_records_total{fallback=\"retry\"}"
        ) && !m.ends_with(" 0")),
        "{metrics}"
    );

    // Back, answering promptly: the waiting record goes out, once.
    peer.set(&serde_json::json!({"decision": "permit"}));
    peer.start();
    lineage_until(&b.url, &id, |l| is(l, "gp", "delivered", None)).await;
    assert_eq!(gp.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gp.received().len(), 1);
    assert_no_bsn("the broker's log", &b.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mitz_peer_refuses_a_client_without_the_right_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peer = MitzPeer::prepare(tmp.path(), &serde_json::json!({"decision": "permit"}));
    peer.start();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&peer.server_ca).unwrap()).unwrap();
    let identity = |(c, k): &(PathBuf, PathBuf)| {
        let mut pem = std::fs::read(c).unwrap();
        pem.extend(std::fs::read(k).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    };
    let client = |id: Option<reqwest::Identity>| {
        let mut b = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone());
        if let Some(id) = id {
            b = b.identity(id);
        }
        b.build().unwrap()
    };
    let url = format!(
        "https://127.0.0.1:{}/abonnementen/fhir/Subscription",
        peer.port
    );
    let body = serde_json::json!({"resourceType": "Subscription", "status": "requested",
        "reason": "OTV", "criteria": format!("Consent?_query=otv&patientid={BSN_B}&providerid=00000659&providertype=Z3"),
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:1/consent/mitz/notify"}})
    .to_string();
    for (what, c) in [
        ("no client certificate", client(None)),
        (
            "a certificate from another CA",
            client(Some(identity(&peer.rogue))),
        ),
    ] {
        let r = c.post(&url).body(body.clone()).send().await;
        assert!(r.is_err(), "{what} was let in: {r:?}");
    }
    let r = client(Some(identity(&peer.client)))
        .post(&url)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);

    // ketenbus with the rogue certificate gets no answer: its deliveries wait.
    let gp = Receiver::ok().await;
    let mut extra = peer.config(&subscription("gp", &gp.url(), "deny"));
    extra = extra
        .replace(
            &format!("{:?}", peer.client.0),
            &format!("{:?}", peer.rogue.0),
        )
        .replace(
            &format!("{:?}", peer.client.1),
            &format!("{:?}", peer.rogue.1),
        );
    let bdir = tempfile::tempdir().unwrap();
    let b = broker(bdir.path(), &extra);
    let id = post_lab(&b.url, 1, BSN_B).await;
    lineage_until(&b.url, &id, |l| {
        is(l, "gp", "retrying", Some("consent_unavailable"))
    })
    .await;
    assert!(
        peer.questions().is_empty(),
        "the peer answered a rogue client"
    );
}

#[test]
fn check_config_names_bad_mitz_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ketenbus.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[consent]\nfile = {:?}\n[consent.mitz]\n\
             base_url = \"http://mitz.example.nl\"\ncert_file = \"/nonexistent/mitz-client.crt\"\n\
             key_file = \"/nonexistent/mitz-client.key\"\nca_files = []\nprovider_id = \"ura:00000659\"\n\
             provider_type = \"Z3\"\nnotify_url = \"https://kb.example.nl/consent/mitz/notify\"\n",
            tmp.path().join("data"),
            tmp.path().join("consent.csv"),
        ),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("consent.csv"),
        "patient,party,purpose,decision\n",
    )
    .unwrap();
    let (ok, err) = ketenbus_tests::check_config(&config, &[]);
    assert!(!ok);
    for (path, says) in [
        ("consent.mitz.base_url", "plain http"),
        ("consent.mitz.cert_file", "/nonexistent/mitz-client.crt"),
        ("consent.mitz.ca_files", "trust anchor"),
        (
            "consent.mitz.notify_secret_env",
            "KETENBUS_MITZ_NOTIFY_SECRET",
        ),
        ("consent.mitz", "not both"),
    ] {
        assert!(
            err.lines().any(|l| l.contains(path) && l.contains(says)),
            "{path} ({says}) missing from:\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscription_is_made_again_and_subscriptions_are_renewed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peer = MitzPeer::prepare(
        tmp.path(),
        &serde_json::json!({"decision": "permit", "subscriptions": "refuse"}),
    );
    peer.start();
    let gp = Receiver::ok().await;
    let extra = peer
        .config(&format!(
            "subscription_renew = \"4s\"\n{}",
            subscription("gp", &gp.url(), "deny")
        ))
        .replace("cache_time = \"1h\"", "cache_time = \"1s\"");
    let bdir = tempfile::tempdir().unwrap();
    let b = broker(bdir.path(), &extra);
    let kinds = |kind: &str| peer.log().iter().filter(|r| r["kind"] == kind).count();
    let delivered = async |n: usize| {
        let id = post_lab(&b.url, n, BSN_B).await;
        lineage_until(&b.url, &id, |l| is(l, "gp", "delivered", None)).await;
    };
    let logged = async |kind: &str, n: usize, what: &str| {
        eventually(Duration::from_secs(3), what, async || kinds(kind) == n).await;
    };
    delivered(1).await;
    logged("refused_subscription", 1, "the refused subscription").await;
    // Mitz takes subscriptions again; the next question (the cached answer expired) makes
    // the subscription that failed, well before subscription_renew.
    peer.set(&serde_json::json!({"decision": "permit"}));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    delivered(2).await;
    logged("subscription", 1, "the subscription made again").await;
    // Within subscription_renew no second one; after it, the next question renews it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    delivered(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kinds("subscription"), 1, "renewed too early");
    tokio::time::sleep(Duration::from_secs(3)).await;
    delivered(4).await;
    logged("subscription", 2, "the renewed subscription").await;
}

/// The subscription requests the peer took about `bsn`.
fn subscriptions_for(peer: &MitzPeer, bsn: &str) -> usize {
    peer.log()
        .iter()
        .filter(|r| r["kind"] == "subscription" && r["patientid"] == bsn)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_about_one_patient_at_once_are_one_question_to_mitz() {
    use ketenbus::deliver::mitz::{Decision, MitzConfig, MitzRegistry, Question};
    let tmp = tempfile::tempdir().unwrap();
    // A slow Mitz: a second and third question come while the first is under way.
    let peer = MitzPeer::running(
        tmp.path(),
        &serde_json::json!({"decision": "permit", "delay": 1.0}),
    );
    let cfg: MitzConfig = serde_json::from_value(serde_json::json!({
        "base_url": format!("https://127.0.0.1:{}", peer.port),
        "cert_file": peer.client.0, "key_file": peer.client.1, "ca_files": [peer.server_ca],
        "provider_id": "ura:00000659", "provider_type": "Z3",
        "party_types": {"ura:12345678": "Z3", "ura:87654321": "Z3"}, "timeout": "10s"}))
    .unwrap();
    let registry = MitzRegistry::new(
        &cfg,
        ketenbus::route::keys::PatientKeyer::new(PATIENT_KEY_SECRET.as_bytes().to_vec()),
        None,
        &ketenbus::env::Env::empty(),
    )
    .unwrap();
    let q = Question {
        patient: "pseudonym-b",
        bsn: BSN_B,
        party: "ura:12345678",
        purpose: "treatment",
    };
    let other = Question {
        party: "ura:87654321",
        ..q
    };
    let (a, b, c, d) = tokio::join!(
        registry.decide(q),
        registry.decide(q),
        registry.decide(q),
        registry.decide(other)
    );
    for answer in [a, b, c, d] {
        assert_eq!(answer.unwrap(), Decision::Permit);
    }
    let asked: Vec<String> = peer
        .questions()
        .iter()
        .filter(|q| q["bsn"] == BSN_B)
        .map(|q| q["party"][1].as_str().unwrap_or("").to_owned())
        .collect();
    // One question for the three alike, one for the other party.
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(asked.contains(&"12345678".to_owned()) && asked.contains(&"87654321".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_subscribe_a_patient_again_and_keeps_no_bsn() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = MitzPeer::running(tmp.path(), &serde_json::json!({"decision": "permit"}));
    let gp = Receiver::ok().await;
    let extra = peer.config(&subscription("gp", &gp.url(), "deny"));
    let bdir = tempfile::tempdir().unwrap();
    let mut b = broker(bdir.path(), &extra);
    let id = post_lab(&b.url, 1, BSN_B).await;
    lineage_until(&b.url, &id, |l| is(l, "gp", "delivered", None)).await;
    let asked = || {
        peer.questions()
            .iter()
            .filter(|q| q["bsn"] == BSN_B)
            .count()
    };
    assert_eq!(asked(), 1);
    eventually(
        Duration::from_secs(10),
        "the patient subscribed to",
        async || (subscriptions_for(&peer, BSN_B) == 1).then_some(()),
    )
    .await;

    // A restart forgets the answers (asked again) but not the subscription.
    b.kill();
    b.spawn();
    let id = post_lab(&b.url, 2, BSN_B).await;
    lineage_until(&b.url, &id, |l| is(l, "gp", "delivered", None)).await;
    assert_eq!(asked(), 2, "the answer cache does not outlive the process");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        subscriptions_for(&peer, BSN_B),
        1,
        "subscribed again after the restart"
    );
    // What is kept names the patient by pseudonym only.
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(bdir.path().join("data"))
        .unwrap()
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("mitz-subscriptions")
        {
            kept.extend(std::fs::read(entry.path()).unwrap());
        }
    }
    assert!(!kept.is_empty(), "the subscriptions are kept on disk");
    assert_no_bsn("the kept subscriptions", &String::from_utf8_lossy(&kept));
}
