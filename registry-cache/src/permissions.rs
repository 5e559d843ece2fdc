//! Who may read a private artifact, answered from memory.
//!
//! A private artifact (one pulled with credentials) is served only to a client that has shown
//! the upstream registry accepts its credentials for the artifact's repository. Two kinds of
//! proof exist:
//!
//! - **Credentials**: an OCI client sends registry credentials (HTTP Basic). The cache asks the
//!   upstream once whether they may read the repository, then answers from memory.
//! - **Namespace bindings**: a policy in namespace N names pull secret S for image I, and the
//!   cache pulled I with S (or checked S against I). N is then bound to I through S, and a
//!   `/wasm/<sha256>.wasm` URL carrying a token for (N, module) is served for as long as S
//!   still reads I. Tokens are HMAC-SHA256 under a key only the cache holds, so a URL rendered
//!   for one namespace cannot be edited into one for another.
//!
//! Every answer is re-checked in the background before its TTL runs out. A check that fails
//! (upstream down, timeout) keeps the last answer for a while, so a registry outage does not
//! take modules away; the upstream saying no revokes it at once. An allowed answer no check has
//! confirmed for `MAX_AGE_TTLS` TTLs is not trusted any more: failures then deny.
//!
//! Clients choose what credentials they send, so nothing they send may cost the namespaces
//! their URLs or the registry more than a fixed rate of requests:
//!
//! - Answers for the credentials namespace bindings use are kept apart from the `MAX_GRANTS`
//!   answers for what clients send: never evicted, never dropped as unused, and re-checked
//!   even when refused. One that is missing is asked for when a URL needs it.
//! - Concurrent questions about the same credentials share one upstream check.
//! - Credentials the cache has no answer for are checked upstream at most
//!   `NEW_CREDENTIAL_CHECK_BURST` at once, refilled at `NEW_CREDENTIAL_CHECKS_PER_SECOND`;
//!   past that they are refused without asking, and without remembering the refusal.

use crate::cache::Entry;
use crate::pull::parse_reference;
use futures::future::{BoxFuture, FutureExt as _, Shared};
use hmac::{Hmac, Mac};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Asks the upstream registry whether `auth` may read `reference`.
pub type AccessCheck =
    Arc<dyn Fn(String, RegistryAuth) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send>> + Send + Sync>;

/// The check `serve` uses: ask the upstream registry through `puller`.
pub fn upstream_access_check(puller: Arc<crate::pull::Puller>) -> AccessCheck {
    Arc::new(move |reference, auth| {
        let puller = Arc::clone(&puller);
        Box::pin(async move { puller.can_read(&reference, &auth).await })
    })
}

type CredentialKey = (String, [u8; 32]);

/// Credentials a namespace reads a repository with (its pull secret's), and the image the
/// pre-puller read with them: what a missing answer is checked against.
#[derive(Clone, PartialEq, Eq)]
pub struct BoundCredential {
    pub reference: String,
    pub auth: RegistryAuth,
}

impl BoundCredential {
    pub fn new(reference: &str, auth: &RegistryAuth) -> Self {
        Self { reference: reference.to_string(), auth: auth.clone() }
    }

    pub fn hash(&self) -> [u8; 32] {
        credential_hash(&self.auth)
    }
}

/// Shows which credentials without showing them.
impl std::fmt::Debug for BoundCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} with credentials {}", self.reference, hex::encode(&self.hash()[..6]))
    }
}

/// `(namespace, repository)` → the credentials the namespace reads it with.
pub type NamespaceBindings = HashMap<(String, String), Vec<BoundCredential>>;

#[derive(Clone)]
struct Grant {
    allowed: bool,
    checked: Instant,
    /// Last asked about: grants nobody asks about are dropped instead of re-checked.
    used: Instant,
    /// Kept to re-check in the background.
    reference: String,
    auth: RegistryAuth,
}

/// At most this many answers for the credentials clients send are kept (least recently used
/// go first): each client with new credentials adds one, so the table must not grow with what
/// clients send. Answers for credentials a namespace binding uses come on top.
pub const MAX_GRANTS: usize = 10_000;

/// Upstream checks of credentials the cache has no answer for: at most this many at once...
pub const NEW_CREDENTIAL_CHECK_BURST: u32 = 20;
/// ...and this many a second after that, whatever clients send. With `Puller::can_read`'s
/// `MAX_UPSTREAM_REQUESTS_PER_CHECK` that bounds what a flood of made-up credentials costs the
/// registry; credentials past it are refused as if the registry had said no (not remembered).
pub const NEW_CREDENTIAL_CHECKS_PER_SECOND: u32 = 10;

/// An allowed answer that no check has confirmed for this many TTLs (20 minutes with the
/// default 300 s) denies: access taken away upstream during a registry outage is not kept
/// forever.
pub const MAX_AGE_TTLS: u32 = 4;

/// Background re-checks run this many at a time, so one slow registry does not hold up the rest.
const REFRESH_CONCURRENCY: usize = 8;

/// What a check over budget answers.
const OVER_BUDGET: &str = "too many new credentials to check; refused without asking the registry";

/// One upstream check, shared by everyone who asks the same question while it runs.
type Flight = Shared<BoxFuture<'static, Result<bool, String>>>;

/// A token bucket for checks of credentials the cache has no answer for.
struct CheckBudget {
    tokens: f64,
    refilled: Instant,
}

impl CheckBudget {
    fn new() -> Self {
        Self { tokens: f64::from(NEW_CREDENTIAL_CHECK_BURST), refilled: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * f64::from(NEW_CREDENTIAL_CHECKS_PER_SECOND);
        self.tokens = (self.tokens + earned).min(f64::from(NEW_CREDENTIAL_CHECK_BURST));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct Bindings {
    /// (namespace, repository) -> the credentials the namespace's policies use for it.
    namespaces: NamespaceBindings,
    /// Every credential of `namespaces`, by the key its answer is kept under.
    bound: HashMap<CredentialKey, BoundCredential>,
}

impl Bindings {
    fn set(&mut self, namespaces: NamespaceBindings) {
        self.bound = namespaces
            .iter()
            .flat_map(|((_, repository), creds)| creds.iter().map(|c| ((repository.clone(), c.hash()), c.clone())))
            .collect();
        self.namespaces = namespaces;
    }
}

/// What the checks running in the background share with `Permissions`.
struct Tables {
    grants: Mutex<HashMap<CredentialKey, Grant>>,
    bindings: Mutex<Bindings>,
    inflight: Mutex<HashMap<CredentialKey, Flight>>,
    budget: Mutex<CheckBudget>,
}

impl Tables {
    /// Records an answer. A new answer for credentials no binding uses may evict the least
    /// recently used of those; answers bindings use are never evicted.
    fn record(&self, key: CredentialKey, grant: Grant, touch: bool) {
        let bindings = lock(&self.bindings);
        let mut grants = lock(&self.grants);
        if let Some(g) = grants.get_mut(&key) {
            g.allowed = grant.allowed;
            g.checked = grant.checked;
            if touch {
                g.used = grant.used;
            }
            return;
        }
        if !bindings.bound.contains_key(&key) {
            let pinned = bindings.bound.keys().filter(|k| grants.contains_key(*k)).count();
            if grants.len() - pinned >= MAX_GRANTS {
                let oldest =
                    grants.iter().filter(|(k, _)| !bindings.bound.contains_key(*k)).min_by_key(|(_, g)| g.used);
                if let Some(oldest) = oldest.map(|(k, _)| k.clone()) {
                    grants.remove(&oldest);
                }
            }
        }
        grants.insert(key, grant);
    }
}

/// Takes a finished (or panicked) check out of the in-flight table.
struct Landing {
    tables: Arc<Tables>,
    key: CredentialKey,
}

impl Drop for Landing {
    fn drop(&mut self) {
        lock(&self.tables.inflight).remove(&self.key);
    }
}

pub struct Permissions {
    ttl: Duration,
    check: AccessCheck,
    tables: Arc<Tables>,
    url_key: Vec<u8>,
    /// Questions about new credentials refused over the budget, without asking the registry.
    refused_over_budget: prometheus_client::metrics::counter::Counter,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fixed-size key for credentials, so they are compared and kept without their text.
pub fn credential_hash(auth: &RegistryAuth) -> [u8; 32] {
    let text = match auth {
        RegistryAuth::Anonymous => String::new(),
        RegistryAuth::Basic(u, p) => format!("basic\0{u}\0{p}"),
        RegistryAuth::Bearer(t) => format!("bearer\0{t}"),
    };
    Sha256::digest(text.as_bytes()).into()
}

/// `registry/repository` of a reference: the unit registries grant access to.
pub fn repository_of(reference: &str) -> String {
    parse_reference(reference).map(|r| format!("{}/{}", r.registry(), r.repository())).unwrap_or_default()
}

/// Shortest URL signing key accepted, in bytes.
pub const MIN_URL_KEY_BYTES: usize = 32;

fn url_mac(key: &[u8], namespace: &str, module: &str) -> Option<Hmac<Sha256>> {
    if key.len() < MIN_URL_KEY_BYTES {
        return None;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    mac.update(b"registry-cache/wasm-url/v1\0");
    mac.update(namespace.as_bytes());
    mac.update(b"\0");
    mac.update(module.as_bytes());
    Some(mac)
}

/// The token that lets `namespace` fetch `module` (a sha256 digest) by URL, under `key`.
/// None if the key is shorter than `MIN_URL_KEY_BYTES`.
pub fn url_token(key: &[u8], namespace: &str, module: &str) -> Option<String> {
    url_mac(key, namespace, module).map(|mac| hex::encode(mac.finalize().into_bytes()))
}

impl Permissions {
    /// `url_key` signs `/wasm` URL tokens; with a key shorter than `MIN_URL_KEY_BYTES` no token
    /// is ever valid.
    pub fn new(ttl: Duration, check: AccessCheck) -> Self {
        Self::with_url_key(ttl, check, Vec::new())
    }

    pub fn with_url_key(ttl: Duration, check: AccessCheck, url_key: Vec<u8>) -> Self {
        let tables = Tables {
            grants: Mutex::default(),
            bindings: Mutex::default(),
            inflight: Mutex::default(),
            budget: Mutex::new(CheckBudget::new()),
        };
        Self { ttl, check, tables: Arc::new(tables), url_key, refused_over_budget: Default::default() }
    }

    /// How old an allowed answer may be, unconfirmed, and still allow.
    fn max_age(&self) -> Duration {
        self.ttl.saturating_mul(MAX_AGE_TTLS)
    }

    /// Whether `auth` may read `entry`: public entries are open to all.
    pub async fn allows(&self, entry: &Entry, auth: Option<RegistryAuth>) -> bool {
        !entry.private || self.allows_reference(&entry.reference, auth).await
    }

    /// Whether `auth` may read `reference` (a private artifact). Known answers come from
    /// memory (the background refresh renews them); a first question waits on the upstream,
    /// within the budget for new credentials, and so does one whose answer is twice the TTL
    /// old, i.e. when no refresher runs.
    pub async fn allows_reference(&self, reference: &str, auth: Option<RegistryAuth>) -> bool {
        let Some(auth) = auth else { return false };
        let key = (repository_of(reference), credential_hash(&auth));
        let known = lock(&self.tables.grants).get_mut(&key).map(|g| {
            g.used = Instant::now();
            (g.allowed, g.checked.elapsed())
        });
        if let Some((allowed, age)) = known {
            if age < self.ttl.saturating_mul(2) {
                return allowed;
            }
        }
        let new = known.is_none() && !lock(&self.tables.bindings).bound.contains_key(&key);
        match self.ask(key, reference, &auth, new).await {
            Ok(allowed) => allowed,
            Err(e) => {
                let max_age = self.max_age();
                if e != OVER_BUDGET {
                    tracing::warn!(error = %e, %reference, "access check failed; using the last answer if it is younger than {max_age:?}");
                }
                known.is_some_and(|(allowed, age)| allowed && age < max_age)
            }
        }
    }

    /// Asks the upstream whether `auth` may read `reference`, sharing a check already running
    /// for the same key, and records the answer. A check for `new` credentials needs the budget.
    async fn ask(&self, key: CredentialKey, reference: &str, auth: &RegistryAuth, new: bool) -> Result<bool, String> {
        let flight = {
            let mut inflight = lock(&self.tables.inflight);
            match inflight.get(&key) {
                Some(flight) => flight.clone(),
                None => {
                    if new && !lock(&self.tables.budget).take() {
                        self.refused_over_budget.inc();
                        return Err(OVER_BUDGET.to_string());
                    }
                    let (tables, check) = (Arc::clone(&self.tables), Arc::clone(&self.check));
                    let (reference, auth, task_key) = (reference.to_string(), auth.clone(), key.clone());
                    // Spawned, so that the answer is recorded even if every client asking gives up.
                    let task = tokio::spawn(async move {
                        let landing = Landing { tables, key: task_key };
                        let answer = check(reference.clone(), auth.clone()).await;
                        if let Ok(allowed) = answer {
                            let now = Instant::now();
                            let grant = Grant { allowed, checked: now, used: now, reference, auth };
                            landing.tables.record(landing.key.clone(), grant, false);
                        }
                        answer
                    });
                    let flight = async move { task.await.unwrap_or_else(|e| Err(e.to_string())) }.boxed().shared();
                    inflight.insert(key, flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    /// Records what the upstream said about `auth` and `reference`, e.g. after a pull with it.
    pub fn record(&self, reference: &str, auth: &RegistryAuth, allowed: bool) {
        let key = (repository_of(reference), credential_hash(auth));
        let now = Instant::now();
        let grant = Grant { allowed, checked: now, used: now, reference: reference.to_string(), auth: auth.clone() };
        self.tables.record(key, grant, true);
    }

    /// Counts questions about new credentials refused over the budget (shares its count).
    pub fn refused_over_budget(&self) -> prometheus_client::metrics::counter::Counter {
        self.refused_over_budget.clone()
    }

    /// How many answers are kept.
    pub fn grant_count(&self) -> usize {
        lock(&self.tables.grants).len()
    }

    /// Namespace `namespace` uses `auth` (its pull secret) for `reference`.
    pub fn bind_namespace(&self, namespace: &str, reference: &str, auth: &RegistryAuth) {
        let mut bindings = lock(&self.tables.bindings);
        let mut namespaces = std::mem::take(&mut bindings.namespaces);
        namespaces
            .insert((namespace.to_string(), repository_of(reference)), vec![BoundCredential::new(reference, auth)]);
        bindings.set(namespaces);
    }

    /// The policy is gone: the namespace no longer gets the artifact by token.
    pub fn unbind_namespace(&self, namespace: &str, reference: &str) {
        let mut bindings = lock(&self.tables.bindings);
        let mut namespaces = std::mem::take(&mut bindings.namespaces);
        namespaces.remove(&(namespace.to_string(), repository_of(reference)));
        bindings.set(namespaces);
    }

    /// Replaces every binding: the pre-puller's view of which namespace reads what, with
    /// which credentials (see `sources::Bindings`).
    pub fn set_bindings(&self, bindings: NamespaceBindings) {
        lock(&self.tables.bindings).set(bindings);
    }

    /// Whether `namespace` is bound to `reference` through credentials the upstream accepts.
    /// An answer for those credentials that is missing is asked for (outside the budget for
    /// new credentials: bindings come from policies, not from clients).
    pub async fn namespace_allows(&self, namespace: &str, reference: &str) -> bool {
        let repository = repository_of(reference);
        let key = (namespace.to_string(), repository.clone());
        let Some(creds) = lock(&self.tables.bindings).namespaces.get(&key).cloned() else {
            return false;
        };
        let max_age = self.max_age();
        let mut missing = vec![];
        for cred in creds {
            let key = (repository.clone(), cred.hash());
            match lock(&self.tables.grants).get(&key) {
                Some(g) if g.allowed && g.checked.elapsed() < max_age => return true,
                Some(_) => {}
                None => missing.push((key, cred)),
            }
        }
        for (key, cred) in missing {
            match self.ask(key, &cred.reference, &cred.auth, false).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, reference = %cred.reference, %namespace, "checking a namespace's pull secret failed")
                }
            }
        }
        false
    }

    /// The token for `namespace` to fetch `module` (a sha256 digest) by URL.
    pub fn url_token(&self, namespace: &str, module: &str) -> Option<String> {
        url_token(&self.url_key, namespace, module)
    }

    /// Checks a URL token, in constant time. Only the form `url_token` issues is accepted
    /// (the whole MAC in lowercase hex): no other spelling of a token is a second valid URL.
    pub fn token_valid(&self, namespace: &str, module: &str, token: &str) -> bool {
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return false;
        }
        let (Some(mac), Ok(given)) = (url_mac(&self.url_key, namespace, module), hex::decode(token)) else {
            return false;
        };
        mac.verify_slice(&given).is_ok()
    }

    /// Re-checks every answer older than half the TTL, and asks for the missing answers of
    /// credentials bindings use. A failed check keeps the answer, up to `MAX_AGE_TTLS`.
    pub async fn refresh(&self) -> RefreshReport {
        use futures::StreamExt as _;
        let bound = lock(&self.tables.bindings).bound.clone();
        let mut report = RefreshReport::default();
        let due: Vec<(CredentialKey, Grant)> = {
            let mut grants = lock(&self.tables.grants);
            // Refusals are asked again on next use, not kept fresh; answers nobody used for two
            // TTLs likewise. Answers bindings use are kept, refusals included: the registry
            // may grant access again, and nobody asks for a namespace URL's answer but Envoy.
            let before = grants.len();
            grants.retain(|k, g| {
                let stale = g.checked.elapsed() >= self.ttl;
                let unused = g.used.elapsed() >= self.ttl.saturating_mul(2);
                bound.contains_key(k) || !((!g.allowed && stale) || (g.allowed && unused))
            });
            report.dropped = before - grants.len();
            let now = Instant::now();
            let mut due: Vec<(CredentialKey, Grant)> = grants
                .iter()
                .filter(|(k, g)| (g.allowed || bound.contains_key(*k)) && g.checked.elapsed() >= self.ttl / 2)
                .map(|(k, g)| (k.clone(), g.clone()))
                .collect();
            due.extend(bound.iter().filter(|(k, _)| !grants.contains_key(*k)).map(|(k, c)| {
                let missing = Grant {
                    allowed: false,
                    checked: now,
                    used: now,
                    reference: c.reference.clone(),
                    auth: c.auth.clone(),
                };
                (k.clone(), missing)
            }));
            due
        };
        let checks = futures::stream::iter(due)
            .map(|(key, grant)| async move {
                let answer = self.ask(key.clone(), &grant.reference, &grant.auth, false).await;
                (key, grant, answer)
            })
            .buffer_unordered(REFRESH_CONCURRENCY);
        tokio::pin!(checks);
        while let Some((key, grant, answer)) = checks.next().await {
            match answer {
                // `ask` recorded it.
                Ok(allowed) => {
                    report.checked += 1;
                    if grant.allowed && !allowed {
                        report.revoked += 1;
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    if grant.allowed && grant.checked.elapsed() >= self.max_age() {
                        report.expired += 1;
                        if let Some(g) = lock(&self.tables.grants).get_mut(&key) {
                            g.allowed = false;
                        }
                        tracing::warn!(error = %e, reference = %grant.reference, "access re-check failed and the last confirmation is too old; denying");
                    } else {
                        tracing::warn!(error = %e, reference = %grant.reference, "access re-check failed; keeping the last answer");
                    }
                }
            }
        }
        report
    }

    /// Runs `refresh` every quarter TTL, forever: answers are renewed before anyone waits.
    pub async fn refresh_forever(&self) {
        let mut tick = tokio::time::interval((self.ttl / 4).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh().await;
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefreshReport {
    pub checked: usize,
    pub revoked: usize,
    pub failed: usize,
    /// Refusals and unused answers forgotten.
    pub dropped: usize,
    /// Allowed answers turned to refusals: unconfirmed for `MAX_AGE_TTLS` TTLs, checks failing.
    pub expired: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An upstream whose answer the test sets: Some(allowed) or None for "unreachable".
    fn upstream(answer: Arc<Mutex<Option<bool>>>, asked: Arc<AtomicUsize>) -> AccessCheck {
        Arc::new(move |_, auth| {
            let answer = Arc::clone(&answer);
            asked.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let valid = auth == RegistryAuth::Basic("u".into(), "p".into());
                match *lock(&answer) {
                    Some(allowed) => Ok(allowed && valid),
                    None => Err("connection refused".to_string()),
                }
            })
        })
    }

    const IMAGE: &str = "registry.example:5000/team/filter:1.0";

    #[tokio::test]
    async fn answers_come_from_memory_and_survive_an_unreachable_upstream() {
        let answer = Arc::new(Mutex::new(Some(true)));
        let asked = Arc::new(AtomicUsize::new(0));
        let p = Permissions::new(Duration::ZERO, upstream(Arc::clone(&answer), Arc::clone(&asked)));
        let good = Some(RegistryAuth::Basic("u".into(), "p".into()));
        let p = Permissions { ttl: Duration::from_secs(3600), ..p };
        assert!(p.allows_reference(IMAGE, good.clone()).await);
        assert!(p.allows_reference("registry.example:5000/team/filter:2.0", good.clone()).await, "same repository");
        assert_eq!(asked.load(Ordering::SeqCst), 1, "the second answer must come from memory");
        assert!(!p.allows_reference(IMAGE, Some(RegistryAuth::Basic("u".into(), "guess".into()))).await);
        assert!(!p.allows_reference(IMAGE, None).await);
        // Re-checks are due after half the TTL; answers used within two TTLs are kept.
        let p = Permissions { ttl: Duration::from_secs(2), ..p };
        tokio::time::sleep(Duration::from_millis(1100)).await;

        *lock(&answer) = None;
        let asked_before = asked.load(Ordering::SeqCst);
        let report = p.refresh().await;
        assert_eq!(report.failed, 1, "only the good answer is kept fresh; refusals are not re-checked");
        assert_eq!(asked.load(Ordering::SeqCst), asked_before + 1);
        assert!(p.allows_reference(IMAGE, good.clone()).await, "a failed re-check must not revoke a good answer");

        *lock(&answer) = Some(false);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let report = p.refresh().await;
        assert_eq!(report.revoked, 1);
        assert!(!p.allows_reference(IMAGE, good).await, "the upstream saying no revokes");
    }

    #[tokio::test]
    async fn an_allowed_answer_unconfirmed_for_too_long_denies() {
        let answer = Arc::new(Mutex::new(Some(true)));
        let ttl = Duration::from_millis(200);
        let p = Permissions::new(ttl, upstream(Arc::clone(&answer), Arc::default()));
        let secret = RegistryAuth::Basic("u".into(), "p".into());
        assert!(p.allows_reference(IMAGE, Some(secret.clone())).await);
        p.bind_namespace("team-a", IMAGE, &secret);
        assert!(p.namespace_allows("team-a", IMAGE).await);
        // The registry goes down: answers hold for a while...
        *lock(&answer) = None;
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(p.refresh().await.expired, 0);
        assert!(p.allows_reference(IMAGE, Some(secret.clone())).await, "an outage does not take modules away");
        assert!(p.namespace_allows("team-a", IMAGE).await);
        // ...but not for ever: access may have been withdrawn meanwhile.
        tokio::time::sleep(ttl * MAX_AGE_TTLS).await;
        assert!(!p.namespace_allows("team-a", IMAGE).await, "namespace URLs stop first");
        assert!(!p.allows_reference(IMAGE, Some(secret.clone())).await);
        let report = p.refresh().await;
        assert_eq!((report.failed, report.expired), (1, 1));
        // The registry answers again: access is confirmed and back.
        *lock(&answer) = Some(true);
        assert!(p.allows_reference(IMAGE, Some(secret)).await);
        assert!(p.namespace_allows("team-a", IMAGE).await);
    }

    #[tokio::test]
    async fn the_answer_table_is_bounded_and_never_evicts_what_a_binding_uses() {
        let p = Permissions::new(Duration::from_secs(60), upstream(Arc::new(Mutex::new(Some(true))), Arc::default()));
        let (secret, used) = (RegistryAuth::Basic("u".into(), "p".into()), RegistryAuth::Basic("v".into(), "q".into()));
        p.record(IMAGE, &secret, true);
        p.bind_namespace("team-a", IMAGE, &secret);
        p.record(IMAGE, &used, true);
        for i in 0..MAX_GRANTS + 50 {
            // Guessed credentials, each refused upstream and remembered.
            p.record(IMAGE, &RegistryAuth::Basic("u".into(), format!("guess-{i}")), false);
            if i % 1000 == 0 {
                assert!(p.allows_reference(IMAGE, Some(used.clone())).await, "a used answer stays");
            }
        }
        assert_eq!(p.grant_count(), MAX_GRANTS + 1, "client answers are bounded; the bound one comes on top");
        assert!(p.namespace_allows("team-a", IMAGE).await, "nobody asked for it, and it is still there");
        assert!(p.allows_reference(IMAGE, Some(used)).await);
    }

    /// An upstream that answers once `gate` opens, counting what it is asked.
    fn gated(gate: Arc<tokio::sync::Semaphore>, asked: Arc<AtomicUsize>) -> AccessCheck {
        Arc::new(move |_, auth| {
            let gate = Arc::clone(&gate);
            asked.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let _open = gate.acquire().await;
                Ok(auth == RegistryAuth::Basic("u".into(), "p".into()))
            })
        })
    }

    #[tokio::test]
    async fn concurrent_questions_share_one_check_and_new_credentials_are_checked_within_the_budget() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let asked = Arc::new(AtomicUsize::new(0));
        let p = Arc::new(Permissions::new(Duration::from_secs(60), gated(Arc::clone(&gate), Arc::clone(&asked))));
        let good = RegistryAuth::Basic("u".into(), "p".into());
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let (p, good) = (Arc::clone(&p), good.clone());
                tokio::spawn(async move { p.allows_reference(IMAGE, Some(good)).await })
            })
            .collect();
        while asked.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1_000_000);
        for w in waiting {
            assert!(w.await.unwrap());
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1, "fifty clients, one check");

        // Made-up credentials: past the burst, at most the rate, and nothing remembered then.
        let started = Instant::now();
        for i in 0..500 {
            assert!(!p.allows_reference(IMAGE, Some(RegistryAuth::Basic("u".into(), format!("guess-{i}")))).await);
        }
        let bound = NEW_CREDENTIAL_CHECK_BURST as f64
            + (started.elapsed().as_secs_f64() * NEW_CREDENTIAL_CHECKS_PER_SECOND as f64).ceil();
        let checked = asked.load(Ordering::SeqCst) - 1;
        assert!(checked >= 1 && checked as f64 <= bound, "{checked} checks of new credentials, bound {bound}");
        assert_eq!(p.grant_count(), 1 + checked);
        // Credentials a namespace is bound through are no client's guess: checked whatever the budget.
        let secret = RegistryAuth::Basic("u".into(), "p".into());
        let other = "registry.example:5000/team/other:1.0";
        p.bind_namespace("team-a", other, &secret);
        assert!(p.namespace_allows("team-a", other).await, "a missing bound answer is asked for");
    }

    #[tokio::test]
    async fn a_bound_answer_refused_then_granted_again_comes_back() {
        let answer = Arc::new(Mutex::new(Some(true)));
        let ttl = Duration::from_millis(200);
        let p = Permissions::new(ttl, upstream(Arc::clone(&answer), Arc::default()));
        let secret = RegistryAuth::Basic("u".into(), "p".into());
        p.bind_namespace("team-a", IMAGE, &secret);
        assert_eq!(p.refresh().await.checked, 1, "the missing answer is asked for");
        assert!(p.namespace_allows("team-a", IMAGE).await);
        *lock(&answer) = Some(false);
        tokio::time::sleep(ttl).await;
        assert_eq!(p.refresh().await.revoked, 1);
        assert!(!p.namespace_allows("team-a", IMAGE).await);
        // A refusal nobody uses would be forgotten after a TTL; this one is kept and re-checked.
        *lock(&answer) = Some(true);
        tokio::time::sleep(ttl * 2).await;
        let report = p.refresh().await;
        assert_eq!((report.dropped, report.checked), (0, 1));
        assert!(p.namespace_allows("team-a", IMAGE).await);
    }

    #[tokio::test]
    async fn namespace_tokens_are_bound_to_namespace_module_and_key() {
        let answer = Arc::new(Mutex::new(Some(true)));
        let asked = Arc::new(AtomicUsize::new(0));
        let p = Permissions::with_url_key(
            Duration::from_secs(60),
            upstream(Arc::clone(&answer), asked),
            b"0123456789abcdef0123456789abcdef".to_vec(),
        );
        let secret = RegistryAuth::Basic("u".into(), "p".into());
        let module = format!("sha256:{}", "ab".repeat(32));
        let token = p.url_token("team-a", &module).unwrap();
        assert!(p.token_valid("team-a", &module, &token));
        assert!(!p.token_valid("team-b", &module, &token), "a token is for one namespace");
        assert!(!p.token_valid("team-a", &format!("sha256:{}", "cd".repeat(32)), &token), "and one module");
        assert!(!p.token_valid("team-a", &module, "00"), "forged");
        assert!(!p.token_valid("team-a", &module, &token.to_uppercase()), "another spelling of a valid token");
        assert!(!p.token_valid("team-a", &module, &token[..32]), "a truncated MAC");
        let other_key =
            Permissions::with_url_key(Duration::from_secs(60), upstream(answer, Arc::default()), vec![7; 32]);
        assert!(!other_key.token_valid("team-a", &module, &token), "and one key");
        let keyless = Permissions::new(Duration::from_secs(60), upstream(Arc::default(), Arc::default()));
        assert_eq!(keyless.url_token("team-a", &module), None);

        assert!(!p.namespace_allows("team-a", IMAGE).await, "not bound yet");
        p.record(IMAGE, &secret, true);
        p.bind_namespace("team-a", IMAGE, &secret);
        assert!(p.namespace_allows("team-a", IMAGE).await);
        assert!(!p.namespace_allows("team-b", IMAGE).await);
        p.unbind_namespace("team-a", IMAGE);
        assert!(!p.namespace_allows("team-a", IMAGE).await);
    }
}
