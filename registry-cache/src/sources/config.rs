//! `serve --config FILE`: where policies come from and how the pre-puller behaves.
//!
//! ```yaml
//! sources:
//!   kubernetes:
//!     enabled: true          # watch EnvoyExtensionPolicies in all namespaces
//!   directories:             # manifests on disk (*.yaml, *.yml, *.json)
//!     - /etc/registry-cache/policies
//!   rescanSeconds: 10        # how often directories are scanned again
//! prefetch:
//!   concurrency: 4
//!   alwaysRefreshSeconds: 300  # re-pull period of `Always` images; 0 disables
//!   initialBackoffMillis: 1000
//!   maxBackoffSeconds: 300
//!   settleAttempts: 3          # initialSyncSettled (/status, metrics) waits at most this many failures per image
//!   secretRecheckSeconds: 60   # pull Secrets are read again this often; a deleted one unbinds
//! ```
//!
//! Unknown fields are refused, and the error names them.

use super::PrefetchConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Settings {
    #[serde(default)]
    pub sources: Sources,
    #[serde(default)]
    pub prefetch: Prefetch,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Sources {
    #[serde(default)]
    pub kubernetes: Kubernetes,
    #[serde(default)]
    pub directories: Vec<PathBuf>,
    #[serde(default = "default_rescan")]
    pub rescan_seconds: u64,
}

impl Default for Sources {
    fn default() -> Self {
        Self { kubernetes: Kubernetes::default(), directories: vec![], rescan_seconds: default_rescan() }
    }
}

fn default_rescan() -> u64 {
    10
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Kubernetes {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Prefetch {
    pub concurrency: usize,
    pub always_refresh_seconds: u64,
    pub initial_backoff_millis: u64,
    pub max_backoff_seconds: u64,
    pub settle_attempts: u32,
    pub secret_recheck_seconds: u64,
}

impl Default for Prefetch {
    fn default() -> Self {
        let d = PrefetchConfig::default();
        Self {
            concurrency: d.concurrency,
            always_refresh_seconds: d.always_refresh.as_secs(),
            initial_backoff_millis: d.initial_backoff.as_millis() as u64,
            max_backoff_seconds: d.max_backoff.as_secs(),
            settle_attempts: d.settle_attempts,
            secret_recheck_seconds: d.secret_recheck.as_secs(),
        }
    }
}

impl Prefetch {
    pub fn to_config(&self) -> PrefetchConfig {
        PrefetchConfig {
            concurrency: self.concurrency.max(1),
            always_refresh: Duration::from_secs(self.always_refresh_seconds),
            initial_backoff: Duration::from_millis(self.initial_backoff_millis.max(1)),
            max_backoff: Duration::from_secs(self.max_backoff_seconds.max(1)),
            settle_attempts: self.settle_attempts.max(1),
            secret_recheck: Duration::from_secs(self.secret_recheck_seconds.max(1)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Parses a config; `origin` names it in errors.
pub fn parse(text: &str, origin: &Path) -> Result<Settings, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Settings::default());
    }
    let settings: Settings = serde_yaml_ng::from_str(text)
        .map_err(|e| ConfigError::Invalid { path: origin.to_path_buf(), message: e.to_string() })?;
    if settings.prefetch.concurrency == 0 {
        return Err(ConfigError::Invalid {
            path: origin.to_path_buf(),
            message: "prefetch.concurrency must be at least 1".into(),
        });
    }
    Ok(settings)
}

/// The config file (if any) with the command line's shortcuts added: `--watch-kubernetes`
/// turns the Kubernetes source on, `--policies-dir` adds directories.
pub fn load(file: Option<&Path>, watch_kubernetes: bool, policies_dirs: &[PathBuf]) -> Result<Settings, ConfigError> {
    let mut settings = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            parse(&text, path)?
        }
        None => Settings::default(),
    };
    settings.sources.kubernetes.enabled |= watch_kubernetes;
    for dir in policies_dirs {
        if !settings.sources.directories.contains(dir) {
            settings.sources.directories.push(dir.clone());
        }
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Settings, String> {
        parse(text, Path::new("config.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn full_config() {
        let s = p("sources:\n  kubernetes: {enabled: true}\n  directories: [/a, /b]\n  rescanSeconds: 3\nprefetch:\n  concurrency: 2\n  alwaysRefreshSeconds: 60\n  secretRecheckSeconds: 15\n")
            .unwrap();
        assert!(s.sources.kubernetes.enabled);
        assert_eq!(s.sources.directories, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(s.sources.rescan_seconds, 3);
        let c = s.prefetch.to_config();
        assert_eq!((c.concurrency, c.always_refresh), (2, Duration::from_secs(60)));
        assert_eq!(c.secret_recheck, Duration::from_secs(15));
        assert_eq!(c.settle_attempts, 3, "unset fields keep their defaults");
    }

    #[test]
    fn empty_config_means_defaults() {
        let s = p("").unwrap();
        assert_eq!(s, Settings::default());
        assert!(!s.sources.kubernetes.enabled);
        assert_eq!(s.sources.rescan_seconds, 10);
        assert_eq!(s.prefetch.to_config().concurrency, 4);
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = p("sources:\n  kubernetes: {enabled: true, namespace: x}\n").unwrap_err();
        assert!(e.contains("unknown field `namespace`") && e.contains("config.yaml"), "{e}");
        let e = p("prefetch:\n  concurency: 3\n").unwrap_err();
        assert!(e.contains("unknown field `concurency`"), "{e}");
        let e = p("source: {}\n").unwrap_err();
        assert!(e.contains("unknown field `source`"), "{e}");
        let e = p("prefetch:\n  concurrency: lots\n").unwrap_err();
        assert!(e.contains("prefetch.concurrency") || e.contains("invalid type"), "{e}");
        let e = p("prefetch:\n  concurrency: 0\n").unwrap_err();
        assert!(e.contains("prefetch.concurrency"), "{e}");
    }

    #[test]
    fn flags_add_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "sources:\n  directories: [/a]\n").unwrap();
        let s = load(Some(&path), true, &[PathBuf::from("/a"), PathBuf::from("/b")]).unwrap();
        assert!(s.sources.kubernetes.enabled);
        assert_eq!(s.sources.directories, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(load(Some(&dir.path().join("missing.yaml")), false, &[])
            .unwrap_err()
            .to_string()
            .contains("missing.yaml"));
    }
}
