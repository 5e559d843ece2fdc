//! `serve` as a library: the cache, its permission layer, the policy sources that pre-pull, and
//! the HTTP server, wired together. The binary and the demo run the same code.

use crate::cache::Cache;
use crate::permissions::{upstream_access_check, Permissions};
use crate::pull::{PullOptions, Puller};
use crate::server::{self, AppState};
use crate::sign::{self, Signer};
use crate::sources::{self, AccessEvent, Prefetcher};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

pub struct ServiceOptions {
    pub cache_dir: PathBuf,
    pub max_cache_bytes: u64,
    /// How long an upstream answer about a client's access holds before it is re-checked.
    pub permission_ttl: Duration,
    pub pull: PullOptions,
    pub settings: sources::config::Settings,
    /// Signs every artifact as it is cached.
    pub signer: Option<Signer>,
    /// Signs `/wasm` URLs of private modules (see `permissions`); empty: no such URLs.
    pub url_key: Vec<u8>,
}

/// A running cache. Its background tasks stop when it is dropped.
pub struct Service {
    pub state: Arc<AppState>,
    pub prefetcher: Option<Prefetcher>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Service {
    /// Opens the cache and starts the sources. The server is ready as soon as it serves: what
    /// the sources want pulled is reported by `/status` and the metrics.
    pub async fn start(options: ServiceOptions) -> anyhow::Result<Self> {
        let cache = Arc::new(Cache::open(&options.cache_dir, options.max_cache_bytes)?);
        drop_unverified(&cache, &options.pull.require_signature)?;
        // Entries dropped for a corrupt blob found while serving, to be pulled again.
        let (corrupt_tx, mut corrupt_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
        cache.on_corrupt(move |references| {
            let _ = corrupt_tx.send(references);
        });
        let mut tasks = vec![];
        if let Some(signer) = options.signer.clone() {
            // What an earlier run cached without a key, or signed with a key since rotated out
            // or under another identity, is signed again with this one; new artifacts are
            // signed as they are cached.
            let (c, s) = (Arc::clone(&cache), signer);
            tasks.push(tokio::spawn(async move {
                let signed = tokio::task::spawn_blocking(move || s.sign_stale(&c)).await.unwrap_or_default();
                for reference in &signed {
                    tracing::info!(%reference, "signed with the current key");
                }
            }));
        }
        let puller = Arc::new(Puller::new(options.pull));
        let check = upstream_access_check(Arc::clone(&puller));
        let permissions = Permissions::with_url_key(options.permission_ttl, check, options.url_key);
        let state = AppState::new(Arc::clone(&cache), permissions);
        tasks.push(state.spawn_permission_refresher());
        let fetcher = Arc::new(sources::RegistryFetcher::new(puller, cache).signing(options.signer));
        let hook_state = Arc::downgrade(&state);
        let hook: sources::AccessHook = Arc::new(move |event| {
            let Some(s) = hook_state.upgrade() else { return };
            match event {
                AccessEvent::Checked { image, auth, allowed, .. } => s.permissions.record(image, auth, allowed),
                AccessEvent::Bindings(bindings) => s.permissions.set_bindings(bindings.clone()),
            }
        });
        let prefetcher = sources::start(&options.settings, fetcher, hook).await?;
        if let Some(prefetcher) = &prefetcher {
            state.report_prefetcher(prefetcher.clone());
            let prefetcher = prefetcher.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(references) = corrupt_rx.recv().await {
                    prefetcher.repull(&references);
                }
            }));
        }
        Ok(Self { state, prefetcher, tasks })
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        server::serve(listener, server::router(Arc::clone(&self.state)), shutdown).await
    }

    /// Serves over HTTPS with the pair `tls` holds (reload it with
    /// [`crate::tls::ServerTls::spawn_reloader`]) until `shutdown` completes.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: &Arc<crate::tls::ServerTls>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let app = server::router(Arc::clone(&self.state));
        server::serve_tls(listener, app, shutdown, server::ServerLimits::default(), tls).await
    }

    /// Waits until the sources' initial sync has settled: each image pulled, or failed
    /// `settle_attempts` times (`initialSyncSettled` in `/status`).
    pub async fn wait_settled(&self) {
        if let Some(p) = &self.prefetcher {
            p.wait_settled().await;
        }
    }

    /// Verifies the cached signature of `reference`.
    pub fn verify(&self, reference: &str, keys: &[sign::PublicKey]) -> Result<crate::cache::Entry, sign::SignError> {
        sign::verify_entry(&self.state.cache, reference, keys)
    }
}

/// With `--require-signature`, entries cached without a signature from one of the keys now
/// required (before the flag was set, or under other keys) are dropped: the pre-puller pulls
/// them again and verifies them, instead of the cache serving, and signing, what nobody checked.
pub fn drop_unverified(cache: &Cache, required: &[sign::PublicKey]) -> Result<Vec<String>, crate::cache::CacheError> {
    if required.is_empty() {
        return Ok(vec![]);
    }
    let fingerprints: Vec<String> = required.iter().map(sign::PublicKey::fingerprint).collect();
    let mut dropped = vec![];
    for entry in cache.entries() {
        if !entry.verified_by.iter().any(|f| fingerprints.contains(f)) {
            tracing::warn!(reference = %entry.reference, "cached without a signature the required keys verify; dropped, to be pulled and verified again");
            cache.remove(&entry.reference)?;
            dropped.push(entry.reference);
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::Format;
    use crate::pull::Pulled;

    fn publish(cache: &Cache, reference: &str, verified_by: Vec<String>) {
        let pulled = Pulled {
            reference: reference.into(),
            upstream_digest: format!("sha256:{}", "1".repeat(64)),
            format: Format::SoloOci,
            module: format!("\0asm\x01\0\0\0{reference}").into_bytes(),
            verified_by,
        };
        crate::publish::publish(cache, &pulled, false).unwrap();
    }

    #[test]
    fn requiring_signatures_drops_what_the_required_keys_did_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 30).unwrap();
        let (a, b) =
            (sign::SigningKey::generate().unwrap().public_key(), sign::SigningKey::generate().unwrap().public_key());
        publish(&cache, "reg.example/verified:1", vec![a.fingerprint()]);
        publish(&cache, "reg.example/unchecked:1", vec![]);
        assert!(drop_unverified(&cache, &[]).unwrap().is_empty(), "nothing is required");
        assert_eq!(
            drop_unverified(&cache, std::slice::from_ref(&a)).unwrap(),
            vec!["reg.example/unchecked:1".to_string()]
        );
        assert!(cache.lookup("reg.example/verified:1").is_some());
        assert_eq!(drop_unverified(&cache, &[b]).unwrap(), vec!["reg.example/verified:1".to_string()], "another key");
    }
}
