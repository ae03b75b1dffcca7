//! IMAP pickup from a hub mailbox (ZorgMail style: one consumer per mailbox). The pickup
//! logs in, reads each message in the mailbox (`BODY.PEEK[]`, so nothing is marked seen), hands it to [`Ingest`] and, only once `accept` resolved, marks it
//! processed: moved to `processed_folder` (IMAP MOVE, RFC 6851) or deleted (UID EXPUNGE).
//! Then it waits in IDLE (RFC 2177) for the server to announce new mail, at most
//! `poll_interval`, or, without IDLE, logs out and looks again after `poll_interval`.
//!
//! Between "durable" and "moved" the pickup can crash. So before moving, it writes the
//! message's `UIDVALIDITY`/`UID` and `Message-ID` to a small state file (synced): a message
//! found again is recognised and only moved, never ingested twice. The entry is dropped once
//! the move succeeded.
//!
//! A message larger than `max_message_size` (by its `RFC822.SIZE`, before the body is
//! read), one the log refuses for good, and a poison message (the log keeps refusing it while
//! it takes others, `max_attempts` times) are set aside: flagged with a keyword naming the
//! reason and moved to `failed_folder`, so the others keep flowing. A body is read only once
//! the ingest memory budget ([`crate::budget`]) has room for it; else the pickup looks again
//! later.
//!
//! Client crate: `async-imap` (the async-email project, used by Delta Chat) rather than
//! `imap`: it is async on tokio like the rest of ketenbus, is released regularly, and has
//! MOVE, UID EXPUNGE and IDLE; `imap` 2.x is blocking and its 3.0 has stayed in alpha.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use ketenbus_schemas::{Format, RawEnvelope};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::contract::ingest::{Ingest, IngestError};
use crate::mail::config::{AfterPickup, ImapConfig, TlsMode};
use crate::mail::{MEDIA_RFC822, MailError};
use crate::party::of_mail_address;
use crate::poison::{Failure, Tries, Verdict};

/// Connector name in envelopes, logs and metrics.
pub const CONNECTOR: &str = "imap";

/// Most messages taken per look, so a full mailbox does not hold one session forever.
const BATCH: usize = 200;

/// One remembered message: ingested, not yet known to be moved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    uid_validity: u32,
    uid: u32,
    message_id: String,
}

/// The pickup's memory of messages that are durable but maybe not yet moved.
#[derive(Debug)]
pub struct PickupState {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl PickupState {
    /// Load (or start) the state in `path`.
    ///
    /// # Errors
    /// [`MailError::State`] when the file exists but cannot be read.
    pub fn load(path: &Path) -> Result<PickupState, MailError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(MailError::State(format!("{}: {e}", path.display()))),
        };
        let entries = text
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ' ');
                Some(Entry {
                    uid_validity: f.next()?.parse().ok()?,
                    uid: f.next()?.parse().ok()?,
                    message_id: f.next().unwrap_or("").to_owned(),
                })
            })
            .collect();
        Ok(PickupState {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// Whether this message was ingested before: the same UID in the same UIDVALIDITY, or
    /// the same Message-ID seen under another UIDVALIDITY (the server renumbered).
    #[must_use]
    pub fn seen(&self, uid_validity: u32, uid: u32, message_id: &str) -> bool {
        self.entries.iter().any(|e| {
            (e.uid_validity == uid_validity && e.uid == uid)
                || (!message_id.is_empty()
                    && e.message_id == message_id
                    && e.uid_validity != uid_validity)
        })
    }

    /// Remember a durable message (synced before this returns).
    ///
    /// # Errors
    /// [`MailError::State`] when the file cannot be written.
    pub fn remember(
        &mut self,
        uid_validity: u32,
        uid: u32,
        message_id: &str,
    ) -> Result<(), MailError> {
        let message_id: String = message_id.chars().filter(|c| !c.is_whitespace()).collect();
        self.entries.push(Entry {
            uid_validity,
            uid,
            message_id,
        });
        self.save()
    }

    /// Forget a message that is moved away.
    ///
    /// # Errors
    /// [`MailError::State`] when the file cannot be written.
    pub fn forget(&mut self, uid_validity: u32, uid: u32) -> Result<(), MailError> {
        let before = self.entries.len();
        self.entries
            .retain(|e| !(e.uid_validity == uid_validity && e.uid == uid));
        if self.entries.len() == before {
            Ok(())
        } else {
            self.save()
        }
    }

    /// How many messages are remembered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none are.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn save(&self) -> Result<(), MailError> {
        let err = |e: std::io::Error| MailError::State(format!("{}: {e}", self.path.display()));
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            for e in &self.entries {
                writeln!(f, "{} {} {}", e.uid_validity, e.uid, e.message_id).map_err(err)?;
            }
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// A configured pickup, ready to run.
pub struct ImapPickup {
    cfg: ImapConfig,
    password: String,
    ingest: Arc<dyn Ingest>,
    state: PickupState,
    tls: Option<tokio_rustls::TlsConnector>,
    status: Option<Arc<dyn crate::SourceStatus>>,
    budget: Budget,
    /// Failed tries per (UIDVALIDITY, UID).
    tries: std::sync::Mutex<Tries<(u32, u32)>>,
}

/// Why a message was set aside: the keyword it is flagged with (a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aside {
    /// Larger than `max_message_size`.
    TooLarge,
    /// Refused for good by the ingest.
    Refused,
    /// Failed `max_attempts` times while others were taken.
    Failed,
}

impl Aside {
    /// The refusal reason code (`ketenbus_ingest_rejected_messages_total`).
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Aside::TooLarge => "too_large",
            Aside::Refused => "refused",
            Aside::Failed => "max_attempts",
        }
    }

    /// The IMAP keyword (RFC 3501 flag) set on the message.
    #[must_use]
    pub fn keyword(self) -> &'static str {
        match self {
            Aside::TooLarge => "$KetenbusTooLarge",
            Aside::Refused => "$KetenbusRefused",
            Aside::Failed => "$KetenbusFailed",
        }
    }
}

impl fmt::Debug for ImapPickup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapPickup")
            .field("name", &self.cfg.name)
            .field("host", &self.cfg.host)
            .finish_non_exhaustive()
    }
}

/// Outcome of one look at the mailbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cycle {
    /// Messages handed to the ingest and made durable.
    pub ingested: usize,
    /// Messages recognised from an earlier pickup and not ingested again.
    pub recognised: usize,
    /// Messages moved or deleted.
    pub marked: usize,
    /// Messages set aside in `failed_folder`.
    pub set_aside: usize,
}

fn conn_err(step: &str, e: impl fmt::Display) -> MailError {
    MailError::Connection(format!("{step}: {e}"))
}

impl ImapPickup {
    /// A pickup for `cfg`; its state file lives in `<data_dir>/imap/<name>.state`.
    ///
    /// # Errors
    /// [`MailError::Config`] when the password variable is unset or the CA file unusable;
    /// [`MailError::State`] when the state file exists but cannot be read (start-up stops
    /// rather than risk taking a message twice).
    pub fn new(
        cfg: ImapConfig,
        data_dir: &Path,
        ingest: Arc<dyn Ingest>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ImapPickup, MailError> {
        let password = env(&cfg.password_env).ok_or_else(|| {
            MailError::Config(format!(
                "environment variable {} is not set",
                cfg.password_env
            ))
        })?;
        let tls = match cfg.tls {
            TlsMode::None => None,
            _ => Some(tokio_rustls::TlsConnector::from(
                crate::mail::tls::client_config(cfg.ca_file.as_deref())?,
            )),
        };
        let state = PickupState::load(&data_dir.join("imap").join(format!("{}.state", cfg.name)))?;
        let tries = std::sync::Mutex::new(Tries::new(cfg.max_attempts));
        Ok(ImapPickup {
            cfg,
            password,
            ingest,
            state,
            tls,
            status: None,
            budget: Budget::unlimited(),
            tries,
        })
    }

    /// Hold each message's bytes against `budget` while it is read and ingested.
    #[must_use]
    pub fn with_budget(mut self, budget: Budget) -> ImapPickup {
        self.budget = budget;
        self
    }

    /// Report whether the hub answers to `status`, as source `imap:<name>`.
    #[must_use]
    pub fn with_status(mut self, status: Arc<dyn crate::SourceStatus>) -> ImapPickup {
        self.status = Some(status);
        self
    }

    fn source(&self) -> String {
        format!("imap:{}", self.cfg.name)
    }

    /// Look at the mailbox every `poll_interval` until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut state = std::mem::replace(
            &mut self.state,
            PickupState {
                path: PathBuf::new(),
                entries: Vec::new(),
            },
        );
        tracing::info!(pickup = %self.cfg.name, host = %self.cfg.host, mailbox = %self.cfg.mailbox, remembered = state.len(), "imap pickup running");
        loop {
            match self.cycle(&mut state, &cancel).await {
                Ok(_) => {}
                Err(e) => {
                    if let Some(s) = &self.status {
                        s.down(&self.source(), &e.to_string());
                    }
                    tracing::warn!(pickup = %self.cfg.name, error = %e, "imap pickup failed, trying again later")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(self.cfg.poll_interval) => {}
            }
        }
        tracing::info!(pickup = %self.cfg.name, "imap pickup stopped");
    }

    /// Connect and take every message; with IDLE, stay connected and take new ones as the
    /// server announces them, until an error or `cancel`.
    ///
    /// # Errors
    /// When the server cannot be reached or refuses, or the state cannot be written.
    pub async fn cycle(
        &self,
        state: &mut PickupState,
        cancel: &CancellationToken,
    ) -> Result<Cycle, MailError> {
        let port = self
            .cfg
            .port
            .unwrap_or(if self.cfg.tls == TlsMode::Implicit {
                993
            } else {
                143
            });
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            TcpStream::connect((self.cfg.host.as_str(), port)),
        )
        .await
        .map_err(|_| conn_err("connect", "timed out"))?
        .map_err(|e| conn_err("connect", e))?;
        match (&self.tls, self.cfg.tls) {
            (None, _) => {
                let mut client = async_imap::Client::new(tcp);
                client
                    .read_response()
                    .await
                    .map_err(|e| conn_err("greeting", e))?;
                self.session(client, state, cancel).await
            }
            (Some(tls), TlsMode::Implicit) => {
                let stream = tls
                    .connect(self.server_name()?, tcp)
                    .await
                    .map_err(|e| conn_err("tls", e))?;
                let mut client = async_imap::Client::new(stream);
                client
                    .read_response()
                    .await
                    .map_err(|e| conn_err("greeting", e))?;
                self.session(client, state, cancel).await
            }
            (Some(tls), _) => {
                let tcp = starttls(tcp).await?;
                let stream = tls
                    .connect(self.server_name()?, tcp)
                    .await
                    .map_err(|e| conn_err("tls", e))?;
                self.session(async_imap::Client::new(stream), state, cancel)
                    .await
            }
        }
    }

    fn server_name(&self) -> Result<ServerName<'static>, MailError> {
        ServerName::try_from(self.cfg.host.clone())
            .map_err(|e| MailError::Config(format!("host: {e}")))
    }

    async fn session<T>(
        &self,
        client: async_imap::Client<T>,
        state: &mut PickupState,
        cancel: &CancellationToken,
    ) -> Result<Cycle, MailError>
    where
        T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send,
    {
        let mut session = client
            .login(&self.cfg.username, &self.password)
            .await
            .map_err(|(e, _)| MailError::Refused(format!("login: {e}")))?;
        let idle = self.cfg.idle
            && session
                .capabilities()
                .await
                .is_ok_and(|c| c.has_str("IDLE"));
        let mut total = Cycle::default();
        loop {
            let cycle = match self.take_all(&mut session, state, cancel).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = session.logout().await;
                    return Err(e);
                }
            };
            if let Some(s) = &self.status {
                s.up(&self.source());
            }
            if cycle != Cycle::default() {
                tracing::debug!(pickup = %self.cfg.name, ingested = cycle.ingested, recognised = cycle.recognised, marked = cycle.marked, set_aside = cycle.set_aside, "imap pickup looked");
            }
            total.ingested += cycle.ingested;
            total.recognised += cycle.recognised;
            total.marked += cycle.marked;
            total.set_aside += cycle.set_aside;
            if !idle || cancel.is_cancelled() {
                let _ = session.logout().await;
                return Ok(total);
            }
            // RFC 2177 IDLE: wait for the server to announce new mail, at most
            // poll_interval, then look again on the same connection.
            let mut handle = session.idle();
            handle.init().await.map_err(|e| conn_err("idle", e))?;
            {
                let (wait, _stop) = handle.wait_with_timeout(self.cfg.poll_interval);
                tokio::select! {
                    r = wait => { r.map_err(|e| conn_err("idle", e))?; }
                    () = cancel.cancelled() => {}
                }
            }
            session = handle.done().await.map_err(|e| conn_err("idle done", e))?;
        }
    }

    async fn take_all<T>(
        &self,
        s: &mut async_imap::Session<T>,
        state: &mut PickupState,
        cancel: &CancellationToken,
    ) -> Result<Cycle, MailError>
    where
        T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send,
    {
        let mailbox = s
            .select(&self.cfg.mailbox)
            .await
            .map_err(|e| MailError::Refused(format!("select: {e}")))?;
        let validity = mailbox.uid_validity.unwrap_or(0);
        // ALL, not UNDELETED: a message we flagged \Deleted just before a crash must be
        // found again to be expunged.
        let mut uids: Vec<u32> = s
            .uid_search("ALL")
            .await
            .map_err(|e| conn_err("search", e))?
            .into_iter()
            .collect();
        uids.sort_unstable();
        // Messages that failed before go last: a poison message cannot hold up the others.
        {
            let mut tries = self.tries.lock().expect("tries lock");
            let present: std::collections::HashSet<u32> = uids.iter().copied().collect();
            tries.retain(|(v, u)| *v == validity && present.contains(u));
            uids.sort_by_key(|uid| tries.count(&(validity, *uid)));
        }
        uids.truncate(BATCH);
        let max_size = self.cfg.max_message_size.as_u64();
        let mut cycle = Cycle::default();
        let mut unavailable_in_a_row = 0;
        for uid in uids {
            if cancel.is_cancelled() {
                break;
            }
            // The size first: a message past the limit or the budget is not read at all.
            let sizes: Vec<_> = s
                .uid_fetch(uid.to_string(), "(UID RFC822.SIZE)")
                .await
                .map_err(|e| conn_err("fetch size", e))?
                .try_collect()
                .await
                .map_err(|e| conn_err("fetch size", e))?;
            let Some(size) = sizes
                .iter()
                .find(|f| f.uid == Some(uid))
                .and_then(|f| f.size)
            else {
                continue;
            };
            if u64::from(size) > max_size {
                let reason =
                    format!("the message is larger than {max_size} bytes (imap max_message_size)");
                self.set_aside(s, uid, Aside::TooLarge, &reason).await?;
                cycle.set_aside += 1;
                continue;
            }
            let Ok(held) = self
                .budget
                .reserve(usize::try_from(size).unwrap_or(usize::MAX))
            else {
                tracing::debug!(pickup = %self.cfg.name, uid, "ingest memory budget in use; looking again later");
                break;
            };
            let fetches: Vec<_> = s
                .uid_fetch(uid.to_string(), "(UID FLAGS BODY.PEEK[])")
                .await
                .map_err(|e| conn_err("fetch", e))?
                .try_collect()
                .await
                .map_err(|e| conn_err("fetch", e))?;
            let Some(fetch) = fetches.iter().find(|f| f.uid == Some(uid)) else {
                continue;
            };
            let deleted = fetch.flags().any(|f| f == async_imap::types::Flag::Deleted);
            let Some(body) = fetch.body().map(<[u8]>::to_vec) else {
                continue;
            };
            drop(fetches);
            let message_id = mail_parser::MessageParser::default()
                .parse_headers(&body)
                .and_then(|m| m.message_id().map(str::to_owned))
                .unwrap_or_default();
            if state.seen(validity, uid, &message_id) {
                cycle.recognised += 1;
            } else if deleted {
                // Deleted by someone else and not ours: leave it alone.
                continue;
            } else {
                let envelope = self.envelope(&body, validity, uid, &message_id);
                drop(body);
                let key = (validity, uid);
                match self.ingest.accept(envelope).await {
                    Ok(a) => {
                        tracing::debug!(pickup = %self.cfg.name, id = %a.id, uid, "imap message stored");
                        cycle.ingested += 1;
                        unavailable_in_a_row = 0;
                        self.tries.lock().expect("tries lock").succeeded(&key);
                    }
                    // Refused for good as it is: set aside, trying again cannot help.
                    Err(e @ IngestError::Refused { .. }) => {
                        self.set_aside(s, uid, Aside::Refused, &e.to_string())
                            .await?;
                        cycle.set_aside += 1;
                        continue;
                    }
                    Err(e) => {
                        let failure = match e {
                            IngestError::Unavailable(_) => Failure::Retryable,
                            _ => Failure::Item,
                        };
                        let verdict = self.tries.lock().expect("tries lock").failed(
                            &key,
                            failure,
                            &e.to_string(),
                        );
                        if let Verdict::SetAside(reason) = verdict {
                            self.set_aside(s, uid, Aside::Failed, &reason).await?;
                            cycle.set_aside += 1;
                            continue;
                        }
                        tracing::warn!(pickup = %self.cfg.name, uid, error = %e, "the log did not take the message; it stays for the next look");
                        if failure == Failure::Retryable {
                            unavailable_in_a_row += 1;
                            // Two in a row: the log is down, not the message.
                            if unavailable_in_a_row >= 2 {
                                return Err(MailError::Connection(format!("ingest: {e}")));
                            }
                        }
                        continue;
                    }
                }
                state.remember(validity, uid, &message_id)?;
            }
            drop(held);
            self.mark(s, uid).await?;
            state.forget(validity, uid)?;
            cycle.marked += 1;
        }
        Ok(cycle)
    }

    /// Set a message aside: flag it with the reason's keyword and move it to
    /// `failed_folder` (made when missing).
    async fn set_aside<T>(
        &self,
        s: &mut async_imap::Session<T>,
        uid: u32,
        why: Aside,
        reason: &str,
    ) -> Result<(), MailError>
    where
        T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send,
    {
        tracing::warn!(pickup = %self.cfg.name, uid, keyword = why.keyword(), folder = %self.cfg.failed_folder, reason = %reason, "imap message set aside");
        if let Some(status) = &self.status {
            status.refused("imap", why.code());
        }
        let _: Vec<_> = s
            .uid_store(
                uid.to_string(),
                format!("+FLAGS.SILENT ({})", why.keyword()),
            )
            .await
            .map_err(|e| MailError::Refused(format!("flag {}: {e}", why.keyword())))?
            .try_collect()
            .await
            .map_err(|e| conn_err("flag", e))?;
        // Already there is fine; a folder that cannot be made shows in the move.
        let _ = s.create(&self.cfg.failed_folder).await;
        s.uid_mv(uid.to_string(), &self.cfg.failed_folder)
            .await
            .map_err(|e| MailError::Refused(format!("move to failed_folder: {e}")))
    }

    async fn mark<T>(&self, s: &mut async_imap::Session<T>, uid: u32) -> Result<(), MailError>
    where
        T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send,
    {
        match self.cfg.after {
            AfterPickup::Move => s
                .uid_mv(uid.to_string(), &self.cfg.processed_folder)
                .await
                .map_err(|e| MailError::Refused(format!("move to processed_folder: {e}"))),
            AfterPickup::Delete => {
                let _: Vec<_> = s
                    .uid_store(uid.to_string(), "+FLAGS.SILENT (\\Deleted)")
                    .await
                    .map_err(|e| MailError::Refused(format!("flag deleted: {e}")))?
                    .try_collect()
                    .await
                    .map_err(|e| conn_err("flag deleted", e))?;
                let _: Vec<_> = s
                    .uid_expunge(uid.to_string())
                    .await
                    .map_err(|e| MailError::Refused(format!("expunge: {e}")))?
                    .try_collect()
                    .await
                    .map_err(|e| conn_err("expunge", e))?;
                Ok(())
            }
        }
    }

    fn envelope(&self, body: &[u8], validity: u32, uid: u32, message_id: &str) -> RawEnvelope {
        let headers = mail_parser::MessageParser::default().parse_headers(body);
        let from = headers
            .as_ref()
            .and_then(|m| m.from())
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .map(str::to_owned);
        // Every `To` and `Cc` address is a recipient (unless the pickup names its receiver).
        let recipients: Vec<String> = headers
            .as_ref()
            .map(|m| {
                [m.to(), m.cc()]
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a.iter())
                    .filter_map(|a| a.address())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let to = recipients.first().cloned();
        let mut attributes = BTreeMap::new();
        attributes.insert("imap.pickup".to_owned(), self.cfg.name.clone());
        attributes.insert("imap.mailbox".to_owned(), self.cfg.mailbox.clone());
        attributes.insert("imap.uidvalidity".to_owned(), validity.to_string());
        attributes.insert("imap.uid".to_owned(), uid.to_string());
        if !message_id.is_empty() {
            attributes.insert("mail.message_id".to_owned(), message_id.to_owned());
        }
        if self.cfg.receiver.is_none() && !recipients.is_empty() {
            attributes.insert(
                crate::party::RCPT_ATTRIBUTE.to_owned(),
                recipients.join(","),
            );
        }
        RawEnvelope {
            id: ketenbus_schemas::new_envelope_id(),
            received_at_ms: ketenbus_schemas::now_ms(),
            connector: CONNECTOR.to_owned(),
            format: Format::Rfc822,
            content_type: MEDIA_RFC822.to_owned(),
            sender: from.as_deref().and_then(of_mail_address),
            receiver: self
                .cfg
                .receiver
                .clone()
                .or_else(|| to.as_deref().and_then(of_mail_address)),
            body: body.to_vec(),
            attributes,
        }
    }
}

/// IMAP STARTTLS (RFC 3501 section 6.2.1) on a fresh connection: read the greeting, ask,
/// and hand back the socket for the handshake.
async fn starttls(tcp: TcpStream) -> Result<TcpStream, MailError> {
    let mut r = BufReader::new(tcp);
    let mut line = String::new();
    r.read_line(&mut line)
        .await
        .map_err(|e| conn_err("greeting", e))?;
    r.get_mut()
        .write_all(b"k1 STARTTLS\r\n")
        .await
        .map_err(|e| conn_err("starttls", e))?;
    loop {
        line.clear();
        if r.read_line(&mut line)
            .await
            .map_err(|e| conn_err("starttls", e))?
            == 0
        {
            return Err(conn_err("starttls", "connection closed"));
        }
        if let Some(rest) = line.strip_prefix("k1 ") {
            if rest.to_ascii_uppercase().starts_with("OK") {
                return Ok(r.into_inner());
            }
            return Err(MailError::Refused(format!("starttls: {}", rest.trim())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_restart_and_recognises_by_uid_or_message_id() {
        let dir = std::env::temp_dir().join(format!("ketenbus-imap-state-{}", std::process::id()));
        let path = dir.join("hub.state");
        let mut s = PickupState::load(&path).unwrap();
        assert!(s.is_empty());
        s.remember(7, 42, "lab-1@example.test").unwrap();
        let s2 = PickupState::load(&path).unwrap();
        assert!(s2.seen(7, 42, ""), "same UID, same UIDVALIDITY");
        assert!(
            s2.seen(8, 1, "lab-1@example.test"),
            "renumbered by the server, same Message-ID"
        );
        assert!(
            !s2.seen(7, 43, "lab-1@example.test"),
            "a new UID in the same mailbox is a new message"
        );
        assert!(!s2.seen(7, 43, "other@example.test"));
        let mut s2 = s2;
        s2.forget(7, 42).unwrap();
        assert!(PickupState::load(&path).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
