//! Whole-system tests of ketenbus: they start the `ketenbus` binary as a process and talk to
//! it through real sockets, with a real webhook receiver on loopback. The same harness drives
//! the end-to-end benchmark (`src/bin/bench.rs`).

pub mod batch;
pub mod ca;
pub mod mcsd;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::sync::Notify;

mod swaks;
pub use swaks::{Swaks, queued_id};

/// A free loopback port.
///
/// # Panics
/// When no port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(100);

/// What a wait's check answers: done, with what the wait gives back, or not yet, with what
/// it saw (for the message when the time is up; may be empty).
pub trait Check {
    /// What the wait gives back once done.
    type Value;
    /// `Ok` when done, else what was seen.
    ///
    /// # Errors
    /// When not done yet: what was seen.
    fn done(self) -> Result<Self::Value, String>;
}

impl Check for bool {
    type Value = ();
    fn done(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Check for Option<T> {
    type Value = T;
    fn done(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T, E: std::fmt::Display> Check for Result<T, E> {
    type Value = T;
    fn done(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Ask `check` every 100 ms until it is done, for at most `timeout`.
///
/// # Errors
/// When the time is up: what the check saw last.
pub async fn within<C: Check>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> C,
) -> Result<C::Value, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = match check().await.done() {
            Ok(value) => return Ok(value),
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(seen);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Wait until `check` is done, asking every 100 ms; what it gives back.
///
/// # Panics
/// When it is not done within `timeout`, naming `what` was awaited and what the check saw
/// last.
pub async fn eventually<C: Check>(
    timeout: Duration,
    what: &str,
    check: impl AsyncFnMut() -> C,
) -> C::Value {
    within(timeout, check)
        .await
        .unwrap_or_else(|seen| panic!("{}", timed_out(timeout, what, &seen)))
}

/// [`within`] for code that blocks (no runtime).
///
/// # Errors
/// When the time is up: what the check saw last.
pub fn within_blocking<C: Check>(
    timeout: Duration,
    mut check: impl FnMut() -> C,
) -> Result<C::Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match check().done() {
            Ok(value) => return Ok(value),
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            return Err(seen);
        }
        std::thread::sleep(POLL);
    }
}

/// [`eventually`] for code that blocks (no runtime).
///
/// # Panics
/// When `check` is not done within `timeout`.
pub fn eventually_blocking<C: Check>(
    timeout: Duration,
    what: &str,
    check: impl FnMut() -> C,
) -> C::Value {
    within_blocking(timeout, check)
        .unwrap_or_else(|seen| panic!("{}", timed_out(timeout, what, &seen)))
}

fn timed_out(timeout: Duration, what: &str, seen: &str) -> String {
    if seen.is_empty() {
        format!("waited {timeout:?} for {what}")
    } else {
        format!("waited {timeout:?} for {what}; last seen:\n{seen}")
    }
}

/// The `ketenbus` binary of this build: next to the test executable's `deps` folder, or
/// `KETENBUS_BIN`. `ops/test.sh` builds it before the tests run.
///
/// # Panics
/// When it is not built.
#[must_use]
pub fn ketenbus_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KETENBUS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("ketenbus");
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build -p ketenbus` first (ops/test.sh does)",
        bin.display()
    );
    bin
}

/// Run `ketenbus check-config` on the config file at `path`, with the test audit key and
/// `env`; (success, what it wrote to stderr).
///
/// # Panics
/// When the binary cannot run.
#[must_use]
pub fn check_config(path: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(ketenbus_bin())
        .args(["check-config", "--config"])
        .arg(path)
        .env("KETENBUS_AUDIT_KEY", AUDIT_KEY)
        .envs(env.iter().copied())
        .output()
        .expect("run ketenbus check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The audit key every broker and command started here gets in `KETENBUS_AUDIT_KEY`
/// (the default `[audit] key_env`), unless a test gives its own.
pub const AUDIT_KEY: &str = "audit-key-for-the-whole-system-tests-0123456789";

/// A running `ketenbus run` process with its own data directory and port.
pub struct Broker {
    child: Option<Child>,
    /// Its data directory (kept across restarts).
    pub dir: PathBuf,
    /// Base URL of its HTTP API.
    pub url: String,
    /// The config file it runs with.
    pub config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Start a broker with `extra` appended to a config that sets data dir and port.
    ///
    /// # Panics
    /// When it does not become ready in 30 s.
    #[must_use]
    pub fn start(extra: &str) -> Broker {
        Broker::start_with_env(extra, &[])
    }

    /// Start a broker whose process also gets these environment variables (secrets).
    ///
    /// # Panics
    /// When it does not become ready in 30 s.
    #[must_use]
    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Broker {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut b = Broker::prepare(&dir, extra);
        b.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        b._tmp = Some(tmp);
        b.spawn();
        b
    }

    /// Write the config for a broker in `dir` without starting it.
    #[must_use]
    pub fn prepare(dir: &Path, extra: &str) -> Broker {
        let port = free_port();
        let config = dir.join("ketenbus.toml");
        let text = format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n",
            dir.join("data")
        );
        std::fs::write(&config, text).expect("write config");
        Broker {
            child: None,
            dir: dir.to_path_buf(),
            url: format!("http://127.0.0.1:{port}"),
            config,
            log: dir.join("ketenbus.log"),
            env: Vec::new(),
            _tmp: None,
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Its `/metrics` text.
    ///
    /// # Panics
    /// When the broker does not answer.
    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text")
    }

    /// GET `path` (e.g. `/readyz`) of its HTTP API; the answer as JSON.
    ///
    /// # Panics
    /// When the broker does not answer with JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).await.json().await.expect("JSON")
    }

    /// Start (or restart) the process and wait until `/readyz` is green.
    ///
    /// # Panics
    /// When it does not become ready in 30 s.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(ketenbus_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("KETENBUS_LOG", "info,ketenbus=debug")
            .env("KETENBUS_AUDIT_KEY", AUDIT_KEY)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ketenbus");
        self.child = Some(child);
        let probe = probe::Probe;
        let ready = within_blocking(Duration::from_secs(30), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "ketenbus exited with {status} during start-up:\n{}",
                    read_log(&self.log)
                );
            }
            probe.ready(&format!("{}/readyz", self.url))
        });
        assert!(
            ready.is_ok(),
            "ketenbus did not become ready:\n{}",
            self.log_text()
        );
    }

    /// Replace the extra environment variables for the next [`spawn`](Self::spawn).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Wait up to `timeout` for the process to exit on its own; its exit status, or `None`
    /// while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = within_blocking(timeout, || {
            self.child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
        })
        .ok()?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL the process (no shutdown of any kind).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the process logged so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }

    /// As [`eventually`], with this broker's log in the message when the time is up.
    ///
    /// # Panics
    /// When `check` is not done within `timeout`.
    pub async fn eventually<C: Check>(
        &self,
        timeout: Duration,
        what: &str,
        check: impl AsyncFnMut() -> C,
    ) -> C::Value {
        within(timeout, check).await.unwrap_or_else(|seen| {
            panic!(
                "{}\nbroker log:\n{}",
                timed_out(timeout, what, &seen),
                self.log_text()
            )
        })
    }

    /// POST a message this broker must take (202): its id.
    ///
    /// # Panics
    /// When the broker does not answer 202 (with its answer and log).
    pub async fn accept(&self, c: &reqwest::Client, content_type: &str, body: Vec<u8>) -> String {
        let (status, j) = post_message(c, &self.url, content_type, body)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()));
        assert_eq!(status, 202, "{j}\n{}", self.log_text());
        j["id"].as_str().expect("an id").to_owned()
    }

    /// Hold the write lock of the embedded log's database for `seconds`, as a stuck disk or
    /// a backup would: another process (python3's sqlite3) that has the lock when this
    /// returns. Wait on it to know the lock is gone.
    ///
    /// # Panics
    /// When python3 cannot start or does not take the lock.
    #[must_use]
    pub fn lock_log(&self, seconds: u32) -> Child {
        let mut holder = Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys,time\nc=sqlite3.connect(sys.argv[1],isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked',flush=True)\ntime.sleep(float(sys.argv[2]))\nc.execute('COMMIT')",
            ])
            .arg(self.dir.join("data/log.db"))
            .arg(seconds.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.as_mut().expect("stdout")),
            &mut line,
        )
        .expect("read python3");
        assert_eq!(line.trim(), "locked");
        holder
    }

    /// Run a `ketenbus` subcommand against this broker's config; returns (success, stdout, stderr).
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(ketenbus_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("KETENBUS_AUDIT_KEY", AUDIT_KEY)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run ketenbus");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking readiness probe without pulling a blocking HTTP client into the build.
mod probe {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub(super) struct Probe;

    impl Probe {
        /// `GET url` answers 200.
        pub(super) fn ready(&self, url: &str) -> bool {
            let rest = url.trim_start_matches("http://");
            let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
            let Ok(mut s) = TcpStream::connect(host) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            if write!(
                s,
                "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .is_err()
            {
                return false;
            }
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            buf.starts_with("HTTP/1.1 200")
        }
    }
}

/// One request a webhook receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request headers (lower-case names).
    pub headers: HashMap<String, String>,
    /// Body.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    /// A header value.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How a receiver answers.
#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    /// Status to answer.
    pub status: u16,
    /// Wait before answering.
    pub delay: Duration,
}

/// A webhook receiver on loopback that records every request.
#[derive(Clone)]
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct ReceiverState {
    got: Mutex<Vec<Received>>,
    /// Requests whose body contains these bytes get this status instead (one patient down).
    fail_matching: Mutex<Option<(Vec<u8>, u16)>>,
    status: AtomicU16,
    delay_ms: AtomicU16,
    notify: Notify,
}

impl Receiver {
    /// Start a receiver answering `status` after `delay`.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start(b: Behaviour) -> Receiver {
        let state = Arc::new(ReceiverState {
            got: Mutex::new(Vec::new()),
            fail_matching: Mutex::new(None),
            status: AtomicU16::new(b.status),
            delay_ms: AtomicU16::new(u16::try_from(b.delay.as_millis()).unwrap_or(u16::MAX)),
            notify: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/{*path}", post(record))
            .route("/", post(record))
            // Takes what the broker takes (a 25 MiB message delivered raw).
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    /// Start a receiver that answers `status` at once.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn answering(status: u16) -> Receiver {
        Receiver::start(Behaviour {
            status,
            delay: Duration::ZERO,
        })
        .await
    }

    /// Start a receiver that answers 200 at once.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn ok() -> Receiver {
        Receiver::answering(200).await
    }

    /// Its URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Change the answer.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Answer `status` (without recording the request) to every request whose body contains
    /// `needle`, e.g. one patient's BSN; `None` answers every request as before again.
    pub fn fail_matching(&self, rule: Option<(&[u8], u16)>) {
        *self.state.fail_matching.lock().expect("lock") = rule.map(|(n, s)| (n.to_vec(), s));
    }

    /// Everything received so far.
    #[must_use]
    pub fn received(&self) -> Vec<Received> {
        self.state.got.lock().expect("lock").clone()
    }

    /// Wait until at least `n` requests arrived, or `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.notify.notified();
            let got = self.received();
            if got.len() >= n || tokio::time::Instant::now() >= deadline {
                return got;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

async fn record(
    State(st): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
    let matched = st
        .fail_matching
        .lock()
        .expect("lock")
        .as_ref()
        .filter(|(needle, _)| {
            !needle.is_empty() && body.windows(needle.len()).any(|w| w == needle.as_slice())
        })
        .map(|(_, s)| *s);
    let status = matched.unwrap_or_else(|| st.status.load(Ordering::SeqCst));
    if (200..300).contains(&status) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        st.got.lock().expect("lock").push(Received {
            headers,
            body,
            at: Instant::now(),
        });
        st.notify.notify_waiters();
    }
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A webhook subscription table for a config.
#[must_use]
pub fn webhook_subscription(name: &str, kinds: &str, url: &str, extra: &str) -> String {
    format!(
        "[[subscriptions]]\nname = \"{name}\"\nkinds = [{kinds}]\nsink = {{ type = \"webhook\", url = \"{url}\" {extra} }}\n"
    )
}

/// POST a message; returns (status, JSON body).
///
/// # Errors
/// On a transport error.
pub async fn post_message(
    client: &reqwest::Client,
    base: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::Result<(u16, serde_json::Value)> {
    let resp = client
        .post(format!("{base}/api/v1/messages"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

/// GET the lineage of a message.
///
/// # Errors
/// On a transport error.
pub async fn lineage(
    client: &reqwest::Client,
    base: &str,
    id: &str,
) -> reqwest::Result<serde_json::Value> {
    client
        .get(format!("{base}/api/v1/messages/{id}"))
        .send()
        .await?
        .json()
        .await
}

/// Poll the lineage of message `id` until `pred` holds, for up to 30 s; that lineage.
///
/// # Panics
/// When it never holds (with the last lineage seen), or the broker does not answer.
pub async fn lineage_until(
    base: &str,
    id: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    lineage_until_as(base, id, None, pred).await
}

/// [`lineage_until`], reading with a bearer `token` (an operator's) where the API asks for one.
///
/// # Panics
/// When it never holds (with the last lineage seen), or the broker does not answer.
pub async fn lineage_until_as(
    base: &str,
    id: &str,
    token: Option<&str>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let c = reqwest::Client::new();
    let what = format!("the lineage of {id} to match");
    eventually(Duration::from_secs(30), &what, async || {
        let mut req = c.get(format!("{base}/api/v1/messages/{id}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let l: serde_json::Value = req
            .send()
            .await
            .expect("lineage")
            .json()
            .await
            .expect("lineage");
        if pred(&l) {
            Ok(l)
        } else {
            Err(format!("{l:#}"))
        }
    })
    .await
}

/// A synthetic MEDLAB:1 lab result (invented patient, BSN passing the eleven-test) from
/// mailbox 500001234 to 500005678, one Kalium result with a remark.
pub const MEDLAB: &str = "UNB+UNOA:1+500001234+500005678+261101:0815+IC0042'
UNH+M0042+MEDLAB:1'
ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567'
PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN999911120'
DET+26:11:01+07:40'
IDE+J+L2611017+bloed'
SEC+CHEMIE'
BEP+0+Kalium+5.9++mmol/l+>+3.5+5.0+K'
OPB+Hemolytisch monster?: herhalen aanbevolen'
UNT+9+M0042'
UNZ+1+IC0042'
";

/// A synthetic MEDLAB lab report (invented patient, test BSN) from `sender` (UNB mailbox
/// number) about the patient with `bsn`.
#[must_use]
pub fn medlab(n: usize, sender: &str, bsn: &str) -> Vec<u8> {
    format!(
        "UNB+UNOA:1+{sender}+500005678+261101:0815+IC{n:04}'\
UNH+M{n:04}+MEDLAB:1'\
ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567'\
PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN{bsn}'\
DET+26:11:01+07:40'\
IDE+J+L{n:07}+bloed'\
SEC+CHEMIE'\
BEP+0+Kalium+5.9++mmol/l+>+3.5+5.0+K'\
UNT+8+M{n:04}'\
UNZ+1+IC{n:04}'"
    )
    .into_bytes()
}

/// Common analytes of a lab panel: name, unit, reference range, the lab's code.
const PANEL: [(&str, &str, f64, f64, &str); 16] = [
    ("Hemoglobine", "mmol/l", 7.5, 10.0, "HB"),
    ("Hematocriet", "l/l", 0.35, 0.50, "HT"),
    ("Leukocyten", "10*9/l", 4.0, 10.0, "LEUC"),
    ("Trombocyten", "10*9/l", 150.0, 400.0, "TROM"),
    ("Natrium", "mmol/l", 135.0, 145.0, "NA"),
    ("Kalium", "mmol/l", 3.5, 5.0, "K"),
    ("Kreatinine", "umol/l", 60.0, 110.0, "KREA"),
    ("Ureum", "mmol/l", 2.5, 7.5, "UREU"),
    ("Glucose", "mmol/l", 4.0, 7.8, "GLUC"),
    ("CRP", "mg/l", 0.0, 10.0, "CRP"),
    ("ALAT", "U/l", 0.0, 45.0, "ALAT"),
    ("ASAT", "U/l", 0.0, 35.0, "ASAT"),
    ("Gamma-GT", "U/l", 0.0, 55.0, "GGT"),
    ("Alkalische fosfatase", "U/l", 40.0, 120.0, "AF"),
    ("TSH", "mU/l", 0.4, 4.0, "TSH"),
    ("HbA1c", "mmol/mol", 20.0, 42.0, "HBA1"),
];

/// A synthetic MEDLAB:1 interchange of about `size` bytes (invented patient, test BSN): the
/// header segments of [`MEDLAB`] and as many results as fill `size`, going round a panel of
/// common analytes with values that differ per message and per line (some flagged high),
/// with a correct UNT segment count, so the router maps it into one lab-result event. The
/// values vary so that a message is no more repetitive than a real one: the embedded log
/// compresses what it stores, and a benchmark of one result repeated would flatter it.
#[must_use]
pub fn edifact_message(n: usize, size: usize) -> Vec<u8> {
    let mut s = format!(
        "UNB+UNOA:1+500001234+500005678+261101:0815+IC{n:06}'UNH+M{n:06}+MEDLAB:1'\
ZKH+Regiolab Noord+Laanweg:12::Groningen:9700AB+0501234567'\
PID+1961:04:09+M+Jansen::Jansen::Pieter:P.++BSN999911120'DET+26:11:01+07:40'\
IDE+J+L{n:07}+bloed'SEC+CHEMIE'"
    );
    // UNH, ZKH, PID, DET, IDE, SEC and, below, UNT.
    let mut segments = 7;
    let tail = format!("UNT+{}+M{n:06}'UNZ+1+IC{n:06}'", usize::MAX).len();
    for line in 0.. {
        let (name, unit, low, high, code) = PANEL[line % PANEL.len()];
        // From the bottom of the range to 30% past its top: about one in four is flagged high.
        let step = (n.wrapping_mul(31) + line.wrapping_mul(17)) % 100;
        #[allow(clippy::cast_precision_loss)]
        let value = low + (high - low) * 1.3 * step as f64 / 100.0;
        let flag = if value > high { "H" } else { "" };
        let decimals = if high >= 100.0 {
            0
        } else if high >= 1.0 {
            1
        } else {
            2
        };
        let segment =
            format!("BEP+0+{name}+{value:.decimals$}++{unit}+{flag}+{low}+{high}+{code}'");
        if s.len() + segment.len() + tail >= size {
            break;
        }
        s.push_str(&segment);
        segments += 1;
    }
    s.push_str(&format!("UNT+{segments}+M{n:06}'UNZ+1+IC{n:06}'"));
    s.into_bytes()
}

/// Validate FHIR R4 resources (JSON) with the independent npm `fhir` validator
/// (`tests/node/validate.js`, installed by `tests/node/setup.sh` on first use):
/// `Ok(report)` when every one is valid, else `Err(report)`.
///
/// # Panics
/// When node or the validator cannot be run.
pub fn fhir_validate(resources: &[serde_json::Value]) -> Result<String, String> {
    static INSTALL: Mutex<bool> = Mutex::new(false);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node");
    {
        let mut done = INSTALL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*done && !dir.join("node_modules/fhir/package.json").exists() {
            let ok = Command::new("bash")
                .arg(dir.join("setup.sh"))
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "tests/node/setup.sh failed: no FHIR validator");
        }
        *done = true;
    }
    // validate.js reads a file of one resource or a JSON array of them.
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(file.path(), serde_json::to_vec(resources).expect("JSON"))
        .expect("write the resources");
    let out = Command::new("node")
        .arg(dir.join("validate.js"))
        .arg(file.path())
        .output()
        .expect("node runs the FHIR validator");
    let report = String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned();
    out.status.success().then(|| report.clone()).ok_or(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_gives_back_what_the_check_found() {
        let mut looks = 0;
        let found = eventually(Duration::from_secs(5), "the third look", async || {
            looks += 1;
            (looks == 3).then_some(looks)
        })
        .await;
        assert_eq!(found, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waited 300ms for the impossible; last seen:\n2 + 2 = 4")]
    async fn eventually_names_what_it_waited_for_and_what_it_saw_last() {
        eventually(Duration::from_millis(300), "the impossible", async || {
            Err::<(), _>("2 + 2 = 4")
        })
        .await;
    }

    #[test]
    fn within_blocking_gives_up_after_the_timeout_with_what_it_saw() {
        let started = Instant::now();
        let seen = within_blocking(Duration::from_millis(250), || Err::<(), _>("not yet"));
        assert_eq!(seen, Err("not yet".to_owned()));
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
}
