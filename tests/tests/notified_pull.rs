//! Notified Pull between two ketenbus processes on the embedded engine (issue 14, items 3
//! and 4): node A notifies node B of an ambulance referral with a `pull-notification` Task,
//! B gets a token from A, pulls the resources and B's subscriber gets the acute handover.
//! Around it, every refusal: reads of A's resources by another party, tokens that expired,
//! that another key signed, that name another audience or another exchange, an
//! authorization-base replayed after it expired, and a partner that is down (retries across
//! a crash, then a dead letter). Every Task and resource A serves passes the npm `fhir`
//! validator.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ketenbus_tests::{Broker, Receiver, free_port, webhook_subscription};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const REFERRAL: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../connectors/testdata/fhir/nictiz-az-ig/Bundle-hg-ReferralBundle-AmbulanceHAP-referral.json"
));

const KEY_A: &str = "node-a-pull-key-0123456789abcdef0123";
const KEY_B: &str = "node-b-pull-key-0123456789abcdef0123";
const RAV: &str = "kb_rav_token";
const HAP: &str = "kb_hap_token";
const OTHER: &str = "kb_other_token";
const OPS: &str = "kb_ops_token";
const A_TO_B: &str = "kb_node_a_at_b";
const DOWN: &str = "kb_down_partner_at_b";

fn h(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Append `extra` to the config `prepare` wrote.
fn configure(b: &Broker, extra: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&b.config)
        .unwrap();
    f.write_all(extra.as_bytes()).unwrap();
}

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node")
}

/// The npm `fhir` validator (tests/node) on these resources; panics with its report.
fn validate(what: &str, resources: &[Value]) -> usize {
    if !node_dir().join("node_modules/fhir/package.json").exists() {
        let ok = Command::new("bash")
            .arg(node_dir().join("setup.sh"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "tests/node/setup.sh failed");
    }
    let mut child = Command::new("node")
        .arg(node_dir().join("validate.js"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(resources).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the npm fhir validator refused {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    resources.len()
}

fn input<'a>(task: &'a Value, code: &str) -> Vec<&'a str> {
    task["input"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"]["coding"][0]["code"] == code)
        .filter_map(|i| i["valueUrl"].as_str().or_else(|| i["valueString"].as_str()))
        .collect()
}

async fn get(c: &reqwest::Client, url: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut req = c.get(url).header("accept", "application/fhir+json");
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn token(c: &reqwest::Client, a: &Broker, base: &str) -> (u16, Value) {
    let resp = c
        .post(format!("{}/notified-pull/token", a.url))
        .form(&[
            ("grant_type", "client_credentials"),
            ("authorization_base", base),
        ])
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn outcome_text(v: &Value) -> String {
    assert_eq!(v["resourceType"], "OperationOutcome", "{v:#}");
    v["issue"][0]["diagnostics"]
        .as_str()
        .or_else(|| v["issue"][0]["details"]["text"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn audit_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("data").join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[derive(Debug, serde::Serialize, serde::Deserialize, Clone)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    exp: u64,
    iat: u64,
    jti: String,
    exchange: String,
    event: String,
}

fn claims_of(jwt: &str) -> Claims {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    jsonwebtoken::decode::<Claims>(jwt, &jsonwebtoken::DecodingKey::from_secret(b"x"), &v)
        .unwrap()
        .claims
}

fn sign(claims: &Claims, key: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// Nodes A and B, prepared in these directories; A takes referrals from the ambulance
/// (`RAV`).
fn nodes(dir_a: &Path, dir_b: &Path) -> (Broker, Broker) {
    let a = Broker::prepare(dir_a, "");
    let b = Broker::prepare(dir_b, "");
    configure(
        &a,
        &format!(
            "[[senders]]\nname = \"rav\"\ntoken_sha256 = \"{}\"\nparty_ids = [\"ura:00000001\"]\n",
            h(RAV)
        ),
    );
    (a, b)
}

/// Node B: node A as its Notified Pull partner (and a sender), its subscriber `rx` taking
/// the acute handovers; then both started with their keys.
fn start_both(a: &mut Broker, b: &mut Broker, rx: &Receiver) {
    configure(
        b,
        &format!(
            r#"
[[senders]]
name = "node-a"
token_sha256 = "{atob}"
party_ids = ["ura:00000001"]
[notified_pull]
base_url = "{b}/fhir"
key_env = "PULL_KEY_B"
[[notified_pull.partners]]
name = "node-a"
party_ids = ["ura:00000001"]
token_url = "{a}/notified-pull/token"
fhir_base = "{a}/fhir"
{hook}"#,
            atob = h(A_TO_B),
            a = a.url,
            b = b.url,
            hook = webhook_subscription("seh", "\"acute_handover\"", &rx.url(), ""),
        ),
    );
    a.set_env(&[("PULL_KEY_A", KEY_A), ("A_TO_B", A_TO_B)]);
    b.set_env(&[("PULL_KEY_B", KEY_B)]);
    a.spawn();
    b.spawn();
}

async fn post_referral(c: &reqwest::Client, a: &Broker) -> reqwest::Response {
    c.post(format!("{}/fhir/$process-message", a.url))
        .bearer_auth(RAV)
        .header("content-type", "application/fhir+json")
        .body(REFERRAL)
        .send()
        .await
        .unwrap()
}

/// A referral posted at A reaches B's subscriber `rx` as the acute handover B pulled: when
/// it arrived, and the event.
async fn handover_at_b(
    c: &reqwest::Client,
    a: &Broker,
    b: &Broker,
    rx: &Receiver,
) -> (Instant, Value) {
    let resp = post_referral(c, a).await;
    assert_eq!(resp.status().as_u16(), 202, "{}", a.log_text());
    let got = rx.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(
        got.len(),
        1,
        "node A:\n{}\nnode B:\n{}",
        a.log_text(),
        b.log_text()
    );
    let e: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(e["header"]["kind"], "acute_handover", "{e:#}");
    assert_eq!(e["referral"]["code"]["code"], "11131000146102");
    (got[0].at, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifies_b_b_pulls_and_every_refusal_holds() {
    let rx = Receiver::answering(204).await; // B's subscriber
    let probe = Receiver::answering(200).await; // a second receiver of A's notifications
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, mut b) = nodes(dir_a.path(), dir_b.path());
    configure(
        &a,
        &format!(
            r#"
[[senders]]
name = "hap"
token_sha256 = "{hap}"
party_ids = ["endpoint:https://hap.example.nl/fhir"]
[[senders]]
name = "other"
token_sha256 = "{other}"
party_ids = ["ura:99999999"]
[[operators]]
name = "ops"
token_sha256 = "{ops}"
[notified_pull]
base_url = "{a}/fhir"
key_env = "PULL_KEY_A"
authorization_base_ttl = "8s"
token_ttl = "4s"
[[subscriptions]]
name = "to-b"
kinds = ["acute_handover"]
sink = {{ type = "notified-pull", base_url = "{b}/fhir", requester = "ura:00000001", token_env = "A_TO_B" }}
[[subscriptions]]
name = "to-probe"
kinds = ["acute_handover"]
sink = {{ type = "notified-pull", base_url = "http://{probe}/fhir", requester = "ura:00000001" }}
"#,
            hap = h(HAP),
            other = h(OTHER),
            ops = h(OPS),
            a = a.url,
            b = b.url,
            probe = probe.addr,
        ),
    );
    start_both(&mut a, &mut b, &rx);
    let c = reqwest::Client::new();
    let mut validated = 0;

    // A takes the referral; B's subscriber gets the acute handover B pulled from A.
    let sent = Instant::now();
    let (at, e) = handover_at_b(&c, &a, &b, &rx).await;
    let pulled_after = at.duration_since(sent);
    assert_eq!(
        e["header"]["receiver"],
        "endpoint:https://hap.example.nl/fhir"
    );
    assert!(
        !e["sections"].as_array().unwrap().is_empty(),
        "the composition came along: {e:#}"
    );
    eprintln!("referral at A to handover at B's subscriber, pulled: {pulled_after:?}");

    // The notification Task as the receiver gets it.
    let tasks = probe.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(tasks.len(), 1, "{}", a.log_text());
    let task: Value = serde_json::from_slice(&tasks[0].body).unwrap();
    validated += validate("the notification Task", std::slice::from_ref(&task));
    assert_eq!(task["resourceType"], "Task");
    assert_eq!(task["code"]["coding"][0]["code"], "pull-notification");
    assert_eq!(task["requester"]["identifier"]["value"], "00000001");
    let base1 = input(&task, "authorization-base")[0].to_owned();
    assert_eq!(base1.len(), 64, "an unguessable authorization-base");
    let reads: Vec<String> = input(&task, "read-available-resource")
        .into_iter()
        .map(str::to_owned)
        .collect();
    let query = input(&task, "query-available-resources")[0].to_owned();
    assert!(reads[0].contains("/fhir/ServiceRequest/"), "{reads:?}");
    assert!(reads.len() >= 5, "{reads:?}");

    // Reads at A: the receiver reads every resource; another party and nobody do not.
    let mut served = Vec::new();
    for url in &reads {
        let (status, r) = get(&c, url, Some(HAP)).await;
        assert_eq!(status, 200, "{url}: {r:#}");
        assert_eq!(url.rsplit('/').next().unwrap(), r["id"]);
        served.push(r);
    }
    validated += validate("the resources A serves", &served);
    let (status, r) = get(&c, &reads[0], Some(OTHER)).await;
    assert_eq!(status, 404, "another party hears nothing exists: {r:#}");
    outcome_text(&r);
    let (status, _) = get(&c, &reads[0], None).await;
    assert_eq!(status, 401);
    let (status, r) = get(&c, &reads[0], Some(OPS)).await;
    assert_eq!(status, 200);
    assert_eq!(r, served[0]);

    // The pull with a token: the query gives the whole exchange.
    let (status, t) = token(&c, &a, &base1).await;
    assert_eq!(status, 200, "{t:#}");
    let jwt1 = t["access_token"].as_str().unwrap().to_owned();
    let (status, workflow) = get(
        &c,
        &format!("{}/fhir/Task/{}", a.url, task["id"].as_str().unwrap()),
        Some(&jwt1),
    )
    .await;
    assert_eq!(status, 200, "the workflow Task: {workflow:#}");
    assert!(input(&workflow, "authorization-base").is_empty());
    assert_eq!(
        input(&workflow, "read-available-resource").len(),
        reads.len()
    );
    let (status, set) = get(&c, &query, Some(&jwt1)).await;
    assert_eq!(status, 200, "{set:#}");
    assert_eq!(set["type"], "searchset");
    assert_eq!(set["entry"].as_array().unwrap().len(), reads.len());
    validated += validate("the searchset of the exchange", std::slice::from_ref(&set));

    // A second referral: a second exchange. Token 1 does not read it.
    let resp = post_referral(&c, &a).await;
    assert_eq!(resp.status().as_u16(), 202);
    let tasks = probe.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(tasks.len(), 2);
    let task2: Value = serde_json::from_slice(&tasks[1].body).unwrap();
    let reads2 = input(&task2, "read-available-resource");
    assert_ne!(reads2[0], reads[0]);
    let (status, r) = get(&c, reads2[0], Some(&jwt1)).await;
    assert_eq!(status, 403, "a token for another exchange: {r:#}");
    assert!(outcome_text(&r).contains("another exchange"));
    let (status, r) = get(
        &c,
        &format!("{}/fhir/Task/{}", a.url, task2["id"].as_str().unwrap()),
        Some(&jwt1),
    )
    .await;
    assert_eq!(status, 403, "another exchange's workflow Task: {r:#}");
    assert!(outcome_text(&r).contains("another exchange"));
    // Outside the exchange, an id that exists nowhere answers as one that exists: a token
    // holder learns nothing of what else this node holds.
    let (status, r) = get(&c, &format!("{}/fhir/Patient/nobody", a.url), Some(&jwt1)).await;
    assert_eq!(status, 403, "a read outside the exchange: {r:#}");
    assert!(outcome_text(&r).contains("another exchange"));
    let (status, r) = get(
        &c,
        &format!("{}/fhir/Patient?_id=nobody", a.url),
        Some(&jwt1),
    )
    .await;
    assert_eq!(status, 403, "a search outside the exchange: {r:#}");
    let (status, r) = get(&c, &format!("{}/fhir/Task/nothing", a.url), Some(&jwt1)).await;
    assert_eq!(status, 403, "a Task that exists nowhere: {r:#}");

    // Tokens this node did not sign as they are.
    let claims = claims_of(&jwt1);
    let (status, r) = get(&c, &reads[0], Some(&sign(&claims, KEY_B.as_bytes()))).await;
    assert_eq!(status, 401, "signed with another key: {r:#}");
    assert!(outcome_text(&r).contains("not one this node signed"));
    let elsewhere = Claims {
        aud: "https://elsewhere.example.nl/fhir".into(),
        ..claims.clone()
    };
    let (status, r) = get(&c, &reads[0], Some(&sign(&elsewhere, KEY_A.as_bytes()))).await;
    assert_eq!(status, 401, "another audience: {r:#}");
    assert!(outcome_text(&r).contains("another audience"));

    // Every read was audited with the patient's pseudonym and the reader.
    let audit = audit_lines(dir_a.path());
    let reads_by = |actor: &str| {
        audit
            .iter()
            .filter(|l| l["action"] == "fhir_read" && l["actor"].as_str() == Some(actor))
            .count()
    };
    assert_eq!(reads_by("sender:hap"), reads.len(), "{audit:#?}");
    assert!(reads_by(&format!("notified-pull:{}", claims.exchange)) >= 1);
    assert!(reads_by("operator:ops") >= 1);
    assert!(
        audit
            .iter()
            .filter(|l| l["action"] == "fhir_read")
            .all(|l| {
                l["patient"]
                    .as_str()
                    .is_some_and(|p| !p.is_empty() && !p.contains("999999990"))
            })
    );

    // Token 1 expires (token_ttl 4 s), then the authorization-base (8 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, r) = get(&c, &reads[0], Some(&jwt1)).await;
    assert_eq!(status, 401, "an expired token: {r:#}");
    assert!(outcome_text(&r).contains("expired"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, r) = token(&c, &a, &base1).await;
    assert_eq!(
        status, 400,
        "an authorization-base replayed after expiry: {r:#}"
    );
    assert_eq!(r["error"], "invalid_grant");
    eprintln!("validated by the npm fhir validator: {validated} resources");
    drop(b);
    drop(a);
}

/// A partner's notification Task as the TA has it, pointing at `base`.
fn partner_task(requester: &str, base: &str) -> String {
    json!({
        "resourceType": "Task",
        "id": "n1",
        "status": "requested",
        "intent": "proposal",
        "code": {"coding": [{"system": "http://fhir.nl/fhir/NamingSystem/TaskCode", "code": "pull-notification"}]},
        "requester": {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": requester}},
        "owner": {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00000002"}},
        "input": [
            {"type": {"coding": [{"system": "http://fhir.nl/fhir/NamingSystem/TaskParameter", "code": "authorization-base"}]},
             "valueString": "secret-authorization-base-of-the-partner"},
            {"type": {"coding": [{"system": "http://fhir.nl/fhir/NamingSystem/TaskParameter", "code": "read-available-resource"}]},
             "valueUrl": format!("{base}/ServiceRequest/s1")}
        ]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_partner_that_is_down_survives_a_crash_and_ends_as_a_dead_letter() {
    let closed = free_port();
    let down = format!("http://127.0.0.1:{closed}/fhir");
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::prepare(dir.path(), "");
    configure(
        &b,
        &format!(
            r#"
[[senders]]
name = "down"
token_sha256 = "{down_token}"
party_ids = ["ura:00000009"]
[notified_pull]
base_url = "{b}/fhir"
key_env = "PULL_KEY_B"
retry = {{ initial = "200ms", max = "400ms", give_up_after = "4s" }}
[[notified_pull.partners]]
name = "down"
party_ids = ["ura:00000009"]
token_url = "http://127.0.0.1:{closed}/notified-pull/token"
fhir_base = "{down}"
timeout = "1s"
"#,
            down_token = h(DOWN),
            b = b.url,
        ),
    );
    b.set_env(&[("PULL_KEY_B", KEY_B)]);
    b.spawn();
    let c = reqwest::Client::new();
    let post = |body: String, bearer: Option<&'static str>| {
        let mut req = c
            .post(format!("{}/fhir/Task", b.url))
            .header("content-type", "application/fhir+json")
            .body(body);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    // Nobody, a party that is no partner, a URL outside the partner's base: refused.
    assert_eq!(
        post(partner_task("00000009", &down), None)
            .await
            .unwrap()
            .status(),
        401
    );
    let r = post(partner_task("12345678", &down), Some(DOWN))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(
        partner_task("00000009", "http://127.0.0.1:1/fhir"),
        Some(DOWN),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);
    // Accepted, then the node is killed before the pull can succeed.
    let r = post(partner_task("00000009", &down), Some(DOWN))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    b.kill();
    b.spawn();
    let what = "the pull from the partner that is down to end as a dead letter";
    let listed = b
        .eventually(Duration::from_secs(30), what, async || {
            let (ok, out, err) = b.cli(&["dlq", "list", "--subscription", "notified-pull"]);
            if ok && out.lines().count() == 1 {
                Ok(out)
            } else {
                Err(format!("{out}{err}"))
            }
        })
        .await;
    assert!(listed.contains("token_refused"), "{listed}");
    assert!(
        !listed.contains("secret-authorization-base"),
        "the credential stays out of the dead letter: {listed}"
    );
    let log = b.log_text();
    let retries = log.matches("notified pull failed, retrying").count();
    assert!(retries >= 2, "retried {retries} times:\n{log}");
    eprintln!(
        "the pull was tried {} times before it was dead-lettered",
        retries + 1
    );
}

/// A resource is served while its event is on the log; once retention removed the event the
/// index still knows the resource, and the answer is 410 Gone with an OperationOutcome, not
/// 404 and never stale content. The XML answer is a FHIR XML resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_whose_event_retention_removed_is_gone() {
    let probe = Receiver::answering(200).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Broker::prepare(dir.path(), "");
    configure(
        &a,
        &format!(
            r#"
[bus.embedded]
retention_max_age = "1s"
retention_interval = "200ms"
[[senders]]
name = "rav"
token_sha256 = "{rav}"
party_ids = ["ura:00000001"]
[[operators]]
name = "ops"
token_sha256 = "{ops}"
[notified_pull]
base_url = "{a}/fhir"
key_env = "PULL_KEY_A"
[[subscriptions]]
name = "to-probe"
kinds = ["acute_handover"]
sink = {{ type = "notified-pull", base_url = "http://{probe}/fhir", requester = "ura:00000001" }}
"#,
            rav = h(RAV),
            ops = h(OPS),
            a = a.url,
            probe = probe.addr,
        ),
    );
    a.set_env(&[("PULL_KEY_A", KEY_A)]);
    a.spawn();
    let c = reqwest::Client::new();
    let resp = post_referral(&c, &a).await;
    assert_eq!(resp.status().as_u16(), 202, "{}", a.log_text());
    let tasks = probe.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(tasks.len(), 1, "{}", a.log_text());
    let task: Value = serde_json::from_slice(&tasks[0].body).unwrap();
    let read = input(&task, "read-available-resource")[0].to_owned();

    let (status, r) = get(&c, &read, Some(OPS)).await;
    assert_eq!(status, 200, "{r:#}");
    let resp = c
        .get(&read)
        .header("accept", "application/fhir+xml")
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let xml = resp.text().await.unwrap();
    let ty = r["resourceType"].as_str().unwrap();
    assert!(
        xml.contains(&format!("<{ty} xmlns=\"http://hl7.org/fhir\">"))
            && xml.contains(&format!("<id value=\"{}\"/>", r["id"].as_str().unwrap())),
        "{xml}"
    );

    let started = Instant::now();
    let (status, r) = loop {
        let (status, r) = get(&c, &read, Some(OPS)).await;
        if status != 200 || started.elapsed() > Duration::from_secs(30) {
            break (status, r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 410, "{r:#}\n{}", a.log_text());
    assert!(!outcome_text(&r).is_empty(), "{r:#}");
    eprintln!("gone {:?} after the read", started.elapsed());
}

/// The Backport rules a test can check on a Notified Pull notification Bundle; its
/// (event number, events since start, focus Task).
fn backport_notification(bundle: &Value) -> (u64, u64, Value) {
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "history", "{bundle:#}");
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        2,
        "the status and the Task, nothing else: {bundle:#}"
    );
    let p = &entries[0]["resource"];
    assert_eq!(p["resourceType"], "Parameters", "status Parameters first");
    assert_eq!(
        p["meta"]["profile"][0],
        "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
    );
    let param = |name: &str| {
        p["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {p:#}"))
    };
    assert_eq!(param("type")["valueCode"], "event-notification");
    assert_eq!(param("status")["valueCode"], "active");
    // The Notified Pull topic, whose focus is the notification Task (not the acute-handover
    // topic, whose focus is the ServiceRequest).
    assert_eq!(
        param("topic")["valueCanonical"],
        "urn:ketenbus:fhir:SubscriptionTopic:notified-pull"
    );
    assert!(
        param("subscription")["valueReference"]["reference"]
            .as_str()
            .unwrap()
            .contains("/fhir/Subscription/"),
    );
    let since: u64 = param("events-since-subscription-start")["valueString"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let event = param("notification-event")["part"].as_array().unwrap();
    let part = |name: &str| event.iter().find(|x| x["name"] == name).unwrap();
    let number: u64 = part("event-number")["valueString"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let focus = part("focus")["valueReference"]["reference"]
        .as_str()
        .unwrap();
    assert_eq!(entries[1]["fullUrl"], focus, "the focus is the Task entry");
    let task = entries[1]["resource"].clone();
    assert_eq!(task["resourceType"], "Task");
    assert_eq!(task["code"]["coding"][0]["code"], "pull-notification");
    assert!(focus.ends_with(&format!("/fhir/Task/{}", task["id"].as_str().unwrap())));
    assert!(
        !bundle.to_string().contains("999999990"),
        "no clinical content, no BSN"
    );
    (number, since, task)
}

/// The `notified-pull` style's second form: A sends a Backport notification Bundle (the
/// SubscriptionStatus first, the notification Task as its focus, nothing clinical); B takes
/// it at its FHIR base and pulls as for the Task, and its subscriber gets the handovers. An
/// expired token, another exchange's token and a read outside the exchange are refused for
/// this form too; B refuses a Backport notification from a stranger or without its Task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backport_notification_with_the_task_as_focus_is_taken_and_pulled() {
    let rx = Receiver::answering(204).await; // B's subscriber
    let probe = Receiver::answering(200).await; // a rest-hook endpoint for A's notifications
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, mut b) = nodes(dir_a.path(), dir_b.path());
    configure(
        &a,
        &format!(
            r#"
[notified_pull]
base_url = "{a}/fhir"
key_env = "PULL_KEY_A"
token_ttl = "3s"
[[subscriptions]]
name = "to-b"
kinds = ["acute_handover"]
sink = {{ type = "notified-pull", base_url = "{b}/fhir", requester = "ura:00000001", token_env = "A_TO_B", notification = "backport" }}
[[subscriptions]]
name = "to-probe"
kinds = ["acute_handover"]
sink = {{ type = "notified-pull", base_url = "http://{probe}/notify", requester = "ura:00000001", notification = "backport" }}
"#,
            a = a.url,
            b = b.url,
            probe = probe.addr,
        ),
    );
    start_both(&mut a, &mut b, &rx);
    let c = reqwest::Client::new();
    let mut validated = 0;

    // A notifies B with the Backport form; B pulls; B's subscriber gets the handover.
    handover_at_b(&c, &a, &b, &rx).await;

    // The notification as a rest-hook endpoint gets it.
    let notes = probe.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(notes.len(), 1, "{}", a.log_text());
    let bundle1: Value = serde_json::from_slice(&notes[0].body).unwrap();
    let (number, since, task) = backport_notification(&bundle1);
    assert_eq!((number, since), (1, 1));
    validated += validate("the Backport notification", std::slice::from_ref(&bundle1));
    // Its topic resolves at A: a Task topic, filtered by the Task's owner (the receiver).
    let (status, topic) = get(&c, &format!("{}/fhir/Basic/notified-pull", a.url), None).await;
    assert_eq!(status, 200, "{topic:#}");
    let exts = topic["extension"].as_array().unwrap();
    let sub = |name: &str| {
        exts.iter()
            .filter(|e| e["url"].as_str().unwrap().ends_with(&format!(".{name}")))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sub("url")[0]["valueUri"],
        "urn:ketenbus:fhir:SubscriptionTopic:notified-pull"
    );
    for shaped in sub("notificationShape")
        .into_iter()
        .chain(sub("canFilterBy"))
        .chain(sub("resourceTrigger"))
    {
        let resource = shaped["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["url"] == "resource")
            .unwrap();
        assert!(
            resource["valueUri"].as_str().unwrap().ends_with("Task"),
            "{shaped:#}"
        );
    }
    assert!(sub("canFilterBy")[0].to_string().contains("\"owner\""));
    validated += validate("the Notified Pull topic", std::slice::from_ref(&topic));
    let base1 = input(&task, "authorization-base")[0].to_owned();
    let reads: Vec<String> = input(&task, "read-available-resource")
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(reads[0].contains("/fhir/ServiceRequest/"), "{reads:?}");

    // The pull with a token: the focus (the workflow Task) and every resource.
    let (status, t) = token(&c, &a, &base1).await;
    assert_eq!(status, 200, "{t:#}");
    let jwt1 = t["access_token"].as_str().unwrap().to_owned();
    let focus = bundle1["entry"][1]["fullUrl"].as_str().unwrap();
    let (status, workflow) = get(&c, focus, Some(&jwt1)).await;
    assert_eq!(status, 200, "the focus is readable: {workflow:#}");
    assert!(input(&workflow, "authorization-base").is_empty());
    let mut served = vec![workflow];
    for url in &reads {
        let (status, r) = get(&c, url, Some(&jwt1)).await;
        assert_eq!(status, 200, "{url}: {r:#}");
        served.push(r);
    }
    validated += validate("the workflow Task and the resources", &served);

    // A second referral: numbered 2, a second exchange that token 1 does not read.
    let resp = post_referral(&c, &a).await;
    assert_eq!(resp.status().as_u16(), 202);
    let notes = probe.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(notes.len(), 2);
    let bundle2: Value = serde_json::from_slice(&notes[1].body).unwrap();
    let (number, since, task2) = backport_notification(&bundle2);
    assert_eq!((number, since), (2, 2), "numbered without gaps");
    validated += validate("the second notification", std::slice::from_ref(&bundle2));
    assert_eq!(
        rx.wait_for(2, Duration::from_secs(20)).await.len(),
        2,
        "{}",
        b.log_text()
    );
    let reads2 = input(&task2, "read-available-resource");
    let (status, r) = get(&c, reads2[0], Some(&jwt1)).await;
    assert_eq!(status, 403, "a token for another exchange: {r:#}");
    assert!(outcome_text(&r).contains("another exchange"));
    let (status, r) = get(
        &c,
        bundle2["entry"][1]["fullUrl"].as_str().unwrap(),
        Some(&jwt1),
    )
    .await;
    assert_eq!(status, 403, "another exchange's focus Task: {r:#}");
    assert!(outcome_text(&r).contains("another exchange"));
    let mut outcomes = vec![r];
    let (status, r) = get(&c, &format!("{}/fhir/Patient/nobody", a.url), Some(&jwt1)).await;
    assert_eq!(
        status, 403,
        "a read outside the exchange, of an id that exists nowhere: {r:#}"
    );
    outcomes.push(r);

    // B refuses a Backport notification from a party that is no partner, and one whose
    // focus is no notification Task it carries; a heartbeat pulls nothing.
    let post_b = |body: Value| {
        c.post(format!("{}/fhir", b.url))
            .bearer_auth(A_TO_B)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };
    let mut stranger = bundle2.clone();
    stranger["entry"][1]["resource"]["requester"]["identifier"]["value"] = json!("00000077");
    let resp = post_b(stranger).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    outcomes.push(resp.json().await.unwrap());
    let mut unfocused = bundle2.clone();
    unfocused["entry"][1]["fullUrl"] = json!(format!("{}/fhir/Task/elsewhere", a.url));
    let resp = post_b(unfocused).await.unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    outcomes.push(resp.json().await.unwrap());
    let mut heartbeat = bundle2.clone();
    heartbeat["entry"] = json!([bundle2["entry"][0].clone()]);
    let params = heartbeat["entry"][0]["resource"]["parameter"]
        .as_array_mut()
        .unwrap();
    params.retain(|p| p["name"] != "notification-event");
    for p in params.iter_mut() {
        if p["name"] == "type" {
            p["valueCode"] = json!("heartbeat");
        }
    }
    validated += validate("a heartbeat", std::slice::from_ref(&heartbeat));
    let resp = post_b(heartbeat).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    validated += validate("B's answers", &outcomes);

    // Token 1 expires (token_ttl 3 s).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (status, r) = get(&c, &reads[0], Some(&jwt1)).await;
    assert_eq!(status, 401, "an expired token: {r:#}");
    assert!(outcome_text(&r).contains("expired"));
    assert_eq!(
        rx.received().len(),
        2,
        "nothing more pulled: {}",
        b.log_text()
    );
    eprintln!("validated by the npm fhir validator: {validated} resources");
    drop(b);
    drop(a);
}
