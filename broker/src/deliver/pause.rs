//! Paused subscriptions: an operator pauses a subscription (console, `POST
//! /console/api/subscriptions/{name}/pause`) and it stops delivering, keeping its place in
//! the log; resumed, it goes on from there. The set of paused subscriptions is a small JSON
//! file in the data directory (`paused.json`), written whole (temporary file, fsync, rename)
//! before the change takes effect, so a pause survives a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The file, in the data directory.
pub const FILE: &str = "paused.json";

/// Why the paused set could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The file could not be read or written.
    #[error("paused subscriptions ({path}): {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not a JSON list of names.
    #[error("paused subscriptions ({path}): not a JSON list of names: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: serde_json::Error,
    },
}

/// Which subscriptions are paused; each subscription's loop and lanes watch their switch.
#[derive(Debug, Clone)]
pub struct Pauses {
    path: PathBuf,
    inner: Arc<Mutex<BTreeMap<String, watch::Sender<bool>>>>,
}

impl Pauses {
    /// Read `paused.json` in `data_dir` (none: nothing paused).
    ///
    /// # Errors
    /// When the file exists but cannot be read or is not a list of names.
    pub fn open(data_dir: &Path) -> Result<Pauses, PauseError> {
        let path = data_dir.join(FILE);
        let names: BTreeSet<String> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| PauseError::Format {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => return Err(PauseError::Io { path, source }),
        };
        let map = names
            .into_iter()
            .map(|n| (n, watch::Sender::new(true)))
            .collect();
        Ok(Pauses {
            path,
            inner: Arc::new(Mutex::new(map)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, watch::Sender<bool>>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The switch of `subscription`: `true` while paused.
    #[must_use]
    pub fn watch(&self, subscription: &str) -> watch::Receiver<bool> {
        self.lock()
            .entry(subscription.to_owned())
            .or_insert_with(|| watch::Sender::new(false))
            .subscribe()
    }

    /// Whether `subscription` is paused now.
    #[must_use]
    pub fn is_paused(&self, subscription: &str) -> bool {
        self.lock().get(subscription).is_some_and(|s| *s.borrow())
    }

    /// The subscriptions paused now, by name.
    #[must_use]
    pub fn paused(&self) -> Vec<String> {
        paused_in(&self.lock()).into_iter().collect()
    }

    /// Pause (`true`) or resume `subscription`: on disk first, then in effect.
    ///
    /// # Errors
    /// When the file cannot be written; then nothing changed.
    pub fn set(&self, subscription: &str, paused: bool) -> Result<(), PauseError> {
        let mut map = self.lock();
        let mut names = paused_in(&map);
        if paused {
            names.insert(subscription.to_owned());
        } else {
            names.remove(subscription);
        }
        let io = |source| PauseError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec(&names).expect("names serialise");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        map.entry(subscription.to_owned())
            .or_insert_with(|| watch::Sender::new(false))
            .send_replace(paused);
        Ok(())
    }
}

/// The names whose switch says paused.
fn paused_in(map: &BTreeMap<String, watch::Sender<bool>>) -> BTreeSet<String> {
    map.iter()
        .filter(|(_, s)| *s.borrow())
        .map(|(n, _)| n.clone())
        .collect()
}

/// Wait while `switch` says paused; `false` when cancelled (or the switch is gone).
pub async fn wait_resumed(
    switch: &mut watch::Receiver<bool>,
    cancel: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        r = switch.wait_for(|paused| !paused) => r.is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_survives_reopening_and_a_resume_too() {
        let dir = tempfile::tempdir().unwrap();
        let p = Pauses::open(dir.path()).unwrap();
        let w = p.watch("gp");
        assert!(!*w.borrow());
        p.set("gp", true).unwrap();
        assert!(*w.borrow(), "the running subscription sees the pause");
        assert!(Pauses::open(dir.path()).unwrap().is_paused("gp"));
        assert!(!Pauses::open(dir.path()).unwrap().is_paused("lab"));
        p.set("gp", false).unwrap();
        assert!(!*w.borrow());
        assert!(!Pauses::open(dir.path()).unwrap().is_paused("gp"));
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert!(matches!(
            Pauses::open(dir.path()),
            Err(PauseError::Format { .. })
        ));
    }
}
