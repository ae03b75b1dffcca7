//! The `mail` sink of a subscription: where and how delivery mails are submitted.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::address_book::{AddressBook, Channel};
use crate::mail::config::{TlsMode, is_loopback, yes};

/// The `mail` sink of a subscription: secure mail through an SMTP submission server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailSinkConfig {
    /// Submission server host.
    pub host: String,
    /// Port; default 465 for implicit TLS, 587 for STARTTLS, 25 for none.
    pub port: Option<u16>,
    /// `implicit`, `starttls` (default) or `none` (loopback only).
    #[serde(default = "starttls")]
    pub tls: TlsMode,
    /// Extra PEM CA certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// Login user name; no AUTH when absent.
    pub username: Option<String>,
    /// Environment variable holding the password (with `username`).
    pub password_env: Option<String>,
    /// Sender address (`From` and envelope sender, where DSNs come back to).
    pub from: String,
    /// Fixed recipient; when absent, the event's receiver party id is looked up in
    /// `[address_book]` (its `mail` address).
    pub to: Option<String>,
    /// Ask the server for delivery status notifications (success, failure, delay).
    #[serde(default = "yes")]
    pub dsn: bool,
    /// Per-delivery timeout (connect and every command).
    #[serde(default = "sink_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn starttls() -> TlsMode {
    TlsMode::Starttls
}
fn sink_timeout() -> Duration {
    Duration::from_secs(30)
}

impl MailSinkConfig {
    /// Every problem in this sink, as (key below `sink`, message).
    #[must_use]
    pub fn problems(
        &self,
        book: &AddressBook,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.tls == TlsMode::None && !is_loopback(&self.host) {
            p.push((
                "tls".into(),
                "\"none\" is only allowed for a loopback host".into(),
            ));
        }
        if !self.from.contains('@') || self.from.parse::<lettre::Address>().is_err() {
            p.push(("from".into(), "not a mail address".into()));
        }
        if let Some(to) = &self.to {
            if to.parse::<lettre::Address>().is_err() {
                p.push(("to".into(), "not a mail address".into()));
            }
        } else if !book.serves(Channel::Mail) {
            p.push((
                "to".into(),
                "required unless [address_book] has mail addresses".into(),
            ));
        }
        match (&self.username, &self.password_env) {
            (Some(_), None) => p.push(("password_env".into(), "required with username".into())),
            (None, Some(_)) => p.push(("username".into(), "required with password_env".into())),
            (Some(_), Some(var)) if env(var).is_none() => {
                p.push((
                    "password_env".into(),
                    format!("environment variable {var} is not set"),
                ));
            }
            _ => {}
        }
        if let Some(f) = &self.ca_file
            && !f.is_file()
        {
            p.push((
                "ca_file".into(),
                format!("{} is not a readable file", f.display()),
            ));
        }
        if self.timeout.is_zero() {
            p.push(("timeout".into(), "must be more than 0".into()));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mail_sink_needs_an_address() {
        let sink = MailSinkConfig {
            host: "smtp.example.test".into(),
            port: None,
            tls: TlsMode::None,
            ca_file: None,
            username: Some("u".into()),
            password_env: None,
            from: "nope".into(),
            to: None,
            dsn: true,
            timeout: Duration::from_secs(1),
        };
        let paths: Vec<String> = sink
            .problems(&AddressBook::default(), &|_| None)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(paths, ["tls", "from", "to", "password_env"]);
        assert!(is_loopback("127.0.0.1") && is_loopback("localhost") && !is_loopback("10.0.0.1"));
    }
}
