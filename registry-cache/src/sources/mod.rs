//! Where the images to pre-pull come from, and the pre-puller they feed.
//!
//! Envoy Gateway fetches a Wasm image while it translates an EnvoyExtensionPolicy. The cache
//! never wants to be the reason translation waits: it learns every referenced image as soon as
//! the policy exists (from the Kubernetes API, [`kubernetes`], or from manifests on disk,
//! [`files`]) and has it pulled before Envoy Gateway asks.
//!
//! The [`Prefetcher`] is source-independent. Sources hand it whole policies ([`PolicyRecord`]):
//! `upsert`, `delete`, and `resync` (the complete set a source currently sees, after a list, a
//! re-list or a directory scan). It keeps the desired set of [`Target`]s (image, pull secret)
//! and pulls each through an injectable [`ImageFetcher`].
//!
//! # Semantics, following Envoy Gateway (`internal/gatewayapi/envoyextensionpolicy.go`,
//! `internal/wasm/cache.go`)
//!
//! * The image URL may carry an `oci://` prefix; an image with neither tag nor digest gets
//!   `:latest`.
//! * `pullSecretRef.namespace` defaults to the policy's namespace. A reference into another
//!   namespace needs a ReferenceGrant in Envoy Gateway; this cache does not evaluate
//!   ReferenceGrants, so such an image is not pre-pulled (Envoy Gateway still fetches it itself).
//! * Pull policy: when unset, `Always` for an image whose tag is `latest`, `IfNotPresent`
//!   otherwise. When the module's checksum is known (`sha256` set, or the image pinned by
//!   digest) Envoy Gateway reuses the module it has whatever the policy says, so the effective
//!   policy is `IfNotPresent`.
//! * `IfNotPresent`: an image already cached under the same reference is not pulled again. With
//!   a pull secret, the cache still asks the registry once whether that secret may read the
//!   image (Envoy Gateway checks permission on a cache hit of a private image, too), and tells
//!   the permission layer through the [`AccessHook`].
//! * `Always`: Envoy Gateway re-pulls when the resourceVersion of a policy that references the
//!   image changes; so does the prefetcher. It also re-pulls every
//!   [`PrefetchConfig::always_refresh`] (default 300 s; zero disables), so that the cached tag
//!   stays close to the registry between policy changes.
//!
//! One image referenced by many policies is pulled once per distinct credential: targets that
//! resolve to the same (image, credentials) share one pull.
//!
//! # Namespace bindings
//!
//! A namespace is bound to a repository (its `/wasm` URLs are served, see `permissions`) while
//! one of its current policies names an image there with a pull secret whose credentials the
//! registry accepted for it. The pre-puller publishes the whole set through the
//! [`AccessHook`] whenever it changes: a policy deleted unbinds at once. Pull secrets are read
//! again every [`PrefetchConfig::secret_recheck`] (default 60 s): a Secret deleted, or left
//! without credentials, unbinds its namespace; one whose credentials changed unbinds it until
//! the registry has accepted the new ones.

pub mod config;
pub mod files;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;

use crate::auth;
use crate::cache::{Cache, InUse};
use crate::permissions::{credential_hash, repository_of, BoundCredential};
use crate::publish;
use crate::pull::{parse_reference, PullError, Puller};
use crate::sign::Signer;
use futures::future::BoxFuture;
use oci_client::secrets::RegistryAuth;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

pub const EEP_KIND: &str = "EnvoyExtensionPolicy";
pub const EEP_GROUP: &str = "gateway.envoyproxy.io";

/// `ImagePullPolicy` of Envoy Gateway, resolved (no "unspecified").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PullPolicy {
    IfNotPresent,
    Always,
}

/// `pullSecretRef`, its namespace resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// One `code.type: Image` entry of a policy's `spec.wasm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmImage {
    pub namespace: String,
    pub policy: String,
    /// Index in `spec.wasm`.
    pub index: usize,
    /// Normalised as Envoy Gateway does: no `oci://`, `:latest` when neither tag nor digest.
    pub image: String,
    pub pull_secret: Option<SecretRef>,
    pub pull_policy: PullPolicy,
}

/// An EnvoyExtensionPolicy as far as the pre-puller cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub namespace: String,
    pub name: String,
    /// `metadata.resourceVersion`, or for manifests on disk a hash of the document.
    pub resource_version: String,
    pub images: Vec<WasmImage>,
}

/// Envoy Gateway's URL handling: strip `oci://`, add `:latest` without tag or digest.
pub fn normalize_image(url: &str) -> String {
    let s = url.trim().strip_prefix("oci://").unwrap_or(url.trim());
    let has_digest = s.contains('@');
    let has_tag = s.rsplit_once(':').is_some_and(|(_, tag)| !tag.contains('/'));
    if has_digest || has_tag {
        s.to_string()
    } else {
        format!("{s}:latest")
    }
}

impl PolicyRecord {
    /// Reads an EnvoyExtensionPolicy (as the API server or a manifest has it). `None` for
    /// other kinds. Entries that are not `type: Image`, or lack a URL, are left out.
    pub fn from_value(doc: &Value) -> Option<Self> {
        if doc.get("kind").and_then(Value::as_str) != Some(EEP_KIND) {
            return None;
        }
        if let Some(api_version) = doc.get("apiVersion").and_then(Value::as_str) {
            if !api_version.starts_with(&format!("{EEP_GROUP}/")) {
                return None;
            }
        }
        let meta = doc.get("metadata");
        let text =
            |v: Option<&Value>, key: &str| v.and_then(|m| m.get(key)).and_then(Value::as_str).map(str::to_string);
        let namespace = text(meta, "namespace").filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
        let name = text(meta, "name").unwrap_or_default();
        let resource_version = text(meta, "resourceVersion").unwrap_or_default();
        let mut images = vec![];
        // A policy `render` rewrote still names its images in an annotation.
        let rendered: Option<Value> = meta
            .and_then(|m| m.pointer(&format!("/annotations/{}", crate::render::SOURCE_ANNOTATION.replace('/', "~1"))))
            .and_then(Value::as_str)
            .and_then(|text| serde_json::from_str(text).ok());
        let wasms = doc.pointer("/spec/wasm").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (index, wasm) in wasms.iter().enumerate() {
            let Some(code) = wasm.get("code") else { continue };
            // A rendered source (HTTP, or an image at the cache itself) stands for the original
            // image recorded in the annotation.
            let code = match rendered.as_ref().and_then(|r| r.get(index.to_string())) {
                Some(source) if source.get("type").and_then(Value::as_str) == Some("Image") => source,
                _ if code.get("type").and_then(Value::as_str) == Some("Image") => code,
                _ => continue,
            };
            let Some(url) = code.pointer("/image/url").and_then(Value::as_str).filter(|u| !u.trim().is_empty()) else {
                tracing::warn!(%namespace, policy = %name, index, "wasm image without url; skipped");
                continue;
            };
            let image = normalize_image(url);
            let pull_secret = code.pointer("/image/pullSecretRef").and_then(|r| {
                let name = r.get("name").and_then(Value::as_str)?.to_string();
                let ns = r.get("namespace").and_then(Value::as_str).filter(|s| !s.is_empty());
                Some(SecretRef { namespace: ns.unwrap_or(&namespace).to_string(), name })
            });
            let checksum_known = code.get("sha256").and_then(Value::as_str).is_some()
                || code.pointer("/image/sha256").and_then(Value::as_str).is_some()
                || image.contains('@');
            let explicit = match code.get("pullPolicy").and_then(Value::as_str) {
                Some("Always") => Some(PullPolicy::Always),
                Some("IfNotPresent") => Some(PullPolicy::IfNotPresent),
                _ => None,
            };
            let pull_policy = if checksum_known {
                PullPolicy::IfNotPresent
            } else {
                explicit.unwrap_or(if image.ends_with(":latest") {
                    PullPolicy::Always
                } else {
                    PullPolicy::IfNotPresent
                })
            };
            images.push(WasmImage {
                namespace: namespace.clone(),
                policy: name.clone(),
                index,
                image,
                pull_secret,
                pull_policy,
            });
        }
        Some(Self { namespace, name, resource_version, images })
    }
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The registry refused these credentials for this image: retried only on a policy change.
    #[error("access denied: {0}")]
    Denied(String),
    /// Cannot succeed as written (e.g. an invalid reference): not retried.
    #[error("{0}")]
    Permanent(String),
    /// Worth retrying, with backoff.
    #[error("{0}")]
    Transient(String),
}

/// Pulls an image into the cache. Injectable so tests can count pulls without a registry; the
/// real one is [`RegistryFetcher`] (`Puller::pull` then `publish`).
pub trait ImageFetcher: Send + Sync + 'static {
    /// Whether `image` is cached under the same reference.
    fn is_cached(&self, image: &str) -> bool;
    /// Pulls `image` with `auth` and publishes it in the cache.
    fn pull<'a>(&'a self, image: &'a str, auth: &'a RegistryAuth) -> BoxFuture<'a, Result<(), FetchError>>;
    /// Whether `auth` may read `image` upstream, without pulling it.
    fn can_read<'a>(&'a self, image: &'a str, auth: &'a RegistryAuth) -> BoxFuture<'a, Result<bool, String>>;
    /// The images active policies name, which the cache must not evict; `None` while not
    /// known yet (a source has not synced), when nothing may be evicted.
    fn set_in_use(&self, _images: Option<&BTreeSet<String>>) {}
}

/// Where pull secrets come from: `Api<Secret>` in Kubernetes, Secret manifests on disk.
pub trait SecretSource: Send + Sync + 'static {
    /// The `.dockerconfigjson` of Secret `namespace/name`; `Ok(None)` when there is no such Secret.
    fn docker_config<'a>(&'a self, namespace: &'a str, name: &'a str)
        -> BoxFuture<'a, Result<Option<Vec<u8>>, String>>;
}

/// Which credentials each namespace reads each repository with: `(namespace, repository)` →
/// the pull-secret credentials of its current policies' images whose last pull or check
/// succeeded, each with the image it was read with.
pub type Bindings = crate::permissions::NamespaceBindings;

/// What the pre-puller learnt about access, for the permission layer (`permissions::Permissions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessEvent<'a> {
    /// The registry said whether `auth` may read `image`: after a pull with it, or a check.
    /// `namespace` is the namespace whose pull secret `auth` is (None: anonymous).
    Checked { namespace: Option<&'a str>, image: &'a str, auth: &'a RegistryAuth, allowed: bool },
    /// The whole set of namespace bindings, whenever it changes; the last one sent is current.
    Bindings(&'a Bindings),
}

/// Told every [`AccessEvent`], in order.
pub type AccessHook = Arc<dyn Fn(AccessEvent<'_>) + Send + Sync>;

/// The real fetcher: `Puller::pull` then `publish` into the cache, signed if a signer is set.
pub struct RegistryFetcher {
    puller: Arc<Puller>,
    cache: Arc<Cache>,
    signer: Option<Signer>,
}

impl RegistryFetcher {
    pub fn new(puller: Arc<Puller>, cache: Arc<Cache>) -> Self {
        Self { puller, cache, signer: None }
    }

    /// Signs each artifact as it is cached, before anyone can be served it.
    pub fn signing(mut self, signer: Option<Signer>) -> Self {
        self.signer = signer;
        self
    }
}

impl ImageFetcher for RegistryFetcher {
    fn is_cached(&self, image: &str) -> bool {
        parse_reference(image).is_ok_and(|r| self.cache.has_entry_intact(&r.whole()))
    }

    fn pull<'a>(&'a self, image: &'a str, auth: &'a RegistryAuth) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            let pulled = match self.puller.pull(image, auth).await {
                Ok(p) => p,
                Err(PullError::Reference(..)) => {
                    return Err(FetchError::Permanent(format!("invalid image reference {image:?}")))
                }
                Err(e) => {
                    // Tell a refusal of these credentials from any other failure.
                    if !matches!(auth, RegistryAuth::Anonymous)
                        && matches!(self.puller.can_read(image, auth).await, Ok(false))
                    {
                        return Err(FetchError::Denied(e.to_string()));
                    }
                    return Err(FetchError::Transient(e.to_string()));
                }
            };
            let private = !matches!(auth, RegistryAuth::Anonymous);
            let (cache, signer) = (Arc::clone(&self.cache), self.signer.clone());
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                publish::publish_signed(&cache, &pulled, private, signer.as_ref()).map_err(|e| e.to_string())?;
                Ok(())
            })
            .await
            .map_err(|e| FetchError::Transient(e.to_string()))?
            .map_err(FetchError::Transient)?;
            Ok(())
        })
    }

    fn can_read<'a>(&'a self, image: &'a str, auth: &'a RegistryAuth) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(self.puller.can_read(image, auth))
    }

    fn set_in_use(&self, images: Option<&BTreeSet<String>>) {
        let in_use = match images {
            Some(images) => {
                InUse::Only(images.iter().filter_map(|i| parse_reference(i).ok()).map(|r| r.whole()).collect())
            }
            None => InUse::All,
        };
        self.cache.set_in_use(in_use);
    }
}

/// Tuning of the pre-puller.
#[derive(Debug, Clone)]
pub struct PrefetchConfig {
    /// Pulls at once.
    pub concurrency: usize,
    /// Period of re-pulling `Always` images; zero disables.
    pub always_refresh: Duration,
    /// First retry delay; doubles per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The initial sync counts as settled ([`Prefetcher::settled`], `/status`, metrics) once
    /// each of its images is pulled or has failed this many times; retries go on regardless.
    /// Readiness does not wait for it.
    pub settle_attempts: u32,
    /// Period of reading every pull Secret in use again, so that a deleted or changed Secret
    /// unbinds its namespace.
    pub secret_recheck: Duration,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            always_refresh: Duration::from_secs(300),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            settle_attempts: 3,
            secret_recheck: Duration::from_secs(60),
        }
    }
}

/// A desired pull: an image and the Secret whose credentials pull it (none: anonymous).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub image: String,
    pub secret: Option<SecretRef>,
}

/// What happened to a target so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetStatus {
    Pending,
    Ready,
    Failed(String),
}

/// Policies are keyed by the source that reported them, so one source's re-list never drops
/// another's policies.
type PolicyKey = (String, String, String);

struct TargetState {
    policy: PullPolicy,
    /// Bumped whenever a (re-)pull is wanted.
    wanted: u64,
    wanted_at: Instant,
    running: bool,
    settled: bool,
    status: TargetStatus,
    last_ok: Option<Instant>,
    /// The credentials the last definitive outcome (pulled, checked, refused) was for; None
    /// when the secret could not be read. The secret's content may change.
    credential: Option<RegistryAuth>,
    /// Failed attempts since the last success, and the last one's error.
    failures: u32,
    last_error: Option<String>,
}

/// One target as `/status` and the metrics report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetReport {
    pub target: Target,
    /// Ready: cached and, with a pull secret, confirmed readable with it. Stays Ready while
    /// later refreshes fail (the cached module is still served); `failures` tells. A pull
    /// secret found gone or empty makes it Failed (its namespace is unbound).
    pub status: TargetStatus,
    /// Failed attempts since the last success.
    pub failures: u32,
    pub last_error: Option<String>,
    /// `namespace/name` of the policies naming the target.
    pub policies: Vec<String>,
}

/// What the pre-puller is doing, for `/status` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Every source delivered its initial sync, and each of its images was pulled or failed
    /// `settle_attempts` times.
    pub initial_sync_settled: bool,
    pub targets: Vec<TargetReport>,
}

struct State {
    policies: BTreeMap<PolicyKey, PolicyRecord>,
    targets: BTreeMap<Target, TargetState>,
    /// Sources whose initial sync has not arrived yet.
    pending_sources: BTreeSet<String>,
}

/// When an (image, credential) was last pulled; locked for the duration of a pull.
type PullSlot = Arc<tokio::sync::Mutex<Option<Instant>>>;

struct Inner {
    config: PrefetchConfig,
    fetcher: Arc<dyn ImageFetcher>,
    secrets: Arc<dyn SecretSource>,
    hook: AccessHook,
    permits: Semaphore,
    state: Mutex<State>,
    /// Last successful pull per (image, credential hash): targets that share credentials share pulls.
    pulled: Mutex<HashMap<(String, [u8; 32]), PullSlot>>,
    settled: watch::Sender<bool>,
    /// The bindings last sent to the hook.
    bindings: Mutex<Option<Bindings>>,
}

/// The source-independent pre-puller. Cheap to clone.
#[derive(Clone)]
pub struct Prefetcher {
    inner: Arc<Inner>,
}

enum Attempt {
    Done,
    Retry(String),
    /// The pull secret is gone or holds no credentials: unbound, and retried.
    NoSecret(String),
    GiveUp(String),
}

impl Prefetcher {
    /// A pre-puller that becomes settled once each of `sources` has delivered its initial sync
    /// and every image in it has settled. Must be created inside a Tokio runtime.
    pub fn new(
        config: PrefetchConfig,
        fetcher: Arc<dyn ImageFetcher>,
        secrets: Arc<dyn SecretSource>,
        hook: AccessHook,
        sources: &[&str],
    ) -> Self {
        let (settled, _) = watch::channel(false);
        let permits = Semaphore::new(config.concurrency.max(1));
        let state = State {
            policies: BTreeMap::new(),
            targets: BTreeMap::new(),
            pending_sources: sources.iter().map(|s| s.to_string()).collect(),
        };
        let this = Self {
            inner: Arc::new(Inner {
                config,
                fetcher,
                secrets,
                hook,
                permits,
                state: Mutex::new(state),
                pulled: Mutex::default(),
                settled,
                bindings: Mutex::default(),
            }),
        };
        {
            let weak = Arc::downgrade(&this.inner);
            let period = this.inner.config.secret_recheck.max(Duration::from_millis(10));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    Prefetcher { inner }.recheck_secrets().await;
                }
            });
        }
        if !this.inner.config.always_refresh.is_zero() {
            let weak = Arc::downgrade(&this.inner);
            let period = this.inner.config.always_refresh;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    Prefetcher { inner }.refresh_always();
                }
            });
        }
        this.publish_in_use(&this.lock());
        this.check_settled();
        this
    }

    /// Tells the fetcher which images are in use. Called under the state lock, so that the
    /// last set told is the current one.
    fn publish_in_use(&self, s: &State) {
        if s.pending_sources.is_empty() {
            let images: BTreeSet<String> = s.targets.keys().map(|t| t.image.clone()).collect();
            self.inner.fetcher.set_in_use(Some(&images));
        } else {
            self.inner.fetcher.set_in_use(None);
        }
    }

    /// Pulls again the targets whose image is one of `references` (normalised as the cache
    /// records them), e.g. after the cache dropped them for a corrupt blob.
    pub fn repull(&self, references: &[String]) {
        self.pull_again(|target, _| {
            let whole = parse_reference(&target.image).map(|r| r.whole());
            let wanted = whole.is_ok_and(|w| references.contains(&w));
            if wanted {
                tracing::info!(image = %target.image, "pulling again");
            }
            wanted
        });
    }

    /// Wants another pull of every target `pick` chooses, starting those not being pulled.
    fn pull_again(&self, pick: impl Fn(&Target, &TargetState) -> bool) {
        let mut to_start = vec![];
        {
            let mut s = self.lock();
            for (target, t) in s.targets.iter_mut().filter(|(target, t)| pick(target, t)) {
                t.wanted += 1;
                t.wanted_at = Instant::now();
                if !t.running {
                    t.running = true;
                    to_start.push(target.clone());
                }
            }
        }
        for target in to_start {
            self.spawn(target);
        }
    }

    /// A policy appeared or changed.
    pub fn upsert(&self, source: &str, policy: PolicyRecord) {
        self.change(|s| {
            s.policies.insert((source.to_string(), policy.namespace.clone(), policy.name.clone()), policy);
        });
    }

    /// A policy is gone.
    pub fn delete(&self, source: &str, namespace: &str, name: &str) {
        self.change(|s| {
            s.policies.remove(&(source.to_string(), namespace.to_string(), name.to_string()));
        });
    }

    /// Everything `source` sees now (after a list, re-list or scan): its other policies are gone.
    pub fn resync(&self, source: &str, policies: Vec<PolicyRecord>) {
        self.change(|s| {
            s.policies.retain(|(src, _, _), _| src != source);
            for p in policies {
                s.policies.insert((source.to_string(), p.namespace.clone(), p.name.clone()), p);
            }
            s.pending_sources.remove(source);
        });
        self.check_settled();
    }

    /// Every target of every known policy, with its status.
    pub fn desired(&self) -> BTreeMap<Target, TargetStatus> {
        self.lock().targets.iter().map(|(t, s)| (t.clone(), s.status.clone())).collect()
    }

    /// The images of [`Self::desired`].
    pub fn desired_images(&self) -> BTreeSet<String> {
        self.lock().targets.keys().map(|t| t.image.clone()).collect()
    }

    /// Becomes true once, after every source's initial sync has been pre-pulled (or each of
    /// its images failed `settle_attempts` times).
    pub fn settled(&self) -> watch::Receiver<bool> {
        self.inner.settled.subscribe()
    }

    pub async fn wait_settled(&self) {
        let mut rx = self.settled();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Every target with its status, failures and the policies naming it.
    pub fn report(&self) -> PrefetchReport {
        let s = self.lock();
        let mut naming: BTreeMap<Target, Vec<String>> = BTreeMap::new();
        for p in s.policies.values() {
            for img in &p.images {
                let target = Target { image: img.image.clone(), secret: img.pull_secret.clone() };
                let names = naming.entry(target).or_default();
                let name = format!("{}/{}", p.namespace, p.name);
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let targets = s
            .targets
            .iter()
            .map(|(target, t)| TargetReport {
                target: target.clone(),
                status: t.status.clone(),
                failures: t.failures,
                last_error: t.last_error.clone(),
                policies: naming.remove(target).unwrap_or_default(),
            })
            .collect();
        PrefetchReport { initial_sync_settled: *self.inner.settled.borrow(), targets }
    }

    /// Waits until no pull is running or wanted (tests, and orderly shutdown).
    pub async fn wait_idle(&self) {
        loop {
            let busy = self.lock().targets.values().any(|t| t.running);
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-pulls every `Always` target not already being pulled.
    pub fn refresh_always(&self) {
        self.pull_again(|_, t| t.policy == PullPolicy::Always);
    }

    /// Applies a change to the policy set and reconciles the targets.
    fn change(&self, apply: impl FnOnce(&mut State)) {
        let mut to_start = vec![];
        {
            let mut s = self.lock();
            let before: BTreeMap<PolicyKey, String> =
                s.policies.iter().map(|(k, p)| (k.clone(), p.resource_version.clone())).collect();
            apply(&mut s);
            // target -> (effective policy, referencing policies that are new or changed)
            let mut wanted: BTreeMap<Target, (PullPolicy, bool)> = BTreeMap::new();
            for (key, p) in &s.policies {
                let changed = before.get(key) != Some(&p.resource_version);
                for img in &p.images {
                    if let Some(secret) = &img.pull_secret {
                        if secret.namespace != img.namespace {
                            if changed {
                                tracing::warn!(
                                    namespace = %img.namespace, policy = %img.policy, image = %img.image,
                                    secret = %format!("{}/{}", secret.namespace, secret.name),
                                    "cross-namespace pullSecretRef needs a ReferenceGrant, which registry-cache does not evaluate; not pre-pulled"
                                );
                            }
                            continue;
                        }
                    }
                    let target = Target { image: img.image.clone(), secret: img.pull_secret.clone() };
                    let entry = wanted.entry(target).or_insert((img.pull_policy, false));
                    entry.0 = entry.0.max(img.pull_policy);
                    entry.1 |= changed;
                }
            }
            s.targets.retain(|t, _| wanted.contains_key(t));
            for (target, (policy, changed)) in wanted {
                let state = s.targets.entry(target.clone()).or_insert_with(|| TargetState {
                    policy,
                    wanted: 0,
                    wanted_at: Instant::now(),
                    running: false,
                    settled: false,
                    status: TargetStatus::Pending,
                    last_ok: None,
                    credential: None,
                    failures: 0,
                    last_error: None,
                });
                let fresh = state.wanted == 0;
                let became_always = policy == PullPolicy::Always && state.policy != PullPolicy::Always;
                state.policy = policy;
                let repull = fresh
                    || (changed && (policy == PullPolicy::Always || state.status != TargetStatus::Ready))
                    || became_always;
                if repull {
                    state.wanted += 1;
                    state.wanted_at = Instant::now();
                    if !state.running {
                        state.running = true;
                        to_start.push(target);
                    }
                }
            }
            // Before any pull starts, so that none evicts what the policies now name.
            self.publish_in_use(&s);
        }
        self.publish_bindings();
        for target in to_start {
            self.spawn(target);
        }
        self.check_settled();
    }

    fn check_settled(&self) {
        let settled = {
            let s = self.lock();
            s.pending_sources.is_empty() && s.targets.values().all(|t| t.settled)
        };
        if settled && !*self.inner.settled.borrow() {
            tracing::info!("initial sync pre-pulled");
            self.inner.settled.send_replace(true);
        }
    }

    fn spawn(&self, target: Target) {
        let this = self.clone();
        tokio::spawn(async move { this.work(target).await });
    }

    /// Pulls `target` until it is current, gone, or failed for good.
    async fn work(&self, target: Target) {
        let mut failures: u32 = 0;
        loop {
            let (generation, policy, wanted_at) = {
                let s = self.lock();
                let Some(t) = s.targets.get(&target) else { return };
                (t.wanted, t.policy, t.wanted_at)
            };
            let (attempt, credential) = self.attempt(&target, policy, wanted_at).await;
            let next = self.record_attempt(&target, generation, attempt, credential, &mut failures);
            self.publish_bindings();
            self.check_settled();
            match next {
                None => return,
                Some(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
                Some(_) => {}
            }
        }
    }

    /// Records the outcome of one attempt; `None` when the work is done, else the delay
    /// before the next attempt.
    fn record_attempt(
        &self,
        target: &Target,
        generation: u64,
        attempt: Attempt,
        credential: Option<RegistryAuth>,
        failures: &mut u32,
    ) -> Option<Duration> {
        let config = &self.inner.config;
        let mut s = self.lock();
        // Gone while the attempt ran: nothing to record, nothing to bind.
        let t = s.targets.get_mut(target)?;
        let no_secret = matches!(attempt, Attempt::NoSecret(_));
        match attempt {
            Attempt::Done => {
                t.status = TargetStatus::Ready;
                t.last_ok = Some(Instant::now());
                t.settled = true;
                t.credential = credential;
                t.failures = 0;
                t.last_error = None;
                *failures = 0;
            }
            Attempt::GiveUp(e) => {
                tracing::warn!(image = %target.image, error = %e, "not pre-pulled");
                t.failures += 1;
                t.last_error = Some(e.clone());
                t.status = TargetStatus::Failed(e);
                t.settled = true;
                t.credential = credential;
            }
            Attempt::Retry(e) | Attempt::NoSecret(e) => {
                *failures += 1;
                t.failures += 1;
                t.last_error = Some(e.clone());
                tracing::warn!(image = %target.image, error = %e, failures = *failures, "pre-pull failed; retrying");
                // A transient failure keeps what was pulled; a secret gone takes the binding.
                if t.status != TargetStatus::Ready || no_secret {
                    t.status = TargetStatus::Failed(e);
                }
                if no_secret {
                    t.credential = None;
                }
                if *failures >= config.settle_attempts {
                    t.settled = true;
                }
                let exp = config.initial_backoff.saturating_mul(1u32 << (*failures - 1).min(20));
                return Some(exp.min(config.max_backoff));
            }
        }
        // Wanted again while this attempt ran (e.g. an `Always` policy changed): go on.
        if t.wanted == generation {
            t.running = false;
            None
        } else {
            Some(Duration::ZERO)
        }
    }

    /// Sends the current bindings if they changed. Computed and sent under one lock, so the
    /// last set sent is always the current one, whichever task sends it.
    fn publish_bindings(&self) {
        let mut last = self.inner.bindings.lock().unwrap_or_else(|e| e.into_inner());
        let mut bindings = Bindings::new();
        for (target, t) in &self.lock().targets {
            let (Some(secret), Some(auth), TargetStatus::Ready) = (&target.secret, &t.credential, &t.status) else {
                continue;
            };
            // A secret without credentials for the registry binds nothing.
            if *auth == RegistryAuth::Anonymous {
                continue;
            }
            let key = (secret.namespace.clone(), repository_of(&target.image));
            let creds = bindings.entry(key).or_default();
            if !creds.iter().any(|c| c.auth == *auth) {
                creds.push(BoundCredential::new(&target.image, auth));
            }
        }
        if last.as_ref() != Some(&bindings) {
            (self.inner.hook)(AccessEvent::Bindings(&bindings));
            *last = Some(bindings);
        }
    }

    fn tell(&self, target: &Target, auth: &RegistryAuth, allowed: bool) {
        let namespace = target.secret.as_ref().map(|s| s.namespace.as_str());
        (self.inner.hook)(AccessEvent::Checked { namespace, image: &target.image, auth, allowed });
    }

    async fn resolve_auth(&self, target: &Target) -> Result<RegistryAuth, Attempt> {
        let Some(secret) = &target.secret else { return Ok(RegistryAuth::Anonymous) };
        let config = self.inner.secrets.docker_config(&secret.namespace, &secret.name).await;
        auth_from(secret, &target.image, config)
    }

    /// One attempt, and the credentials it was made with (None: no secret read).
    async fn attempt(
        &self,
        target: &Target,
        policy: PullPolicy,
        wanted_at: Instant,
    ) -> (Attempt, Option<RegistryAuth>) {
        let auth = match self.resolve_auth(target).await {
            Ok(a) => a,
            Err(attempt) => return (attempt, None),
        };
        let credential = target.secret.as_ref().map(|_| auth.clone());
        (self.attempt_with(target, policy, wanted_at, auth).await, credential)
    }

    /// Reads every pull Secret in use again (each once). A namespace whose Secret is gone or
    /// holds no credentials is unbound; one whose credentials changed is unbound and its image
    /// checked (or pulled) with the new ones. A Secret that cannot be read (API server down)
    /// changes nothing: the registry's answer for the credentials is still re-checked.
    pub async fn recheck_secrets(&self) {
        let targets: Vec<(Target, SecretRef)> = {
            let s = self.lock();
            s.targets.keys().filter_map(|t| t.secret.clone().map(|secret| (t.clone(), secret))).collect()
        };
        let mut configs: BTreeMap<SecretRef, Result<Option<Vec<u8>>, String>> = BTreeMap::new();
        for (_, secret) in &targets {
            if !configs.contains_key(secret) {
                let config = self.inner.secrets.docker_config(&secret.namespace, &secret.name).await;
                configs.insert(secret.clone(), config);
            }
        }
        let mut to_start = vec![];
        {
            let mut s = self.lock();
            for (target, secret) in targets {
                let Some(config) = configs.get(&secret) else { continue };
                let Some(t) = s.targets.get_mut(&target) else { continue };
                match auth_from(&secret, &target.image, config.clone()) {
                    Ok(auth) if t.credential.as_ref() == Some(&auth) => {}
                    Ok(_) => {
                        tracing::info!(image = %target.image, secret = %format!("{}/{}", secret.namespace, secret.name), "pull secret changed; checking the new credentials");
                        if t.status == TargetStatus::Ready {
                            t.status = TargetStatus::Pending;
                        }
                        t.credential = None;
                        t.wanted += 1;
                        t.wanted_at = Instant::now();
                        if !t.running {
                            t.running = true;
                            to_start.push(target);
                        }
                    }
                    Err(Attempt::NoSecret(e)) if t.credential.is_some() || t.status == TargetStatus::Ready => {
                        tracing::warn!(image = %target.image, error = %e, "pull secret gone; namespace unbound");
                        t.failures += 1;
                        t.last_error = Some(e.clone());
                        t.status = TargetStatus::Failed(e);
                        t.credential = None;
                    }
                    Err(Attempt::Retry(e)) => {
                        tracing::warn!(image = %target.image, error = %e, "pull secret not read again; keeping what it gave");
                    }
                    Err(_) => {}
                }
            }
        }
        self.publish_bindings();
        for target in to_start {
            self.spawn(target);
        }
    }

    async fn attempt_with(
        &self,
        target: &Target,
        policy: PullPolicy,
        wanted_at: Instant,
        auth: RegistryAuth,
    ) -> Attempt {
        let key = (target.image.clone(), credential_hash(&auth));
        let slot = {
            let mut pulled = self.inner.pulled.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(pulled.entry(key).or_default())
        };
        let mut last = slot.lock().await;
        let Ok(_permit) = self.inner.permits.acquire().await else { return Attempt::GiveUp("shutting down".into()) };
        // Another target with the same credentials pulled this image since we asked.
        if last.is_some_and(|at| at >= wanted_at) {
            return Attempt::Done;
        }
        let fetcher = &self.inner.fetcher;
        if policy == PullPolicy::IfNotPresent && fetcher.is_cached(&target.image) {
            if matches!(auth, RegistryAuth::Anonymous) {
                *last = Some(Instant::now());
                return Attempt::Done;
            }
            return match fetcher.can_read(&target.image, &auth).await {
                Ok(allowed) => {
                    self.tell(target, &auth, allowed);
                    if allowed {
                        *last = Some(Instant::now());
                        Attempt::Done
                    } else {
                        Attempt::GiveUp(format!("pull secret may not read {}", target.image))
                    }
                }
                Err(e) => Attempt::Retry(e),
            };
        }
        match fetcher.pull(&target.image, &auth).await {
            Ok(()) => {
                *last = Some(Instant::now());
                self.tell(target, &auth, true);
                tracing::info!(image = %target.image, "pre-pulled");
                Attempt::Done
            }
            Err(FetchError::Denied(e)) => {
                self.tell(target, &auth, false);
                Attempt::GiveUp(format!("access denied: {e}"))
            }
            Err(FetchError::Permanent(e)) => Attempt::GiveUp(e),
            Err(FetchError::Transient(e)) => Attempt::Retry(e),
        }
    }
}

/// The credentials `secret` (its `docker_config` read as `config`) gives for `image`.
fn auth_from(
    secret: &SecretRef,
    image: &str,
    config: Result<Option<Vec<u8>>, String>,
) -> Result<RegistryAuth, Attempt> {
    let name = format!("{}/{}", secret.namespace, secret.name);
    let config = match config {
        Ok(Some(c)) => c,
        Ok(None) => return Err(Attempt::NoSecret(format!("pull secret {name} not found"))),
        Err(e) => return Err(Attempt::Retry(format!("pull secret {name}: {e}"))),
    };
    let auths =
        auth::parse_docker_config(&config).map_err(|e| Attempt::NoSecret(format!("pull secret {name}: {e}")))?;
    let reference = parse_reference(image).map_err(|e| Attempt::GiveUp(e.to_string()))?;
    Ok(auth::for_registry(&auths, reference.resolve_registry()))
}

/// Parses every document of a (multi-document) YAML or JSON text.
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = vec![];
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Starts the sources `settings` names around a new [`Prefetcher`]; `None` when none is
/// configured. The Kubernetes source uses the in-cluster config or `KUBECONFIG`.
pub async fn start(
    settings: &config::Settings,
    fetcher: Arc<dyn ImageFetcher>,
    hook: AccessHook,
) -> anyhow::Result<Option<Prefetcher>> {
    let kube_enabled = settings.sources.kubernetes.enabled;
    let dirs = settings.sources.directories.clone();
    if !kube_enabled && dirs.is_empty() {
        return Ok(None);
    }
    let mut names = vec![];
    if !dirs.is_empty() {
        names.push(files::SOURCE);
    }
    let file_secrets = files::FileSecrets::default();
    #[cfg(feature = "kubernetes")]
    let prefetcher = {
        let client = if kube_enabled { Some(kube::Client::try_default().await?) } else { None };
        if client.is_some() {
            names.push(kubernetes::SOURCE);
        }
        let secrets: Arc<dyn SecretSource> = match &client {
            Some(c) => Arc::new(kubernetes::KubeSecrets::new(c.clone()).with_fallback(file_secrets.clone())),
            None => Arc::new(file_secrets.clone()),
        };
        let prefetcher = Prefetcher::new(settings.prefetch.to_config(), fetcher, secrets, hook, &names);
        if let Some(client) = client {
            tokio::spawn(kubernetes::run(client, prefetcher.clone()));
        }
        prefetcher
    };
    #[cfg(not(feature = "kubernetes"))]
    let prefetcher = {
        anyhow::ensure!(!kube_enabled, "this registry-cache was built without the `kubernetes` feature");
        Prefetcher::new(settings.prefetch.to_config(), fetcher, Arc::new(file_secrets.clone()), hook, &names)
    };
    if !dirs.is_empty() {
        let interval = Duration::from_secs(settings.sources.rescan_seconds.max(1));
        tokio::spawn(files::run(dirs, interval, prefetcher.clone(), file_secrets));
    }
    Ok(Some(prefetcher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(url: &str, extra: Value) -> Value {
        let mut code = json!({"type": "Image", "image": {"url": url}});
        if let (Some(c), Some(e)) = (code.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                if k == "pullSecretRef" {
                    c["image"]["pullSecretRef"] = v.clone();
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyExtensionPolicy",
            "metadata": {"name": "p", "namespace": "team-a", "resourceVersion": "7"},
            "spec": {"wasm": [{"name": "w", "code": code}, {"name": "h", "code": {"type": "HTTP", "http": {"url": "https://x/y.wasm"}}}]}
        })
    }

    fn one(url: &str, extra: Value) -> WasmImage {
        let p = PolicyRecord::from_value(&policy(url, extra)).unwrap();
        assert_eq!(p.images.len(), 1, "HTTP sources are not images");
        p.images.into_iter().next().unwrap()
    }

    #[test]
    fn normalizes_like_envoy_gateway() {
        assert_eq!(normalize_image("oci://reg.example/a/b"), "reg.example/a/b:latest");
        assert_eq!(normalize_image("reg.example:5000/a/b"), "reg.example:5000/a/b:latest");
        assert_eq!(normalize_image("reg.example:5000/a/b:v1"), "reg.example:5000/a/b:v1");
        assert_eq!(normalize_image("reg.example/a@sha256:abc"), "reg.example/a@sha256:abc");
    }

    #[test]
    fn pull_policy_defaults_and_overrides() {
        assert_eq!(one("reg/a:v1", json!({})).pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(one("reg/a", json!({})).pull_policy, PullPolicy::Always);
        assert_eq!(one("reg/a:latest", json!({})).pull_policy, PullPolicy::Always);
        assert_eq!(one("reg/a:latest", json!({"pullPolicy": "IfNotPresent"})).pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(one("reg/a:v1", json!({"pullPolicy": "Always"})).pull_policy, PullPolicy::Always);
        let digest = format!("reg/a@sha256:{}", "0".repeat(64));
        assert_eq!(one(&digest, json!({"pullPolicy": "Always"})).pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(
            one("reg/a:v1", json!({"pullPolicy": "Always", "sha256": "ab"})).pull_policy,
            PullPolicy::IfNotPresent
        );
    }

    #[test]
    fn pull_secret_namespace_defaults_to_the_policys() {
        let w = one("reg/a:v1", json!({"pullSecretRef": {"name": "regcred"}}));
        assert_eq!(w.pull_secret, Some(SecretRef { namespace: "team-a".into(), name: "regcred".into() }));
        let w = one("reg/a:v1", json!({"pullSecretRef": {"name": "regcred", "namespace": "other"}}));
        assert_eq!(w.pull_secret, Some(SecretRef { namespace: "other".into(), name: "regcred".into() }));
        assert_eq!((w.namespace.as_str(), w.policy.as_str(), w.index), ("team-a", "p", 0));
    }

    #[test]
    fn other_kinds_are_ignored() {
        assert!(PolicyRecord::from_value(&json!({"kind": "Secret"})).is_none());
        assert!(
            PolicyRecord::from_value(&json!({"apiVersion": "other.io/v1", "kind": "EnvoyExtensionPolicy"})).is_none()
        );
    }
}
