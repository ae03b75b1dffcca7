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
pub use mime::MailNormaliser;
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

/// What the mail sources share from the runtime that starts them.
pub struct MailContext<'a> {
    /// The data directory (the IMAP pickup keeps its state there).
    pub data_dir: &'a std::path::Path,
    /// Where accepted messages go.
    pub ingest: &'a std::sync::Arc<dyn crate::Ingest>,
    /// The environment (passwords named by `*_env` keys).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Where the sources report up and down (sources `smtp` and `imap:<name>`).
    pub status: &'a std::sync::Arc<dyn crate::SourceStatus>,
    /// The memory budget message bytes are held against.
    pub budget: &'a crate::budget::Budget,
    /// Stops every source.
    pub cancel: &'a tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for MailContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailContext")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Start what `[mail]` configures: the SMTP listener (bound before this returns, so a busy
/// port fails start-up) and one task per IMAP pickup, in `tasks`, each sharing `ctx`.
///
/// # Errors
/// [`MailError::Config`] when a listener cannot bind or a setting cannot be used.
pub async fn start(
    config: &MailConfig,
    ctx: &MailContext<'_>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), MailError> {
    if let Some(smtp) = &config.smtp {
        let listener = SmtpListener::new(smtp, std::sync::Arc::clone(ctx.ingest), ctx.env)?
            .with_budget(ctx.budget.clone())
            .with_status(std::sync::Arc::clone(ctx.status));
        let socket = tokio::net::TcpListener::bind(smtp.listen)
            .await
            .map_err(|e| {
                MailError::Config(format!("binding the SMTP listener to {}: {e}", smtp.listen))
            })?;
        tasks.spawn(listener.run(socket, ctx.cancel.clone()));
        ctx.status.up("smtp");
    }
    for pickup in &config.imap {
        let p = imap::ImapPickup::new(
            pickup.clone(),
            ctx.data_dir,
            std::sync::Arc::clone(ctx.ingest),
            ctx.env,
        )?
        .with_status(std::sync::Arc::clone(ctx.status))
        .with_budget(ctx.budget.clone());
        tasks.spawn(p.run(ctx.cancel.clone()));
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
