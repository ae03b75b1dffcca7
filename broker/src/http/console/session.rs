//! Console sessions: an operator logs in (operator token or client certificate) and gets a
//! session cookie (`HttpOnly`, `SameSite=Strict`, `Secure` on TLS, `Path` the console's)
//! naming a random 256-bit session id. Sessions live in memory only: a restart logs everyone
//! out, which is the safe side. Each has an idle and an absolute timeout, and a CSRF token of
//! its own that every state-changing request carries in the `X-CSRF-Token` header.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Name of the session cookie.
pub const COOKIE: &str = "ketenbus_console";
/// Header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// One logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    /// The operator's configured name.
    pub operator: String,
    /// The token state-changing requests must carry.
    pub csrf: String,
    created: Instant,
    seen: Instant,
}

/// Every live session, by the SHA-256 of its id (the id itself is kept only by the browser).
#[derive(Debug)]
pub struct Sessions {
    idle: Duration,
    absolute: Duration,
    map: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// The session id a request's `Cookie` header carries, if any.
#[must_use]
pub fn cookie_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Sessions {
    /// An empty store with these timeouts.
    #[must_use]
    pub fn new(idle: Duration, absolute: Duration) -> Sessions {
        Sessions {
            idle,
            absolute,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new session for `operator`: its id (for the cookie) and the session.
    pub fn create(&self, operator: &str) -> (String, Session) {
        let id = random_hex();
        let now = Instant::now();
        let session = Session {
            operator: operator.to_owned(),
            csrf: random_hex(),
            created: now,
            seen: now,
        };
        let mut map = self.lock();
        let (idle, absolute) = (self.idle, self.absolute);
        map.retain(|_, s| now - s.seen < idle && now - s.created < absolute);
        map.insert(key(&id), session.clone());
        (id, session)
    }

    /// The live session with this id, its idle time restarted; an expired one is removed.
    pub fn touch(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.lock();
        let k = key(id);
        let s = map.get_mut(&k)?;
        if now - s.seen >= self.idle || now - s.created >= self.absolute {
            map.remove(&k);
            return None;
        }
        s.seen = now;
        Some(s.clone())
    }

    /// End the session with this id.
    pub fn remove(&self, id: &str) {
        self.lock().remove(&key(id));
    }
}

/// Whether `given` is the session's CSRF token (constant time).
#[must_use]
pub fn csrf_matches(session: &Session, given: Option<&str>) -> bool {
    given.is_some_and(|g| {
        g.len() == session.csrf.len() && bool::from(g.as_bytes().ct_eq(session.csrf.as_bytes()))
    })
}

/// Whether a state-changing request comes from the console's own pages: `Sec-Fetch-Site`,
/// when the browser sends it, is `same-origin`; `Origin`, when sent, names the host the
/// request was sent to. A request without either (a non-browser client) passes here and is
/// still held to the CSRF token.
#[must_use]
pub fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site")
        && site != "same-origin"
    {
        return false;
    }
    match text("origin") {
        None => true,
        Some(origin) => {
            let host = text("x-forwarded-host").or(text("host"));
            let origin_host = origin
                .split_once("://")
                .map(|(_, rest)| rest.trim_end_matches('/'));
            matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
        }
    }
}

/// The `Set-Cookie` value that gives the browser session `id`.
#[must_use]
pub fn set_cookie(id: &str, path: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path={path}; HttpOnly; SameSite=Strict{secure}")
}

/// The `Set-Cookie` value that removes the session cookie.
#[must_use]
pub fn clear_cookie(path: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path={path}; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_after_idle_time_and_after_absolute_time() {
        let s = Sessions::new(Duration::from_millis(400), Duration::from_millis(1200));
        let (id, _) = s.create("alice");
        assert_eq!(id.len(), 64, "256 bits, hex");
        assert!(s.touch(&id).is_some());
        std::thread::sleep(Duration::from_millis(500));
        assert!(s.touch(&id).is_none(), "idle too long");
        let (id, _) = s.create("alice");
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(200));
            assert!(s.touch(&id).is_some(), "kept alive");
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            s.touch(&id).is_none(),
            "absolute timeout reached while active"
        );
        assert!(s.touch(&random_hex()).is_none(), "an unknown id");
    }

    #[test]
    fn csrf_and_origin_checks_refuse_what_a_foreign_page_sends() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(60));
        let (_, session) = s.create("alice");
        assert!(csrf_matches(&session, Some(&session.csrf)));
        assert!(!csrf_matches(&session, None));
        assert!(!csrf_matches(&session, Some("")));
        assert!(!csrf_matches(&session, Some(&random_hex())));
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            m
        };
        assert!(same_origin(&h(&[("host", "kb.test:8443")])));
        assert!(same_origin(&h(&[
            ("host", "kb.test:8443"),
            ("origin", "https://kb.test:8443"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_origin(&h(&[
            ("host", "kb.test:8443"),
            ("origin", "https://evil.test"),
        ])));
        assert!(!same_origin(&h(&[
            ("host", "kb.test:8443"),
            ("sec-fetch-site", "cross-site"),
        ])));
        assert!(!same_origin(&h(&[("host", "kb.test"), ("origin", "null")])));
    }

    #[test]
    fn the_cookie_is_http_only_strict_scoped_and_secure_on_tls() {
        let c = set_cookie("ab", "/ops/console/", true);
        assert_eq!(
            c,
            "ketenbus_console=ab; Path=/ops/console/; HttpOnly; SameSite=Strict; Secure"
        );
        assert!(!set_cookie("ab", "/console/", false).contains("Secure"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={}", "f".repeat(64)).parse().unwrap(),
        );
        assert_eq!(cookie_id(&h), Some("f".repeat(64)));
        h.insert(header::COOKIE, format!("{COOKIE}=short").parse().unwrap());
        assert_eq!(cookie_id(&h), None);
    }
}
