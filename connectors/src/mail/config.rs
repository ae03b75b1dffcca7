//! Configuration of the mail connectors: `[mail]`, `[mail.smtp]` and `[[mail.imap]]` (the
//! `mail` sink of a subscription has its own, [`MailSinkConfig`](super::send::config)).
//! Documented serde structs; secrets only as `_env` names.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[mail]`: everything about mail in and out. Absent sections start nothing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    /// The SMTP listener (`[mail.smtp]`); not started when absent.
    pub smtp: Option<SmtpConfig>,
    /// IMAP mailboxes to pick up from (`[[mail.imap]]`), one consumer per mailbox.
    pub imap: Vec<ImapConfig>,
    /// Where attachment bytes are kept by SHA-256; default `<data_dir>/content`.
    pub content_dir: Option<PathBuf>,
    /// Sources whose delivery status notifications (bounces) may update the deliveries of
    /// mail subscriptions: `"smtp"` (the listener) and `"imap:<name>"` (a pickup). Absent:
    /// the SMTP listener and every IMAP pickup; `[]`: none. A report also needs the token
    /// the mail sink set in its envelope id; mail posted over HTTP never counts.
    pub bounce_sources: Option<Vec<String>>,
}

/// `[mail.smtp]`: the SMTP listener (RFC 5321).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Name in the greeting and the EHLO answer.
    pub hostname: String,
    /// Largest message accepted (announced as SIZE); larger ones get 552.
    pub max_message_size: bytesize::ByteSize,
    /// Most recipients per message; more get 452.
    pub max_recipients: usize,
    /// Longest command or message line in bytes, CRLF included; longer ones get 500 / 552.
    pub max_line_length: usize,
    /// Most connections at once; more get 421 and are closed.
    pub max_connections: usize,
    /// A connection silent this long gets 421 and is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Recipient domains accepted (`lms.example.test`); with `accept_addresses` both empty,
    /// every recipient is accepted.
    pub accept_domains: Vec<String>,
    /// Recipient addresses accepted, besides those in `accept_domains`.
    pub accept_addresses: Vec<String>,
    /// STARTTLS with this certificate; not offered when absent.
    pub tls: Option<TlsFiles>,
    /// Refuse MAIL until the client has started TLS (needs `tls`).
    pub require_tls: bool,
    /// AUTH PLAIN/LOGIN, offered only after STARTTLS (needs `tls`).
    pub auth: Option<SmtpAuthConfig>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            hostname: "ketenbus.localhost".into(),
            max_message_size: bytesize::ByteSize::mib(25),
            max_recipients: 100,
            max_line_length: 8192,
            max_connections: 256,
            idle_timeout: Duration::from_secs(300),
            accept_domains: Vec::new(),
            accept_addresses: Vec::new(),
            tls: None,
            require_tls: false,
            auth: None,
        }
    }
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `[mail.smtp.auth]`: SMTP AUTH users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpAuthConfig {
    /// Refuse MAIL from clients that did not authenticate.
    #[serde(default = "yes")]
    pub required: bool,
    /// Users allowed to authenticate.
    pub users: Vec<SmtpUser>,
}

pub(crate) fn yes() -> bool {
    true
}

/// One SMTP AUTH user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpUser {
    /// User name.
    pub username: String,
    /// Environment variable holding the password.
    pub password_env: String,
    /// Party ids (`mailbox:…`, `agb:…`) this user may send as. When given, a message whose
    /// EDIFACT or FHIR parts declare another sender is refused with `550 5.7.1`, and the
    /// envelope's sender is the declared party (else the first of these). Empty: no check.
    #[serde(default)]
    pub party_ids: Vec<String>,
}

/// How a connection to a mail server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS from the first byte (IMAPS 993, SMTPS/submissions 465).
    Implicit,
    /// Plain connection upgraded with STARTTLS, which must succeed.
    Starttls,
    /// No TLS: only for loopback tests; refused for other hosts by validation.
    None,
}

/// What the pickup does with a message once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterPickup {
    /// Move it to `processed_folder`.
    Move,
    /// Delete (flag `\Deleted` and expunge) it.
    Delete,
}

/// `[[mail.imap]]`: one mailbox at a hub to pick up from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    /// Name of this pickup (letters, digits, `-`, `_`): in logs and the state file name.
    pub name: String,
    /// Server host name.
    pub host: String,
    /// Server port; default 993 for implicit TLS, else 143.
    pub port: Option<u16>,
    /// `implicit` (default), `starttls` or `none` (loopback only).
    #[serde(default = "implicit")]
    pub tls: TlsMode,
    /// Extra PEM CA certificates to trust (a hub's private CA, test certificates).
    pub ca_file: Option<PathBuf>,
    /// Login user name.
    pub username: String,
    /// Environment variable holding the password.
    pub password_env: String,
    /// Mailbox to read.
    #[serde(default = "inbox")]
    pub mailbox: String,
    /// `move` (default) to `processed_folder` (needs the server's MOVE, RFC 6851), or
    /// `delete` (flag `\Deleted`, then UID EXPUNGE, RFC 4315).
    #[serde(default = "move_after")]
    pub after: AfterPickup,
    /// Folder processed messages are moved to; it must exist.
    #[serde(default = "processed")]
    pub processed_folder: String,
    /// Time between looks at the mailbox; with IDLE, the longest wait for an announcement.
    #[serde(default = "poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Stay connected and wait in IDLE (RFC 2177) when the server offers it, so new mail
    /// is taken at once; `false` logs out and polls.
    #[serde(default = "yes")]
    pub idle: bool,
    /// Party id of the mailbox owner, set as the envelope's receiver (e.g. `mailbox:500005678`).
    pub receiver: Option<String>,
    /// Largest message taken (by its `RFC822.SIZE`); a larger one is set aside unread.
    #[serde(default = "max_message_size")]
    pub max_message_size: bytesize::ByteSize,
    /// Tries before a message the log keeps refusing (while it takes others) is set aside.
    #[serde(default = "max_attempts")]
    pub max_attempts: u32,
    /// Folder messages are set aside in (too large, refused, poison), flagged with a keyword
    /// naming the reason (`$KetenbusTooLarge`, `$KetenbusRefused`, `$KetenbusFailed`);
    /// made when missing.
    #[serde(default = "failed_folder")]
    pub failed_folder: String,
}

fn implicit() -> TlsMode {
    TlsMode::Implicit
}
fn inbox() -> String {
    "INBOX".into()
}
fn move_after() -> AfterPickup {
    AfterPickup::Move
}
fn processed() -> String {
    "Processed".into()
}
fn poll_interval() -> Duration {
    Duration::from_secs(30)
}
fn max_message_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(25)
}
fn max_attempts() -> u32 {
    5
}
fn failed_folder() -> String {
    "Failed".into()
}

/// Whether `host` names the loopback interface (where plain connections are allowed).
#[must_use]
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl MailConfig {
    /// Every problem in this section, as (key path below `mail`, message); environment
    /// variables are read through `env`.
    #[must_use]
    pub fn problems(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if let Some(s) = &self.smtp {
            if s.max_message_size.as_u64() == 0 {
                p.push((
                    "smtp.max_message_size".into(),
                    "must be more than 0 bytes".into(),
                ));
            }
            if s.max_recipients == 0 {
                p.push(("smtp.max_recipients".into(), "must be at least 1".into()));
            }
            if s.max_line_length < 512 {
                p.push((
                    "smtp.max_line_length".into(),
                    "must be at least 512 (RFC 5321)".into(),
                ));
            }
            if s.max_connections == 0 {
                p.push(("smtp.max_connections".into(), "must be at least 1".into()));
            }
            if s.idle_timeout.is_zero() {
                p.push(("smtp.idle_timeout".into(), "must be more than 0".into()));
            }
            if let Some(t) = &s.tls {
                for (k, f) in [
                    ("smtp.tls.cert_file", &t.cert_file),
                    ("smtp.tls.key_file", &t.key_file),
                ] {
                    if !f.is_file() {
                        p.push((k.into(), format!("{} is not a readable file", f.display())));
                    }
                }
            }
            if s.require_tls && s.tls.is_none() {
                p.push(("smtp.require_tls".into(), "needs smtp.tls".into()));
            }
            // As for HTTP: off loopback, every client proves who it is over TLS.
            let authenticated_over_tls =
                s.tls.is_some() && s.auth.as_ref().is_some_and(|a| a.required);
            if !s.listen.ip().is_loopback() && !authenticated_over_tls {
                p.push((
                    "smtp.listen".into(),
                    format!(
                        "{} is not loopback: needs smtp.tls and smtp.auth with required = true, so no one posts unauthenticated or in plain text",
                        s.listen
                    ),
                ));
            }
            if let Some(a) = &s.auth {
                if s.tls.is_none() {
                    p.push((
                        "smtp.auth".into(),
                        "needs smtp.tls: AUTH is only offered after STARTTLS".into(),
                    ));
                }
                if a.users.is_empty() {
                    p.push(("smtp.auth.users".into(), "name at least one user".into()));
                }
                for (i, u) in a.users.iter().enumerate() {
                    if env(&u.password_env).is_none_or(|v| v.is_empty()) {
                        p.push((
                            format!("smtp.auth.users[{i}].password_env"),
                            format!("environment variable {} is not set", u.password_env),
                        ));
                    }
                }
            }
        }
        for (i, source) in self.bounce_sources.iter().flatten().enumerate() {
            let known = match source.strip_prefix("imap:") {
                Some(name) => self.imap.iter().any(|m| m.name == name),
                None => source == "smtp" && self.smtp.is_some(),
            };
            if !known {
                p.push((
                    format!("bounce_sources[{i}]"),
                    format!(
                        "{source} is not a configured source: name \"smtp\" (with [mail.smtp]) or \"imap:<name>\" of a [[mail.imap]] pickup"
                    ),
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.imap.iter().enumerate() {
            let at = |k: &str| format!("imap[{i}].{k}");
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                p.push((at("name"), "must be letters, digits, '-' or '_'".into()));
            } else if !names.insert(m.name.clone()) {
                p.push((at("name"), format!("duplicate pickup name {}", m.name)));
            }
            if m.tls == TlsMode::None && !is_loopback(&m.host) {
                p.push((
                    at("tls"),
                    "\"none\" is only allowed for a loopback host".into(),
                ));
            }
            if env(&m.password_env).is_none() {
                p.push((
                    at("password_env"),
                    format!("environment variable {} is not set", m.password_env),
                ));
            }
            if m.poll_interval.is_zero() {
                p.push((at("poll_interval"), "must be more than 0".into()));
            }
            if m.max_message_size.as_u64() == 0 {
                p.push((at("max_message_size"), "must be more than 0".into()));
            }
            if m.max_attempts == 0 {
                p.push((at("max_attempts"), "must be at least 1".into()));
            }
            if m.failed_folder.is_empty() || m.failed_folder == m.mailbox {
                p.push((
                    at("failed_folder"),
                    "must name a folder other than the mailbox read".into(),
                ));
            }
            if let Some(f) = &m.ca_file
                && !f.is_file()
            {
                p.push((
                    at("ca_file"),
                    format!("{} is not a readable file", f.display()),
                ));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mail_problem_is_named_by_its_key() {
        let c = broken();
        let paths: Vec<String> = c.problems(&|_| None).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            paths,
            [
                "smtp.max_line_length",
                "smtp.require_tls",
                "smtp.auth",
                "smtp.auth.users[0].password_env",
                "bounce_sources[0]",
                "bounce_sources[2]",
                "imap[0].name",
                "imap[0].tls",
                "imap[0].password_env",
            ]
        );
    }

    /// `[mail]` with one mistake per check.
    fn broken() -> MailConfig {
        MailConfig {
            smtp: Some(SmtpConfig {
                max_line_length: 100,
                require_tls: true,
                auth: Some(SmtpAuthConfig {
                    required: true,
                    users: vec![SmtpUser {
                        username: "lab".into(),
                        password_env: "NOPE".into(),
                        party_ids: Vec::new(),
                    }],
                }),
                ..SmtpConfig::default()
            }),
            imap: vec![ImapConfig {
                name: "hub 1".into(),
                host: "imap.example.test".into(),
                port: None,
                tls: TlsMode::None,
                ca_file: None,
                username: "u".into(),
                password_env: "NOPE".into(),
                mailbox: inbox(),
                after: AfterPickup::Move,
                processed_folder: processed(),
                poll_interval: poll_interval(),
                idle: true,
                receiver: None,
                max_message_size: max_message_size(),
                max_attempts: max_attempts(),
                failed_folder: failed_folder(),
            }],
            content_dir: None,
            bounce_sources: Some(vec!["imap:nope".into(), "smtp".into(), "http".into()]),
        }
    }
}
