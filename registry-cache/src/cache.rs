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
//!
//! A publish stores its blobs before it records the entry that uses them. Meanwhile another
//! thread's `record` may evict an entry that used the same blob (the `{}` config, a module
//! shared by two tags) and delete it. Blobs are therefore stored through a [`Staging`], which
//! pins them until its entry is recorded: eviction never deletes a pinned blob. `record` also
//! refuses an entry one of whose blobs is missing, so the index never names a blob that is not
//! on disk.
//!
//! Eviction is least recently used, among entries no active policy names: `serve`'s policy
//! sources tell the cache which references are in use ([`Cache::set_in_use`]), and those are
//! never evicted while named. When the modules in use alone would exceed the bound, the new
//! entry is refused ([`CacheError::Full`]) rather than an entry in use evicted.
//!
//! A blob that no longer matches its digest when read is never served: the entries using it
//! are dropped, and the listener set with [`Cache::on_corrupt`] is told their references, so
//! that `serve` pulls them again.

use crate::artifact::{digest_hex, sha256_hex};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("blob {0} is corrupt and was removed")]
    Corrupt(String),
    #[error("{0}")]
    Digest(#[from] crate::artifact::ArtifactError),
    #[error("cannot record {reference}: its blob {digest} is not in the cache (removed while it was being published); publish it again")]
    Missing { reference: String, digest: String },
    #[error(
        "cannot cache {reference}: with it the cache would hold {needed} bytes of modules, over its limit of \
         {max} (--max-cache-bytes), and every other module is in use (named by an active policy, or not \
         known yet while a policy source has not synced); remove policies or raise the limit"
    )]
    Full { reference: String, needed: u64, max: u64 },
}

/// Which entries active policies name, and so must not be evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InUse {
    /// These references (as [`Entry::reference`] has them).
    Only(HashSet<String>),
    /// Not known yet (a policy source has not delivered its initial sync): every entry.
    All,
}

impl Default for InUse {
    fn default() -> Self {
        Self::Only(HashSet::new())
    }
}

impl InUse {
    fn contains(&self, reference: &str) -> bool {
        match self {
            Self::Only(set) => set.contains(reference),
            Self::All => true,
        }
    }
}

/// Told the references dropped because a blob of theirs was found corrupt.
type CorruptListener = Box<dyn Fn(Vec<String>) + Send + Sync>;

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
    /// Fingerprints of the keys whose upstream cosign signature verified when it was pulled
    /// (`--require-signature`); empty when none was required.
    #[serde(default)]
    pub verified_by: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    entries: BTreeMap<String, Entry>,
}

/// What the lock guards: the index and the blobs pinned by publishes not yet recorded.
#[derive(Default)]
struct State {
    index: Index,
    /// digest -> number of [`Staging`]s holding it. Eviction treats these as referenced.
    pinned: HashMap<String, usize>,
    in_use: InUse,
}

pub struct Cache {
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Opened to read what another process writes: corrupt blobs are reported, not deleted.
    read_only: bool,
    corrupt_listener: std::sync::OnceLock<CorruptListener>,
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

/// Blobs that must stay: those of recorded entries and those pinned by in-flight publishes.
fn referenced(state: &State) -> HashSet<String> {
    state.index.entries.values().flat_map(blobs_of).chain(state.pinned.keys().cloned()).collect()
}

/// Stores blobs for one entry and keeps them from being deleted until the entry is recorded
/// (or the staging is dropped). See the module documentation.
pub struct Staging<'a> {
    cache: &'a Cache,
    pinned: Mutex<Vec<String>>,
}

impl Staging<'_> {
    /// Pins the blob, then stores it (or finds it already stored) and returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, CacheError> {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        // Pin first: once pinned, no eviction deletes the blob, so "it exists, skip the write"
        // below stays true until the entry is recorded.
        *self.cache.state().pinned.entry(digest.clone()).or_default() += 1;
        self.pinned.lock().unwrap_or_else(|e| e.into_inner()).push(digest.clone());
        self.cache.store_blob(&digest, bytes)?;
        Ok(digest)
    }

    /// Records `entry` (see [`Cache::record`]) and releases the pins in the same critical
    /// section. Returns the entry as recorded (merged with the one it replaces) and the
    /// references evicted.
    pub fn record(self, entry: Entry) -> Result<(Entry, Vec<String>), CacheError> {
        let pinned = std::mem::take(&mut *self.pinned.lock().unwrap_or_else(|e| e.into_inner()));
        let mut state = self.cache.state();
        unpin(&mut state, &pinned);
        self.cache.record_locked(&mut state, entry)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        let pinned = std::mem::take(&mut *self.pinned.lock().unwrap_or_else(|e| e.into_inner()));
        if !pinned.is_empty() {
            // Not recorded: the blobs are left for the next sweep (another entry may use them).
            unpin(&mut self.cache.state(), &pinned);
        }
    }
}

fn unpin(state: &mut State, digests: &[String]) {
    for d in digests {
        if let Some(n) = state.pinned.get_mut(d) {
            *n -= 1;
            if *n == 0 {
                state.pinned.remove(d);
            }
        }
    }
}

/// Where blobs can be stored: the cache itself, or a [`Staging`] that pins them until its
/// entry is recorded.
pub trait BlobStore {
    fn put_blob(&self, bytes: &[u8]) -> Result<String, CacheError>;
}

impl BlobStore for Cache {
    fn put_blob(&self, bytes: &[u8]) -> Result<String, CacheError> {
        Cache::put_blob(self, bytes)
    }
}

impl BlobStore for Staging<'_> {
    fn put_blob(&self, bytes: &[u8]) -> Result<String, CacheError> {
        Staging::put_blob(self, bytes)
    }
}

/// How much of a blob is read, hashed and handed on at a time.
pub const BLOB_CHUNK_BYTES: usize = 64 << 10;

/// A blob being read in chunks, hashed as it goes. The chunk that ends the blob is returned
/// only once the whole blob has matched its digest: whoever streams a blob through this hands
/// on all of it only if it is sound, and learns of a mismatch before its last bytes go out.
pub struct BlobReader {
    file: File,
    path: PathBuf,
    digest: String,
    hasher: Sha256,
    len: u64,
    remaining: u64,
    /// The last chunk was returned.
    done: bool,
}

impl BlobReader {
    /// The blob's length, as stored when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The next at most `max` bytes; `None` once all were returned. [`CacheError::Corrupt`]
    /// when the blob does not match its digest (or is shorter than it was when opened), in
    /// place of its last chunk. Blocking file I/O.
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, CacheError> {
        if self.done {
            return Ok(None);
        }
        let want = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(max.max(1));
        let mut chunk = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            let read = self.file.read(chunk.get_mut(filled..).unwrap_or_default()).map_err(io(&self.path))?;
            if read == 0 {
                // Truncated in place: the file is no longer what was stored.
                return Err(CacheError::Corrupt(self.digest.clone()));
            }
            filled += read;
        }
        self.hasher.update(&chunk);
        self.remaining -= want as u64;
        if self.remaining == 0 {
            // An empty blob is one empty chunk: it too is verified before it ends.
            self.done = true;
            let actual = format!("sha256:{}", hex::encode(std::mem::take(&mut self.hasher).finalize()));
            if actual != self.digest {
                return Err(CacheError::Corrupt(self.digest.clone()));
            }
        }
        Ok(Some(chunk))
    }
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
        let cache = Self {
            root: root.to_path_buf(),
            max_bytes,
            state: Mutex::new(State { index, ..State::default() }),
            read_only: false,
            corrupt_listener: std::sync::OnceLock::new(),
        };
        let entries: Vec<Entry> = cache.entries();
        let intact = |digest: &String| matches!(cache.check_file(digest), Ok(Some(_)));
        for e in entries {
            if let Some(digest) = [&e.module, &e.manifest, &e.config].into_iter().find(|d| !intact(d)) {
                tracing::warn!(reference = %e.reference, %digest, "dropping cache entry with a missing or corrupt blob");
                cache.remove(&e.reference)?;
            } else if e.signature.iter().chain(&e.extra_blobs).any(|d| !intact(d)) {
                // The artifact is sound; only its signature is not. Unsigned, it is signed again.
                tracing::warn!(reference = %e.reference, "dropping a signature with a missing or corrupt blob");
                cache.set_signature(&e.reference, &e.manifest, None, vec![])?;
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
        Ok(Self {
            root: root.to_path_buf(),
            max_bytes: u64::MAX,
            state: Mutex::new(State { index, ..State::default() }),
            read_only: true,
            corrupt_listener: std::sync::OnceLock::new(),
        })
    }

    /// Sets which references are in use: never evicted while in use. Until it is called,
    /// none is (plain LRU, as for `registry-cache pull`).
    pub fn set_in_use(&self, in_use: InUse) {
        self.state().in_use = in_use;
    }

    /// Calls `listener`, outside any lock, with the references dropped whenever a blob is
    /// found corrupt as it is read. Only the first listener set is kept.
    pub fn on_corrupt(&self, listener: impl Fn(Vec<String>) + Send + Sync + 'static) {
        let _ = self.corrupt_listener.set(Box::new(listener));
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts storing the blobs of one entry; see [`Staging`].
    pub fn stage(&self) -> Staging<'_> {
        Staging { cache: self, pinned: Mutex::new(vec![]) }
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

    /// Stores a blob under its sha256 and returns the digest. Nothing keeps it from being
    /// evicted before an entry using it is recorded: to publish, use [`Cache::stage`].
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, CacheError> {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        self.store_blob(&digest, bytes)?;
        Ok(digest)
    }

    fn store_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.blob_path(digest)?;
        // A corrupt copy is replaced here by the right bytes, which makes its users whole again.
        if !matches!(self.check_file(digest), Ok(Some(_))) {
            self.write_atomically(&path, bytes)?;
        }
        Ok(())
    }

    /// Reads and verifies a blob. A blob that does not match its digest is deleted, and so are
    /// the entries that use it (the [`Cache::on_corrupt`] listener is told which); a read-only
    /// cache only reports it. Holds the whole blob: to serve one, use [`Cache::open_blob`].
    pub fn get_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let read = self.read_verified(digest);
        if matches!(read, Err(CacheError::Corrupt(_))) {
            self.corrupt_found(digest);
        }
        read
    }

    /// Opens a blob to be streamed: [`BlobReader`] verifies it as it is read. `None` if absent.
    pub fn open_blob(&self, digest: &str) -> Result<Option<BlobReader>, CacheError> {
        let path = self.blob_path(digest)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Io { path, source: e }),
        };
        // The length of the file opened: a blob is replaced by renaming, never rewritten, so
        // this descriptor's bytes stay what they are whatever is stored meanwhile.
        let len = file.metadata().map_err(io(&path))?.len();
        Ok(Some(BlobReader {
            file,
            path,
            digest: digest.to_string(),
            hasher: Sha256::new(),
            len,
            remaining: len,
            done: false,
        }))
    }

    /// Told by a [`BlobReader`] that the blob it read did not match: checks the file stored now
    /// and, if it does not match either (it was not mended meanwhile), deletes it and drops the
    /// entries using it, as [`Cache::get_blob`] does.
    pub fn report_corrupt(&self, digest: &str) {
        if matches!(self.check_file(digest), Err(CacheError::Corrupt(_))) {
            self.corrupt_found(digest);
        }
    }

    /// After a blob was found corrupt (and deleted): drops the entries using it and tells the
    /// listener. A read-only cache changes nothing.
    fn corrupt_found(&self, digest: &str) {
        if self.read_only {
            return;
        }
        let dropped = self.drop_users_of(digest);
        if !dropped.is_empty() {
            tracing::error!(%digest, references = ?dropped, "corrupt blob on disk; dropped the entries using it");
            if let Some(listener) = self.corrupt_listener.get() {
                listener(dropped);
            }
        }
    }

    /// Removes the entries one of whose blobs is `digest`; returns their references. Their
    /// other blobs stay on disk for a re-pull to find (or the next open to sweep).
    fn drop_users_of(&self, digest: &str) -> Vec<String> {
        let mut state = self.state();
        let dropped: Vec<String> = state
            .index
            .entries
            .values()
            .filter(|e| blobs_of(e).any(|d| d == digest))
            .map(|e| e.reference.clone())
            .collect();
        for reference in &dropped {
            state.index.entries.remove(reference);
        }
        if !dropped.is_empty() {
            if let Err(e) = self.persist(&state.index) {
                // The next open drops them again: their blob is gone.
                tracing::warn!(error = %e, "could not persist the index after dropping corrupt entries");
            }
        }
        dropped
    }

    /// Reads and verifies a blob, deleting it (unless read-only) if it does not match.
    fn read_verified(&self, digest: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.blob_path(digest)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Io { path, source: e }),
        };
        if format!("sha256:{}", sha256_hex(&bytes)) != digest {
            self.delete_corrupt(&path);
            return Err(CacheError::Corrupt(digest.to_string()));
        }
        Ok(Some(bytes))
    }

    /// As [`Cache::read_verified`], hashing the file as it streams by instead of holding it.
    fn check_file(&self, digest: &str) -> Result<Option<()>, CacheError> {
        let Some(mut reader) = self.open_blob(digest)? else { return Ok(None) };
        loop {
            match reader.next_chunk(BLOB_CHUNK_BYTES) {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(Some(())),
                Err(e @ CacheError::Corrupt(_)) => {
                    self.delete_corrupt(&reader.path);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn delete_corrupt(&self, path: &Path) {
        if !self.read_only {
            let _ = fs::remove_file(path);
        }
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.exists()).unwrap_or(false)
    }

    fn persist(&self, index: &Index) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec_pretty(index).unwrap_or_default();
        self.write_atomically(&self.root.join("index.json"), &bytes)
    }

    /// Records an entry whose blobs are already stored, then evicts least recently used
    /// entries not in use beyond the size bound; returns the references evicted. Fails with
    /// [`CacheError::Missing`], recording nothing, if one of the entry's blobs is not on disk,
    /// and with [`CacheError::Full`], recording and evicting nothing (and deleting the entry's
    /// blobs nothing else uses), if it does not fit beside the entries in use.
    ///
    /// An entry replacing one for the same reference inherits its signature if the manifest is
    /// the same and the new entry is unsigned. Visibility is the new entry's own: a repository
    /// public yesterday may be private today, with new content under the same tag, and the
    /// latest pull is what says so. The replaced entry's blobs that nothing else uses are
    /// deleted.
    ///
    /// Blobs stored with [`Cache::put_blob`] may be evicted before this runs; publish through
    /// [`Cache::stage`] and [`Staging::record`] instead.
    pub fn record(&self, entry: Entry) -> Result<Vec<String>, CacheError> {
        self.record_locked(&mut self.state(), entry).map(|(_, evicted)| evicted)
    }

    fn record_locked(&self, state: &mut State, mut entry: Entry) -> Result<(Entry, Vec<String>), CacheError> {
        let old = state.index.entries.get(&entry.reference);
        if let Some(old) = old {
            if old.manifest == entry.manifest && entry.signature.is_none() {
                // A re-pull without a signing key must not lose the signature of these bytes.
                entry.signature.clone_from(&old.signature);
                entry.extra_blobs.clone_from(&old.extra_blobs);
            }
        }
        let missing = blobs_of(&entry).find(|d| !self.has_blob(d));
        if let Some(digest) = missing {
            return Err(CacheError::Missing { reference: entry.reference, digest });
        }
        let mut garbage: Vec<String> = vec![];
        // Planned on a copy: a refused entry leaves the index as it was.
        let mut entries = state.index.entries.clone();
        if let Some(replaced) = entries.insert(entry.reference.clone(), entry.clone()) {
            garbage.extend(blobs_of(&replaced));
        }
        let evicted = match self.evict(&mut entries, &entry, &state.in_use, &mut garbage) {
            Ok(evicted) => evicted,
            Err(full) => {
                let used = referenced(state);
                for digest in blobs_of(&entry).filter(|d| !used.contains(d)) {
                    if let Ok(path) = self.blob_path(&digest) {
                        let _ = fs::remove_file(path);
                    }
                }
                return Err(full);
            }
        };
        state.index.version = 1;
        state.index.entries = entries;
        self.persist(&state.index)?;
        // Deleted after the index no longer names them (a crash in between leaves blobs the
        // next open sweeps), and under the lock, so a blob a staging pins stays.
        let used = referenced(state);
        for digest in garbage.iter().filter(|d| !used.contains(*d)) {
            if let Ok(path) = self.blob_path(digest) {
                let _ = fs::remove_file(path);
            }
        }
        Ok((entry, evicted))
    }

    /// Removes least recently used entries, never `new` (the entry being recorded) nor one in
    /// use, until the modules fit in `max_bytes`; adds their blobs to `garbage`. Fails when
    /// they cannot fit.
    fn evict(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        new: &Entry,
        in_use: &InUse,
        garbage: &mut Vec<String>,
    ) -> Result<Vec<String>, CacheError> {
        let mut evicted = vec![];
        loop {
            // Modules shared by several references count once.
            let mut modules: BTreeMap<&str, u64> = BTreeMap::new();
            for e in entries.values() {
                modules.insert(&e.module, e.size);
            }
            let total: u64 = modules.values().sum();
            if total <= self.max_bytes {
                return Ok(evicted);
            }
            let Some(oldest) = entries
                .values()
                .filter(|e| e.reference != new.reference && !in_use.contains(&e.reference))
                .min_by_key(|e| e.last_used)
                .map(|e| e.reference.clone())
            else {
                return Err(CacheError::Full { reference: new.reference.clone(), needed: total, max: self.max_bytes });
            };
            if let Some(gone) = entries.remove(&oldest) {
                garbage.extend(blobs_of(&gone));
            }
            evicted.push(oldest);
        }
    }

    /// Deletes blobs no entry refers to: leftovers of interrupted pulls. Only safe while
    /// nothing else writes, i.e. when the cache is opened.
    fn sweep(&self) -> Result<(), CacheError> {
        let used = referenced(&self.state());
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
        let mut state = self.state();
        if state.index.entries.remove(reference).is_some() {
            self.persist(&state.index)?;
        }
        Ok(())
    }

    pub fn lookup(&self, reference: &str) -> Option<Entry> {
        self.state().index.entries.get(reference).cloned()
    }

    /// Whether `reference` is recorded and its module, manifest and config are on disk (not
    /// read or verified: [`Cache::get_blob`] does that when they are served). What
    /// "already cached, no need to pull" should mean.
    pub fn has_entry_intact(&self, reference: &str) -> bool {
        self.lookup(reference).is_some_and(|e| [&e.module, &e.manifest, &e.config].iter().all(|d| self.has_blob(d)))
    }

    /// Entries whose module has this digest.
    pub fn by_module(&self, module: &str) -> Vec<Entry> {
        let state = self.state();
        state.index.entries.values().filter(|e| e.module == module).cloned().collect()
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.state().index.entries.values().cloned().collect()
    }

    /// Marks an entry used now, for LRU eviction. Persisted with the next write.
    pub fn touch(&self, reference: &str) {
        let mut state = self.state();
        if let Some(e) = state.index.entries.get_mut(reference) {
            e.last_used = now_secs();
        }
    }

    /// Records (or clears) the signature of an entry whose manifest is `manifest`, and the other
    /// blobs it keeps alive, all already stored. `None` if the entry is gone, or holds another
    /// manifest by now (re-published meanwhile): a signature of other bytes is never recorded.
    pub fn set_signature(
        &self,
        reference: &str,
        manifest: &str,
        signature: Option<String>,
        extra_blobs: Vec<String>,
    ) -> Result<Option<Entry>, CacheError> {
        let mut state = self.state();
        if let Some(digest) = signature.iter().chain(&extra_blobs).find(|d| !self.has_blob(d)) {
            return Err(CacheError::Missing { reference: reference.into(), digest: digest.clone() });
        }
        let Some(e) = state.index.entries.get_mut(reference).filter(|e| e.manifest == manifest) else {
            return Ok(None);
        };
        let old = blobs_of(e).collect::<Vec<_>>();
        e.signature = signature;
        e.extra_blobs = extra_blobs;
        let entry = e.clone();
        self.persist(&state.index)?;
        // The signature replaced, if any, is not kept on disk either.
        let used = referenced(&state);
        for digest in old.iter().filter(|d| !used.contains(*d)) {
            if let Ok(path) = self.blob_path(digest) {
                let _ = fs::remove_file(path);
            }
        }
        Ok(Some(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(reference: &str, module: &str, size: u64, last_used: u64, c: &Cache) -> Entry {
        entry_in(reference, module, size, last_used, c)
    }

    /// As [`entry`], storing the manifest and config through `store` (a cache or a staging).
    fn entry_in(reference: &str, module: &str, size: u64, last_used: u64, store: &impl BlobStore) -> Entry {
        let manifest = store.put_blob(format!("manifest of {reference}").as_bytes()).unwrap();
        let config = store.put_blob(b"{}").unwrap();
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
            verified_by: vec![],
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
            let manifest = c.lookup("r/signed:1").unwrap().manifest;
            c.set_signature("r/signed:1", &manifest, Some(sig), vec![sig_payload.clone()]).unwrap();
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

    fn intact(c: &Cache, e: &Entry) -> bool {
        blobs_of(e).all(|d| matches!(c.get_blob(&d), Ok(Some(_))))
    }

    /// The interleaving found in review, from one thread: Y's publish finds module M already
    /// stored (X uses it), then another record evicts X, the only recorded user of M, then Y
    /// is recorded.
    #[test]
    fn a_blob_staged_for_a_publish_survives_the_eviction_of_its_other_user() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 30).unwrap();
        let m = c.put_blob(b"shared module").unwrap();
        c.record(entry("r/x:1", &m, 10, 1, &c)).unwrap();

        let staging = c.stage();
        assert_eq!(staging.put_blob(b"shared module").unwrap(), m, "found already stored");
        let y = entry_in("r/y:1", &m, 10, 10, &staging);

        let z = c.put_blob(b"module z").unwrap();
        let evicted = c.record(entry("r/z:1", &z, 25, 5, &c)).unwrap();
        assert_eq!(evicted, vec!["r/x:1".to_string()]);
        assert!(c.has_blob(&m), "a blob pinned by an in-flight publish is not deleted");
        assert!(!c.has_entry_intact("r/x:1"));

        let (recorded, _) = staging.record(y).unwrap();
        assert!(intact(&c, &recorded));
        assert!(c.has_entry_intact("r/y:1"));
        assert!(c.state().pinned.is_empty(), "recording releases the pins");
    }

    /// Without a staging nothing pins the blob: `record` refuses the entry rather than
    /// recording one whose module is gone.
    #[test]
    fn recording_an_entry_with_a_missing_blob_fails_and_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 30).unwrap();
        let m = c.put_blob(b"shared module").unwrap();
        c.record(entry("r/x:1", &m, 10, 1, &c)).unwrap();
        assert_eq!(c.put_blob(b"shared module").unwrap(), m);
        let y = entry("r/y:1", &m, 10, 10, &c);
        let z = c.put_blob(b"module z").unwrap();
        c.record(entry("r/z:1", &z, 25, 5, &c)).unwrap();
        assert!(!c.has_blob(&m), "unpinned, the module went with X");

        let err = c.record(y).unwrap_err();
        assert!(matches!(&err, CacheError::Missing { reference, digest } if reference == "r/y:1" && *digest == m));
        assert!(err.to_string().contains("publish it again"), "{err}");
        assert!(c.lookup("r/y:1").is_none() && !c.has_entry_intact("r/y:1"));
        let reopened = Cache::open(dir.path(), 30).unwrap();
        assert!(reopened.lookup("r/y:1").is_none());
    }

    #[test]
    fn a_dropped_staging_releases_its_pins() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        {
            let staging = c.stage();
            staging.put_blob(b"a").unwrap();
            staging.put_blob(b"a").unwrap();
            let other = c.stage();
            other.put_blob(b"a").unwrap();
            assert_eq!(c.state().pinned.values().sum::<usize>(), 3);
            drop(staging);
            assert_eq!(c.state().pinned.values().sum::<usize>(), 1);
        }
        assert!(c.state().pinned.is_empty());
    }

    #[test]
    fn has_entry_intact_checks_the_blobs_not_only_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let m = c.put_blob(b"module").unwrap();
        c.record(entry("r/a:1", &m, 6, 1, &c)).unwrap();
        assert!(c.has_entry_intact("r/a:1"));
        assert!(!c.has_entry_intact("r/other:1"));
        fs::remove_file(c.blob_path(&m).unwrap()).unwrap();
        assert!(c.lookup("r/a:1").is_some() && !c.has_entry_intact("r/a:1"));
    }

    #[test]
    fn replacing_an_entry_deletes_the_blobs_only_it_used() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let (m1, m2, m3) = (c.put_blob(b"one").unwrap(), c.put_blob(b"two").unwrap(), c.put_blob(b"three").unwrap());
        let first = entry("r/a:latest", &m1, 3, 1, &c);
        c.record(first.clone()).unwrap();
        c.record(entry("r/b:1", &m2, 3, 1, &c)).unwrap();

        // :latest moves to m2, which r/b also uses (with its own manifest: a manifest names
        // its module).
        let mut second = entry("r/a:latest", &m2, 3, 2, &c);
        second.manifest = c.put_blob(b"manifest of r/a:latest -> two").unwrap();
        c.record(second.clone()).unwrap();
        assert!(!c.has_blob(&m1), "the replaced module nothing else uses is deleted");
        assert!(!c.has_blob(&first.manifest), "and so is its manifest");
        assert!(c.has_blob(&first.config), "the config every entry shares stays");
        assert!(intact(&c, &second) && c.has_entry_intact("r/b:1"));

        // Moving on again: m2 stays (r/b uses it), and a blob pinned by a publish stays too.
        let staging = c.stage();
        staging.put_blob(&fs::read(c.blob_path(&second.manifest).unwrap()).unwrap()).unwrap();
        c.record(entry("r/a:latest", &m3, 5, 3, &c)).unwrap();
        assert!(c.has_blob(&m2), "still used by r/b:1");
        assert!(c.has_blob(&second.manifest), "pinned by an in-flight publish");
        drop(staging);

        // Nothing dangling and nothing left over: a reopen drops no entry.
        let before = c.entries();
        drop(c);
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(c.entries(), before);
    }

    #[test]
    fn replacing_an_entry_frees_its_share_of_the_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 25).unwrap();
        let other = c.put_blob(b"other").unwrap();
        c.record(entry("r/other:1", &other, 10, 1, &c)).unwrap();
        for i in 0..5u64 {
            let m = c.put_blob(format!("latest #{i}").as_bytes()).unwrap();
            let mut e = entry("r/a:latest", &m, 10, 2 + i, &c);
            e.manifest = c.put_blob(format!("manifest #{i}").as_bytes()).unwrap();
            assert_eq!(c.record(e).unwrap(), Vec::<String>::new(), "churn of one tag evicts nothing");
        }
        let blobs = fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count();
        // other's module and manifest, :latest's module and manifest, the shared config, and
        // the unused "manifest of r/a:latest" the helper stores.
        assert!(blobs <= 6, "{blobs} blobs on disk: replaced ones were not deleted");
    }

    #[test]
    fn a_repull_of_the_same_manifest_without_a_key_keeps_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let m = c.put_blob(b"signed module").unwrap();
        let mut signed = entry("r/s:1", &m, 13, 1, &c);
        signed.signature = Some(c.put_blob(b"signature manifest").unwrap());
        signed.extra_blobs = vec![c.put_blob(b"signature payload").unwrap()];
        c.record(signed.clone()).unwrap();

        let (recorded, _) = c.stage().record(entry("r/s:1", &m, 13, 2, &c)).unwrap();
        assert_eq!((&recorded.signature, &recorded.extra_blobs), (&signed.signature, &signed.extra_blobs));
        assert_eq!(c.lookup("r/s:1").unwrap(), recorded);
        assert!(intact(&c, &recorded));

        // A signed re-pull replaces the signature; the old one's blobs go.
        let mut resigned = entry("r/s:1", &m, 13, 3, &c);
        resigned.signature = Some(c.put_blob(b"another signature manifest").unwrap());
        c.record(resigned.clone()).unwrap();
        assert_eq!(c.lookup("r/s:1").unwrap().signature, resigned.signature);
        assert!(!c.has_blob(signed.signature.as_ref().unwrap()) && !c.has_blob(&signed.extra_blobs[0]));

        // Another manifest: the signature does not apply to it and is dropped with its blobs.
        let m2 = c.put_blob(b"new module").unwrap();
        let mut moved = entry("r/s:1", &m2, 10, 4, &c);
        moved.manifest = c.put_blob(b"another manifest").unwrap();
        c.record(moved).unwrap();
        let e = c.lookup("r/s:1").unwrap();
        assert_eq!((e.signature, e.extra_blobs), (None, vec![]));
        assert!(!c.has_blob(resigned.signature.as_ref().unwrap()));
    }

    #[test]
    fn privacy_follows_the_latest_pull() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let m = c.put_blob(b"module").unwrap();
        let with = |private: bool, last_used: u64| {
            let mut e = entry("r/p:1", &m, 6, last_used, &c);
            e.private = private;
            c.record(e).unwrap();
            c.lookup("r/p:1").unwrap().private
        };
        assert!(with(true, 1), "first pulled with a secret: private");
        assert!(!with(false, 2), "pulled anonymously: public");
        assert!(with(true, 3), "the repository went private: so does the entry");
        assert!(!with(false, 4), "and public again");
    }

    #[test]
    fn set_signature_refuses_missing_blobs_and_deletes_the_one_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let m = c.put_blob(b"module").unwrap();
        c.record(entry("r/a:1", &m, 6, 1, &c)).unwrap();
        let manifest = c.lookup("r/a:1").unwrap().manifest;
        let gone = format!("sha256:{}", sha256_hex(b"never stored"));
        assert!(matches!(c.set_signature("r/a:1", &manifest, Some(gone), vec![]), Err(CacheError::Missing { .. })));
        assert_eq!(c.lookup("r/a:1").unwrap().signature, None);
        let old = c.put_blob(b"old signature").unwrap();
        c.set_signature("r/a:1", &manifest, Some(old.clone()), vec![]).unwrap();
        let new = c.put_blob(b"new signature").unwrap();
        c.set_signature("r/a:1", &manifest, Some(new.clone()), vec![]).unwrap();
        assert!(!c.has_blob(&old) && c.has_blob(&new));
    }

    /// A signer that read the entry before it was re-published with other bytes must not
    /// record its signature of the old manifest with the new one.
    #[test]
    fn set_signature_leaves_an_entry_re_published_with_another_manifest_alone() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let m = c.put_blob(b"module").unwrap();
        c.record(entry("r/a:1", &m, 6, 1, &c)).unwrap();
        let read_by_signer = c.lookup("r/a:1").unwrap().manifest;
        let mut republished = entry("r/a:1", &m, 6, 2, &c);
        republished.manifest = c.put_blob(b"the manifest of new bytes").unwrap();
        c.record(republished.clone()).unwrap();
        let stale = c.put_blob(b"signature of the old manifest").unwrap();
        assert_eq!(c.set_signature("r/a:1", &read_by_signer, Some(stale), vec![]).unwrap(), None);
        assert_eq!(c.lookup("r/a:1").unwrap(), republished);
    }

    fn in_use(references: &[&str]) -> InUse {
        InUse::Only(references.iter().map(|r| r.to_string()).collect())
    }

    #[test]
    fn entries_in_use_are_never_evicted_and_what_cannot_fit_beside_them_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 25).unwrap();
        let (m1, m2, m3) = (c.put_blob(b"one").unwrap(), c.put_blob(b"two").unwrap(), c.put_blob(b"three").unwrap());
        c.record(entry("r/a:1", &m1, 10, 1, &c)).unwrap();
        c.record(entry("r/b:1", &m2, 10, 2, &c)).unwrap();
        c.set_in_use(in_use(&["r/a:1", "r/c:1"]));
        let evicted = c.record(entry("r/c:1", &m3, 10, 3, &c)).unwrap();
        assert_eq!(evicted, vec!["r/b:1".to_string()], "the least recently used entry is in use: the next one goes");
        assert!(c.has_entry_intact("r/a:1") && c.has_entry_intact("r/c:1"));

        // Only entries in use are left, and a third does not fit beside them.
        let before = c.entries();
        let staging = c.stage();
        let m4 = staging.put_blob(b"four").unwrap();
        let d = entry_in("r/d:1", &m4, 10, 4, &staging);
        let err = staging.record(d.clone()).unwrap_err();
        assert!(matches!(&err, CacheError::Full { reference, needed: 30, max: 25 } if reference == "r/d:1"), "{err:?}");
        assert!(err.to_string().contains("--max-cache-bytes"), "{err}");
        assert_eq!(c.entries(), before, "a refused entry evicts nothing");
        assert!(!c.has_blob(&m4) && !c.has_blob(&d.manifest), "and leaves none of its blobs behind");
        assert!(c.has_blob(&d.config), "the config the others share stays");
        drop(c);
        assert_eq!(Cache::open(dir.path(), 25).unwrap().entries(), before);

        // Until the sources have synced, nothing is known to be unused.
        let c = Cache::open(dir.path(), 25).unwrap();
        c.set_in_use(InUse::All);
        let m4 = c.put_blob(b"four").unwrap();
        assert!(matches!(c.record(entry("r/d:1", &m4, 10, 4, &c)), Err(CacheError::Full { .. })));
        c.set_in_use(in_use(&["r/a:1", "r/d:1"]));
        let m4 = c.put_blob(b"four").unwrap();
        assert_eq!(c.record(entry("r/d:1", &m4, 10, 4, &c)).unwrap(), vec!["r/c:1".to_string()]);
    }

    #[test]
    fn a_corrupt_blob_found_on_read_drops_the_entries_using_it_and_tells_the_listener() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let told: std::sync::Arc<Mutex<Vec<String>>> = std::sync::Arc::default();
        let sink = std::sync::Arc::clone(&told);
        c.on_corrupt(move |references| sink.lock().unwrap().extend(references));
        let (shared, own) = (c.put_blob(b"shared module").unwrap(), c.put_blob(b"own module").unwrap());
        c.record(entry("r/a:1", &shared, 13, 1, &c)).unwrap();
        c.record(entry("r/b:1", &shared, 13, 1, &c)).unwrap();
        c.record(entry("r/c:1", &own, 10, 1, &c)).unwrap();

        fs::write(c.blob_path(&shared).unwrap(), b"bit rot").unwrap();
        assert!(matches!(c.get_blob(&shared), Err(CacheError::Corrupt(_))));
        assert_eq!(*told.lock().unwrap(), vec!["r/a:1".to_string(), "r/b:1".to_string()]);
        assert!(c.lookup("r/a:1").is_none() && c.lookup("r/b:1").is_none());
        assert!(c.has_entry_intact("r/c:1"));
        let after = c.entries();
        drop(c);
        assert_eq!(Cache::open(dir.path(), 1 << 30).unwrap().entries(), after, "the drop was persisted");

        // Storing the right bytes over a corrupt copy (a publish finding it) mends it: its
        // users are kept.
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        c.on_corrupt(|references| panic!("{references:?} dropped while being mended"));
        fs::write(c.blob_path(&own).unwrap(), b"bit rot").unwrap();
        assert_eq!(c.put_blob(b"own module").unwrap(), own);
        assert_eq!(c.get_blob(&own).unwrap().as_deref(), Some(&b"own module"[..]));
        assert!(c.has_entry_intact("r/c:1"));
    }

    /// Every chunk of `reader`, or the error that ended it, and how many bytes came before.
    fn drain(reader: &mut BlobReader, chunk: usize) -> (Result<Vec<u8>, CacheError>, usize) {
        let mut all = vec![];
        loop {
            match reader.next_chunk(chunk) {
                Ok(Some(c)) => all.extend_from_slice(&c),
                Ok(None) => return (Ok(all.clone()), all.len()),
                Err(e) => return (Err(e), all.len()),
            }
        }
    }

    #[test]
    fn a_blob_reader_returns_a_sound_blob_whole_and_never_the_end_of_a_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let d = c.put_blob(&blob).unwrap();
        let e = c.put_blob(b"").unwrap();
        let mut reader = c.open_blob(&d).unwrap().unwrap();
        assert_eq!(reader.len(), 10_000);
        assert_eq!(drain(&mut reader, 4096).0.unwrap(), blob);
        assert_eq!(drain(&mut c.open_blob(&e).unwrap().unwrap(), 4096).0.unwrap(), b"");
        assert!(c.open_blob(&format!("sha256:{}", "0".repeat(64))).unwrap().is_none());

        // A flipped byte in the first chunk is found only at the end: everything but the last
        // chunk goes out, then the error.
        let mut rotten = blob.clone();
        rotten[10] ^= 1;
        fs::write(c.blob_path(&d).unwrap(), &rotten).unwrap();
        let (read, before) = drain(&mut c.open_blob(&d).unwrap().unwrap(), 4096);
        assert!(matches!(read, Err(CacheError::Corrupt(_))) && before == 8192, "{read:?} after {before} bytes");
        // Truncated in place after it was opened.
        fs::write(c.blob_path(&d).unwrap(), &blob).unwrap();
        let mut reader = c.open_blob(&d).unwrap().unwrap();
        File::options().write(true).open(c.blob_path(&d).unwrap()).unwrap().set_len(5000).unwrap();
        let (read, before) = drain(&mut reader, 4096);
        assert!(matches!(read, Err(CacheError::Corrupt(_))) && before == 4096, "{read:?} after {before} bytes");
    }

    #[test]
    fn a_corrupt_read_reported_drops_the_entries_unless_the_blob_was_mended_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 1 << 30).unwrap();
        let m = c.put_blob(b"module").unwrap();
        c.record(entry("r/a:1", &m, 6, 1, &c)).unwrap();
        // A reader saw it corrupt, but a publish stored the right bytes since: nothing to drop.
        c.report_corrupt(&m);
        assert!(c.has_entry_intact("r/a:1"));
        fs::write(c.blob_path(&m).unwrap(), b"modulX").unwrap();
        c.report_corrupt(&m);
        assert!(c.lookup("r/a:1").is_none() && !c.has_blob(&m));
    }

    #[test]
    fn the_entry_just_recorded_is_never_the_one_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 15).unwrap();
        let (m1, m2) = (c.put_blob(b"one").unwrap(), c.put_blob(b"two").unwrap());
        c.record(entry("b:1", &m1, 10, 7, &c)).unwrap();
        // Same second (or a clock step back): the new entry is not the least recently used
        // one to go.
        let evicted = c.record(entry("a:1", &m2, 10, 7, &c)).unwrap();
        assert_eq!(evicted, vec!["b:1".to_string()]);
        assert!(c.has_entry_intact("a:1"));
    }

    /// Publishes (through stagings, as `publish` does) and evictions racing, with a bound so
    /// small nearly every record evicts: afterwards every recorded entry is whole, and a
    /// reopen, which drops entries with missing blobs, drops none.
    #[test]
    fn concurrent_publishes_and_evictions_leave_no_dangling_entry() {
        let dir = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(Cache::open(dir.path(), 25).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = std::sync::Arc::clone(&c);
                std::thread::spawn(move || {
                    for i in 0..150u64 {
                        let n = (t * 7 + i * 3) % 5;
                        let staging = c.stage();
                        // Five modules shared by ten references: a publish usually finds its
                        // module stored, used by an entry another thread is about to evict.
                        let m = staging.put_blob(format!("module {n}").as_bytes()).unwrap();
                        let e = entry_in(&format!("r/{}:{}", (t + i) % 10, n % 2), &m, 10, i, &staging);
                        std::thread::yield_now();
                        let (recorded, _) = staging.record(e).unwrap();
                        assert!(recorded.module == m);
                        if i % 10 == 0 {
                            c.touch(&recorded.reference);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let entries = c.entries();
        assert!(!entries.is_empty());
        for e in &entries {
            assert!(intact(&c, e), "{} names a missing blob", e.reference);
        }
        assert!(c.state().pinned.is_empty());
        drop(c);
        assert_eq!(Cache::open(dir.path(), 25).unwrap().entries(), entries, "the reopen dropped entries");
    }
}
