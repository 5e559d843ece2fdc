//! Directory mode: the same as Kubernetes mode, from manifests on disk.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the configured directories is read
//! (multi-document YAML allowed). EnvoyExtensionPolicies feed the [`Prefetcher`];
//! `kubernetes.io/dockerconfigjson` Secrets answer `pullSecretRef`s (a manifest without
//! `metadata.namespace` is in `default`, as with `kubectl apply`). The directories are scanned
//! again every interval; each scan is one `resync`, so an added file acts like `ADDED`, a
//! removed one like `DELETED`, and an edited one like `MODIFIED` (a policy's resourceVersion
//! here is a hash of its document). A file that cannot be read or parsed keeps what its last
//! good read gave, so a half-written file never drops policies.

use super::{documents, PolicyRecord, Prefetcher, SecretRef, SecretSource};
use base64::Engine as _;
use futures::future::BoxFuture;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The name this source reports under.
pub const SOURCE: &str = "files";

/// What one file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileContents {
    pub policies: Vec<PolicyRecord>,
    /// Secret -> its Docker config.json bytes.
    pub secrets: BTreeMap<SecretRef, Vec<u8>>,
}

fn is_manifest(path: &Path) -> bool {
    path.is_file() && path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

fn docker_config_of(doc: &Value) -> Option<Vec<u8>> {
    if let Some(data) = doc.pointer("/data/.dockerconfigjson").and_then(Value::as_str) {
        return base64::engine::general_purpose::STANDARD.decode(data.trim()).ok();
    }
    doc.pointer("/stringData/.dockerconfigjson").and_then(Value::as_str).map(|s| s.as_bytes().to_vec())
}

/// Parses one manifest file's text.
pub fn parse_file(text: &str) -> Result<FileContents, String> {
    let mut out = FileContents::default();
    for doc in documents(text)? {
        match doc.get("kind").and_then(Value::as_str) {
            Some("Secret") if doc.get("type").and_then(Value::as_str) == Some("kubernetes.io/dockerconfigjson") => {
                let meta = doc.get("metadata");
                let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
                let namespace = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default");
                let Some(config) = docker_config_of(&doc) else {
                    tracing::warn!(%namespace, %name, "dockerconfigjson Secret without a readable .dockerconfigjson");
                    continue;
                };
                out.secrets.insert(SecretRef { namespace: namespace.into(), name: name.into() }, config);
            }
            Some(_) => {
                if let Some(mut p) = PolicyRecord::from_value(&doc) {
                    p.resource_version = format!("sha256:{}", hex::encode(Sha256::digest(doc.to_string().as_bytes())));
                    out.policies.push(p);
                }
            }
            None => {}
        }
    }
    Ok(out)
}

/// Pull secrets found on disk; the scanner replaces them after each scan.
#[derive(Clone, Default)]
pub struct FileSecrets {
    secrets: Arc<RwLock<BTreeMap<SecretRef, Vec<u8>>>>,
}

impl FileSecrets {
    pub fn replace(&self, secrets: BTreeMap<SecretRef, Vec<u8>>) {
        *self.secrets.write().unwrap_or_else(|e| e.into_inner()) = secrets;
    }
}

impl SecretSource for FileSecrets {
    fn docker_config<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        let key = SecretRef { namespace: namespace.into(), name: name.into() };
        let found = self.secrets.read().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        Box::pin(async move { Ok(found) })
    }
}

/// Scans directories, remembering each file's last good contents.
#[derive(Default)]
pub struct Scanner {
    dirs: Vec<PathBuf>,
    last_good: HashMap<PathBuf, FileContents>,
}

impl Scanner {
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self { dirs, last_good: HashMap::new() }
    }

    /// Everything the directories hold now.
    pub fn scan(&mut self) -> FileContents {
        let mut seen = HashMap::new();
        for dir in &self.dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read policy directory");
                    // Keep what this directory held.
                    for (path, contents) in self.last_good.iter().filter(|(p, _)| p.parent() == Some(dir)) {
                        seen.insert(path.clone(), contents.clone());
                    }
                    continue;
                }
            };
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)).collect();
            paths.sort();
            for path in paths {
                let parsed = std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| parse_file(&t));
                match parsed {
                    Ok(contents) => {
                        seen.insert(path, contents);
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "unreadable manifest; keeping its last good contents");
                        if let Some(old) = self.last_good.get(&path) {
                            seen.insert(path, old.clone());
                        }
                    }
                }
            }
        }
        self.last_good = seen;
        let mut out = FileContents::default();
        let mut paths: Vec<&PathBuf> = self.last_good.keys().collect();
        paths.sort();
        for path in paths {
            if let Some(c) = self.last_good.get(path) {
                out.policies.extend(c.policies.iter().cloned());
                out.secrets.extend(c.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        out
    }

    /// Scans once and hands the result to `prefetcher` (secrets first, so that pulls started
    /// by the resync find them).
    pub fn sync(&mut self, prefetcher: &Prefetcher, secrets: &FileSecrets) {
        let contents = self.scan();
        secrets.replace(contents.secrets);
        prefetcher.resync(SOURCE, contents.policies);
    }
}

/// Scans `dirs` now and every `interval`, forever.
pub async fn run(dirs: Vec<PathBuf>, interval: Duration, prefetcher: Prefetcher, secrets: FileSecrets) {
    let mut scanner = Scanner::new(dirs);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        scanner.sync(&prefetcher, &secrets);
    }
}
