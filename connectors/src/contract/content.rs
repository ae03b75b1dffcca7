//! The content store: attachment bytes kept once by SHA-256, so events carry a hash and a
//! size instead of the document, and a sink fetches the bytes when it renders a delivery.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Content-addressed storage of document bytes.
pub trait ContentStore: Send + Sync {
    /// Store `bytes` (idempotent: the same bytes land under the same name); returns the hex
    /// SHA-256 they are kept under.
    ///
    /// # Errors
    /// When the store cannot write.
    fn put(&self, bytes: &[u8]) -> std::io::Result<String>;

    /// The bytes stored under `sha256`, if any.
    ///
    /// # Errors
    /// When the store cannot read.
    fn get(&self, sha256: &str) -> std::io::Result<Option<Vec<u8>>>;
}

/// Hex SHA-256 of `bytes`.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One file per document in a directory: `<dir>/<sha256>`, written to a temporary name,
/// synced and renamed, so a reader never sees half a document.
#[derive(Debug, Clone)]
pub struct FsContentStore {
    dir: PathBuf,
}

impl FsContentStore {
    /// A store in `dir` (created when missing).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(dir: &Path) -> std::io::Result<FsContentStore> {
        std::fs::create_dir_all(dir)?;
        Ok(FsContentStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn valid_name(sha256: &str) -> bool {
    sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl ContentStore for FsContentStore {
    fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let name = sha256_hex(bytes);
        let path = self.dir.join(&name);
        if path.metadata().is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(name);
        }
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(name)
    }

    fn get(&self, sha256: &str) -> std::io::Result<Option<Vec<u8>>> {
        if !valid_name(sha256) {
            return Ok(None);
        }
        match std::fs::read(self.dir.join(sha256)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A store in memory, for tests and `inspect`.
#[derive(Debug, Default)]
pub struct MemoryContentStore {
    items: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

impl ContentStore for MemoryContentStore {
    fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let name = sha256_hex(bytes);
        self.items
            .lock()
            .expect("content lock")
            .insert(name.clone(), bytes.to_vec());
        Ok(name)
    }

    fn get(&self, sha256: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self
            .items
            .lock()
            .expect("content lock")
            .get(sha256)
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_hash_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("ketenbus-content-{}", std::process::id()));
        let store = FsContentStore::open(&dir).unwrap();
        let h = store.put(b"%PDF-1.4 synthetic").unwrap();
        assert_eq!(h, sha256_hex(b"%PDF-1.4 synthetic"));
        assert_eq!(store.put(b"%PDF-1.4 synthetic").unwrap(), h, "idempotent");
        assert_eq!(
            store.get(&h).unwrap().as_deref(),
            Some(&b"%PDF-1.4 synthetic"[..])
        );
        assert_eq!(
            store.get("../../etc/passwd").unwrap(),
            None,
            "only hashes are names"
        );
        assert_eq!(store.get(&"0".repeat(64)).unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
