//! The settings an SMTP session runs with, derived once from `[mail.smtp]` and shared by all
//! sessions of a listener.

use std::fmt;

use crate::mail::config::SmtpConfig;

/// The session's fixed settings, shared by all sessions of a listener.
#[derive(Clone)]
pub struct SessionConfig {
    /// Name in the greeting and EHLO answer.
    pub hostname: String,
    /// Largest message in bytes (after dot-unstuffing).
    pub max_message_size: usize,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Longest line in bytes, CRLF included.
    pub max_line_length: usize,
    /// Accepted recipient domains, lower case; with `accept_addresses` empty: everyone.
    pub accept_domains: Vec<String>,
    /// Accepted recipient addresses, lower case.
    pub accept_addresses: Vec<String>,
    /// The shell can do STARTTLS.
    pub tls_available: bool,
    /// MAIL only after STARTTLS.
    pub require_tls: bool,
    /// MAIL only after AUTH.
    pub auth_required: bool,
    /// AUTH users and their passwords; empty: AUTH not offered.
    pub users: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("hostname", &self.hostname)
            .field("max_message_size", &self.max_message_size)
            .field("tls_available", &self.tls_available)
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    /// Settings from `[mail.smtp]`; passwords are read through `env`, `tls_available` tells
    /// whether the shell loaded a certificate.
    #[must_use]
    pub fn from_config(
        c: &SmtpConfig,
        tls_available: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> SessionConfig {
        let users = c
            .auth
            .as_ref()
            .map(|a| {
                a.users
                    .iter()
                    .filter_map(|u| {
                        env(&u.password_env).map(|p| (u.username.clone(), p.into_bytes()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        SessionConfig {
            hostname: c.hostname.clone(),
            max_message_size: usize::try_from(c.max_message_size.as_u64()).unwrap_or(usize::MAX),
            max_recipients: c.max_recipients,
            max_line_length: c.max_line_length,
            accept_domains: c
                .accept_domains
                .iter()
                .map(|d| d.trim_start_matches('@').to_ascii_lowercase())
                .collect(),
            accept_addresses: c
                .accept_addresses
                .iter()
                .map(|a| a.to_ascii_lowercase())
                .collect(),
            tls_available,
            require_tls: c.require_tls,
            auth_required: c.auth.as_ref().is_some_and(|a| a.required),
            users,
        }
    }

    /// Defaults for tests: everything accepted, no TLS, no AUTH.
    #[must_use]
    pub fn open(hostname: &str) -> SessionConfig {
        SessionConfig::from_config(
            &SmtpConfig {
                hostname: hostname.into(),
                ..SmtpConfig::default()
            },
            false,
            &|_| None,
        )
    }

    /// Whether a message for `rcpt` is taken (`accept_domains`, `accept_addresses`).
    pub(super) fn accepts(&self, rcpt: &str) -> bool {
        if self.accept_domains.is_empty() && self.accept_addresses.is_empty() {
            return true;
        }
        let rcpt = rcpt.to_ascii_lowercase();
        if self.accept_addresses.contains(&rcpt) {
            return true;
        }
        rcpt.rsplit_once('@')
            .is_some_and(|(_, d)| self.accept_domains.iter().any(|a| a == d))
    }

    /// Whether `password` is `user`'s, compared in constant time.
    pub(super) fn check_password(&self, user: &str, password: &[u8]) -> bool {
        // Compare every byte of every user so the answer time says nothing about the match.
        let mut ok = false;
        for (u, p) in &self.users {
            let same_user = u == user;
            let mut diff = u8::from(p.len() != password.len());
            for (i, b) in p.iter().enumerate() {
                diff |= b ^ password.get(i).copied().unwrap_or(0);
            }
            ok |= same_user && diff == 0;
        }
        ok
    }
}
