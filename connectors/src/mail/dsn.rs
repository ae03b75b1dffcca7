//! Delivery status notifications (RFC 3464, RFC 3461 envelope ids) coming back in through
//! the SMTP listener or an IMAP pickup: what happened to which recipient, and which of our
//! deliveries it is about.
//!
//! Anyone can send a mail that looks like a report, so a report counts only when its
//! `Original-Envelope-Id` carries the token the mail sink set in `ENVID`
//! ([`envelope_id`]): `<record id>/<token>`, the token an HMAC-SHA256 over the subscription
//! and the record id keyed with a broker secret. Nobody without the key can make one for
//! another delivery, and it names the subscription that sent the mail (a mail sink), so a
//! report can never touch a delivery of a webhook or FHIR subscription. The token is only
//! seen by the mail servers on the way (`ENVID` is not part of the delivered message).
//! Which sources may bring reports at all is [`ReportSources`] (`mail.bounce_sources`).
use std::collections::BTreeSet;

use hmac::{Hmac, Mac};
use ketenbus_schemas::{RawEnvelope, envelope_of};
use mail_parser::{MimeHeaders, PartType};
use serde::Serialize;
use sha2::Sha256;

use crate::mail::config::MailConfig;

/// Purpose the token key is derived for from a broker secret (the same for the mail sink
/// that sets tokens and the router that checks them).
pub const KEY_PURPOSE: &str = "delivery report token";

/// Bytes of the HMAC kept in the token (128 bits, 32 hex characters).
const TOKEN_BYTES: usize = 16;

fn token_mac(key: &[u8], subscription: &str, record_id: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes keys of any length");
    mac.update(b"ketenbus-dsn\0");
    mac.update(subscription.as_bytes());
    mac.update(b"\0");
    mac.update(record_id.as_bytes());
    mac
}

/// The envelope id (`ENVID`, RFC 3461) the mail sink sets for the delivery of `record_id`
/// by `subscription`: `<record id>/<token>`, with the token the first 128 bits (hex) of an
/// HMAC-SHA256 keyed with `key`. About 70 characters, inside ENVID's 100.
#[must_use]
pub fn envelope_id(key: &[u8], subscription: &str, record_id: &str) -> String {
    let tag = token_mac(key, subscription, record_id)
        .finalize()
        .into_bytes();
    format!("{record_id}/{}", hex::encode(&tag[..TOKEN_BYTES]))
}

/// The delivery an envelope id made by [`envelope_id`] stands for: the subscription (one
/// of `subscriptions`, the mail subscriptions) and the record id. `None` when the id
/// carries no token, or one that no subscription's key makes (compared in constant time).
#[must_use]
pub fn verify(envid: &str, key: &[u8], subscriptions: &[String]) -> Option<(String, String)> {
    let (record_id, token) = envid.rsplit_once('/')?;
    if record_id.is_empty() || token.len() != 2 * TOKEN_BYTES {
        return None;
    }
    let tag = hex::decode(token).ok()?;
    subscriptions
        .iter()
        .find(|sub| {
            token_mac(key, sub, record_id)
                .verify_truncated_left(&tag)
                .is_ok()
        })
        .map(|sub| (sub.clone(), record_id.to_owned()))
}

/// Which sources may bring delivery reports (`mail.bounce_sources`): the SMTP listener
/// (`smtp`) and named IMAP pickups (`imap:<name>`). Messages posted over HTTP or dropped
/// in an inbox folder never count as reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportSources {
    /// Reports through the SMTP listener count.
    pub smtp: bool,
    /// Names of the IMAP pickups whose reports count.
    pub imap: BTreeSet<String>,
}

impl ReportSources {
    /// The sources `mail.bounce_sources` names; when absent, the SMTP listener (when
    /// configured) and every IMAP pickup.
    #[must_use]
    pub fn of(mail: &MailConfig) -> ReportSources {
        match &mail.bounce_sources {
            Some(list) => ReportSources {
                smtp: list.iter().any(|s| s == "smtp"),
                imap: list
                    .iter()
                    .filter_map(|s| s.strip_prefix("imap:"))
                    .map(str::to_owned)
                    .collect(),
            },
            None => ReportSources {
                smtp: mail.smtp.is_some(),
                imap: mail.imap.iter().map(|m| m.name.clone()).collect(),
            },
        }
    }

    /// Whether `envelope` came in through a source whose reports count.
    #[must_use]
    pub fn allows(&self, envelope: &RawEnvelope) -> bool {
        match envelope.connector.as_str() {
            "smtp" => self.smtp,
            "imap" => envelope
                .attributes
                .get("imap.pickup")
                .is_some_and(|p| self.imap.contains(p)),
            _ => false,
        }
    }
}

/// Why a delivery report changed nothing (the reason of the `ignored` step in the report's
/// own lineage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// It came in through a source not in `mail.bounce_sources` (or over HTTP).
    SourceNotAllowed,
    /// Its envelope id carries no token of ours: not about a delivery a mail sink made.
    NotOurs,
}

impl Ignored {
    /// Reason code.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Ignored::SourceNotAllowed => "report_source_not_allowed",
            Ignored::NotOurs => "report_not_ours",
        }
    }
}

/// Checks reports: from an allowed source, with a token made with the key for one of the
/// mail subscriptions.
#[derive(Clone)]
pub struct ReportCheck {
    /// The token key (derived from a broker secret).
    pub key: Vec<u8>,
    /// Names of the subscriptions with a mail sink.
    pub subscriptions: Vec<String>,
    /// Sources whose reports count.
    pub sources: ReportSources,
}

impl std::fmt::Debug for ReportCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportCheck")
            .field("subscriptions", &self.subscriptions)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

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
    /// The record id the report claims to be about: from the envelope id (`<record id>/<token>`),
    /// else the local part of the returned `Message-ID` (`<record id>@host`). A claim only:
    /// [`lineage_of`] acts on a report only when its token verifies.
    #[must_use]
    pub fn record_id(&self) -> Option<String> {
        match self
            .original_envelope_id
            .as_deref()
            .filter(|s| !s.is_empty())
        {
            Some(envid) => Some(envid.rsplit_once('/').map_or(envid, |(r, _)| r).to_owned()),
            None => self
                .original_message_id
                .as_deref()
                .and_then(|m| m.rsplit_once('@'))
                .map(|(local, _)| local.to_owned()),
        }
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
    /// The mail subscription that delivered (its token verified).
    pub subscription: String,
    /// The delivered record.
    pub record_id: String,
    /// `delivered`, `delayed` or `failed`.
    pub outcome: &'static str,
    /// `dsn_<status>` (`dsn_5.1.1`), or `dsn_invalid` when the status is not an RFC 3463
    /// code.
    pub reason: String,
    /// The remote server's answer, at most [`MAX_DETAIL`] characters.
    pub detail: Option<String>,
}

impl LineageReport {
    /// The mail failed for good: the delivery bounced and is to be dead-lettered.
    #[must_use]
    pub fn bounced(&self) -> bool {
        self.outcome == Action::Failed.outcome()
    }
}

/// Longest remote answer kept as a step's detail.
pub const MAX_DETAIL: usize = 300;

/// The lineage step a delivery status notification makes: `Ok(None)` for a message that is
/// no report, `Err` for a report that must change nothing (wrong source, no valid token),
/// else the delivery it is about, verified.
///
/// # Errors
/// [`Ignored`] says why a report is not acted on.
pub fn lineage_of(
    envelope: &RawEnvelope,
    check: &ReportCheck,
) -> Result<Option<LineageReport>, Ignored> {
    let Some(report) = parse(&envelope.body) else {
        return Ok(None);
    };
    if !check.sources.allows(envelope) {
        return Err(Ignored::SourceNotAllowed);
    }
    let (subscription, record_id) = report
        .original_envelope_id
        .as_deref()
        .and_then(|e| verify(e, &check.key, &check.subscriptions))
        .ok_or(Ignored::NotOurs)?;
    let Some(deciding) = report.deciding() else {
        return Ok(None);
    };
    Ok(Some(LineageReport {
        envelope_id: envelope_of(&record_id).to_owned(),
        subscription,
        outcome: deciding.action.outcome(),
        reason: format!(
            "dsn_{}",
            deciding
                .status
                .as_deref()
                .filter(|s| is_status_code(s))
                .unwrap_or("invalid")
        ),
        detail: deciding
            .diagnostic
            .as_deref()
            .map(|d| d.chars().take(MAX_DETAIL).collect()),
        record_id,
    }))
}

/// An RFC 3463 enhanced status code: `class.subject.detail`, class 2, 4 or 5, then one to
/// three digits each.
fn is_status_code(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok = |p: Option<&str>, max: usize| {
        p.is_some_and(|p| (1..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(parts.next(), Some("2" | "4" | "5"))
        && ok(parts.next(), 3)
        && ok(parts.next(), 3)
        && parts.next().is_none()
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
    fn bounce_sources_default_to_every_mail_source() {
        let mut mail = MailConfig {
            smtp: Some(crate::mail::config::SmtpConfig::default()),
            ..MailConfig::default()
        };
        assert_eq!(
            ReportSources::of(&mail),
            ReportSources {
                smtp: true,
                imap: BTreeSet::new()
            }
        );
        mail.bounce_sources = Some(vec!["imap:hub".into()]);
        assert_eq!(
            ReportSources::of(&mail),
            ReportSources {
                smtp: false,
                imap: BTreeSet::from(["hub".to_owned()])
            }
        );
        mail.bounce_sources = Some(Vec::new());
        assert_eq!(ReportSources::of(&mail), ReportSources::default());
    }

    const KEY: &[u8] = b"test report key, 32 bytes long!!";

    fn envelope(connector: &str, body: &[u8]) -> RawEnvelope {
        RawEnvelope {
            id: "report-1".into(),
            received_at_ms: 0,
            connector: connector.into(),
            format: ketenbus_schemas::Format::Rfc822,
            content_type: "message/rfc822".into(),
            sender: None,
            receiver: None,
            body: body.to_vec(),
            attributes: std::collections::BTreeMap::new(),
        }
    }

    /// The failure fixture with `envid` as its `Original-Envelope-Id`.
    fn failed_with(envid: &str) -> Vec<u8> {
        String::from_utf8(FAILED.to_vec())
            .unwrap()
            .replace(
                "Original-Envelope-Id: 0193a1b2-0000-7000-8000-000000000001.0",
                &format!("Original-Envelope-Id: {}", xtext_encode(envid)),
            )
            .into_bytes()
    }

    fn check(subscriptions: &[&str]) -> ReportCheck {
        ReportCheck {
            key: KEY.to_vec(),
            subscriptions: subscriptions.iter().map(|s| (*s).to_owned()).collect(),
            sources: ReportSources {
                smtp: true,
                imap: BTreeSet::from(["hub".to_owned()]),
            },
        }
    }

    #[test]
    fn the_envelope_id_carries_a_token_only_the_key_makes() {
        let record = "0193a1b2-0000-7000-8000-000000000001.3";
        let envid = envelope_id(KEY, "gp-by-mail", record);
        assert!(envid.len() <= 100, "ENVID is at most 100 characters");
        assert!(envid.starts_with(&format!("{record}/")));
        let subs = vec!["webhook-sub".to_owned(), "gp-by-mail".to_owned()];
        assert_eq!(
            verify(&envid, KEY, &subs),
            Some(("gp-by-mail".to_owned(), record.to_owned()))
        );
        // Another key, another record, another subscription or a changed token: nothing.
        assert_eq!(verify(&envid, b"another key", &subs), None);
        let other_record = envid.replace(".3/", ".4/");
        assert_eq!(verify(&other_record, KEY, &subs), None);
        assert_eq!(verify(&envid, KEY, &["webhook-sub".to_owned()]), None);
        let mut flipped = envid.clone();
        let last = if flipped.ends_with('0') { "1" } else { "0" };
        flipped.replace_range(flipped.len() - 1.., last);
        assert_eq!(verify(&flipped, KEY, &subs), None);
        // What the sink set before tokens, or a guess, is no token.
        for forged in [
            "gp-by-mail/0193a1b2-0000-7000-8000-000000000001.3",
            record,
            &format!("{record}/"),
            &format!("{record}/{}", "0".repeat(32)),
        ] {
            assert_eq!(verify(forged, KEY, &subs), None, "{forged}");
        }
        let r = parse(&failed_with(&envid)).unwrap();
        assert_eq!(r.record_id().as_deref(), Some(record));
    }

    #[test]
    fn a_verified_report_becomes_a_lineage_step_for_the_original_envelope() {
        let envid = envelope_id(KEY, "gp-by-mail", "0193a1b2-0000-7000-8000-000000000001.0");
        let l = lineage_of(
            &envelope("smtp", &failed_with(&envid)),
            &check(&["gp-by-mail"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(l.envelope_id, "0193a1b2-0000-7000-8000-000000000001");
        assert_eq!(l.record_id, "0193a1b2-0000-7000-8000-000000000001.0");
        assert_eq!(l.subscription, "gp-by-mail");
        assert_eq!(l.outcome, "failed");
        assert!(l.bounced());
        assert_eq!(l.reason, "dsn_5.1.1");
        assert_eq!(
            lineage_of(&envelope("smtp", b"Subject: x\r\n\r\nhi\r\n"), &check(&[])),
            Ok(None)
        );
    }

    #[test]
    fn a_forged_or_misdirected_report_changes_nothing() {
        let c = check(&["gp-by-mail"]);
        let good = failed_with(&envelope_id(
            KEY,
            "gp-by-mail",
            "0193a1b2-0000-7000-8000-000000000001.0",
        ));
        // Right token, wrong way in.
        assert_eq!(
            lineage_of(&envelope("http", &good), &c),
            Err(Ignored::SourceNotAllowed)
        );
        assert_eq!(
            lineage_of(&envelope("inbox", &good), &c),
            Err(Ignored::SourceNotAllowed)
        );
        let mut imap = envelope("imap", &good);
        assert_eq!(lineage_of(&imap, &c), Err(Ignored::SourceNotAllowed));
        imap.attributes
            .insert("imap.pickup".into(), "other-hub".into());
        assert_eq!(lineage_of(&imap, &c), Err(Ignored::SourceNotAllowed));
        imap.attributes.insert("imap.pickup".into(), "hub".into());
        assert!(lineage_of(&imap, &c).unwrap().is_some());
        // Right way in, no token: the fixture as it is, and one by Message-ID only.
        assert_eq!(
            lineage_of(&envelope("smtp", FAILED), &c),
            Err(Ignored::NotOurs)
        );
        assert_eq!(
            lineage_of(&envelope("smtp", DELIVERED), &c),
            Err(Ignored::NotOurs)
        );
        // A token for a delivery of a subscription that has no mail sink.
        let webhook = failed_with(&envelope_id(KEY, "webhook-sub", "e.0"));
        assert_eq!(
            lineage_of(&envelope("smtp", &webhook), &c),
            Err(Ignored::NotOurs)
        );
    }

    #[test]
    fn status_text_that_is_no_status_code_never_becomes_a_reason() {
        let envid = envelope_id(KEY, "gp-by-mail", "e.0");
        let body = String::from_utf8(failed_with(&envid))
            .unwrap()
            .replace("Status: 5.1.1", "Status: 5.1.1-INJECTED-Jansen-999911120")
            .into_bytes();
        let l = lineage_of(&envelope("smtp", &body), &check(&["gp-by-mail"]))
            .unwrap()
            .unwrap();
        assert_eq!(l.reason, "dsn_invalid");
        for (s, ok) in [
            ("5.1.1", true),
            ("2.0.0", true),
            ("4.4.7", true),
            ("5.7.100", true),
            ("3.1.1", false),
            ("5.1", false),
            ("5.1.1.1", false),
            ("5.1.1x", false),
            ("5.1234.1", false),
        ] {
            assert_eq!(is_status_code(s), ok, "{s}");
        }
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
