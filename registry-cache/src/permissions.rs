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

use crate::cache::Entry;
use crate::pull::parse_reference;
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

/// `(namespace, repository)` → hashes of the credentials the namespace reads it with.
pub type NamespaceBindings = HashMap<(String, String), Vec<[u8; 32]>>;

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

/// At most this many answers are kept (least recently used go first): each client with new
/// credentials adds one, so the table must not grow with what clients send.
pub const MAX_GRANTS: usize = 10_000;

/// An allowed answer that no check has confirmed for this many TTLs (20 minutes with the
/// default 300 s) denies: access taken away upstream during a registry outage is not kept
/// forever.
pub const MAX_AGE_TTLS: u32 = 4;

/// Background re-checks run this many at a time, so one slow registry does not hold up the rest.
const REFRESH_CONCURRENCY: usize = 8;

pub struct Permissions {
    ttl: Duration,
    check: AccessCheck,
    grants: Mutex<HashMap<CredentialKey, Grant>>,
    /// (namespace, repository) -> the credentials the namespace's policies use for it.
    namespaces: Mutex<NamespaceBindings>,
    url_key: Vec<u8>,
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
        Self { ttl, check, grants: Mutex::new(HashMap::new()), namespaces: Mutex::new(HashMap::new()), url_key }
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
    /// and so does one whose answer is twice the TTL old, i.e. when no refresher runs.
    pub async fn allows_reference(&self, reference: &str, auth: Option<RegistryAuth>) -> bool {
        let Some(auth) = auth else { return false };
        let key = (repository_of(reference), credential_hash(&auth));
        let known = lock(&self.grants).get_mut(&key).map(|g| {
            g.used = Instant::now();
            (g.allowed, g.checked.elapsed())
        });
        if let Some((allowed, age)) = known {
            if age < self.ttl.saturating_mul(2) {
                return allowed;
            }
        }
        match (self.check)(reference.to_string(), auth.clone()).await {
            Ok(allowed) => {
                self.record(reference, &auth, allowed);
                allowed
            }
            Err(e) => {
                let max_age = self.max_age();
                tracing::warn!(error = %e, %reference, "access check failed; using the last answer if it is younger than {max_age:?}");
                known.is_some_and(|(allowed, age)| allowed && age < max_age)
            }
        }
    }

    /// Records what the upstream said about `auth` and `reference`, e.g. after a pull with it.
    pub fn record(&self, reference: &str, auth: &RegistryAuth, allowed: bool) {
        let key = (repository_of(reference), credential_hash(auth));
        let now = Instant::now();
        let grant = Grant { allowed, checked: now, used: now, reference: reference.to_string(), auth: auth.clone() };
        let mut grants = lock(&self.grants);
        if grants.len() >= MAX_GRANTS && !grants.contains_key(&key) {
            if let Some(oldest) = grants.iter().min_by_key(|(_, g)| g.used).map(|(k, _)| k.clone()) {
                grants.remove(&oldest);
            }
        }
        grants.insert(key, grant);
    }

    /// How many answers are kept.
    pub fn grant_count(&self) -> usize {
        lock(&self.grants).len()
    }

    /// Namespace `namespace` uses `auth` (its pull secret) for `reference`.
    pub fn bind_namespace(&self, namespace: &str, reference: &str, auth: &RegistryAuth) {
        lock(&self.namespaces).insert((namespace.to_string(), repository_of(reference)), vec![credential_hash(auth)]);
    }

    /// The policy is gone: the namespace no longer gets the artifact by token.
    pub fn unbind_namespace(&self, namespace: &str, reference: &str) {
        lock(&self.namespaces).remove(&(namespace.to_string(), repository_of(reference)));
    }

    /// Replaces every binding: the pre-puller's view of which namespace reads what, with
    /// which credentials (see `sources::Bindings`).
    pub fn set_bindings(&self, bindings: NamespaceBindings) {
        *lock(&self.namespaces) = bindings;
    }

    /// Whether `namespace` is bound to `reference` through credentials the upstream accepts.
    pub fn namespace_allows(&self, namespace: &str, reference: &str) -> bool {
        let repository = repository_of(reference);
        let Some(hashes) = lock(&self.namespaces).get(&(namespace.to_string(), repository.clone())).cloned() else {
            return false;
        };
        let grants = lock(&self.grants);
        let max_age = self.max_age();
        hashes.into_iter().any(|hash| {
            grants.get(&(repository.clone(), hash)).is_some_and(|g| g.allowed && g.checked.elapsed() < max_age)
        })
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

    /// Re-checks every answer older than half the TTL. A failed check keeps the answer.
    pub async fn refresh(&self) -> RefreshReport {
        use futures::StreamExt as _;
        let bound: std::collections::HashSet<CredentialKey> = lock(&self.namespaces)
            .iter()
            .flat_map(|((_, repository), hashes)| hashes.iter().map(|h| (repository.clone(), *h)))
            .collect();
        let mut report = RefreshReport::default();
        let due: Vec<(CredentialKey, Grant)> = {
            let mut grants = lock(&self.grants);
            // Refusals are asked again on next use, not kept fresh; answers nobody used for two
            // TTLs, unless a namespace is bound through them, likewise.
            let before = grants.len();
            grants.retain(|k, g| {
                let stale = g.checked.elapsed() >= self.ttl;
                let unused = g.used.elapsed() >= self.ttl.saturating_mul(2) && !bound.contains(k);
                !((!g.allowed && stale) || (g.allowed && unused))
            });
            report.dropped = before - grants.len();
            grants
                .iter()
                .filter(|(_, g)| g.allowed && g.checked.elapsed() >= self.ttl / 2)
                .map(|(k, g)| (k.clone(), g.clone()))
                .collect()
        };
        let checks = futures::stream::iter(due)
            .map(|(key, grant)| async move {
                let answer = (self.check)(grant.reference.clone(), grant.auth.clone()).await;
                (key, grant, answer)
            })
            .buffer_unordered(REFRESH_CONCURRENCY);
        tokio::pin!(checks);
        while let Some((key, grant, answer)) = checks.next().await {
            match answer {
                Ok(allowed) => {
                    report.checked += 1;
                    if grant.allowed && !allowed {
                        report.revoked += 1;
                    }
                    if let Some(g) = lock(&self.grants).get_mut(&key) {
                        g.allowed = allowed;
                        g.checked = Instant::now();
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    if grant.checked.elapsed() >= self.max_age() {
                        report.expired += 1;
                        if let Some(g) = lock(&self.grants).get_mut(&key) {
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
        assert!(p.namespace_allows("team-a", IMAGE));
        // The registry goes down: answers hold for a while...
        *lock(&answer) = None;
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(p.refresh().await.expired, 0);
        assert!(p.allows_reference(IMAGE, Some(secret.clone())).await, "an outage does not take modules away");
        assert!(p.namespace_allows("team-a", IMAGE));
        // ...but not for ever: access may have been withdrawn meanwhile.
        tokio::time::sleep(ttl * MAX_AGE_TTLS).await;
        assert!(!p.namespace_allows("team-a", IMAGE), "namespace URLs stop first");
        assert!(!p.allows_reference(IMAGE, Some(secret.clone())).await);
        let report = p.refresh().await;
        assert_eq!((report.failed, report.expired), (1, 1));
        // The registry answers again: access is confirmed and back.
        *lock(&answer) = Some(true);
        assert!(p.allows_reference(IMAGE, Some(secret)).await);
        assert!(p.namespace_allows("team-a", IMAGE));
    }

    #[tokio::test]
    async fn the_answer_table_is_bounded_whatever_clients_send() {
        let p = Permissions::new(Duration::from_secs(60), upstream(Arc::new(Mutex::new(Some(false))), Arc::default()));
        let good = RegistryAuth::Basic("u".into(), "p".into());
        p.record(IMAGE, &good, true);
        for i in 0..MAX_GRANTS + 50 {
            // Guessed credentials, each refused upstream and remembered.
            assert!(!p.allows_reference(IMAGE, Some(RegistryAuth::Basic("u".into(), format!("guess-{i}")))).await);
            if i % 1000 == 0 {
                assert!(p.allows_reference(IMAGE, Some(good.clone())).await, "a used answer stays");
            }
        }
        assert_eq!(p.grant_count(), MAX_GRANTS);
        assert!(p.allows_reference(IMAGE, Some(good)).await);
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

        assert!(!p.namespace_allows("team-a", IMAGE), "not bound yet");
        p.record(IMAGE, &secret, true);
        p.bind_namespace("team-a", IMAGE, &secret);
        assert!(p.namespace_allows("team-a", IMAGE));
        assert!(!p.namespace_allows("team-b", IMAGE));
        p.unbind_namespace("team-a", IMAGE);
        assert!(!p.namespace_allows("team-a", IMAGE));
    }
}
