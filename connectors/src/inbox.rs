//! Inbox folder: a directory partners (or a file transfer) drop messages into. A file is taken
//! once it has stopped growing, handed to ingest, and moved to `done/` only after its envelope
//! is durable; a file that cannot be read or does not parse goes to `failed/` with a
//! `<name>.reason` file saying why and where. A crash between ingest and the move leaves the
//! file in place, so it is ingested again after a restart (a duplicate, never a loss).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ketenbus_schemas::{Format, RawEnvelope};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ingest, IngestError};

/// `[[inbox]]`: one watched directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxConfig {
    /// The directory to watch; `done/` and `failed/` are made inside it.
    pub path: PathBuf,
    /// File name patterns to take (`*` and `?` wildcards, case-insensitive).
    #[serde(default = "default_patterns")]
    pub patterns: Vec<String>,
    /// Format of the files.
    #[serde(default = "default_format")]
    pub format: Format,
    /// How often the directory is scanned.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A file is taken only when its size and modification time stayed the same this long
    /// (a half-written file is still growing).
    #[serde(default = "default_settle", with = "humantime_serde")]
    pub settle: Duration,
}

fn default_patterns() -> Vec<String> {
    vec!["*.edi".into(), "*.edifact".into(), "*.txt".into()]
}
fn default_format() -> Format {
    Format::Edifact
}
fn default_poll() -> Duration {
    Duration::from_secs(2)
}
fn default_settle() -> Duration {
    Duration::from_secs(1)
}

impl InboxConfig {
    /// Problems as (key, message).
    #[must_use]
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !self.path.is_dir() {
            p.push((
                "path".into(),
                format!("{} is not a directory", self.path.display()),
            ));
        }
        if self.patterns.is_empty() {
            p.push(("patterns".into(), "name at least one pattern".into()));
        }
        if self.poll_interval.is_zero() {
            p.push(("poll_interval".into(), "must be more than 0".into()));
        }
        p
    }
}

/// `*` and `?` wildcard match, ASCII case-insensitive.
#[must_use]
pub fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// What a scan saw of a file last time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u64,
    modified: SystemTime,
    since: std::time::Instant,
}

/// Why a file went to `failed/`.
fn unreadable(format: Format, bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return Some("the file is empty".into());
    }
    match format {
        Format::Edifact => crate::edifact::parse(bytes)
            .err()
            .map(|e| format!("not EDIFACT: {e}")),
        _ => None,
    }
}

/// A watched inbox directory.
pub struct Inbox {
    config: InboxConfig,
    ingest: Arc<dyn Ingest>,
    seen: HashMap<PathBuf, Seen>,
}

/// What one scan did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    /// Files ingested and moved to `done/`.
    pub taken: usize,
    /// Files moved to `failed/`.
    pub failed: usize,
    /// Files still settling.
    pub waiting: usize,
}

impl Inbox {
    /// An inbox on `config.path` handing files to `ingest`.
    ///
    /// # Errors
    /// When `done/` or `failed/` cannot be made.
    pub fn new(config: InboxConfig, ingest: Arc<dyn Ingest>) -> std::io::Result<Inbox> {
        std::fs::create_dir_all(config.path.join("done"))?;
        std::fs::create_dir_all(config.path.join("failed"))?;
        Ok(Inbox {
            config,
            ingest,
            seen: HashMap::new(),
        })
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
            match self.take(&path, &name).await {
                Ok(true) => report.taken += 1,
                Ok(false) => report.failed += 1,
                Err(IngestError::Unavailable(e)) => {
                    tracing::warn!(file = %name, error = %e, "log unavailable; the file stays for the next scan");
                    break;
                }
                Err(e) => return Err(std::io::Error::other(e)),
            }
            self.seen.remove(&path);
        }
        self.seen.retain(|p, _| present.contains(p));
        Ok(report)
    }

    /// Ingest one settled file: `Ok(true)` taken, `Ok(false)` moved to `failed/`.
    async fn take(&self, path: &Path, name: &str) -> Result<bool, IngestError> {
        let bytes = match tokio::fs::read(path).await {
            Ok(b) => b,
            Err(e) => {
                self.fail(path, name, &format!("cannot read the file: {e}"))
                    .await;
                return Ok(false);
            }
        };
        if let Some(reason) = unreadable(self.config.format, &bytes) {
            self.fail(path, name, &reason).await;
            return Ok(false);
        }
        let received_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
        // The file names its own parties (UNB, MessageHeader); no one else vouches for them.
        let declared = crate::party::declared(self.config.format, &bytes);
        let envelope = RawEnvelope {
            id: uuid::Uuid::now_v7().to_string(),
            received_at_ms,
            connector: "inbox".into(),
            format: self.config.format,
            content_type: content_type(self.config.format).into(),
            sender: declared.sender().map(str::to_owned),
            receiver: declared.receiver().map(str::to_owned),
            body: bytes,
            attributes: BTreeMap::from([("file".to_owned(), name.to_owned())]),
        };
        let accepted = self.ingest.accept(envelope).await?;
        let target = free_name(&self.config.path.join("done"), name, &accepted.id);
        if let Err(e) = tokio::fs::rename(path, &target).await {
            // Durable already: a failed move only means the file may be taken again.
            tracing::error!(file = %name, error = %e, "ingested but not moved to done/; it will be ingested again");
        }
        Ok(true)
    }

    async fn fail(&self, path: &Path, name: &str, reason: &str) {
        tracing::warn!(file = %name, reason = %reason, "inbox file moved to failed/");
        let failed = self.config.path.join("failed");
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
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

    use super::*;
    use crate::ingest::Accepted;
    use crate::sink::BoxFuture;

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
}
