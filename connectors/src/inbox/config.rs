//! `[[inbox]]`: one watched directory, and which of its files are taken.

use std::path::PathBuf;
use std::time::Duration;

use ketenbus_schemas::Format;
use serde::Deserialize;

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
    /// Largest file taken; a larger one goes to `failed/` with its `.reason`.
    #[serde(default = "default_max_size")]
    pub max_size: bytesize::ByteSize,
    /// Tries before a file the log keeps refusing (while it takes others) goes to
    /// `failed/` with its `.reason`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

pub(super) fn default_patterns() -> Vec<String> {
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
pub(super) fn default_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(25)
}
pub(super) fn default_max_attempts() -> u32 {
    5
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
        if self.max_size.as_u64() == 0 {
            p.push(("max_size".into(), "must be more than 0".into()));
        }
        if self.max_attempts == 0 {
            p.push(("max_attempts".into(), "must be at least 1".into()));
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
