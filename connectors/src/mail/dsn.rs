//! Delivery status notifications (RFC 3464, RFC 3461 envelope ids) coming back in through
//! the SMTP listener or an IMAP pickup: what happened to which recipient, and which of our
//! deliveries it is about. The mail sink sets `ENVID` and `Message-ID` from the record id,
//! so [`DeliveryReport::record_id`] finds the delivery again.

use mail_parser::{MimeHeaders, PartType};
use serde::Serialize;

/// What a reporting MTA did for one recipient (RFC 3464 section 2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Delivered to the recipient's mailbox.
    Delivered,
    /// Relayed to a system that sends no DSN; final for us.
    Relayed,
    /// Delivered to a list or alias, expanded.
    Expanded,
    /// Not yet delivered, still trying.
    Delayed,
    /// Could not be delivered and will not be.
    Failed,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        match s.trim().to_ascii_lowercase().as_str() {
            "delivered" => Some(Action::Delivered),
            "relayed" => Some(Action::Relayed),
            "expanded" => Some(Action::Expanded),
            "delayed" => Some(Action::Delayed),
            "failed" => Some(Action::Failed),
            _ => None,
        }
    }

    /// The lineage outcome it means: `delivered`, `delayed` or `failed`.
    #[must_use]
    pub fn outcome(self) -> &'static str {
        match self {
            Action::Delivered | Action::Relayed | Action::Expanded => "delivered",
            Action::Delayed => "delayed",
            Action::Failed => "failed",
        }
    }
}

/// One recipient's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecipientStatus {
    /// `Final-Recipient` address (type prefix removed).
    pub final_recipient: Option<String>,
    /// What happened.
    pub action: Action,
    /// Enhanced status code, e.g. `5.1.1`.
    pub status: Option<String>,
    /// The remote server's answer, e.g. `smtp; 550 5.1.1 user unknown`.
    pub diagnostic: Option<String>,
}

/// A parsed delivery status notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryReport {
    /// `Original-Envelope-Id` (the ENVID we sent), xtext-decoded.
    pub original_envelope_id: Option<String>,
    /// `Message-ID` of the returned message or headers, without angle brackets.
    pub original_message_id: Option<String>,
    /// `Reporting-MTA`.
    pub reporting_mta: Option<String>,
    /// Per-recipient statuses.
    pub recipients: Vec<RecipientStatus>,
}

impl DeliveryReport {
    /// The record id of the delivery this report is about: from the envelope id we set
    /// (`<subscription>/<record id>`), else the local part of the `Message-ID` we set
    /// (`<record id>@host`).
    #[must_use]
    pub fn record_id(&self) -> Option<String> {
        match self
            .original_envelope_id
            .as_deref()
            .filter(|s| !s.is_empty())
        {
            Some(envid) => Some(envid.rsplit_once('/').map_or(envid, |(_, r)| r).to_owned()),
            None => self
                .original_message_id
                .as_deref()
                .and_then(|m| m.rsplit_once('@'))
                .map(|(local, _)| local.to_owned()),
        }
    }

    /// The subscription that made the delivery, when the envelope id names it.
    #[must_use]
    pub fn subscription(&self) -> Option<String> {
        self.original_envelope_id
            .as_deref()
            .and_then(|e| e.split_once('/'))
            .map(|(s, _)| s.to_owned())
    }

    /// The overall action: the worst over all recipients (failed before delayed before
    /// delivered).
    #[must_use]
    pub fn action(&self) -> Option<Action> {
        self.recipients.iter().map(|r| r.action).max()
    }

    /// The status of the recipient that decided [`action`](Self::action).
    #[must_use]
    pub fn deciding(&self) -> Option<&RecipientStatus> {
        let action = self.action()?;
        self.recipients.iter().find(|r| r.action == action)
    }
}

/// What a delivery status notification means for the lineage of the delivery it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineageReport {
    /// Envelope whose lineage gets the step.
    pub envelope_id: String,
    /// Subscription that delivered, when the report names it.
    pub subscription: Option<String>,
    /// The delivered record.
    pub record_id: String,
    /// `delivered`, `delayed` or `failed`.
    pub outcome: &'static str,
    /// `dsn_<status>`, e.g. `dsn_5.1.1`.
    pub reason: Option<String>,
    /// The remote server's answer.
    pub detail: Option<String>,
}

/// The lineage step a message makes when it is a delivery status notification about one of
/// our deliveries; `None` for any other message.
#[must_use]
pub fn lineage_of(message: &[u8]) -> Option<LineageReport> {
    let report = parse(message)?;
    let record_id = report.record_id()?;
    let deciding = report.deciding()?;
    Some(LineageReport {
        envelope_id: envelope_of(&record_id).to_owned(),
        subscription: report.subscription(),
        outcome: deciding.action.outcome(),
        reason: deciding.status.as_ref().map(|s| format!("dsn_{s}")),
        detail: deciding.diagnostic.clone(),
        record_id,
    })
}

/// The envelope id of a record id: `<envelope id>.<n>` for events, the id itself for raw.
#[must_use]
pub fn envelope_of(record_id: &str) -> &str {
    match record_id.rsplit_once('.') {
        Some((env, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => env,
        _ => record_id,
    }
}

/// Decode RFC 3461 xtext (`+XX` hex escapes).
#[must_use]
pub fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encode as RFC 3461 xtext.
#[must_use]
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Field groups of a `message/delivery-status` body: unfolded `name: value` pairs, one
/// group per blank-line separated block.
fn groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = Vec::new();
    let mut current: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = current.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            current.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn field<'a>(g: &'a [(String, String)], name: &str) -> Option<&'a str> {
    g.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `rfc822; user@host` -> `user@host`.
fn typed(v: &str) -> String {
    v.split_once(';').map_or(v, |(_, a)| a).trim().to_owned()
}

fn strip_id(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

/// Parse a delivery status notification; `None` when the message is not one.
#[must_use]
pub fn parse(bytes: &[u8]) -> Option<DeliveryReport> {
    let message = crate::mail::mime::parse_message(bytes)?;
    let mut status_text = None;
    let mut original_message_id = None;
    for part in &message.parts {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let ty = format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or("")).to_ascii_lowercase();
        match (ty.as_str(), &part.body) {
            ("message/delivery-status" | "message/global-delivery-status", body) => {
                let text = match body {
                    PartType::Text(t) | PartType::Html(t) => t.to_string(),
                    PartType::Binary(b) | PartType::InlineBinary(b) => {
                        String::from_utf8_lossy(b).into_owned()
                    }
                    PartType::Message(m) => String::from_utf8_lossy(m.raw_message()).into_owned(),
                    PartType::Multipart(_) => continue,
                };
                status_text = Some(text);
            }
            ("message/rfc822" | "message/global", PartType::Message(m)) => {
                original_message_id = original_message_id.or_else(|| m.message_id().map(strip_id));
            }
            ("text/rfc822-headers" | "message/global-headers" | "message/rfc822", body) => {
                let raw: &[u8] = match body {
                    PartType::Text(t) | PartType::Html(t) => t.as_bytes(),
                    PartType::Binary(b) | PartType::InlineBinary(b) => b.as_ref(),
                    _ => continue,
                };
                let mut with_body = raw.to_vec();
                with_body.extend_from_slice(b"\r\n\r\n");
                original_message_id = original_message_id.or_else(|| {
                    crate::mail::mime::parse_message(&with_body)
                        .and_then(|h| h.message_id().map(strip_id))
                });
            }
            _ => {}
        }
    }
    let groups = groups(&status_text?);
    let (first, rest) = groups.split_first()?;
    let recipients: Vec<RecipientStatus> = rest
        .iter()
        .filter_map(|g| {
            Some(RecipientStatus {
                final_recipient: field(g, "final-recipient")
                    .or_else(|| field(g, "original-recipient"))
                    .map(typed),
                action: Action::parse(field(g, "action")?)?,
                status: field(g, "status")
                    .map(|s| s.split_whitespace().next().unwrap_or("").to_owned()),
                diagnostic: field(g, "diagnostic-code").map(str::to_owned),
            })
        })
        .collect();
    if recipients.is_empty() {
        return None;
    }
    Some(DeliveryReport {
        original_envelope_id: field(first, "original-envelope-id").map(|v| xtext_decode(v.trim())),
        original_message_id,
        reporting_mta: field(first, "reporting-mta").map(typed),
        recipients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED: &[u8] = include_bytes!("../../testdata/mail/dsn-failed.eml");
    const DELIVERED: &[u8] = include_bytes!("../../testdata/mail/dsn-delivered.eml");

    #[test]
    fn a_failure_report_names_the_delivery_and_the_reason() {
        let r = parse(FAILED).expect("a DSN");
        assert_eq!(
            r.original_envelope_id.as_deref(),
            Some("0193a1b2-0000-7000-8000-000000000001.0")
        );
        assert_eq!(
            r.record_id().as_deref(),
            Some("0193a1b2-0000-7000-8000-000000000001.0")
        );
        assert_eq!(r.action(), Some(Action::Failed));
        assert_eq!(r.recipients[0].status.as_deref(), Some("5.1.1"));
        assert_eq!(
            r.recipients[0].final_recipient.as_deref(),
            Some("nobody@gp.example.test")
        );
        assert!(
            r.recipients[0]
                .diagnostic
                .as_deref()
                .unwrap()
                .contains("550")
        );
        assert_eq!(r.reporting_mta.as_deref(), Some("relay.example.test"));
    }

    #[test]
    fn a_success_report_without_envid_is_found_by_message_id() {
        let r = parse(DELIVERED).expect("a DSN");
        assert_eq!(r.original_envelope_id, None);
        assert_eq!(
            r.original_message_id.as_deref(),
            Some("0193a1b2-0000-7000-8000-000000000002.1@ketenbus.example.test")
        );
        assert_eq!(
            r.record_id().as_deref(),
            Some("0193a1b2-0000-7000-8000-000000000002.1")
        );
        assert_eq!(r.action().map(Action::outcome), Some("delivered"));
    }

    #[test]
    fn the_envelope_id_may_name_the_subscription() {
        let mut r = parse(FAILED).unwrap();
        r.original_envelope_id = Some("gp-by-mail/0193a1b2-0000-7000-8000-000000000001.3".into());
        assert_eq!(
            r.record_id().as_deref(),
            Some("0193a1b2-0000-7000-8000-000000000001.3")
        );
        assert_eq!(r.subscription().as_deref(), Some("gp-by-mail"));
        assert_eq!(r.deciding().unwrap().status.as_deref(), Some("5.1.1"));
        assert_eq!(
            envelope_of("0193a1b2-0000-7000-8000-000000000001.3"),
            "0193a1b2-0000-7000-8000-000000000001"
        );
        assert_eq!(
            envelope_of("0193a1b2-0000-7000-8000-000000000001"),
            "0193a1b2-0000-7000-8000-000000000001"
        );
    }

    #[test]
    fn a_report_becomes_a_lineage_step_for_the_original_envelope() {
        let l = lineage_of(FAILED).unwrap();
        assert_eq!(l.envelope_id, "0193a1b2-0000-7000-8000-000000000001");
        assert_eq!(l.record_id, "0193a1b2-0000-7000-8000-000000000001.0");
        assert_eq!(l.outcome, "failed");
        assert_eq!(l.reason.as_deref(), Some("dsn_5.1.1"));
        assert_eq!(lineage_of(b"Subject: x\r\n\r\nhi\r\n"), None);
    }

    #[test]
    fn an_ordinary_message_is_no_report() {
        assert_eq!(
            parse(b"From: a@b.test\r\nSubject: x\r\n\r\nhello\r\n"),
            None
        );
    }

    #[test]
    fn xtext_round_trips() {
        assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext_decode("a+2Bb+3Dc+20d"), "a+b=c d");
        assert_eq!(xtext_decode("plain.id-1"), "plain.id-1");
    }
}
