//! Security and trust, through real sockets: TLS and mTLS on the listener, bearer tokens,
//! senders bound to their party ids, filters, consent and the audit trail. Certificates
//! are made here at run time with rcgen; no key material is committed.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ketenbus_tests::{
    check_config, eventually, free_port, ketenbus_bin, lineage_until_as, medlab, within_blocking,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test PKI: a CA, a server certificate for 127.0.0.1 and client certificates.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// PEM files of one certificate.
struct Pair {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Pair {
    /// cert + key in one PEM, as reqwest's `Identity::from_pem` wants.
    fn identity(&self) -> reqwest::Identity {
        let mut pem = std::fs::read(&self.cert).unwrap();
        pem.extend(std::fs::read(&self.key).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }

    fn sha256(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&self.der))
    }
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    fn issue(&self, file: &str, sans: &[&str], client: bool) -> Pair {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }
}

/// A `ketenbus run` over TLS, probed with a client that trusts the test CA.
struct TlsBroker {
    child: Child,
    url: String,
    log: PathBuf,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

impl TlsBroker {
    fn start(tmp: tempfile::TempDir, extra: &str, probe: &reqwest::Client) -> TlsBroker {
        let port = free_port();
        let dir = tmp.path();
        let config = dir.join("ketenbus.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n",
                dir.join("data")
            ),
        )
        .unwrap();
        let log = dir.join("ketenbus.log");
        let child = Command::new(ketenbus_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("KETENBUS_LOG", "info,ketenbus=debug")
            .env("KETENBUS_AUDIT_KEY", ketenbus_tests::AUDIT_KEY)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let b = TlsBroker {
            child,
            url: format!("https://127.0.0.1:{port}"),
            log,
            config,
            _tmp: tmp,
        };
        b.wait_ready(probe);
        b
    }

    fn wait_ready(&self, probe: &reqwest::Client) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ready = within_blocking(Duration::from_secs(30), || {
            rt.block_on(async {
                probe
                    .get(format!("{}/readyz", self.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            })
        });
        assert!(
            ready.is_ok(),
            "ketenbus did not become ready:\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(ca: &Path, identity: Option<reqwest::Identity>) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        b = b.identity(id);
    }
    b.build().unwrap()
}

fn tls_table(server: &Pair, client_ca: Option<&Path>) -> String {
    let mut t = format!(
        "[http.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        server.cert, server.key
    );
    if let Some(ca) = client_ca {
        t.push_str(&format!("client_ca_file = {ca:?}\n"));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_answers_over_tls_only() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "main");
    let server = pki.issue("server", &["127.0.0.1", "localhost"], false);
    let https = client(&pki.ca_file("main"), None);
    let extra = tls_table(&server, None);
    let probe = https.clone();
    let broker = tokio::task::spawn_blocking(move || TlsBroker::start(tmp, &extra, &probe))
        .await
        .unwrap();
    let r = https
        .get(format!("{}/healthz", broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The same port in plain HTTP gets no answer.
    let plain = reqwest::Client::new()
        .get(broker.url.replace("https://", "http://") + "/healthz")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP must not be served on a TLS listener"
    );
    // A client that does not trust the CA refuses the server.
    let other = Pki::new(broker._tmp.path(), "other");
    let untrusting = client(&other.ca_file("other"), None);
    assert!(
        untrusting
            .get(format!("{}/healthz", broker.url))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_takes_only_client_certificates_of_the_configured_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "main");
    let server = pki.issue("server", &["127.0.0.1"], false);
    let good = pki.issue("lab-client", &[], true);
    let rogue_ca = Pki::new(tmp.path(), "rogue");
    let rogue = rogue_ca.issue("rogue-client", &[], true);
    let extra = tls_table(&server, Some(&pki.ca_file("main")));
    let ca = pki.ca_file("main");
    let with_good = client(&ca, Some(good.identity()));
    let probe = with_good.clone();
    let broker = tokio::task::spawn_blocking(move || TlsBroker::start(tmp, &extra, &probe))
        .await
        .unwrap();
    let url = format!("{}/healthz", broker.url);
    assert_eq!(with_good.get(&url).send().await.unwrap().status(), 200);
    let without = client(&ca, None);
    assert!(
        without.get(&url).send().await.is_err(),
        "no client certificate: handshake refused"
    );
    let with_rogue = client(&ca, Some(rogue.identity()));
    assert!(
        with_rogue.get(&url).send().await.is_err(),
        "a client certificate from another CA: handshake refused"
    );
    assert!(broker.log_text().contains("TLS handshake failed"));
    let _ = (good.sha256(), &broker.config);
}

#[test]
fn a_public_listener_without_tls_is_a_config_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("k.toml");
    std::fs::write(
        &config,
        "[http]\nlisten = \"0.0.0.0:8080\"\n[[subscriptions]]\nname = \"far\"\nkinds = [\"raw\"]\nsink = { type = \"webhook\", url = \"http://his.example.test/x\" }\n",
    )
    .unwrap();
    let (ok, err) = check_config(&config, &[]);
    assert!(!ok);
    assert!(
        err.contains("http.listen: a non-loopback address without [http.tls]"),
        "{err}"
    );
    assert!(
        err.contains("subscriptions[0].sink.url: plain http"),
        "{err}"
    );
    std::fs::write(
        &config,
        "[http]\nlisten = \"0.0.0.0:8080\"\nallow_plaintext = true\n[[subscriptions]]\nname = \"far\"\nkinds = [\"raw\"]\nsink = { type = \"webhook\", url = \"http://his.example.test/x\", allow_plain_http = true }\n",
    )
    .unwrap();
    let (ok, err) = check_config(&config, &[]);
    assert!(ok, "{err}");
}

/// A sender `lab` for mailbox:500001234, a sender `other-lab` for mailbox:500007777 and an
/// operator `ops`, with their tokens.
const LAB_TOKEN: &str = "kb_lab_token_for_tests_0123456789abcdef";
const OTHER_TOKEN: &str = "kb_other_lab_token_for_tests_0123456789";
const OPS_TOKEN: &str = "kb_ops_token_for_tests_0123456789abcdef";

fn sha(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn principals() -> String {
    format!(
        "[[senders]]\nname = \"lab\"\ntoken_sha256 = \"{}\"\nparty_ids = [\"mailbox:500001234\"]\n\
         [[senders]]\nname = \"other-lab\"\ntoken_sha256 = \"{}\"\nparty_ids = [\"mailbox:500007777\"]\n\
         [[operators]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\n",
        sha(LAB_TOKEN),
        sha(OTHER_TOKEN),
        sha(OPS_TOKEN)
    )
}

/// A MEDLAB from `sender` about the default test patient.
fn edifact_from(n: usize, sender: &str) -> Vec<u8> {
    medlab(n, sender, "999911120")
}

async fn post_as(
    c: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value, Option<String>) {
    let mut req = c
        .post(format!("{base}/api/v1/messages"))
        .header("content-type", "application/EDIFACT")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        resp.json().await.unwrap_or(serde_json::Value::Null),
        www,
    )
}

/// POST as `token`'s sender a message that must be taken (202): its id.
async fn accepted_as(
    c: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> String {
    let (s, j, _) = post_as(c, base, token, body).await;
    assert_eq!(s, 202, "{j}");
    j["id"].as_str().unwrap().to_owned()
}

/// The lab posts a MEDLAB about each patient of `bsns` in turn, numbered from 1: their ids.
async fn lab_posts(c: &reqwest::Client, base: &str, bsns: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for (n, bsn) in (1..).zip(bsns) {
        ids.push(accepted_as(c, base, Some(LAB_TOKEN), medlab(n, "500001234", bsn)).await);
    }
    ids
}

async fn get_as(c: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = c.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_may_post_and_read() {
    let broker = ketenbus_tests::Broker::start(&principals());
    let c = reqwest::Client::new();
    let base = &broker.url;

    let (status, json, www) = post_as(&c, base, None, edifact_from(1, "500001234")).await;
    assert_eq!(status, 401, "{json}");
    assert_eq!(json["error"], "unauthenticated");
    assert!(www.unwrap().starts_with("Bearer"));
    let (status, _, _) = post_as(&c, base, Some("kb_guessed"), edifact_from(1, "500001234")).await;
    assert_eq!(status, 401);
    let (status, _, _) = post_as(&c, base, Some(OPS_TOKEN), edifact_from(1, "500001234")).await;
    assert_eq!(status, 401, "an operator is not a sender");

    let id = accepted_as(&c, base, Some(LAB_TOKEN), edifact_from(1, "500001234")).await;

    // Lineage: operators only.
    let url = format!("{base}/api/v1/messages/{id}");
    assert_eq!(get_as(&c, &url, None).await.0, 401);
    assert_eq!(get_as(&c, &url, Some(LAB_TOKEN)).await.0, 401);
    let (status, l) = get_as(&c, &url, Some(OPS_TOKEN)).await;
    assert_eq!(status, 200, "{l}");
    assert_eq!(l["sender"], "mailbox:500001234", "the authenticated party");
    // Health stays open.
    assert_eq!(get_as(&c, &format!("{base}/healthz"), None).await.0, 200);

    // The dead-letter command needs an operator token too.
    let dlq = |token: Option<&str>| {
        let mut cmd = Command::new(ketenbus_bin());
        cmd.args(["dlq", "list", "--subscription", "router", "--config"])
            .arg(&broker.config)
            .env("KETENBUS_AUDIT_KEY", ketenbus_tests::AUDIT_KEY)
            .env_remove("KETENBUS_OPERATOR_TOKEN");
        if let Some(t) = token {
            cmd.env("KETENBUS_OPERATOR_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = dlq(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KETENBUS_OPERATOR_TOKEN"));
    assert!(!dlq(Some(LAB_TOKEN)).status.success());
    let out = dlq(Some(OPS_TOKEN));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_cannot_post_in_another_partys_name() {
    let broker = ketenbus_tests::Broker::start(&principals());
    let c = reqwest::Client::new();
    let (status, json, _) = post_as(
        &c,
        &broker.url,
        Some(LAB_TOKEN),
        edifact_from(2, "500007777"),
    )
    .await;
    assert_eq!(status, 403, "{json}");
    assert_eq!(json["error"], "sender_mismatch");
    let msg = json["message"].as_str().unwrap();
    assert!(
        msg.contains("mailbox:500007777") && msg.contains("lab"),
        "{msg}"
    );
    // The rightful sender of that party may.
    let (status, _, _) = post_as(
        &c,
        &broker.url,
        Some(OTHER_TOKEN),
        edifact_from(2, "500007777"),
    )
    .await;
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_posted_over_http_is_held_to_its_edifact_sender() {
    let broker = ketenbus_tests::Broker::start(&principals());
    let c = reqwest::Client::new();
    let mail = |sender: &str| {
        let mut m = b"From: lab@example.test\r\nTo: gp@example.test\r\nSubject: uitslag\r\n\
MIME-Version: 1.0\r\nContent-Type: application/EDIFACT\r\n\r\n"
            .to_vec();
        m.extend(edifact_from(3, sender));
        m.extend_from_slice(b"\r\n");
        m
    };
    let post = |body: Vec<u8>, token: &'static str| {
        let c = c.clone();
        let url = format!("{}/api/v1/messages", broker.url);
        async move {
            let resp = c
                .post(url)
                .header("content-type", "message/rfc822")
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (
                status,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, json) = post(mail("500007777"), LAB_TOKEN).await;
    assert_eq!(status, 403, "{json}");
    assert_eq!(json["error"], "sender_mismatch");
    let (status, json) = post(mail("500001234"), LAB_TOKEN).await;
    assert_eq!(status, 202, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_never_sees_an_event_outside_its_filter() {
    let rx = ketenbus_tests::Receiver::ok().await;
    let sub = format!(
        "{}filter = {{ senders = [\"mailbox:500001234\"] }}\n",
        ketenbus_tests::webhook_subscription("lab-only", "\"raw\", \"lab_result\"", &rx.url(), "")
    );
    let broker = ketenbus_tests::Broker::start(&format!("{sub}{}", principals()));
    let c = reqwest::Client::new();
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    for n in 0..5 {
        mine.push(
            accepted_as(
                &c,
                &broker.url,
                Some(LAB_TOKEN),
                edifact_from(n, "500001234"),
            )
            .await,
        );
        theirs.push(
            accepted_as(
                &c,
                &broker.url,
                Some(OTHER_TOKEN),
                edifact_from(100 + n, "500007777"),
            )
            .await,
        );
    }
    // Wait until every one of theirs is known to be filtered.
    eventually(
        Duration::from_secs(20),
        "every one of theirs to be filtered",
        async || {
            for id in &theirs {
                let (_, l) = get_as(
                    &c,
                    &format!("{}/api/v1/messages/{id}", broker.url),
                    Some(OPS_TOKEN),
                )
                .await;
                let steps = l["steps"].as_array().cloned().unwrap_or_default();
                let filtered = steps.iter().filter(|s| s["outcome"] == "filtered").count();
                if filtered < 2 {
                    return Err(format!("not filtered: {l:#}")); // raw and lab_result
                }
            }
            Ok(())
        },
    )
    .await;
    let got = rx.wait_for(10, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = if got.len() < rx.received().len() {
        rx.received()
    } else {
        got
    };
    assert_eq!(
        got.len(),
        10,
        "5 raw + 5 lab results of mine: {}",
        broker.log_text()
    );
    for r in &got {
        let env = r.header("ketenbus-envelope-id").unwrap();
        assert!(
            mine.iter().any(|m| m == env),
            "{env} is not from the filtered sender"
        );
    }
}

/// The patient pseudonym of `bsn` under the secret in TEST_PATIENT_KEY, from the CLI.
fn pseudonym(dir: &Path, bsn: &str) -> String {
    let config = dir.join("keys-only.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[keys]\npatient_key_secret_env = \"TEST_PATIENT_KEY\"\n",
            dir.join("unused")
        ),
    )
    .unwrap();
    let out = Command::new(ketenbus_bin())
        .args(["consent", "pseudonym", "--bsn", bsn, "--config"])
        .arg(&config)
        .env("TEST_PATIENT_KEY", PATIENT_KEY_SECRET)
        .env("KETENBUS_AUDIT_KEY", ketenbus_tests::AUDIT_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

const PATIENT_KEY_SECRET: &str = "patient-key-secret-for-tests-0123456789";

/// Poll the lineage, read as the operator, until `pred` holds.
async fn lineage_until(
    base: &str,
    id: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    lineage_until_as(base, id, Some(OPS_TOKEN), pred).await
}

fn delivery_outcome(l: &serde_json::Value) -> Option<(String, Option<String>)> {
    delivery_outcome_of(l, None)
}

/// The last final delivery outcome in a lineage, of one subscription when named.
fn delivery_outcome_of(
    l: &serde_json::Value,
    subscription: Option<&str>,
) -> Option<(String, Option<String>)> {
    l["steps"].as_array()?.iter().rev().find_map(|s| {
        (s["stage"] == "delivery"
            && s["outcome"] != "retrying"
            && subscription.is_none_or(|n| s["subscription"] == n))
        .then(|| {
            (
                s["outcome"].as_str().unwrap_or("").to_owned(),
                s["reason"].as_str().map(str::to_owned),
            )
        })
    })
}

/// Patients: A denied consent, B allowed it, C has nothing recorded (default deny).
const BSN_A: &str = "999990007";
const BSN_B: &str = "999990019";
const BSN_C: &str = "999990020";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_decides_delivery_and_a_refusal_is_an_outcome() {
    let rx = ketenbus_tests::Receiver::ok().await;
    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (pseudonym(keys.path(), BSN_A), pseudonym(keys.path(), BSN_B));
    assert_ne!(a, b);
    assert!(!a.contains(BSN_A));
    let consent = keys.path().join("consent.csv");
    std::fs::write(
        &consent,
        format!(
            "patient,party,purpose,decision\n{a},agb:01234567,treatment,deny\n{b},agb:01234567,treatment,allow\n"
        ),
    )
    .unwrap();
    // The raw messages too, with default allow: only the patient who said no is withheld.
    let raw_rx = ketenbus_tests::Receiver::ok().await;
    let sub = format!(
        "{}consent = {{ party = \"agb:01234567\", purpose = \"treatment\", default = \"deny\" }}\n\
         {}consent = {{ party = \"agb:01234567\", purpose = \"treatment\", default = \"allow\" }}\n",
        ketenbus_tests::webhook_subscription("gp", "\"lab_result\"", &rx.url(), ""),
        ketenbus_tests::webhook_subscription("archive", "\"raw\"", &raw_rx.url(), "")
    );
    let extra = format!(
        "[keys]\npatient_key_secret_env = \"TEST_PATIENT_KEY\"\n[consent]\nfile = {consent:?}\n{sub}{}",
        principals()
    );
    let broker =
        ketenbus_tests::Broker::start_with_env(&extra, &[("TEST_PATIENT_KEY", PATIENT_KEY_SECRET)]);
    let c = reqwest::Client::new();
    let ids = lab_posts(&c, &broker.url, &[BSN_A, BSN_B, BSN_C]).await;
    let outcome = |l: &serde_json::Value| delivery_outcome_of(l, Some("gp"));
    let la = lineage_until(&broker.url, &ids[0], |l| outcome(l).is_some()).await;
    assert_eq!(
        outcome(&la),
        Some(("filtered".into(), Some("no_consent".into()))),
        "{la:#}"
    );
    let lb = lineage_until(&broker.url, &ids[1], |l| outcome(l).is_some()).await;
    assert_eq!(outcome(&lb), Some(("delivered".into(), None)), "{lb:#}");
    let lc = lineage_until(&broker.url, &ids[2], |l| outcome(l).is_some()).await;
    assert_eq!(
        outcome(&lc),
        Some(("filtered".into(), Some("no_consent".into()))),
        "no record and default deny: {lc:#}"
    );
    let got = rx.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("ketenbus-envelope-id"), Some(ids[1].as_str()));
    // The refusal's detail names party and purpose, never the patient.
    let detail = la["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["reason"] == "no_consent")
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("agb:01234567") && !detail.contains(&a),
        "{detail}"
    );
    // A raw message is held to the consent of the patient it declares.
    let got = raw_rx.wait_for(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut envelopes: Vec<&str> = raw_rx
        .received()
        .iter()
        .filter_map(|r| r.header("ketenbus-envelope-id").map(str::to_owned))
        .map(|e| {
            if e == ids[1] {
                "b"
            } else if e == ids[2] {
                "c"
            } else {
                "a"
            }
        })
        .collect();
    envelopes.sort_unstable();
    assert_eq!(envelopes, ["b", "c"], "{} raw deliveries", got.len());
}

fn audit_cli(broker: &ketenbus_tests::Broker, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ketenbus_bin())
        .args(args)
        .arg("--config")
        .arg(&broker.config)
        .env("KETENBUS_OPERATOR_TOKEN", OPS_TOKEN)
        .env("KETENBUS_AUDIT_KEY", ketenbus_tests::AUDIT_KEY)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_deliveries_and_reads_and_shows_an_edit() {
    let rx = ketenbus_tests::Receiver::ok().await;
    let sub = ketenbus_tests::webhook_subscription("gp", "\"lab_result\"", &rx.url(), "");
    let mut broker = ketenbus_tests::Broker::start(&format!("{sub}{}", principals()));
    let c = reqwest::Client::new();
    let ids = lab_posts(&c, &broker.url, &[BSN_A, BSN_B, BSN_C]).await;
    assert_eq!(rx.wait_for(3, Duration::from_secs(20)).await.len(), 3);
    for id in &ids {
        lineage_until(&broker.url, id, |l| {
            delivery_outcome(l).is_some_and(|(o, _)| o == "delivered")
        })
        .await;
    }
    let audit_file = broker.dir.join("data").join("audit.jsonl");
    let records = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rs = records();
    let deliveries: Vec<_> = rs.iter().filter(|r| r["action"] == "delivery").collect();
    assert_eq!(deliveries.len(), 3, "{rs:#?}");
    for d in &deliveries {
        assert_eq!(d["actor"], "subscription:gp");
        let patient = d["patient"].as_str().unwrap();
        assert_eq!(patient.len(), 32, "a pseudonym");
        assert!(ids.iter().any(|id| d["envelope_id"] == id.as_str()));
        assert!(
            d["event_id"]
                .as_str()
                .unwrap()
                .starts_with(d["envelope_id"].as_str().unwrap())
        );
    }
    let text = std::fs::read_to_string(&audit_file).unwrap();
    for bsn in [BSN_A, BSN_B, BSN_C] {
        assert!(!text.contains(bsn), "no BSN in the audit trail");
    }
    let reads: Vec<_> = rs
        .iter()
        .filter(|r| r["action"] == "lineage_read")
        .collect();
    assert!(!reads.is_empty());
    assert!(
        reads.iter().all(|r| r["actor"] == "operator:ops"),
        "{reads:#?}"
    );
    // A refused read is not a read.
    let before = records().len();
    assert_eq!(
        get_as(
            &c,
            &format!("{}/api/v1/messages/{}", broker.url, ids[0]),
            None
        )
        .await
        .0,
        401
    );
    assert_eq!(records().len(), before);

    broker.kill();
    let (ok, out, err) = audit_cli(&broker, &["audit", "verify"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("intact, {before} record(s)")),
        "{out}"
    );
    let (ok, out, _) = audit_cli(
        &broker,
        &["audit", "export", "--since", "2000-01-01T00:00:00Z"],
    );
    assert!(ok);
    assert_eq!(out.lines().count(), before);
    let (ok, out, _) = audit_cli(
        &broker,
        &["audit", "export", "--since", "2100-01-01T00:00:00Z"],
    );
    assert!(ok);
    assert_eq!(out.lines().count(), 0);

    // Someone edits the second record: who read it.
    let full = std::fs::read_to_string(&audit_file).unwrap();
    let mut lines: Vec<String> = full.lines().map(str::to_owned).collect();
    lines[1] = lines[1].replacen("\"actor\":\"", "\"actor\":\"x", 1);
    std::fs::write(&audit_file, lines.join("\n") + "\n").unwrap();
    let (ok, out, err) = audit_cli(&broker, &["audit", "verify"]);
    assert!(!ok, "{out}");
    assert!(err.contains("broken at record 2"), "{err}");
    assert!(err.contains("does not match its hash"), "{err}");
}

/// What someone who can write the data directory but has no audit key does: remove the
/// record at `remove` (0-based) and recompute the chain after it the way `audit verify`
/// checked it before it was keyed: renumber, point `prev` at the record before, and put
/// the plain SHA-256 of the record's content (the line without `hash`) in `hash`.
fn remove_and_rechain_plainly(text: &str, remove: usize) -> String {
    use sha2::Digest;
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(remove);
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for (i, line) in lines.into_iter().enumerate() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let cut = line.rfind(",\"hash\":\"").unwrap();
        let content = format!("{}}}", &line[..cut])
            .replacen(
                &format!("{{\"seq\":{},", r["seq"]),
                &format!("{{\"seq\":{},", i + 1),
                1,
            )
            .replacen(
                &format!("\"prev\":\"{}\"", r["prev"].as_str().unwrap()),
                &format!("\"prev\":\"{prev}\""),
                1,
            );
        let hash = hex::encode(sha2::Sha256::digest(content.as_bytes()));
        out.push_str(&format!(
            "{},\"hash\":\"{hash}\"}}\n",
            &content[..content.len() - 1]
        ));
        prev = hash;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_is_keyed_and_raw_deliveries_name_party_and_patient() {
    let rx = ketenbus_tests::Receiver::ok().await;
    let keys = tempfile::tempdir().unwrap();
    let consent = keys.path().join("consent.csv");
    std::fs::write(&consent, "patient,party,purpose,decision\n").unwrap();
    // A raw subscription that delivers for one party; a raw one that names no party.
    let sub = format!(
        "{}consent = {{ party = \"agb:01234567\", purpose = \"treatment\", default = \"allow\" }}\n{}",
        ketenbus_tests::webhook_subscription("raw-gp", "\"raw\"", &rx.url(), ""),
        ketenbus_tests::webhook_subscription("raw-archive", "\"raw\"", &rx.url(), ""),
    );
    let extra = format!("[consent]\nfile = {consent:?}\n{sub}{}", principals());
    let mut broker = ketenbus_tests::Broker::start(&extra);
    // The pseudonyms under this broker's own patient-key secret.
    let pseudonym = |bsn: &str| {
        let (ok, out, err) = broker.cli(&["consent", "pseudonym", "--bsn", bsn]);
        assert!(ok, "{err}");
        out.trim().to_owned()
    };
    let (a, b) = (pseudonym(BSN_A), pseudonym(BSN_B));
    let c = reqwest::Client::new();
    let ids = lab_posts(&c, &broker.url, &[BSN_A, BSN_B]).await;
    assert_eq!(rx.wait_for(4, Duration::from_secs(20)).await.len(), 4);
    for id in &ids {
        lineage_until(&broker.url, id, |l| {
            l["steps"]
                .as_array()
                .is_some_and(|s| s.iter().filter(|s| s["outcome"] == "delivered").count() == 2)
        })
        .await;
    }
    broker.kill();
    let audit_file = broker.dir.join("data").join("audit.jsonl");
    let text = std::fs::read_to_string(&audit_file).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let raw = |actor: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| r["action"] == "delivery" && r["actor"] == actor)
            .collect()
    };
    let (gp, archive) = (raw("subscription:raw-gp"), raw("subscription:raw-archive"));
    assert_eq!((gp.len(), archive.len()), (2, 2), "{text}");
    for (i, id) in ids.iter().enumerate() {
        let patient = [&a, &b][i];
        for r in [&gp, &archive] {
            let r = r.iter().find(|r| r["envelope_id"] == id.as_str()).unwrap();
            assert_eq!(r["patient"], patient.as_str(), "the pseudonym: {r}");
        }
        let r = gp.iter().find(|r| r["envelope_id"] == id.as_str()).unwrap();
        assert_eq!(r["party"], "agb:01234567", "the consent party: {r}");
    }
    assert!(!text.contains(BSN_A) && !text.contains(BSN_B));

    // The untouched trail verifies.
    let (ok, out, err) = audit_cli(&broker, &["audit", "verify"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("intact, {} record(s)", records.len())),
        "{out}"
    );
    // Without the key it cannot be checked at all.
    let out = Command::new(ketenbus_bin())
        .args(["audit", "verify", "--config"])
        .arg(&broker.config)
        .env("KETENBUS_OPERATOR_TOKEN", OPS_TOKEN)
        .env_remove("KETENBUS_AUDIT_KEY")
        // Nor with a loopback broker's own key, which is another.
        .env("XDG_CONFIG_HOME", broker.dir.join("no-config"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("audit.key_env"));

    // Someone removes the first delivery and recomputes the chain without the key.
    let first = text
        .lines()
        .position(|l| l.contains("\"action\":\"delivery\""))
        .unwrap();
    std::fs::write(&audit_file, remove_and_rechain_plainly(&text, first)).unwrap();
    let (ok, out, err) = audit_cli(&broker, &["audit", "verify"]);
    assert!(!ok, "a recomputed chain passed: {out}");
    assert!(err.contains("broken at record 1"), "{err}");
    // Nor does the broker write on after it: it refuses to start.
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| broker.spawn()));
    assert!(started.is_err(), "the broker continued a rewritten trail");
    assert!(
        broker
            .log_text()
            .contains("does not hold under the configured audit key"),
        "{}",
        broker.log_text()
    );

    // An edit, an insertion and a removal of the untouched trail are each found.
    let lines: Vec<&str> = text.lines().collect();
    let edited = {
        let mut l: Vec<String> = lines.iter().map(|s| (*s).to_owned()).collect();
        l[first] = l[first].replacen("\"actor\":\"", "\"actor\":\"x", 1);
        l.join("\n") + "\n"
    };
    let inserted = {
        let mut l = lines.clone();
        l.insert(1, lines[0]);
        l.join("\n") + "\n"
    };
    let removed = {
        let mut l = lines.clone();
        l.remove(first);
        l.join("\n") + "\n"
    };
    for (what, changed) in [
        ("edit", edited),
        ("insertion", inserted),
        ("removal", removed),
    ] {
        assert_ne!(changed, text, "{what}");
        std::fs::write(&audit_file, changed).unwrap();
        let (ok, out, _) = audit_cli(&broker, &["audit", "verify"]);
        assert!(!ok, "{what} went unnoticed: {out}");
    }
}

/// Send `head` (and maybe more) on a raw connection and read what comes back until the
/// server closes or `wait` passes.
fn raw_exchange(addr: &str, bytes: &[u8], wait: Duration) -> (String, Duration) {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    (
        String::from_utf8_lossy(&buf).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn listener_limits_answer_hostile_clients_clearly() {
    let broker = ketenbus_tests::Broker::start(
        "[http.limits]\nmax_connections = 3\nmax_headers = 10\nmax_header_bytes = \"8 KiB\"\nheader_timeout = \"1s\"\nrequest_timeout = \"1s\"\n",
    );
    let addr = broker.url.trim_start_matches("http://").to_owned();

    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..20 {
        many.push_str(&format!("X-Filler-{i}: y\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    let (resp, _) = raw_exchange(&addr, many.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 431"), "too many headers: {resp}");

    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let (resp, _) = raw_exchange(&addr, big.as_bytes(), Duration::from_secs(5));
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "headers too large: {resp:.80}"
    );

    // A body that never finishes: 408 after request_timeout.
    let slow = "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/EDIFACT\r\nContent-Length: 1000\r\n\r\nUNB+UNOA:1";
    let (resp, took) = raw_exchange(&addr, slow.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("request_timeout"), "{resp}");
    assert!(took < Duration::from_secs(4), "{took:?}");

    // Headers that never finish: the connection is closed after header_timeout.
    let (resp, took) = raw_exchange(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    );
    assert!(!resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        took < Duration::from_secs(4),
        "closed after the header timeout: {took:?}"
    );

    // Past max_connections: 503 with a reason, while the others hold their slots.
    let hold: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (resp, _) = raw_exchange(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("too_many_connections"), "{resp}");
    drop(hold);
    // Slots come back once those connections go.
    std::thread::sleep(Duration::from_millis(300));
    let (resp, _) = raw_exchange(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_identifies_a_sender() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "main");
    let server = pki.issue("server", &["127.0.0.1"], false);
    let lab = pki.issue("lab-client", &[], true);
    let stranger = pki.issue("stranger-client", &[], true);
    let ca = pki.ca_file("main");
    let extra = format!(
        "{}require_client_cert = false\n[[senders]]\nname = \"lab\"\ncert_sha256 = \"{}\"\nparty_ids = [\"mailbox:500001234\"]\n",
        tls_table(&server, Some(&ca)),
        lab.sha256()
    );
    let with_lab = client(&ca, Some(lab.identity()));
    let probe = client(&ca, None);
    let broker = tokio::task::spawn_blocking(move || TlsBroker::start(tmp, &extra, &probe))
        .await
        .unwrap();
    let (s, j, _) = post_as(&with_lab, &broker.url, None, edifact_from(1, "500001234")).await;
    assert_eq!(s, 202, "{j}");
    let (s, j, _) = post_as(&with_lab, &broker.url, None, edifact_from(2, "500007777")).await;
    assert_eq!(s, 403, "in another party's name: {j}");
    let anonymous = client(&ca, None);
    let (s, _, _) = post_as(&anonymous, &broker.url, None, edifact_from(3, "500001234")).await;
    assert_eq!(s, 401, "no certificate, no token");
    let with_stranger = client(&ca, Some(stranger.identity()));
    let (s, j, _) = post_as(
        &with_stranger,
        &broker.url,
        None,
        edifact_from(4, "500001234"),
    )
    .await;
    assert_eq!(s, 401, "a valid certificate nobody configured: {j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_verify_the_receiver_against_the_configured_ca() {
    // The receiver is a second ketenbus over TLS: it takes the raw EDIFACT with 202.
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "care-network");
    let server = pki.issue("receiver", &["127.0.0.1"], false);
    let ca = pki.ca_file("care-network");
    let extra = tls_table(&server, None);
    let probe = client(&ca, None);
    let receiver = tokio::task::spawn_blocking(move || TlsBroker::start(tmp, &extra, &probe))
        .await
        .unwrap();
    let target = format!("{}/api/v1/messages", receiver.url);
    let subs = format!(
        "{}{}[subscriptions.retry]\ninitial = \"100ms\"\nmax = \"200ms\"\ngive_up_after = \"1s\"\n",
        ketenbus_tests::webhook_subscription(
            "trusting",
            "\"raw\"",
            &target,
            &format!(", ca_file = {ca:?}")
        ),
        ketenbus_tests::webhook_subscription("public-roots", "\"raw\"", &target, ""),
    );
    let sender = ketenbus_tests::Broker::start(&subs);
    let c = reqwest::Client::new();
    let id = accepted_as(&c, &sender.url, None, edifact_from(1, "500001234")).await;
    let l = lineage_until_as(&sender.url, &id, None, |l| {
        let outcomes: Vec<(String, String)> = l["deliveries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|d| {
                (
                    d["subscription"].as_str().unwrap_or("").to_owned(),
                    d["outcome"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        outcomes.len() == 2 && outcomes.iter().all(|(_, o)| o != "retrying")
    })
    .await;
    let outcome = |name: &str| {
        l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["subscription"] == name)
            .unwrap()["outcome"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(outcome("trusting"), "delivered", "{l:#}");
    assert_eq!(
        outcome("public-roots"),
        "dead_lettered",
        "an unknown CA is never trusted: {l:#}"
    );
}

/// Nictiz Acute Zorg example (CC0, synthetic patient): an ambulance referral whose
/// MessageHeader names sender ura:00000001.
const AZ_REFERRAL: &str = include_str!(
    "../../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
);
const AMBULANCE_TOKEN: &str = "kb_ambulance_token_for_tests_0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fhir_message_header_must_name_the_authenticated_sender() {
    let extra = format!(
        "{}[[senders]]\nname = \"ambulance\"\ntoken_sha256 = \"{}\"\nparty_ids = [\"ura:00000001\"]\n",
        principals(),
        sha(AMBULANCE_TOKEN)
    );
    let broker = ketenbus_tests::Broker::start(&extra);
    let c = reqwest::Client::new();
    let post = |path: &'static str, token: &'static str| {
        c.post(format!("{}{path}", broker.url))
            .header("content-type", "application/fhir+json")
            .bearer_auth(token)
            .body(AZ_REFERRAL)
            .send()
    };
    for path in ["/api/v1/messages", "/fhir/$process-message"] {
        let r = post(path, LAB_TOKEN).await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        // The API answers JSON, the FHIR endpoints an OperationOutcome.
        let j: serde_json::Value = r.json().await.unwrap();
        let text = if path.starts_with("/fhir") {
            j["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        } else {
            assert_eq!(j["error"], "sender_mismatch");
            j["message"].as_str().unwrap().to_owned()
        };
        assert!(
            text.contains("sender_mismatch") || !path.starts_with("/fhir"),
            "{j}"
        );
        assert!(text.contains("ura:00000001"), "{j}");
        let r = post(path, AMBULANCE_TOKEN).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    // The capability statement stays open; FHIR reads need an operator.
    let meta = c
        .get(format!("{}/fhir/metadata", broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(meta.status(), 200);
}
