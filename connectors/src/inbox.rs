//! Inbox folder: a directory partners (or a file transfer) drop messages into. A file is taken
//! once it has stopped growing, handed to ingest, and moved to `done/` only after its envelope
//! is durable; a file that cannot be read or does not parse goes to `failed/` with a
//! `<name>.reason` file saying why and where. A crash between ingest and the move leaves the
//! file in place, so it is ingested again after a restart (a duplicate, never a loss).
//!
//! A file larger than `max_size` goes to `failed/` at once. A file the log keeps refusing
//! while others are taken (a poison file) goes to `failed/` after `max_attempts` tries, so
//! it cannot hold up the rest. A file is read only once the ingest memory budget
//! ([`crate::budget`]) has room for it; otherwise it waits for the next scan.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ketenbus_schemas::{Format, RawEnvelope};
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::contract::ingest::{Ingest, IngestError};
use crate::poison::{Failure, Tries, Verdict};

pub mod config;

pub use config::{InboxConfig, matches};

/// The envelope attribute naming the file a message came from (its name, never its path).
pub const FILE_ATTRIBUTE: &str = "file";

/// What a scan saw of a file last time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u64,
    modified: SystemTime,
    since: std::time::Instant,
}

/// Why a file went to `failed/`: a reason code and the text of its `.reason` file.
fn unreadable(format: Format, bytes: &[u8]) -> Option<(&'static str, String)> {
    if bytes.is_empty() {
        return Some(("empty_body", "the file is empty".into()));
    }
    match format {
        Format::Edifact => crate::edifact::parse(bytes)
            .err()
            .map(|e| ("not_parseable", format!("not EDIFACT: {e}"))),
        _ => None,
    }
}

/// A watched inbox directory.
pub struct Inbox {
    config: InboxConfig,
    ingest: Arc<dyn Ingest>,
    seen: HashMap<PathBuf, Seen>,
    budget: Budget,
    tries: Tries<PathBuf>,
    status: Option<Arc<dyn crate::SourceStatus>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What one scan did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    /// Files ingested and moved to `done/`.
    pub taken: usize,
    /// Files moved to `failed/`.
    pub failed: usize,
    /// Files still settling, or waiting for room in the memory budget or for the log.
    pub waiting: usize,
}

/// What became of one settled file.
enum Taken {
    /// Durable, moved to `done/`.
    Done,
    /// Moved to `failed/`.
    Failed,
    /// No room in the memory budget: left for the next scan.
    NoRoom,
}

impl Inbox {
    /// An inbox on `config.path` handing files to `ingest`.
    ///
    /// # Errors
    /// When `done/` or `failed/` cannot be made.
    pub fn new(config: InboxConfig, ingest: Arc<dyn Ingest>) -> std::io::Result<Inbox> {
        std::fs::create_dir_all(config.path.join("done"))?;
        std::fs::create_dir_all(config.path.join("failed"))?;
        let tries = Tries::new(config.max_attempts);
        Ok(Inbox {
            config,
            ingest,
            seen: HashMap::new(),
            budget: Budget::unlimited(),
            tries,
            status: None,
        })
    }

    /// Tell `status` of every file moved to `failed/` (connector `inbox`, with its reason code).
    #[must_use]
    pub fn with_status(mut self, status: Arc<dyn crate::SourceStatus>) -> Inbox {
        self.status = Some(status);
        self
    }

    /// Hold each file's bytes against `budget` while it is read and ingested.
    #[must_use]
    pub fn with_budget(mut self, budget: Budget) -> Inbox {
        self.budget = budget;
        self
    }

    /// Scan until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        tracing::info!(path = %self.config.path.display(), "inbox watching");
        loop {
            match self.scan().await {
                Ok(r) if r.taken + r.failed > 0 => {
                    tracing::debug!(
                        taken = r.taken,
                        failed = r.failed,
                        waiting = r.waiting,
                        "inbox scan"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %self.config.path.display(), error = %e, "inbox scan failed, retrying")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// One pass over the directory.
    ///
    /// # Errors
    /// When the directory cannot be listed. A log that cannot take a file leaves the file in
    /// place for the next scan.
    pub async fn scan(&mut self) -> std::io::Result<ScanReport> {
        let mut report = ScanReport::default();
        let mut present = Vec::new();
        let mut settled = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.config.path).await?;
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = match entry.metadata().await {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            if name.starts_with('.') || !self.config.patterns.iter().any(|p| matches(p, &name)) {
                continue;
            }
            let path = entry.path();
            present.push(path.clone());
            let now = std::time::Instant::now();
            let modified = meta.modified().unwrap_or(UNIX_EPOCH);
            let seen = self.seen.entry(path.clone()).or_insert(Seen {
                size: meta.len(),
                modified,
                since: now,
            });
            if seen.size != meta.len() || seen.modified != modified {
                *seen = Seen {
                    size: meta.len(),
                    modified,
                    since: now,
                };
            }
            if now.duration_since(seen.since) < self.config.settle {
                report.waiting += 1;
                continue;
            }
            settled.push((path, name, meta.len()));
        }
        // Files that failed before go last: a poison file cannot hold up the others.
        settled.sort_by_key(|(path, _, _)| self.tries.count(path));
        let mut unavailable_in_a_row = 0;
        for (path, name, size) in settled {
            match self.take(&path, &name, size).await {
                Ok(Taken::Done) => {
                    report.taken += 1;
                    self.tries.succeeded(&path);
                    unavailable_in_a_row = 0;
                }
                Ok(Taken::Failed) => report.failed += 1,
                Ok(Taken::NoRoom) => {
                    tracing::debug!(file = %name, "ingest memory budget in use; the file waits for the next scan");
                    report.waiting += 1;
                    break;
                }
                Err(e @ IngestError::Refused { .. }) => {
                    // Refused for good as it is: trying again cannot help.
                    self.fail(&path, &name, "refused", &e.to_string()).await;
                    report.failed += 1;
                }
                Err(e) => {
                    let failure = match e {
                        IngestError::Unavailable(_) => Failure::Retryable,
                        _ => Failure::Item,
                    };
                    match self.tries.failed(&path, failure, &e.to_string()) {
                        Verdict::SetAside(reason) => {
                            self.fail(&path, &name, "max_attempts", &reason).await;
                            report.failed += 1;
                        }
                        Verdict::Retry => {
                            tracing::warn!(file = %name, error = %e, "the log did not take the file; it stays for the next scan");
                            report.waiting += 1;
                        }
                    }
                    if failure == Failure::Retryable {
                        unavailable_in_a_row += 1;
                        // Two in a row: the log is down, not the file.
                        if unavailable_in_a_row >= 2 {
                            break;
                        }
                    }
                    continue;
                }
            }
            self.seen.remove(&path);
        }
        self.seen.retain(|p, _| present.contains(p));
        self.tries.retain(|p| present.contains(p));
        Ok(report)
    }

    /// Ingest one settled file of `size` bytes.
    async fn take(&self, path: &Path, name: &str, size: u64) -> Result<Taken, IngestError> {
        let max = self.config.max_size.as_u64();
        let too_large = || format!("the file is larger than {max} bytes (inbox max_size)");
        if size > max {
            self.fail(path, name, "too_large", &too_large()).await;
            return Ok(Taken::Failed);
        }
        let Ok(mut held) = self
            .budget
            .reserve(usize::try_from(size).unwrap_or(usize::MAX))
        else {
            return Ok(Taken::NoRoom);
        };
        let bytes = match read_at_most(path, max).await {
            Ok(b) => b,
            Err(e) => {
                self.fail(
                    path,
                    name,
                    "unreadable",
                    &format!("cannot read the file: {e}"),
                )
                .await;
                return Ok(Taken::Failed);
            }
        };
        if bytes.len() as u64 > max {
            self.fail(path, name, "too_large", &too_large()).await;
            return Ok(Taken::Failed);
        }
        if held.grow_to(bytes.len()).is_err() {
            return Ok(Taken::NoRoom);
        }
        // Parsing a large file is CPU work: off the async workers.
        let format = self.config.format;
        let (bytes, unreadable) = tokio::task::spawn_blocking(move || {
            let why = unreadable(format, &bytes);
            (bytes, why)
        })
        .await
        .map_err(|e| IngestError::Fatal(format!("inbox parse task: {e}")))?;
        if let Some((code, reason)) = unreadable {
            self.fail(path, name, code, &reason).await;
            return Ok(Taken::Failed);
        }
        let received_at_ms = ketenbus_schemas::now_ms();
        // The file names its own parties (UNB, MessageHeader); no one else vouches for them.
        let declared = crate::party::declared(self.config.format, &bytes);
        let envelope = RawEnvelope {
            id: ketenbus_schemas::new_envelope_id(),
            received_at_ms,
            connector: "inbox".into(),
            format: self.config.format,
            content_type: content_type(self.config.format).into(),
            sender: declared.sender().map(str::to_owned),
            receiver: declared.receiver().map(str::to_owned),
            body: bytes,
            attributes: BTreeMap::from([(FILE_ATTRIBUTE.to_owned(), name.to_owned())]),
        };
        let accepted = self.ingest.accept(envelope).await?;
        drop(held);
        let target = free_name(&self.config.path.join("done"), name, &accepted.id);
        match tokio::fs::rename(path, &target).await {
            Ok(()) => tracing::info!(
                file = %name,
                message_id = %accepted.id,
                done = %target.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                "inbox file taken, moved to done/"
            ),
            // Durable already: a failed move only means the file may be taken again.
            Err(e) => {
                tracing::error!(file = %name, message_id = %accepted.id, error = %e, "ingested but not moved to done/; it will be ingested again")
            }
        }
        Ok(Taken::Done)
    }

    /// Move a file to `failed/` with its `.reason` note; `code` is its refusal reason code.
    async fn fail(&self, path: &Path, name: &str, code: &'static str, reason: &str) {
        tracing::warn!(file = %name, reason = %reason, "inbox file moved to failed/");
        if let Some(status) = &self.status {
            status.refused("inbox", code);
        }
        let failed = self.config.path.join("failed");
        let stamp = ketenbus_schemas::now_ms();
        let target = free_name(&failed, name, &stamp.to_string());
        let reason_file = target.with_file_name(format!(
            "{}.reason",
            target
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        let _ = tokio::fs::write(&reason_file, format!("{reason}\n")).await;
        if let Err(e) = tokio::fs::rename(path, &target).await {
            tracing::error!(file = %name, error = %e, "cannot move a failed inbox file");
        }
    }
}

/// The file's bytes, at most `max + 1` of them (it may have grown since it was measured).
async fn read_at_most(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .await?;
    Ok(bytes)
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Edifact => "application/EDIFACT",
        Format::FhirJson => "application/fhir+json",
        Format::FhirXml => "application/fhir+xml",
        Format::Rfc822 => "message/rfc822",
    }
}

/// `dir/name`, or `dir/name.<suffix>` when that is taken.
fn free_name(dir: &Path, name: &str, suffix: &str) -> PathBuf {
    let plain = dir.join(name);
    if plain.exists() {
        dir.join(format!("{name}.{suffix}"))
    } else {
        plain
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::config::{default_max_attempts, default_max_size, default_patterns};
    use super::*;
    use crate::contract::ingest::Accepted;
    use crate::contract::sink::BoxFuture;

    /// Keeps what it is given, like the log would; can be made unavailable.
    #[derive(Default)]
    struct Keep {
        got: Mutex<Vec<RawEnvelope>>,
        unavailable: std::sync::atomic::AtomicBool,
    }

    impl Ingest for Keep {
        fn accept(&self, envelope: RawEnvelope) -> BoxFuture<'_, Result<Accepted, IngestError>> {
            Box::pin(async move {
                if self.unavailable.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(IngestError::Unavailable("full".into()));
                }
                // What a log with a record size limit says of a record past it.
                if envelope.body.windows(6).any(|w| w == b"POISON") {
                    return Err(IngestError::Unavailable(
                        "record larger than the log takes".into(),
                    ));
                }
                let id = envelope.id.clone();
                self.got.lock().unwrap().push(envelope);
                Ok(Accepted { id })
            })
        }
    }

    const MEDLAB: &[u8] =
        b"UNB+UNOA:1+500001234+500005678+261101:0815+IC1'UNH+M1+MEDLAB:1'UNT+2+M1'UNZ+1+IC1'";

    fn inbox(dir: &Path, keep: Arc<Keep>) -> Inbox {
        let config = InboxConfig {
            path: dir.to_path_buf(),
            patterns: default_patterns(),
            format: Format::Edifact,
            poll_interval: Duration::from_millis(10),
            settle: Duration::from_millis(200),
            max_size: default_max_size(),
            max_attempts: default_max_attempts(),
        };
        Inbox::new(config, keep).unwrap()
    }

    #[test]
    fn patterns_match_like_a_shell() {
        assert!(matches("*.edi", "lab-001.EDI"));
        assert!(matches("lab-???.edi", "lab-001.edi"));
        assert!(!matches("*.edi", "lab.edi.part"));
        assert!(matches("*", "anything"));
    }

    #[tokio::test]
    async fn a_settled_file_is_ingested_then_moved_to_done() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Arc::new(Keep::default());
        let mut inbox = inbox(dir.path(), Arc::clone(&keep));
        std::fs::write(dir.path().join("lab.edi"), MEDLAB).unwrap();
        std::fs::write(dir.path().join("notes.doc"), b"not for us").unwrap();
        let r = inbox.scan().await.unwrap();
        assert_eq!(
            r,
            ScanReport {
                taken: 0,
                failed: 0,
                waiting: 1
            },
            "first sight: still settling"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = inbox.scan().await.unwrap();
        assert_eq!(r.taken, 1);
        let got = keep.got.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, MEDLAB);
        assert_eq!(got[0].connector, "inbox");
        assert_eq!(got[0].attributes["file"], "lab.edi");
        assert!(dir.path().join("done/lab.edi").exists());
        assert!(!dir.path().join("lab.edi").exists());
        assert!(
            dir.path().join("notes.doc").exists(),
            "other files are left alone"
        );
    }

    #[tokio::test]
    async fn a_growing_file_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Arc::new(Keep::default());
        let mut inbox = inbox(dir.path(), Arc::clone(&keep));
        let path = dir.path().join("big.edi");
        std::fs::write(&path, &MEDLAB[..20]).unwrap();
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            std::io::Write::write_all(&mut f, &MEDLAB[20 + i * 5..25 + i * 5]).unwrap();
            drop(f);
            assert_eq!(inbox.scan().await.unwrap().taken, 0, "still being written");
        }
        assert!(keep.got.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_unparseable_file_goes_to_failed_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Arc::new(Keep::default());
        let mut inbox = inbox(dir.path(), Arc::clone(&keep));
        std::fs::write(dir.path().join("broken.edi"), b"UNB+UNOA:1+500001234").unwrap();
        std::fs::write(dir.path().join("empty.edi"), b"").unwrap();
        inbox.scan().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = inbox.scan().await.unwrap();
        assert_eq!(r.failed, 2);
        assert!(keep.got.lock().unwrap().is_empty());
        assert_eq!(
            std::fs::read(dir.path().join("failed/broken.edi")).unwrap(),
            b"UNB+UNOA:1+500001234",
            "kept whole"
        );
        let reason = std::fs::read_to_string(dir.path().join("failed/broken.edi.reason")).unwrap();
        assert!(reason.starts_with("not EDIFACT"), "{reason}");
        let reason = std::fs::read_to_string(dir.path().join("failed/empty.edi.reason")).unwrap();
        assert!(reason.contains("empty"), "{reason}");
    }

    #[tokio::test]
    async fn a_file_stays_while_the_log_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Arc::new(Keep::default());
        keep.unavailable
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut inbox = inbox(dir.path(), Arc::clone(&keep));
        std::fs::write(dir.path().join("lab.edi"), MEDLAB).unwrap();
        inbox.scan().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(inbox.scan().await.unwrap().taken, 0);
        assert!(
            dir.path().join("lab.edi").exists(),
            "not moved while not durable"
        );
        keep.unavailable
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(inbox.scan().await.unwrap().taken, 1);
        assert!(dir.path().join("done/lab.edi").exists());
    }

    #[tokio::test]
    async fn a_file_past_max_size_goes_to_failed_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Arc::new(Keep::default());
        let mut inbox = inbox(dir.path(), Arc::clone(&keep));
        inbox.config.max_size = bytesize::ByteSize::b(MEDLAB.len() as u64 - 1);
        std::fs::write(dir.path().join("big.edi"), MEDLAB).unwrap();
        inbox.scan().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(inbox.scan().await.unwrap().failed, 1);
        assert!(keep.got.lock().unwrap().is_empty());
        let reason = std::fs::read_to_string(dir.path().join("failed/big.edi.reason")).unwrap();
        assert!(reason.contains("max_size"), "{reason}");
        assert!(dir.path().join("failed/big.edi").exists());
    }

    #[tokio::test]
    async fn a_poison_file_is_set_aside_and_the_others_keep_flowing() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Arc::new(Keep::default());
        let mut inbox = inbox(dir.path(), Arc::clone(&keep));
        inbox.config.settle = Duration::ZERO;
        let poison = b"UNB+UNOA:1+500001234+500005678+261101:0815+POISON'UNH+M1+MEDLAB:1'UNT+2+M1'UNZ+1+POISON'";
        // The poison file sorts first, as a scan would often meet it.
        std::fs::write(dir.path().join("a-poison.edi"), poison).unwrap();
        let mut good = 0;
        for round in 0..8 {
            for i in 0..3 {
                std::fs::write(dir.path().join(format!("b-{round}-{i}.edi")), MEDLAB).unwrap();
                good += 1;
            }
            inbox.scan().await.unwrap();
            inbox.scan().await.unwrap();
        }
        assert_eq!(
            keep.got.lock().unwrap().len(),
            good,
            "every good file taken"
        );
        assert!(!dir.path().join("a-poison.edi").exists());
        let reason =
            std::fs::read_to_string(dir.path().join("failed/a-poison.edi.reason")).unwrap();
        assert!(
            reason.contains("set aside after 5 failed tries"),
            "{reason}"
        );
        assert!(
            reason.contains("record larger than the log takes"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn a_file_waits_for_room_in_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Arc::new(Keep::default());
        let budget = Budget::new(MEDLAB.len() + 10);
        let mut inbox = inbox(dir.path(), Arc::clone(&keep)).with_budget(budget.clone());
        inbox.config.settle = Duration::ZERO;
        let held = budget.reserve(20).unwrap();
        std::fs::write(dir.path().join("lab.edi"), MEDLAB).unwrap();
        let r = inbox.scan().await.unwrap();
        assert_eq!((r.taken, r.waiting), (0, 1));
        assert!(dir.path().join("lab.edi").exists(), "left in place");
        drop(held);
        assert_eq!(inbox.scan().await.unwrap().taken, 1);
        assert_eq!(budget.in_use(), 0, "given back once durable");
    }
}
