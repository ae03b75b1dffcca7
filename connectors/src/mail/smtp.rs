//! The SMTP server session (RFC 5321, with RFC 3207 STARTTLS, RFC 4954 AUTH, RFC 1870
//! SIZE, RFC 2920 PIPELINING, RFC 6152 8BITMIME, RFC 2034 ENHANCEDSTATUSCODES) as a sans-IO
//! state machine: bytes go in with [`Session::push`], [`Session::step`] says what the
//! shell must do next, replies collect in [`Session::take_output`]. No socket, clock or
//! task in here; `listener.rs` is the thin tokio shell around it.
//!
//! A message is only answered after the shell reports what became of it
//! ([`Session::delivered`]): `250` when it is durable, `451` when the log could not take it.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::contract::ingest::IngestError;

mod config;

pub use config::SessionConfig;

/// Replies past which a session is closed (a client that only sends errors is not a client).
const MAX_ERRORS: u32 = 20;

/// A complete message, handed to the shell to make durable.
#[derive(Clone)]
pub struct Mail {
    /// Envelope sender (`""` for the null sender of bounces).
    pub from: String,
    /// Envelope recipients, in order.
    pub rcpts: Vec<String>,
    /// The message exactly as sent (dot-unstuffed).
    pub data: Vec<u8>,
    /// The client's EHLO/HELO name.
    pub helo: String,
    /// Whether the message came over TLS.
    pub tls: bool,
    /// Authenticated user, if any.
    pub auth_user: Option<String>,
}

impl fmt::Debug for Mail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mail")
            .field("rcpts", &self.rcpts.len())
            .field("size", &self.data.len())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// What the shell must do next.
#[derive(Debug)]
pub enum Step {
    /// Write pending output, then read more bytes and [`Session::push`] them.
    NeedInput,
    /// Write pending output, make this message durable, then call [`Session::delivered`].
    Deliver(Mail),
    /// Write pending output (`220 Ready to start TLS`), do the TLS handshake, then call
    /// [`Session::tls_started`].
    StartTls,
    /// Write pending output and close the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Discard {
    TooBig,
    LineTooLong,
    /// The ingest memory budget had no room for more.
    NoRoom,
}

#[derive(Debug)]
enum State {
    Command,
    Data {
        discard: Option<Discard>,
        prev_crlf: bool,
    },
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass {
        user: String,
    },
    Delivering,
    Closed,
}

/// One SMTP conversation.
pub struct Session {
    cfg: Arc<SessionConfig>,
    state: State,
    input: Vec<u8>,
    pos: usize,
    /// Skipping the rest of an over-long command line.
    skipping: bool,
    out: Vec<u8>,
    helo: Option<String>,
    tls: bool,
    auth_user: Option<String>,
    from: Option<String>,
    rcpts: Vec<String>,
    data: Vec<u8>,
    errors: u32,
    /// Reason codes of refusals answered since the last [`Session::take_refusals`].
    refusals: Vec<&'static str>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.state)
            .field("tls", &self.tls)
            .field("rcpts", &self.rcpts.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new session; the greeting is already in the output.
    #[must_use]
    pub fn new(cfg: Arc<SessionConfig>) -> Session {
        let mut s = Session {
            state: State::Command,
            input: Vec::new(),
            pos: 0,
            skipping: false,
            out: Vec::with_capacity(512),
            helo: None,
            tls: false,
            auth_user: None,
            from: None,
            rcpts: Vec::new(),
            data: Vec::new(),
            errors: 0,
            refusals: Vec::new(),
            cfg,
        };
        let greeting = format!("220 {} ESMTP ketenbus", s.cfg.hostname);
        s.reply(&greeting);
        s
    }

    /// Bytes read from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 && self.pos * 2 > self.input.len() {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Replies to write to the client, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The reason codes of the messages (or recipients) refused since the last call:
    /// `too_large`, `memory_budget`, `line_too_long`, `tls_required`, `auth_required`,
    /// `recipient_refused`, `too_many_recipients`. Refusals the ingest answers (the log, the
    /// sender check) are counted there.
    pub fn take_refusals(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.refusals)
    }

    /// Whether replies are waiting to be written.
    #[must_use]
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Whether the connection is encrypted.
    #[must_use]
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The handshake succeeded: the session starts over (RFC 3207 section 4.2), and any
    /// bytes the client pipelined after STARTTLS are dropped (they were not encrypted).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.input.clear();
        self.pos = 0;
        self.helo = None;
        self.auth_user = None;
        self.reset_transaction();
        self.state = State::Command;
    }

    /// The client was silent too long.
    pub fn timed_out(&mut self) {
        let text = format!("421 4.4.2 {} Error: timeout exceeded", self.cfg.hostname);
        self.reply(&text);
        self.state = State::Closed;
    }

    /// The server is shutting down.
    pub fn shutting_down(&mut self) {
        let text = format!(
            "421 4.3.2 {} Service shutting down, try again later",
            self.cfg.hostname
        );
        self.reply(&text);
        self.state = State::Closed;
    }

    /// Bytes of message data held now, for the ingest memory budget.
    #[must_use]
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// The ingest memory budget has no room for more of the message being received: the
    /// rest is read and dropped, and the client hears `451 4.3.1` at its end.
    pub fn over_budget(&mut self) {
        if let State::Data {
            discard: discard @ None,
            ..
        } = &mut self.state
        {
            *discard = Some(Discard::NoRoom);
            self.data = Vec::new();
        }
    }

    /// What became of the message handed out by [`Step::Deliver`]: its id when durable.
    pub fn delivered(&mut self, result: Result<String, IngestError>) {
        match result {
            Ok(id) => self.reply(&format!("250 2.0.0 Ok: queued as {id}")),
            Err(IngestError::Unavailable(_)) => {
                self.reply("451 4.3.0 Error: the message could not be stored, try again later")
            }
            Err(IngestError::Fatal(_)) => {
                self.reply("451 4.3.5 Error: the message store is not available, try again later")
            }
            Err(IngestError::Refused { detail, .. }) => {
                self.reply(&format!("550 5.7.1 Error: {detail}"));
            }
        }
        self.reset_transaction();
        self.state = State::Command;
    }

    /// Process buffered input until the shell has to act.
    pub fn step(&mut self) -> Step {
        loop {
            match self.state {
                State::Closed => return Step::Close,
                State::Delivering => return Step::NeedInput,
                State::Data { .. } => {
                    if let Some(step) = self.data_lines() {
                        return step;
                    }
                    if matches!(self.state, State::Data { .. }) {
                        return Step::NeedInput;
                    }
                }
                State::Command
                | State::AuthPlain
                | State::AuthLoginUser
                | State::AuthLoginPass { .. } => {
                    let Some(line) = self.next_line() else {
                        return Step::NeedInput;
                    };
                    if let Some(step) = self.line(&line) {
                        return step;
                    }
                    if self.errors >= MAX_ERRORS {
                        self.reply("421 4.7.0 Error: too many errors");
                        self.state = State::Closed;
                    }
                }
            }
        }
    }

    /// The next command line without its line ending, or `None` when more input is needed.
    /// Over-long lines are answered with 500 and skipped.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            let rest = &self.input[self.pos..];
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let line = &rest[..i];
                    let line = line.strip_suffix(b"\r").unwrap_or(line).to_vec();
                    self.pos += i + 1;
                    if self.skipping {
                        self.skipping = false;
                        continue;
                    }
                    if i + 1 > self.cfg.max_line_length {
                        self.error("500 5.5.2 Error: line too long");
                        continue;
                    }
                    return Some(line);
                }
                None => {
                    if rest.len() > self.cfg.max_line_length {
                        if !self.skipping {
                            self.error("500 5.5.2 Error: line too long");
                        }
                        self.skipping = true;
                        self.pos = self.input.len();
                    }
                    return None;
                }
            }
        }
    }

    /// Consume DATA lines; `Some` when the message ended.
    fn data_lines(&mut self) -> Option<Step> {
        let State::Data {
            mut discard,
            mut prev_crlf,
        } = self.state
        else {
            return None;
        };
        let max_line = self.cfg.max_line_length;
        let max_size = self.cfg.max_message_size;
        let result = loop {
            let rest = &self.input[self.pos..];
            let Some(i) = rest.iter().position(|&b| b == b'\n') else {
                if rest.len() > max_line {
                    discard = Some(Discard::LineTooLong);
                    self.data = Vec::new();
                    // Keep the last byte: it may be the CR of the coming CRLF.
                    self.pos = self.input.len() - 1;
                    prev_crlf = false;
                }
                break None;
            };
            let line = &rest[..=i];
            self.pos += i + 1;
            let crlf = line.ends_with(b"\r\n");
            if prev_crlf && line == b".\r\n" {
                break Some(discard);
            }
            // Only a line that starts after a CRLF is dot-stuffed (a bare LF ends no line).
            let at_line_start = prev_crlf;
            prev_crlf = crlf;
            if discard.is_some() {
                continue;
            }
            if line.len() > max_line {
                discard = Some(Discard::LineTooLong);
                self.data = Vec::new();
                continue;
            }
            let line = if at_line_start && line.first() == Some(&b'.') {
                &line[1..]
            } else {
                line
            };
            if self.data.len() + line.len() > max_size {
                discard = Some(Discard::TooBig);
                self.data = Vec::new();
                continue;
            }
            self.data.extend_from_slice(line);
        };
        match result {
            None => {
                self.state = State::Data { discard, prev_crlf };
                None
            }
            Some(Some(Discard::TooBig)) => {
                let text = format!(
                    "552 5.3.4 Error: message too big, the limit is {} bytes",
                    self.cfg.max_message_size
                );
                self.refusals.push("too_large");
                self.reply(&text);
                self.reset_transaction();
                self.state = State::Command;
                None
            }
            Some(Some(Discard::NoRoom)) => {
                self.refusals.push("memory_budget");
                self.reply("451 4.3.1 Error: insufficient system storage, try again later");
                self.reset_transaction();
                self.state = State::Command;
                None
            }
            Some(Some(Discard::LineTooLong)) => {
                let text = format!(
                    "554 5.6.0 Error: a message line is longer than {} bytes",
                    self.cfg.max_line_length
                );
                self.refusals.push("line_too_long");
                self.reply(&text);
                self.reset_transaction();
                self.state = State::Command;
                None
            }
            Some(None) => {
                self.state = State::Delivering;
                let mail = Mail {
                    from: self.from.clone().unwrap_or_default(),
                    rcpts: std::mem::take(&mut self.rcpts),
                    data: std::mem::take(&mut self.data),
                    helo: self.helo.clone().unwrap_or_default(),
                    tls: self.tls,
                    auth_user: self.auth_user.clone(),
                };
                Some(Step::Deliver(mail))
            }
        }
    }

    fn line(&mut self, line: &[u8]) -> Option<Step> {
        match std::mem::replace(&mut self.state, State::Command) {
            State::AuthPlain => {
                self.auth_plain_response(line);
                None
            }
            State::AuthLoginUser => {
                if line == b"*" {
                    self.error("501 5.7.0 Authentication cancelled");
                    return None;
                }
                match B64
                    .decode(line)
                    .ok()
                    .and_then(|u| String::from_utf8(u).ok())
                {
                    Some(user) => {
                        self.reply("334 UGFzc3dvcmQ6");
                        self.state = State::AuthLoginPass { user };
                    }
                    None => self.error("501 5.5.2 Error: invalid base64"),
                }
                None
            }
            State::AuthLoginPass { user } => {
                if line == b"*" {
                    self.error("501 5.7.0 Authentication cancelled");
                    return None;
                }
                match B64.decode(line) {
                    Ok(pass) => self.finish_auth(&user, &pass),
                    Err(_) => self.error("501 5.5.2 Error: invalid base64"),
                }
                None
            }
            _ => self.command(line),
        }
    }

    fn command(&mut self, line: &[u8]) -> Option<Step> {
        let Ok(text) = std::str::from_utf8(line) else {
            self.error("500 5.5.2 Error: bad syntax");
            return None;
        };
        let text = text.trim_end();
        let (verb, arg) = text
            .split_once(' ')
            .map_or((text, ""), |(v, a)| (v, a.trim()));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => self.ehlo(arg, true),
            "HELO" => self.ehlo(arg, false),
            "MAIL" => self.mail(arg),
            "RCPT" => self.rcpt(arg),
            "DATA" => self.data_command(arg),
            "RSET" => {
                self.reset_transaction();
                self.reply("250 2.0.0 Ok");
            }
            "NOOP" => self.reply("250 2.0.0 Ok"),
            "QUIT" => {
                self.reply("221 2.0.0 Bye");
                self.state = State::Closed;
                return Some(Step::Close);
            }
            "VRFY" => self.reply("252 2.0.0 Cannot VRFY user, but will accept message"),
            "HELP" => self.reply("214 2.0.0 See RFC 5321"),
            "STARTTLS" => return self.starttls(arg),
            "AUTH" => self.auth(arg),
            "" => self.error("500 5.5.2 Error: bad syntax"),
            _ => self.error("502 5.5.2 Error: command not recognized"),
        }
        None
    }

    fn ehlo(&mut self, arg: &str, extended: bool) {
        if arg.is_empty() {
            self.error("501 5.5.4 Syntax: EHLO hostname");
            return;
        }
        self.helo = Some(arg.to_owned());
        self.reset_transaction();
        if !extended {
            let text = format!("250 {}", self.cfg.hostname);
            self.reply(&text);
            return;
        }
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
        ];
        if self.cfg.tls_available && !self.tls {
            lines.push("STARTTLS".to_owned());
        }
        if self.auth_offered() && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".to_owned());
        }
        lines.push("HELP".to_owned());
        let n = lines.len();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            self.out
                .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    fn auth_offered(&self) -> bool {
        !self.cfg.users.is_empty() && self.tls
    }

    fn mail(&mut self, arg: &str) {
        if self.helo.is_none() {
            self.error("503 5.5.1 Error: send HELO/EHLO first");
            return;
        }
        if self.cfg.require_tls && !self.tls {
            self.refusals.push("tls_required");
            self.error("530 5.7.0 Must issue a STARTTLS command first");
            return;
        }
        if self.cfg.auth_required && self.auth_user.is_none() {
            self.refusals.push("auth_required");
            self.error("530 5.7.0 Authentication required");
            return;
        }
        if self.from.is_some() {
            self.error("503 5.5.1 Error: nested MAIL command");
            return;
        }
        let Some((path, params)) = parse_path(arg, "FROM:") else {
            self.error("501 5.5.4 Syntax: MAIL FROM:<address>");
            return;
        };
        for p in params.split_ascii_whitespace() {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.to_ascii_uppercase().as_str() {
                "SIZE" => match v.parse::<u64>() {
                    Ok(n) if n > self.cfg.max_message_size as u64 => {
                        let text = format!(
                            "552 5.3.4 Error: message size exceeds the limit of {} bytes",
                            self.cfg.max_message_size
                        );
                        self.refusals.push("too_large");
                        self.error(&text);
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        self.error("501 5.5.4 Error: bad SIZE parameter");
                        return;
                    }
                },
                "BODY" if v.eq_ignore_ascii_case("8BITMIME") || v.eq_ignore_ascii_case("7BIT") => {}
                // The address a relay authenticated the sender as: informative only.
                "AUTH" => {}
                _ => {
                    self.error("555 5.5.4 Error: unsupported MAIL parameter");
                    return;
                }
            }
        }
        self.from = Some(path);
        self.reply("250 2.1.0 Ok");
    }

    fn rcpt(&mut self, arg: &str) {
        if self.from.is_none() {
            self.error("503 5.5.1 Error: need MAIL command");
            return;
        }
        let Some((path, _params)) = parse_path(arg, "TO:") else {
            self.error("501 5.5.4 Syntax: RCPT TO:<address>");
            return;
        };
        if path.is_empty() || !path.contains('@') {
            self.error("501 5.1.3 Error: bad recipient address syntax");
            return;
        }
        if !self.cfg.accepts(&path) {
            // Echo the address as printable ASCII only: nothing the client sends can
            // break the reply line.
            let shown: String = path
                .chars()
                .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                .collect();
            let text =
                format!("550 5.1.1 <{shown}>: recipient address rejected: not accepted here");
            self.refusals.push("recipient_refused");
            self.error(&text);
            return;
        }
        if self.rcpts.len() >= self.cfg.max_recipients {
            self.refusals.push("too_many_recipients");
            self.error("452 4.5.3 Error: too many recipients");
            return;
        }
        self.rcpts.push(path);
        self.reply("250 2.1.5 Ok");
    }

    fn data_command(&mut self, arg: &str) {
        if !arg.is_empty() {
            self.error("501 5.5.4 Syntax: DATA");
        } else if self.from.is_none() {
            self.error("503 5.5.1 Error: need MAIL command");
        } else if self.rcpts.is_empty() {
            self.error("554 5.5.1 Error: no valid recipients");
        } else {
            self.reply("354 End data with <CR><LF>.<CR><LF>");
            self.data.clear();
            self.state = State::Data {
                discard: None,
                prev_crlf: true,
            };
        }
    }

    fn starttls(&mut self, arg: &str) -> Option<Step> {
        if !arg.is_empty() {
            self.error("501 5.5.4 Syntax: STARTTLS");
        } else if self.tls {
            self.error("503 5.5.1 Error: TLS already active");
        } else if !self.cfg.tls_available {
            self.error("454 4.7.0 TLS not available");
        } else {
            self.reply("220 2.0.0 Ready to start TLS");
            return Some(Step::StartTls);
        }
        None
    }

    fn auth(&mut self, arg: &str) {
        if self.cfg.users.is_empty() {
            self.error("503 5.5.1 Error: authentication not enabled");
            return;
        }
        if !self.tls {
            self.error("538 5.7.11 Encryption required for requested authentication mechanism");
            return;
        }
        if self.auth_user.is_some() {
            self.error("503 5.5.1 Error: already authenticated");
            return;
        }
        if self.from.is_some() {
            self.error("503 5.5.1 Error: MAIL transaction in progress");
            return;
        }
        let (mech, initial) = arg
            .split_once(' ')
            .map_or((arg, None), |(m, i)| (m, Some(i.trim())));
        match (mech.to_ascii_uppercase().as_str(), initial) {
            ("PLAIN", None) => {
                self.reply("334 ");
                self.state = State::AuthPlain;
            }
            ("PLAIN", Some(ir)) => self.auth_plain_response(ir.as_bytes()),
            ("LOGIN", None) => {
                self.reply("334 VXNlcm5hbWU6");
                self.state = State::AuthLoginUser;
            }
            ("LOGIN", Some(ir)) => {
                match B64.decode(ir).ok().and_then(|u| String::from_utf8(u).ok()) {
                    Some(user) => {
                        self.reply("334 UGFzc3dvcmQ6");
                        self.state = State::AuthLoginPass { user };
                    }
                    None => self.error("501 5.5.2 Error: invalid base64"),
                }
            }
            _ => self.error("504 5.5.4 Error: unsupported authentication mechanism"),
        }
    }

    fn auth_plain_response(&mut self, line: &[u8]) {
        if line == b"*" {
            self.error("501 5.7.0 Authentication cancelled");
            return;
        }
        let decoded = if line == b"=" {
            Ok(Vec::new())
        } else {
            B64.decode(line)
        };
        let Ok(decoded) = decoded else {
            self.error("501 5.5.2 Error: invalid base64");
            return;
        };
        let mut parts = decoded.split(|&b| b == 0);
        let (_authz, user, pass) = (parts.next(), parts.next(), parts.next());
        match (user.and_then(|u| std::str::from_utf8(u).ok()), pass) {
            (Some(user), Some(pass)) if parts.next().is_none() => {
                let user = user.to_owned();
                self.finish_auth(&user, pass);
            }
            _ => self.error("501 5.5.2 Error: malformed PLAIN response"),
        }
    }

    fn finish_auth(&mut self, user: &str, pass: &[u8]) {
        if self.cfg.check_password(user, pass) {
            self.auth_user = Some(user.to_owned());
            self.reply("235 2.7.0 Authentication successful");
        } else {
            self.error("535 5.7.8 Error: authentication credentials invalid");
        }
    }

    fn reset_transaction(&mut self) {
        self.from = None;
        self.rcpts.clear();
        self.data = Vec::new();
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn error(&mut self, text: &str) {
        self.errors += 1;
        self.reply(text);
    }
}

/// `FROM:<path> params` (or `TO:`), tolerant of a space after the colon and of a path
/// without angle brackets. Returns the address and the parameters.
fn parse_path(arg: &str, keyword: &str) -> Option<(String, String)> {
    // `get`, not an index: a multi-byte character may straddle the keyword's length.
    if !arg
        .get(..keyword.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(keyword))
    {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        let path = &inner[..end];
        // A source route (`@a,@b:user@host`) is ignored as RFC 5321 allows.
        let path = path
            .rsplit_once(':')
            .filter(|_| path.starts_with('@'))
            .map_or(path, |(_, p)| p);
        Some((path.to_owned(), inner[end + 1..].trim().to_owned()))
    } else {
        let (path, params) = rest.split_once(' ').unwrap_or((rest, ""));
        if path.is_empty() {
            return None;
        }
        Some((path.to_owned(), params.trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SessionConfig {
        let mut c = SessionConfig::open("mx.test");
        c.max_message_size = 100;
        c.max_recipients = 2;
        c.max_line_length = 600;
        c.accept_domains = vec!["lms.test".into()];
        c
    }

    /// Feed `input`, run the session, and deliver every message with `outcome`; returns
    /// everything the server wrote and the messages.
    fn converse(
        cfg: SessionConfig,
        input: &[u8],
        outcome: impl Fn() -> Result<String, IngestError>,
    ) -> (String, Vec<Mail>) {
        let mut s = Session::new(Arc::new(cfg));
        s.push(input);
        let mut mails = Vec::new();
        let mut out = Vec::new();
        loop {
            match s.step() {
                Step::NeedInput | Step::Close => break,
                Step::Deliver(m) => {
                    mails.push(m);
                    s.delivered(outcome());
                }
                Step::StartTls => break,
            }
        }
        out.extend(s.take_output());
        (String::from_utf8(out).unwrap(), mails)
    }

    fn codes(out: &str) -> Vec<&str> {
        out.lines()
            .filter(|l| l.len() >= 4 && &l[3..4] == " ")
            .map(|l| &l[..3])
            .collect()
    }

    #[test]
    fn a_pipelined_transaction_is_answered_in_order_and_only_after_delivery() {
        let input = b"EHLO client.test\r\nMAIL FROM:<lab@example.test> SIZE=40\r\nRCPT TO:<500005678@lms.test>\r\nDATA\r\nSubject: x\r\n\r\n..dotted\r\nbody\r\n.\r\nQUIT\r\n";
        let (out, mails) = converse(cfg(), input, || Ok("m1".into()));
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "354", "250", "221"],
            "{out}"
        );
        assert!(
            out.contains("250-PIPELINING")
                && out.contains("250-SIZE 100")
                && out.contains("250-8BITMIME"),
            "{out}"
        );
        assert!(!out.contains("STARTTLS"), "no TLS configured, none offered");
        assert!(out.contains("queued as m1"));
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].data, b"Subject: x\r\n\r\n.dotted\r\nbody\r\n");
        assert_eq!(mails[0].rcpts, ["500005678@lms.test"]);
        assert_eq!(mails[0].from, "lab@example.test");
        assert_eq!(mails[0].helo, "client.test");
    }

    #[test]
    fn the_sender_hears_451_when_the_log_cannot_take_it() {
        let input = b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@lms.test>\r\nDATA\r\nx\r\n.\r\n";
        let (out, mails) = converse(cfg(), input, || {
            Err(IngestError::Unavailable("full".into()))
        });
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "354", "451"],
            "{out}"
        );
        assert_eq!(mails.len(), 1, "handed over, but not acknowledged");
        assert!(!out.contains("full"), "internal detail stays inside");
    }

    #[test]
    fn no_reply_comes_before_the_delivery_outcome() {
        let mut s = Session::new(Arc::new(cfg()));
        s.push(
            b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<a@lms.test>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n",
        );
        let Step::Deliver(_) = s.step() else {
            panic!("expected a message")
        };
        let before = String::from_utf8(s.take_output()).unwrap();
        assert!(
            before.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
            "{before}"
        );
        assert!(
            matches!(s.step(), Step::NeedInput),
            "nothing happens while the message is stored"
        );
        assert!(!s.has_output());
        s.delivered(Ok("id".into()));
        assert!(matches!(s.step(), Step::NeedInput));
        assert_eq!(
            codes(&String::from_utf8(s.take_output()).unwrap()),
            ["250", "250"]
        );
    }

    #[test]
    fn recipients_outside_the_accepted_domains_and_past_the_limit_are_refused() {
        let input = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nRCPT TO:<1@lms.test>\r\nRCPT TO:<2@LMS.test>\r\nRCPT TO:<3@lms.test>\r\nRCPT TO:<nodomain>\r\n";
        let (out, _) = converse(cfg(), input, || Ok("x".into()));
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "550", "250", "250", "452", "501"],
            "{out}"
        );
        assert!(out.contains("550 5.1.1 <x@elsewhere.test>: recipient address rejected"));
    }

    #[test]
    fn data_without_valid_recipients_is_refused() {
        let (out, mails) = converse(
            cfg(),
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@nope.test>\r\nDATA\r\nhello\r\n.\r\n",
            || Ok("x".into()),
        );
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "550", "554", "502", "502"],
            "{out}"
        );
        assert!(mails.is_empty());
    }

    #[test]
    fn oversize_messages_get_552_whether_announced_or_not() {
        let (out, _) = converse(
            cfg(),
            b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=1000\r\n",
            || Ok("x".into()),
        );
        assert!(out.contains("552 5.3.4"), "{out}");
        let mut input =
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<a@lms.test>\r\nDATA\r\n".to_vec();
        for _ in 0..10 {
            input.extend_from_slice(b"0123456789012345678901234567890\r\n");
        }
        input.extend_from_slice(b".\r\nMAIL FROM:<a@b.test>\r\n");
        let (out, mails) = converse(cfg(), &input, || Ok("x".into()));
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "354", "552", "250"],
            "{out}"
        );
        assert!(out.contains("the limit is 100 bytes"));
        assert!(mails.is_empty());
    }

    #[test]
    fn long_lines_are_refused_in_commands_and_in_data() {
        let mut input = b"EHLO c\r\nNOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 700));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let (out, _) = converse(cfg(), &input, || Ok("x".into()));
        assert_eq!(codes(&out), ["220", "250", "500", "250"], "{out}");
        let mut c = cfg();
        c.max_message_size = 10_000;
        let mut input =
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<a@lms.test>\r\nDATA\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'y', 700));
        input.extend_from_slice(b"\r\n.\r\n");
        let (out, mails) = converse(c, &input, || Ok("x".into()));
        assert!(out.contains("554 5.6.0"), "{out}");
        assert!(mails.is_empty());
    }

    #[test]
    fn a_long_line_arriving_in_pieces_is_refused_once() {
        let mut s = Session::new(Arc::new(cfg()));
        s.push(b"EHLO c\r\n");
        for _ in 0..5 {
            s.push(&[b'z'; 300]);
            assert!(matches!(s.step(), Step::NeedInput));
        }
        s.push(b"\r\nNOOP\r\n");
        assert!(matches!(s.step(), Step::NeedInput));
        let out = String::from_utf8(s.take_output()).unwrap();
        assert_eq!(codes(&out), ["220", "250", "500", "250"], "{out}");
    }

    #[test]
    fn bare_lf_dot_does_not_end_the_message() {
        // SMTP smuggling: only CRLF.CRLF ends DATA.
        let input = b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<a@lms.test>\r\nDATA\r\nA\n.\nMAIL FROM:<evil@x>\r\n.\r\n";
        let (out, mails) = converse(cfg(), input, || Ok("x".into()));
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].data, b"A\n.\nMAIL FROM:<evil@x>\r\n");
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "354", "250"],
            "{out}"
        );
    }

    #[test]
    fn data_split_at_every_byte_gives_the_same_message() {
        let input: &[u8] = b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<a@lms.test>\r\nDATA\r\nl1\r\n..l2\r\n.\r\nQUIT\r\n";
        let mut s = Session::new(Arc::new(cfg()));
        let mut mails = Vec::new();
        for b in input {
            s.push(&[*b]);
            while let Step::Deliver(m) = s.step() {
                mails.push(m);
                s.delivered(Ok("x".into()));
            }
        }
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].data, b"l1\r\n.l2\r\n");
    }

    fn tls_cfg() -> SessionConfig {
        let mut c = cfg();
        c.tls_available = true;
        c.require_tls = true;
        c.auth_required = true;
        c.users = vec![("lab".into(), b"s3cret".to_vec())];
        c
    }

    #[test]
    fn starttls_is_offered_and_plaintext_commands_after_it_are_dropped() {
        let mut s = Session::new(Arc::new(tls_cfg()));
        s.push(b"EHLO c\r\nAUTH PLAIN AGxhYgBzM2NyZXQ=\r\nMAIL FROM:<a@b.test>\r\nSTARTTLS\r\nMAIL FROM:<injected@x>\r\n");
        assert!(matches!(s.step(), Step::StartTls));
        let out = String::from_utf8(s.take_output()).unwrap();
        assert!(out.contains("250-STARTTLS"), "{out}");
        assert!(
            !out.contains("AUTH PLAIN"),
            "AUTH is not offered before TLS: {out}"
        );
        assert_eq!(codes(&out), ["220", "250", "538", "530", "220"], "{out}");
        s.tls_started();
        assert!(
            matches!(s.step(), Step::NeedInput),
            "the injected command was dropped"
        );
        assert!(!s.has_output());
        s.push(b"MAIL FROM:<a@b.test>\r\nEHLO c\r\nMAIL FROM:<a@b.test>\r\n");
        assert!(matches!(s.step(), Step::NeedInput));
        let out = String::from_utf8(s.take_output()).unwrap();
        assert!(
            out.contains("250-AUTH PLAIN LOGIN") && !out.contains("STARTTLS"),
            "{out}"
        );
        assert_eq!(codes(&out), ["503", "250", "530"], "{out}");
    }

    #[test]
    fn auth_plain_and_login_check_the_password() {
        let mut s = Session::new(Arc::new(tls_cfg()));
        s.tls_started();
        let _ = s.take_output();
        // PLAIN with initial response, wrong password; then LOGIN right.
        let wrong = B64.encode(b"\0lab\0nope");
        s.push(format!("EHLO c\r\nAUTH PLAIN {wrong}\r\nAUTH LOGIN\r\n{}\r\n{}\r\nMAIL FROM:<a@b.test>\r\n", B64.encode("lab"), B64.encode("s3cret")).as_bytes());
        assert!(matches!(s.step(), Step::NeedInput));
        let out = String::from_utf8(s.take_output()).unwrap();
        assert_eq!(
            codes(&out),
            ["250", "535", "334", "334", "235", "250"],
            "{out}"
        );
        // PLAIN in two steps.
        let mut s = Session::new(Arc::new(tls_cfg()));
        s.tls_started();
        let _ = s.take_output();
        s.push(
            format!(
                "EHLO c\r\nAUTH PLAIN\r\n{}\r\n",
                B64.encode(b"\0lab\0s3cret")
            )
            .as_bytes(),
        );
        assert!(matches!(s.step(), Step::NeedInput));
        let out = String::from_utf8(s.take_output()).unwrap();
        assert_eq!(codes(&out), ["250", "334", "235"], "{out}");
    }

    #[test]
    fn sequence_errors_and_unknown_commands_are_named() {
        let (out, _) = converse(cfg(), b"MAIL FROM:<a@b.test>\r\nHELO c\r\nRCPT TO:<a@lms.test>\r\nDATA\r\nFOO\r\nMAIL FROM:<a@b.test> XYZ=1\r\nMAIL TO:<x>\r\nRSET\r\nQUIT\r\nNOOP\r\n", || Ok("x".into()));
        assert_eq!(
            codes(&out),
            [
                "220", "503", "250", "503", "503", "502", "555", "501", "250", "221"
            ],
            "{out}"
        );
    }

    #[test]
    fn too_many_errors_close_the_session() {
        let input = "FOO\r\n".repeat(30);
        let mut s = Session::new(Arc::new(cfg()));
        s.push(input.as_bytes());
        assert!(matches!(s.step(), Step::Close));
        let out = String::from_utf8(s.take_output()).unwrap();
        assert!(
            out.ends_with("421 4.7.0 Error: too many errors\r\n"),
            "{out}"
        );
    }

    #[test]
    fn paths_are_parsed_tolerantly() {
        assert_eq!(
            parse_path("FROM:<a@b>", "FROM:"),
            Some(("a@b".into(), String::new()))
        );
        assert_eq!(
            parse_path("from: <a@b> SIZE=3", "FROM:"),
            Some(("a@b".into(), "SIZE=3".into()))
        );
        assert_eq!(
            parse_path("FROM:<>", "FROM:"),
            Some((String::new(), String::new()))
        );
        assert_eq!(
            parse_path("TO:<@r1,@r2:u@h>", "TO:"),
            Some(("u@h".into(), String::new()))
        );
        assert_eq!(
            parse_path("TO:u@h", "TO:"),
            Some(("u@h".into(), String::new()))
        );
        assert_eq!(parse_path("TO:<u@h", "TO:"), None);
        assert_eq!(parse_path("X", "TO:"), None);
    }

    /// Run a whole conversation fed in the given pieces; returns the output and messages.
    fn feed_pieces(cfg: SessionConfig, pieces: &[&[u8]]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut s = Session::new(Arc::new(cfg));
        let mut out = Vec::new();
        let mut mails = Vec::new();
        for p in pieces {
            s.push(p);
            while let Step::Deliver(m) = s.step() {
                mails.push(m.data);
                s.delivered(Ok("id".into()));
            }
            out.extend(s.take_output());
        }
        (out, mails)
    }

    /// Found by the `smtp_session` fuzz target: a non-ASCII character across the end of
    /// `TO:` (`RCPT TO\u{1bf}...`) panicked slicing the argument, and the session with it.
    #[test]
    fn a_multibyte_character_where_the_keyword_ends_is_a_syntax_error() {
        assert_eq!(parse_path("TO\u{1bf}a@lms.test>", "TO:"), None);
        assert_eq!(parse_path("\u{e9}", "FROM:"), None);
        let (out, mails) = converse(
            cfg(),
            b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO\xc6\xbfa@lms.test>\r\nQUIT\r\n",
            || Ok("x".into()),
        );
        assert!(mails.is_empty());
        assert!(out.contains("\r\n501 5.5.4 Syntax: RCPT TO"), "{out}");
        assert!(out.ends_with("221 2.0.0 Bye\r\n"), "{out}");
    }

    proptest::proptest! {
        #[test]
        fn any_split_of_a_conversation_gives_the_same_answers(cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let input: &[u8] = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@lms.test>\r\nDATA\r\nSubject: s\r\n\r\n..dot\r\nline\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<y@lms.test>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n";
            let whole = feed_pieces(cfg(), &[input]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % input.len()).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts {
                pieces.push(&input[at..c.max(at)]);
                at = c.max(at);
            }
            pieces.push(&input[at..]);
            let split = feed_pieces(cfg(), &pieces);
            proptest::prop_assert_eq!(&split, &whole);
            proptest::prop_assert_eq!(whole.1.len(), 2);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_every_reply_is_a_reply_line(input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let (out, _) = feed_pieces(cfg(), &[&input]);
            let text = String::from_utf8(out).expect("replies are ASCII");
            for line in text.split_terminator("\r\n") {
                proptest::prop_assert!(line.len() >= 4 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit), "{}", line);
            }
        }
    }
}
