//! Secure mail, both ways: what replaced the fax in Dutch care (STANDARDS.md sections 2, 6).
//!
//! In: [`smtp`] is a sans-IO SMTP server session, [`listener`] the tokio shell that runs it
//! (STARTTLS, AUTH, limits) and hands each message to the ingest; [`imap`] picks messages up
//! from a hub mailbox and marks them processed only once they are durable. [`mime`] is the
//! normaliser for `message/rfc822`: EDIFACT and FHIR parts go to those normalisers, letters
//! (text, HTML, PDF) become letter events whose attachments live in the
//! [`content`](crate::contract::content) store.
//! Out: [`send`] is the secure-mail sink (lettre); [`dsn`] reads the delivery status
//! notifications that come back and finds the delivery they are about.

pub mod config;
pub mod dsn;
pub mod imap;
pub mod listener;
pub mod mime;
pub mod send;
pub mod sender_check;
pub mod smtp;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ketenbus_schemas::{Format, RawEnvelope};

pub use config::{MailConfig, SmtpAuthConfig};
pub use listener::SmtpListener;
pub use mime::MailNormalizer;
pub use send::{MailSink, MailSinkConfig};
pub use sender_check::SmtpSenderCheck;

use crate::ErrorKind;

/// The media type of a mail message.
pub const MEDIA_RFC822: &str = "message/rfc822";

/// Envelope attribute naming the user an SMTP client authenticated as.
pub const AUTH_USER_ATTRIBUTE: &str = "smtp.auth_user";

/// What went wrong in a mail connector. Texts name the step, never message content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailError {
    /// A setting cannot be used (certificate file, address).
    #[error("mail config: {0}")]
    Config(String),
    /// The peer cannot be reached or broke off; worth another try.
    #[error("mail connection: {0}")]
    Connection(String),
    /// The peer refused for good.
    #[error("mail refused: {0}")]
    Refused(String),
    /// Local state (the pickup's state file) cannot be read or written.
    #[error("mail state: {0}")]
    State(String),
}

impl MailError {
    /// How to handle it.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            MailError::Connection(_) => ErrorKind::Retryable,
            MailError::Refused(_) => ErrorKind::Rejected,
            MailError::Config(_) | MailError::State(_) => ErrorKind::Fatal,
        }
    }
}

/// The raw envelope for a message an SMTP session received: the bytes as sent (moved, not
/// copied), the envelope addresses as party ids and transport details as attributes.
#[must_use]
pub fn envelope_for(mail: smtp::Mail, connector: &str, peer: Option<SocketAddr>) -> RawEnvelope {
    let mut attributes = BTreeMap::new();
    attributes.insert("mail.from".to_owned(), mail.from.clone());
    attributes.insert(
        crate::party::RCPT_ATTRIBUTE.to_owned(),
        mail.rcpts.join(","),
    );
    attributes.insert("smtp.helo".to_owned(), mail.helo.clone());
    attributes.insert("smtp.tls".to_owned(), mail.tls.to_string());
    if let Some(u) = &mail.auth_user {
        attributes.insert(AUTH_USER_ATTRIBUTE.to_owned(), u.clone());
    }
    if let Some(p) = peer {
        attributes.insert("smtp.peer".to_owned(), p.ip().to_string());
    }
    RawEnvelope {
        id: ketenbus_schemas::new_envelope_id(),
        received_at_ms: ketenbus_schemas::now_ms(),
        connector: connector.to_owned(),
        format: Format::Rfc822,
        content_type: MEDIA_RFC822.to_owned(),
        sender: crate::party::of_mail_address(&mail.from),
        receiver: mail
            .rcpts
            .first()
            .and_then(|r| crate::party::of_mail_address(r)),
        body: mail.data,
        attributes,
    }
}

/// Start what `[mail]` configures: the SMTP listener (bound before this returns, so a busy
/// port fails start-up) and one task per IMAP pickup, each handing messages to `ingest`,
/// reporting to `status` (sources `smtp` and `imap:<name>`), holding message bytes against
/// `budget` and stopping at `cancel`.
///
/// # Errors
/// [`MailError::Config`] when a listener cannot bind or a setting cannot be used.
#[expect(
    clippy::too_many_arguments,
    reason = "the runtime's wiring, each a different thing the sources share"
)]
pub async fn start(
    config: &MailConfig,
    data_dir: &std::path::Path,
    ingest: &std::sync::Arc<dyn crate::Ingest>,
    env: &dyn Fn(&str) -> Option<String>,
    status: &std::sync::Arc<dyn crate::SourceStatus>,
    budget: &crate::budget::Budget,
    cancel: &tokio_util::sync::CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), MailError> {
    if let Some(smtp) = &config.smtp {
        let listener = SmtpListener::new(smtp, std::sync::Arc::clone(ingest), env)?
            .with_budget(budget.clone());
        let socket = tokio::net::TcpListener::bind(smtp.listen)
            .await
            .map_err(|e| {
                MailError::Config(format!("binding the SMTP listener to {}: {e}", smtp.listen))
            })?;
        tasks.spawn(listener.run(socket, cancel.clone()));
        status.up("smtp");
    }
    for pickup in &config.imap {
        let p =
            imap::ImapPickup::new(pickup.clone(), data_dir, std::sync::Arc::clone(ingest), env)?
                .with_status(std::sync::Arc::clone(status))
                .with_budget(budget.clone());
        tasks.spawn(p.run(cancel.clone()));
    }
    Ok(())
}

/// The content store `[mail]` configures: `content_dir`, else `<data_dir>/content`.
///
/// # Errors
/// When the directory cannot be created.
pub fn content_store(
    config: &MailConfig,
    data_dir: &std::path::Path,
) -> std::io::Result<crate::FsContentStore> {
    crate::FsContentStore::open(
        &config
            .content_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("content")),
    )
}
