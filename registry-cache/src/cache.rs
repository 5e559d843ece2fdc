//! Content-addressed cache on disk.
//!
//! ```text
//! <root>/blobs/sha256/<hex>   every blob by its digest: modules, manifests, configs, signatures
//! <root>/index.json          reference -> what was pulled, when, how big
//! <root>/tmp/                files being written; emptied on open
//! ```
//!
//! A blob is written to `tmp/`, fsynced and renamed into place, and the index is replaced the
//! same way after its blobs are in place: a process killed at any point leaves either the old
//! state or the new one, never a half-written entry. Blobs are verified against their digest
//! on every read; one that does not match is deleted with the entries that use it.

use crate::artifact::{digest_hex, sha256_hex};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("blob {0} is corrupt and was removed")]
    Corrupt(String),
    #[error("{0}")]
    Digest(#[from] crate::artifact::ArtifactError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io { path: path.to_path_buf(), source }
}

/// One cached artifact, as the index records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The reference as pulled, normalised (`registry/repository:tag` or `@sha256:...`).
    pub reference: String,
    /// Digest of the manifest the upstream registry served.
    pub upstream_digest: String,
    /// sha256 digest of the Wasm module.
    pub module: String,
    pub size: u64,
    /// compat, oci or cncf.
    pub format: String,
    /// The manifest this cache serves for the module (re-published in one format).
    pub manifest: String,
    pub config: String,
    /// Unix seconds.
    pub pulled_at: u64,
    pub last_used: u64,
    /// Pulled with credentials: served only to clients that prove access.
    pub private: bool,
    /// Digest of the cosign signature manifest, once signed.
    #[serde(default)]
    pub signature: Option<String>,
    /// Other blobs this entry keeps alive (the signature's payload and config).
    #[serde(default)]
    pub extra_blobs: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    entries: BTreeMap<String, Entry>,
}

pub struct Cache {
    root: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    /// Opened to read what another process writes: corrupt blobs are reported, not deleted.
    read_only: bool,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn blobs_of(e: &Entry) -> impl Iterator<Item = String> + '_ {
    [e.module.clone(), e.manifest.clone(), e.config.clone()]
        .into_iter()
        .chain(e.signature.clone())
        .chain(e.extra_blobs.iter().cloned())
}

fn referenced(index: &Index) -> std::collections::HashSet<String> {
    index.entries.values().flat_map(blobs_of).collect()
}

fn fsync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Cache {
    /// Opens (or creates) a cache, dropping leftovers of interrupted writes and index entries
    /// whose blobs are missing or corrupt.
    pub fn open(root: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let index_path = root.join("index.json");
        let index: Index = match fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cache index unreadable; starting empty (artifacts are pulled again)");
                Index::default()
            }),
            Err(_) => Index::default(),
        };
        let cache = Self { root: root.to_path_buf(), max_bytes, index: Mutex::new(index), read_only: false };
        let entries: Vec<Entry> = cache.entries();
        let intact = |digest: &String| matches!(cache.get_blob(digest), Ok(Some(_)));
        for e in entries {
            if let Some(digest) = [&e.module, &e.manifest, &e.config].into_iter().find(|d| !intact(d)) {
                tracing::warn!(reference = %e.reference, %digest, "dropping cache entry with a missing or corrupt blob");
                cache.remove(&e.reference)?;
            } else if e.signature.iter().chain(&e.extra_blobs).any(|d| !intact(d)) {
                // The artifact is sound; only its signature is not. Unsigned, it is signed again.
                tracing::warn!(reference = %e.reference, "dropping a signature with a missing or corrupt blob");
                cache.set_signature(&e.reference, None, vec![])?;
            }
        }
        cache.sweep()?;
        Ok(cache)
    }

    /// Opens a cache another process may be writing (`serve`), to read it: no clean-up, no
    /// sweep, nothing written. Blobs are still verified as they are read.
    pub fn open_read_only(root: &Path) -> Result<Self, CacheError> {
        let index_path = root.join("index.json");
        let bytes = fs::read(&index_path).map_err(io(&index_path))?;
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| CacheError::Io { path: index_path, source: std::io::Error::other(e) })?;
        Ok(Self { root: root.to_path_buf(), max_bytes: u64::MAX, index: Mutex::new(index), read_only: true })
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    fn write_atomically(&self, dest: &Path, bytes: &[u8]) -> Result<(), CacheError> {
        // One temp file per write: two threads storing the same blob (every entry shares the
        // `{}` config) must not write into, or rename away, each other's file.
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("blob"),
            std::process::id(),
            SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let written = File::create(&tmp).map_err(io(&tmp)).and_then(|mut f| {
            f.write_all(bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))
        });
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, dest).map_err(io(dest))) {
            // A full disk must not stay full of our leftovers until the next restart.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(dir) = dest.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    /// Stores a blob under its sha256 and returns the digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, CacheError> {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        let path = self.blob_path(&digest)?;
        if !matches!(self.get_blob(&digest), Ok(Some(_))) {
            self.write_atomically(&path, bytes)?;
        }
        Ok(digest)
    }

    /// Reads and verifies a blob. A blob that does not match its digest is deleted.
    pub fn get_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.blob_path(digest)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Io { path, source: e }),
        };
        if format!("sha256:{}", sha256_hex(&bytes)) != digest {
            if !self.read_only {
                let _ = fs::remove_file(&path);
            }
            return Err(CacheError::Corrupt(digest.to_string()));
        }
        Ok(Some(bytes))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.exists()).unwrap_or(false)
    }

    fn persist(&self, index: &Index) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec_pretty(index).unwrap_or_default();
        self.write_atomically(&self.root.join("index.json"), &bytes)
    }

    /// Records an entry whose blobs are already stored, then evicts least recently used
    /// entries beyond the size bound.
    pub fn record(&self, entry: Entry) -> Result<Vec<String>, CacheError> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.version = 1;
        index.entries.insert(entry.reference.clone(), entry);
        let evicted = self.evict(&mut index)?;
        self.persist(&index)?;
        Ok(evicted)
    }

    fn evict(&self, index: &mut Index) -> Result<Vec<String>, CacheError> {
        let mut evicted = vec![];
        loop {
            // Modules shared by several references count once.
            let mut modules: BTreeMap<&str, u64> = BTreeMap::new();
            for e in index.entries.values() {
                modules.insert(&e.module, e.size);
            }
            let total: u64 = modules.values().sum();
            if total <= self.max_bytes || index.entries.len() <= 1 {
                break;
            }
            let Some(oldest) = index.entries.values().min_by_key(|e| e.last_used).map(|e| e.reference.clone()) else {
                break;
            };
            if let Some(gone) = index.entries.remove(&oldest) {
                // Only the evicted entry's own blobs: others may be mid-publish, not yet recorded.
                let used = referenced(index);
                for digest in blobs_of(&gone) {
                    if let (false, Ok(path)) = (used.contains(&digest), self.blob_path(&digest)) {
                        let _ = fs::remove_file(path);
                    }
                }
            }
            evicted.push(oldest);
        }
        Ok(evicted)
    }

    /// Deletes blobs no entry refers to: leftovers of interrupted pulls. Only safe while
    /// nothing else writes, i.e. when the cache is opened.
    fn sweep(&self) -> Result<(), CacheError> {
        let used = referenced(&self.index.lock().unwrap_or_else(|e| e.into_inner()));
        let dir = self.root.join("blobs/sha256");
        for f in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let digest = format!("sha256:{}", f.file_name().to_string_lossy());
            if !used.contains(&digest) {
                let _ = fs::remove_file(f.path());
            }
        }
        Ok(())
    }

    pub fn remove(&self, reference: &str) -> Result<(), CacheError> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if index.entries.remove(reference).is_some() {
            self.persist(&index)?;
        }
        Ok(())
    }

    pub fn lookup(&self, reference: &str) -> Option<Entry> {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).entries.get(reference).cloned()
    }

    /// Entries whose module has this digest.
    pub fn by_module(&self, module: &str) -> Vec<Entry> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.entries.values().filter(|e| e.module == module).cloned().collect()
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.index.lock().unwrap_or_else(|e| e.into_inner()).entries.values().cloned().collect()
    }

    /// Marks an entry used now, for LRU eviction. Persisted with the next write.
    pub fn touch(&self, reference: &str) {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = index.entries.get_mut(reference) {
            e.last_used = now_secs();
        }
    }

    /// Records (or clears) an entry's signature manifest and the other blobs it keeps alive,
    /// all already stored. `None` if the entry is gone.
    pub fn set_signature(
        &self,
        reference: &str,
        signature: Option<String>,
        extra_blobs: Vec<String>,
    ) -> Result<Option<Entry>, CacheError> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = index.entries.get_mut(reference) else { return Ok(None) };
        e.signature = signature;
        e.extra_blobs = extra_blobs;
        let entry = e.clone();
        self.persist(&index)?;
        Ok(Some(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(reference: &str, module: &str, size: u64, last_used: u64, c: &Cache) -> Entry {
        let manifest = c.put_blob(format!("manifest of {reference}").as_bytes()).unwrap();
        let config = c.put_blob(b"{}").unwrap();
        Entry {
            reference: reference.into(),
            upstream_digest: manifest.clone(),
            module: module.into(),
            size,
            format: "oci".into(),
            manifest,
            config,
            pulled_at: 1,
            last_used,
            private: false,
            signature: None,
            extra_blobs: vec![],
        }
    }

    #[test]
    fn blobs_are_content_addressed_and_verified_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let d = c.put_blob(b"module bytes").unwrap();
        assert_eq!(d, format!("sha256:{}", sha256_hex(b"module bytes")));
        assert_eq!(c.get_blob(&d).unwrap().as_deref(), Some(&b"module bytes"[..]));
        // Corrupt it on disk: the read refuses it and removes it.
        fs::write(c.blob_path(&d).unwrap(), b"tampered").unwrap();
        assert!(matches!(c.get_blob(&d), Err(CacheError::Corrupt(_))));
        assert_eq!(c.get_blob(&d).unwrap(), None);
        assert!(c.get_blob("sha256:../../etc/passwd").is_err());
    }

    #[test]
    fn index_survives_a_restart_and_drops_corrupt_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad);
        {
            let c = Cache::open(dir.path(), 1 << 30).unwrap();
            good = c.put_blob(b"good module").unwrap();
            bad = c.put_blob(b"bad module").unwrap();
            c.record(entry("r/good:1", &good, 11, 1, &c)).unwrap();
            c.record(entry("r/bad:1", &bad, 10, 1, &c)).unwrap();
            fs::write(c.blob_path(&bad).unwrap(), b"flipped bits").unwrap();
            // A write interrupted by a crash leaves a temp file behind.
            fs::write(dir.path().join("tmp/half-written"), b"partial").unwrap();
        }
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        assert!(c.lookup("r/good:1").is_some());
        assert!(c.lookup("r/bad:1").is_none(), "a corrupt module must not be served after restart");
        assert!(!dir.path().join("tmp/half-written").exists());
    }

    #[test]
    fn a_signature_with_a_lost_blob_is_dropped_and_the_artifact_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sig_payload;
        {
            let c = Cache::open(dir.path(), 1 << 30).unwrap();
            let m = c.put_blob(b"signed module").unwrap();
            c.record(entry("r/signed:1", &m, 13, 1, &c)).unwrap();
            let sig = c.put_blob(b"signature manifest").unwrap();
            sig_payload = c.put_blob(b"signature payload").unwrap();
            c.set_signature("r/signed:1", Some(sig), vec![sig_payload.clone()]).unwrap();
        }
        fs::remove_file(dir.path().join("blobs/sha256").join(digest_hex(&sig_payload).unwrap())).unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let e = c.lookup("r/signed:1").expect("the artifact itself is intact");
        assert_eq!((e.signature, e.extra_blobs), (None, vec![]));
    }

    #[test]
    fn least_recently_used_entries_are_evicted_beyond_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 25).unwrap();
        let m1 = c.put_blob(b"one").unwrap();
        let m2 = c.put_blob(b"two").unwrap();
        let m3 = c.put_blob(b"three").unwrap();
        c.record(entry("a:1", &m1, 10, 1, &c)).unwrap();
        c.record(entry("b:1", &m2, 10, 3, &c)).unwrap();
        let evicted = c.record(entry("c:1", &m3, 10, 2, &c)).unwrap();
        assert_eq!(evicted, vec!["a:1".to_string()]);
        assert!(!c.has_blob(&m1), "the evicted module's blob is gone");
        assert!(c.has_blob(&m2) && c.has_blob(&m3));
    }
}
