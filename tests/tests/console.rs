//! The operators' console at `/console/`: driven in a real browser (Debian's headless
//! Chromium through Python's Playwright, `tests/python/console_browser.py`), and attacked
//! directly: no session, a foreign page's POST, a stale session, a pause that must survive a
//! restart. Screenshots of each page are kept in `target/console-screenshots/operator/` and
//! `.../patient-search/`.

#![allow(clippy::unwrap_used)] // test code: a failing unwrap is a failing test

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use axum::response::IntoResponse;
use ketenbus_tests::{Broker, MEDLAB, Receiver, medlab, webhook_subscription};
use sha2::{Digest, Sha256};

const TOKEN: &str = "kb_console_test_operator_token_0123456789abcdef";
/// For `ketenbus dlq list` (the broker ignores it).
const OPERATOR: &[(&str, &str)] = &[("KETENBUS_OPERATOR_TOKEN", TOKEN)];
const BSN: &str = "999911120";
/// The sender of [`MEDLAB`].
const SENDER: &str = "mailbox:500001234";

fn config(gp: &str, archive: &str, console: &str) -> String {
    format!(
        "[http.console]\n{console}\n[edifact]\ncontrl_partners = [\"{SENDER}\"]\n\
         [[operators]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\n{}{}",
        hex::encode(Sha256::digest(TOKEN.as_bytes())),
        webhook_subscription("gp", "\"lab_result\"", gp, ""),
        webhook_subscription("archive", "\"lab_result\"", archive, ""),
    )
}

/// The venv's python (`KETENBUS_TEST_PYTHON`, set by `ops/test.sh`) when it and chromium are
/// there. Missing under CI is a failure; on a developer's machine it skips with a notice.
fn browser() -> Option<String> {
    let python = std::env::var("KETENBUS_TEST_PYTHON").ok();
    let chromium = std::path::Path::new("/usr/bin/chromium").exists();
    match python {
        Some(p) if chromium => Some(p),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "CI must run the console's browser tests: KETENBUS_TEST_PYTHON or /usr/bin/chromium missing (use ops/test.sh)"
            )
        }
        _ => {
            eprintln!(
                "skipping: KETENBUS_TEST_PYTHON or chromium missing; run through ops/test.sh"
            );
            None
        }
    }
}

/// The repository, where the browser script is and the screenshots go.
fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn audit_trail(b: &Broker) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(ketenbus::observe::audit::path_in(&b.dir.join("data")))
        .unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn audited(trail: &[serde_json::Value], action: &str) -> usize {
    trail
        .iter()
        .filter(|r| r["action"] == action && r["actor"] == "operator:alice")
        .count()
}

/// A message dead-lettered by `gp` (its receiver answers 400), delivered to `archive`.
async fn dead_lettered_message(b: &Broker) -> String {
    let c = reqwest::Client::new();
    let id = b
        .accept(&c, "application/EDIFACT", MEDLAB.as_bytes().to_vec())
        .await;
    b.eventually(Duration::from_secs(20), "the gp dead letter", async || {
        let (ok, out, _) = b.cli(&["dlq", "list", "--subscription", "gp"]);
        ok && out.contains(&id)
    })
    .await;
    id
}

/// Two subscriptions, `gp` and `archive`, and a message `gp` dead-lettered (its receiver
/// answered 400; now it answers 204); the console is configured for the `/ops` prefix.
async fn scene() -> (Receiver, Receiver, Broker, String) {
    let gp = Receiver::answering(400).await;
    let archive = Receiver::ok().await;
    let prefix = "path_prefix = \"/ops\"";
    let b = Broker::start_with_env(&config(&gp.url(), &archive.url(), prefix), OPERATOR);
    let id = dead_lettered_message(&b).await;
    gp.set_status(204);
    (gp, archive, b, id)
}

/// A reverse proxy that serves `upstream` under `/ops` on a port of its own, as nginx does with
/// `location /ops/ { proxy_pass http://broker/; proxy_set_header X-Forwarded-Host $host; }`:
/// its base URL.
async fn prefix_proxy(upstream: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let upstream = upstream.to_owned();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (client, upstream) = (client.clone(), upstream.clone());
        async move { forward(&client, &upstream, req).await }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/ops")
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    req: axum::extract::Request,
) -> axum::response::Response {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Some(rest) = path.strip_prefix("/ops") else {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    };
    let mut out = client.request(req.method().clone(), format!("{upstream}{rest}"));
    for (k, v) in req.headers() {
        if k == "host" {
            out = out.header("x-forwarded-host", v);
        } else {
            out = out.header(k, v);
        }
    }
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    let resp = out.body(body).send().await.unwrap();
    let mut back = axum::http::Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if !["connection", "transfer-encoding", "keep-alive"].contains(&k.as_str()) {
            back = back.header(k, v);
        }
    }
    back.body(axum::body::Body::from(resp.bytes().await.unwrap()))
        .unwrap()
}

/// Make a FHIR Subscription (acute handovers for a GP post) notifying `endpoint`, as the
/// operator: its subscription name (`fhir-<id>`).
async fn fhir_subscription(b: &Broker, endpoint: &str) -> String {
    let backport = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
    let asked = serde_json::json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "acute handovers for the GP post",
        "criteria": "urn:ketenbus:fhir:SubscriptionTopic:acute-handover",
        "_criteria": { "extension": [{
            "url": format!("{backport}backport-filter-criteria"),
            "valueString": "ServiceRequest?receiver=ura:90000001",
        }] },
        "channel": { "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json" },
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/fhir/Subscription", b.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/fhir+json")
        .body(asked.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let made: serde_json::Value = resp.json().await.unwrap();
    format!("fhir-{}", made["id"].as_str().unwrap())
}

/// Run the browser script; `Err` with its output when it fails.
async fn drive(
    python: &str,
    b: &Broker,
    id: &str,
    patient: Option<&str>,
    fhir: Option<&str>,
) -> (String, Vec<String>) {
    let shots = repo()
        .join("target/console-screenshots")
        .join(if patient.is_some() {
            "patient-search"
        } else {
            "operator"
        });
    std::fs::create_dir_all(&shots).unwrap();
    let urls = b.dir.join("urls.txt");
    let next = String::from_utf8(medlab(7, "500001234", BSN)).unwrap();
    // Behind a proxy that serves the broker under /ops (its config says so).
    let console = prefix_proxy(&b.url).await;
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("tests/python/console_browser.py"))
        .args(["--url", &format!("{console}/console/")])
        .args(["--api", &b.url, "--token", TOKEN, "--message", id])
        .args([
            "--sender",
            SENDER,
            "--dead-sub",
            "gp",
            "--pause-sub",
            "archive",
        ])
        .args(["--next-message", &next])
        .arg("--shots")
        .arg(&shots)
        .arg("--urls")
        .arg(&urls);
    if let Some(p) = patient {
        cmd.args(["--patient", p]);
    }
    if let Some(f) = fhir {
        cmd.args(["--fhir-sub", f]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run the browser script");
    assert!(
        out.status.success(),
        "the browser script failed:\n{}\n{}\nbroker log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        b.log_text()
    );
    let visited = std::fs::read_to_string(&urls)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), visited)
}

/// Through a reverse proxy that serves the broker under `/ops`, an operator logs in, reads the overview, finds the dead-lettered message, opens it and its
/// raw form, replays its dead letter and sees it delivered, pauses a subscription (nothing is
/// delivered) and resumes it (it is), and logs out; each action is in the audit trail under
/// the operator's name, and neither the log nor any URL the browser asked for holds the BSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_works_the_console_in_a_real_browser() {
    let Some(python) = browser() else { return };
    let (gp, archive, b, id) = scene().await;
    // A Subscription made through the API, to be listed and paused like the others.
    let subscriber = Receiver::ok().await;
    let fhir = fhir_subscription(&b, &subscriber.url()).await;

    let (_, visited) = drive(&python, &b, &id, None, Some(&fhir)).await;

    assert_eq!(
        gp.received().len(),
        2,
        "the replayed dead letter and the message posted during the pause, once each"
    );
    assert_eq!(archive.received().len(), 2, "both messages reached archive");
    let trail = audit_trail(&b);
    for action in [
        "lineage_list",
        "lineage_read",
        "raw_read",
        "dlq_replay",
        "subscription_pause",
        "subscription_resume",
    ] {
        assert!(
            audited(&trail, action) > 0,
            "no {action} by alice: {trail:?}"
        );
    }
    assert!(
        trail.iter().any(|r| r["action"] == "subscription_pause"
            && r["party"] == format!("subscription:{fhir}").as_str()),
        "the FHIR Subscription's pause is audited: {trail:?}"
    );
    assert!(visited.iter().any(|u| u.contains("/console/api/search")));
    for u in &visited {
        assert!(!u.contains(BSN), "a URL with the BSN: {u}");
    }
    assert!(!b.log_text().contains(BSN), "the BSN is in the log");
    // Showing the raw message and its events is a read of that patient, by name.
    assert!(
        trail
            .iter()
            .any(|r| r["action"] == "raw_read"
                && r["patient"].as_str().is_some_and(|p| p.len() == 32)),
        "the raw read names no patient pseudonym: {trail:?}"
    );
}

/// The same in the browser, searching by the patient's BSN: the search finds the message, is
/// audited as a read of that patient, and the BSN is in no URL and not in the log. Needs the
/// `patient` filter of issue 13 item 2 (GET /api/v1/messages?patient=, branch h13s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_message_by_the_patients_bsn_in_the_browser() {
    let Some(python) = browser() else { return };
    let (_gp, _archive, b, id) = scene().await;
    let (_, visited) = drive(&python, &b, &id, Some(BSN), None).await;
    for u in &visited {
        assert!(!u.contains(BSN), "a URL with the BSN: {u}");
    }
    assert!(!b.log_text().contains(BSN), "the BSN is in the log");
    let trail = audit_trail(&b);
    assert!(
        trail.iter().any(|r| r["action"] == "patient_search"
            && r["actor"] == "operator:alice"
            && r["patient"].is_string()),
        "no audited read of the patient: {trail:?}"
    );
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(base: &str) -> Client {
        Client {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: format!("{base}/console/"),
        }
    }

    async fn login(&self, token: &str, origin: Option<&str>) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}api/login", self.base))
            .json(&serde_json::json!({ "token": token }));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send().await.unwrap()
    }

    /// Log in: (cookie, CSRF token, the whole Set-Cookie header).
    async fn session(&self) -> (String, String, String) {
        let resp = self.login(TOKEN, None).await;
        assert_eq!(resp.status(), 200);
        let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        let cookie = set.split(';').next().unwrap().to_owned();
        let j: serde_json::Value = resp.json().await.unwrap();
        (cookie, j["csrf"].as_str().unwrap().to_owned(), set)
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.unwrap()
    }

    /// A POST from the console's own page (the session's CSRF token, no Origin): its status.
    async fn act(&self, path: &str, cookie: &str, csrf: &str) -> u16 {
        let h = [("x-csrf-token", csrf)];
        let r = self.post(path, cookie, &h, serde_json::json!({})).await;
        r.status().as_u16()
    }

    async fn post(
        &self,
        path: &str,
        cookie: &str,
        headers: &[(&str, &str)],
        body: serde_json::Value,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

/// Without a session every API call is refused and pages go to the login page; a wrong token
/// gets no session; the cookie is HttpOnly, SameSite=Strict and scoped to the console's path
/// (behind the configured prefix); a POST without the session's CSRF token, with a wrong one,
/// or from a foreign origin changes nothing; a session ends after its idle time and at logout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_refuses_what_has_no_session_or_comes_from_elsewhere() {
    let gp = Receiver::answering(400).await;
    let archive = Receiver::ok().await;
    let b = Broker::start_with_env(
        &config(
            &gp.url(),
            &archive.url(),
            "path_prefix = \"/ops\"\nidle_timeout = \"2s\"",
        ),
        OPERATOR,
    );
    let id = dead_lettered_message(&b).await;
    gp.set_status(204);
    let c = Client::new(&b.url);

    for path in ["api/overview", "api/subscriptions", "api/session"] {
        assert_eq!(c.get(path, None).await.status(), 401, "{path}");
    }
    let page = c.get("", None).await;
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers()["location"], "login");
    let forged_cookie = format!("ketenbus_console={}", "a".repeat(64));
    assert_eq!(
        c.get("api/overview", Some(&forged_cookie)).await.status(),
        401
    );
    assert_eq!(c.login("kb_wrong", None).await.status(), 401);
    assert_eq!(
        c.login(TOKEN, Some("https://evil.example")).await.status(),
        403,
        "a login from a foreign page"
    );

    let (cookie, csrf, set) = c.session().await;
    let attrs: Vec<&str> = set.split("; ").collect();
    assert!(attrs.contains(&"HttpOnly"), "{set}");
    assert!(attrs.contains(&"SameSite=Strict"), "{set}");
    assert!(attrs.contains(&"Path=/ops/console/"), "{set}");
    assert!(!attrs.contains(&"Secure"), "plain HTTP on loopback: {set}");
    // Behind a proxy that took the request over HTTPS the cookie is Secure.
    let behind_tls = c
        .http
        .post(format!("{}api/login", c.base))
        .header("x-forwarded-proto", "https")
        .json(&serde_json::json!({ "token": TOKEN }))
        .send()
        .await
        .unwrap();
    let set_tls = behind_tls.headers()["set-cookie"].to_str().unwrap();
    assert!(set_tls.ends_with("; Secure"), "{set_tls}");
    assert_eq!(cookie.len(), "ketenbus_console=".len() + 64, "256-bit id");
    assert_eq!(c.get("", Some(&cookie)).await.status(), 200);
    let headers = c.get("api/overview", Some(&cookie)).await;
    assert_eq!(headers.headers()["cache-control"], "no-store");
    let snapshot: serde_json::Value = headers.json().await.unwrap();
    assert!(
        snapshot["metrics"]["ketenbus_dispatch_dead_letters_total"].is_array(),
        "{snapshot}"
    );

    // Forged cross-site POSTs: replay and pause refused, nothing happens.
    let replay = "api/subscriptions/gp/dead-letters/replay";
    let all = serde_json::json!({ "all": true });
    for (what, headers) in [
        ("no CSRF token", vec![]),
        ("a wrong CSRF token", vec![("x-csrf-token", "0".repeat(64))]),
        (
            "a foreign Origin",
            vec![
                ("x-csrf-token", csrf.clone()),
                ("origin", "https://evil.example".to_owned()),
            ],
        ),
        (
            "Sec-Fetch-Site: cross-site",
            vec![
                ("x-csrf-token", csrf.clone()),
                ("sec-fetch-site", "cross-site".to_owned()),
            ],
        ),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = c.post(replay, &cookie, &h, all.clone()).await;
        assert_eq!(r.status(), 403, "{what}");
        let r = c
            .post("api/subscriptions/archive/pause", &cookie, &h, all.clone())
            .await;
        assert_eq!(r.status(), 403, "{what}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(gp.received().is_empty(), "a forged replay was carried out");
    let trail = audit_trail(&b);
    assert_eq!(audited(&trail, "dlq_replay"), 0);
    assert_eq!(audited(&trail, "subscription_pause"), 0);

    // The real thing, from the console's own origin.
    let ok = [("x-csrf-token", csrf.as_str()), ("origin", b.url.as_str())];
    let r = c
        .post(replay, &cookie, &ok, serde_json::json!({ "ids": [id] }))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(gp.wait_for(1, Duration::from_secs(20)).await.len(), 1);

    // Idle for longer than idle_timeout: the session is gone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(c.get("api/session", Some(&cookie)).await.status(), 401);
    // Logout ends a session at once.
    let (cookie, csrf, _) = c.session().await;
    assert_eq!(c.act("api/logout", &cookie, &csrf).await, 204);
    assert_eq!(c.get("api/session", Some(&cookie)).await.status(), 401);
}

/// A paused subscription delivers nothing, also after a restart of the broker, and keeps its
/// place: resumed, it delivers what came in meanwhile. Pause and resume are audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_across_a_restart_and_a_resume_delivers_what_waited() {
    let gp = Receiver::ok().await;
    let archive = Receiver::ok().await;
    let mut b = Broker::start(&config(&gp.url(), &archive.url(), ""));
    let http = reqwest::Client::new();
    let c = Client::new(&b.url);
    let (cookie, csrf, _) = c.session().await;
    assert_eq!(
        c.act("api/subscriptions/archive/pause", &cookie, &csrf)
            .await,
        200
    );
    b.accept(&http, "application/EDIFACT", medlab(1, "500001234", BSN))
        .await;
    assert_eq!(gp.wait_for(1, Duration::from_secs(20)).await.len(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(archive.received().is_empty(), "delivered while paused");

    b.kill();
    b.spawn();
    b.accept(&http, "application/EDIFACT", medlab(2, "500001234", BSN))
        .await;
    assert_eq!(gp.wait_for(2, Duration::from_secs(20)).await.len(), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        archive.received().is_empty(),
        "delivered after a restart while paused"
    );
    let c = Client::new(&b.url);
    let (cookie, csrf, _) = c.session().await;
    let subs: serde_json::Value = c
        .get("api/subscriptions", Some(&cookie))
        .await
        .json()
        .await
        .unwrap();
    let archive_state = subs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "archive")
        .unwrap();
    assert_eq!(archive_state["paused"], true, "{subs}");
    // `ketenbus status` says so too, after the restart.
    let (_, out, err) = b.cli(&["status"]);
    assert!(out.contains("archive (paused)"), "{out}{err}");
    assert!(out.contains("- archive is paused"), "{out}{err}");
    assert!(!out.contains("gp (paused)"), "{out}{err}");

    assert_eq!(
        c.act("api/subscriptions/archive/resume", &cookie, &csrf)
            .await,
        200
    );
    let got = archive.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2, "both waiting records, once each");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(archive.received().len(), 2);
    let (_, out, err) = b.cli(&["status"]);
    assert!(!out.contains("paused"), "{out}{err}");
    let trail = audit_trail(&b);
    let pauses: Vec<&serde_json::Value> = trail
        .iter()
        .filter(|r| {
            r["actor"] == "operator:alice"
                && r["party"] == "subscription:archive"
                && (r["action"] == "subscription_pause" || r["action"] == "subscription_resume")
        })
        .collect();
    assert_eq!(pauses.len(), 2, "{trail:?}");
}

/// `ketenbus run --config config`, its log in `dir/ketenbus.log`: for listeners the test
/// harness does not start (TLS).
fn run_with_log(dir: &std::path::Path, config: &std::path::Path) -> std::process::Child {
    let log = std::fs::File::create(dir.join("ketenbus.log")).unwrap();
    Command::new(ketenbus_tests::ketenbus_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("KETENBUS_AUDIT_KEY", ketenbus_tests::AUDIT_KEY)
        .stderr(log)
        .spawn()
        .unwrap()
}

/// On a TLS listener the console answers over HTTPS and its session cookie is `Secure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_session_cookie_is_secure() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    let port = ketenbus_tests::free_port();
    let config = tmp.path().join("ketenbus.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[http.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
             [[operators]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\n",
            tmp.path().join("data"),
            hex::encode(Sha256::digest(TOKEN.as_bytes())),
        ),
    )
    .unwrap();
    let mut child = run_with_log(tmp.path(), &config);
    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pair.cert.pem().as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}/console/");
    let ready = ketenbus_tests::within(Duration::from_secs(30), async || {
        https.get(format!("{base}login")).send().await
    })
    .await;
    let logged = async {
        let page = ready.map_err(|e| e.to_string())?;
        assert_eq!(page.status(), 200);
        let resp = https
            .post(format!("{base}api/login"))
            .json(&serde_json::json!({ "token": TOKEN }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(resp)
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let resp = logged.unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            std::fs::read_to_string(tmp.path().join("ketenbus.log")).unwrap_or_default()
        )
    });
    assert_eq!(resp.status(), 200);
    let set = resp.headers()["set-cookie"].to_str().unwrap();
    assert_eq!(
        set.split("; ").skip(1).collect::<Vec<_>>(),
        ["Path=/console/", "HttpOnly", "SameSite=Strict", "Secure"],
        "{set}"
    );
}

/// On a listener that asks for client certificates (mTLS), an operator whose certificate is
/// the `cert_sha256` of their `[[operators]]` entry logs in to the console without a token,
/// and the login is audited with their name; a sender's certificate, or none, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_client_certificate_logs_in_without_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ketenbus_tests::ca::Ca::new(tmp.path(), "main");
    let (cert, key) = ca.issue("server", true);
    ca.issue("alice-client", false);
    ca.issue("lab-client", false);
    let port = ketenbus_tests::free_port();
    let config = tmp.path().join("ketenbus.toml");
    let data = tmp.path().join("data");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [http.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_ca_file = {:?}\nrequire_client_cert = false\n\
             [[operators]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\ncert_sha256 = \"{}\"\n\
             [[senders]]\nname = \"lab\"\ncert_sha256 = \"{}\"\nparty_ids = [\"{SENDER}\"]\n",
            ca.file(),
            hex::encode(Sha256::digest(TOKEN.as_bytes())),
            ca.fingerprint("alice-client"),
            ca.fingerprint("lab-client"),
        ),
    )
    .unwrap();
    let mut child = run_with_log(tmp.path(), &config);
    let client = |who: Option<&str>| {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(ca.file()).unwrap()).unwrap(),
            )
            .redirect(reqwest::redirect::Policy::none());
        if let Some(cn) = who {
            b = b.identity(ca.identity(cn));
        }
        b.build().unwrap()
    };
    let base = format!("https://127.0.0.1:{port}/console/");
    let (alice, lab, nobody) = (
        client(Some("alice-client")),
        client(Some("lab-client")),
        client(None),
    );
    let tried = async {
        ketenbus_tests::within(Duration::from_secs(30), async || {
            nobody.get(format!("{base}login")).send().await
        })
        .await
        .map_err(|e| e.to_string())?;
        let login = async |c: &reqwest::Client, body: serde_json::Value| {
            c.post(format!("{base}api/login"))
                .json(&body)
                .send()
                .await
                .map_err(|e| e.to_string())
        };
        let by_alice = login(&alice, serde_json::json!({})).await?;
        let status = by_alice.status().as_u16();
        let cookie = by_alice
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
        let body: serde_json::Value = by_alice.json().await.map_err(|e| e.to_string())?;
        // The session works like one made with a token.
        let session = match &cookie {
            Some(cookie) => alice
                .get(format!("{base}api/session"))
                .header("cookie", cookie)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .status()
                .as_u16(),
            None => 0,
        };
        let by_lab = login(&lab, serde_json::json!({})).await?.status().as_u16();
        let by_nobody = login(&nobody, serde_json::json!({}))
            .await?
            .status()
            .as_u16();
        // A wrong token is refused even with the operator's certificate.
        let wrong_token = login(&alice, serde_json::json!({ "token": "kb_not_it" }))
            .await?
            .status()
            .as_u16();
        Ok::<_, String>((
            status,
            cookie,
            body,
            session,
            by_lab,
            by_nobody,
            wrong_token,
        ))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let (status, cookie, body, session, by_lab, by_nobody, wrong_token) =
        tried.unwrap_or_else(|e| {
            panic!(
                "{e}\n{}",
                std::fs::read_to_string(tmp.path().join("ketenbus.log")).unwrap_or_default()
            )
        });
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["operator"], "alice", "{body}");
    assert!(cookie.is_some_and(|c| c.starts_with("ketenbus_console=")));
    assert_eq!(
        session, 200,
        "the certificate's session opens the console's API"
    );
    assert_eq!(by_lab, 401, "a sender's certificate is no operator's");
    assert_eq!(by_nobody, 401, "no certificate, no token");
    assert_eq!(
        wrong_token, 401,
        "a token given is checked, certificate or not"
    );
    let trail: Vec<serde_json::Value> =
        std::fs::read_to_string(ketenbus::observe::audit::path_in(&data))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(audited(&trail, "console_login_certificate"), 1, "{trail:?}");
    assert_eq!(trail.len(), 1, "refused logins open nothing: {trail:?}");
}
