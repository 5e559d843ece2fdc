//! The pre-puller and the directory source, with a counting fake fetcher and temp dirs.

use base64::Engine as _;
use futures::future::BoxFuture;
use oci_client::secrets::RegistryAuth;
use registry_cache::sources::files::{self, FileSecrets, Scanner};
use registry_cache::sources::{
    AccessEvent, AccessHook, FetchError, ImageFetcher, PolicyRecord, PrefetchConfig, Prefetcher, SecretRef,
    SecretSource, TargetStatus,
};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct CountingFetcher {
    pulls: Mutex<Vec<(String, RegistryAuth)>>,
    cached: Mutex<BTreeSet<String>>,
    /// Fail this many pulls (transiently) before succeeding.
    fail_first: AtomicU32,
    /// Pulls of these images are refused as unauthorized.
    denied: Mutex<BTreeSet<String>>,
    delay: Option<Duration>,
    /// Every in-use set the cache was told, in order.
    in_use: Mutex<Vec<Option<BTreeSet<String>>>>,
}

impl CountingFetcher {
    fn pulls_of(&self, image: &str) -> Vec<RegistryAuth> {
        self.pulls.lock().unwrap().iter().filter(|(i, _)| i == image).map(|(_, a)| a.clone()).collect()
    }

    fn total(&self) -> usize {
        self.pulls.lock().unwrap().len()
    }

    fn last_in_use(&self) -> Option<Option<BTreeSet<String>>> {
        self.in_use.lock().unwrap().last().cloned()
    }
}

impl ImageFetcher for CountingFetcher {
    fn is_cached(&self, image: &str) -> bool {
        self.cached.lock().unwrap().contains(image)
    }

    fn pull<'a>(&'a self, image: &'a str, auth: &'a RegistryAuth) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
            self.pulls.lock().unwrap().push((image.to_string(), auth.clone()));
            if self.denied.lock().unwrap().contains(image) {
                return Err(FetchError::Denied("401".into()));
            }
            if self.fail_first.load(Ordering::SeqCst) > 0 {
                self.fail_first.fetch_sub(1, Ordering::SeqCst);
                return Err(FetchError::Transient("registry unavailable".into()));
            }
            self.cached.lock().unwrap().insert(image.to_string());
            Ok(())
        })
    }

    fn can_read<'a>(&'a self, image: &'a str, _auth: &'a RegistryAuth) -> BoxFuture<'a, Result<bool, String>> {
        let allowed = !self.denied.lock().unwrap().contains(image);
        Box::pin(async move { Ok(allowed) })
    }

    fn set_in_use(&self, images: Option<&BTreeSet<String>>) {
        self.in_use.lock().unwrap().push(images.cloned());
    }
}

type Outcomes = Arc<Mutex<Vec<(String, RegistryAuth, bool)>>>;

fn prefetcher(fetcher: &Arc<CountingFetcher>, secrets: impl SecretSource, sources: &[&str]) -> (Prefetcher, Outcomes) {
    let outcomes: Outcomes = Arc::default();
    let recorded = Arc::clone(&outcomes);
    let hook: AccessHook = Arc::new(move |event| {
        if let AccessEvent::Checked { image, auth, allowed, .. } = event {
            recorded.lock().unwrap().push((image.to_string(), auth.clone(), allowed));
        }
    });
    let config = PrefetchConfig {
        always_refresh: Duration::ZERO,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..PrefetchConfig::default()
    };
    (Prefetcher::new(config, Arc::clone(fetcher) as Arc<dyn ImageFetcher>, Arc::new(secrets), hook, sources), outcomes)
}

fn policy_yaml(ns: &str, name: &str, image: &str, extra: &str) -> String {
    format!(
        "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: EnvoyExtensionPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}}]\n  wasm:\n  - name: {name}\n    code:\n      type: Image\n      image:\n        url: {image}\n{extra}"
    )
}

fn secret_yaml(ns: &str, name: &str, registry: &str, user: &str, password: &str) -> String {
    let config = format!(r#"{{"auths":{{"{registry}":{{"username":"{user}","password":"{password}"}}}}}}"#);
    let encoded = base64::engine::general_purpose::STANDARD.encode(config);
    format!("apiVersion: v1\nkind: Secret\ntype: kubernetes.io/dockerconfigjson\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  .dockerconfigjson: {encoded}\n")
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const PRIVATE: &str = "registry.example.com/team-a/auth:v1";

#[tokio::test]
async fn directory_scans_behave_like_watch_events() {
    let dir = tempfile::tempdir().unwrap();
    let with_secret = "        pullSecretRef:\n          name: regcred\n";
    write(
        dir.path(),
        "team-a.yaml",
        &format!(
            "{}---\n{}",
            policy_yaml("team-a", "auth", PRIVATE, with_secret),
            secret_yaml("team-a", "regcred", "registry.example.com", "alice", "pw")
        ),
    );
    write(dir.path(), "notes.txt", "not a manifest");
    let fetcher = Arc::new(CountingFetcher::default());
    let secrets = FileSecrets::default();
    let (p, outcomes) = prefetcher(&fetcher, secrets.clone(), &[files::SOURCE]);
    let mut scanner = Scanner::new(vec![dir.path().to_path_buf()]);

    scanner.sync(&p, &secrets);
    tokio::time::timeout(Duration::from_secs(10), p.wait_settled()).await.unwrap();
    let alice = RegistryAuth::Basic("alice".into(), "pw".into());
    assert_eq!(fetcher.pulls_of(PRIVATE), vec![alice.clone()]);
    assert_eq!(outcomes.lock().unwrap().as_slice(), &[(PRIVATE.to_string(), alice, true)]);

    // A file appears (JSON this time): like ADDED.
    let json = serde_json::json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyExtensionPolicy",
        "metadata": {"name": "headers", "namespace": "team-b"},
        "spec": {"wasm": [{"name": "h", "code": {"type": "Image", "image": {"url": "ghcr.io/example/headers:v1"}}}]}
    });
    write(dir.path(), "team-b.json", &json.to_string());
    scanner.sync(&p, &secrets);
    p.wait_idle().await;
    assert_eq!(fetcher.pulls_of("ghcr.io/example/headers:v1"), vec![RegistryAuth::Anonymous]);
    assert_eq!(p.desired_images(), BTreeSet::from([PRIVATE.to_string(), "ghcr.io/example/headers:v1".to_string()]));

    // An unchanged rescan pulls nothing (IfNotPresent).
    scanner.sync(&p, &secrets);
    p.wait_idle().await;
    assert_eq!(fetcher.total(), 2);

    // A half-written file keeps what it last held.
    write(dir.path(), "team-b.json", "{\"apiVersion\": ");
    scanner.sync(&p, &secrets);
    assert!(p.desired_images().contains("ghcr.io/example/headers:v1"));

    // A file disappears: like DELETED.
    std::fs::remove_file(dir.path().join("team-a.yaml")).unwrap();
    scanner.sync(&p, &secrets);
    p.wait_idle().await;
    assert_eq!(p.desired_images(), BTreeSet::from(["ghcr.io/example/headers:v1".to_string()]));
    assert_eq!(fetcher.total(), 2);
}

#[tokio::test]
async fn the_directory_is_rescanned_on_an_interval() {
    let dir = tempfile::tempdir().unwrap();
    let fetcher = Arc::new(CountingFetcher::default());
    let secrets = FileSecrets::default();
    let (p, _) = prefetcher(&fetcher, secrets.clone(), &[files::SOURCE]);
    let task = tokio::spawn(files::run(vec![dir.path().to_path_buf()], Duration::from_millis(50), p.clone(), secrets));
    tokio::time::timeout(Duration::from_secs(10), p.wait_settled()).await.unwrap();
    assert!(p.desired_images().is_empty());
    write(dir.path(), "a.yml", &policy_yaml("default", "a", "ghcr.io/example/a:v1", ""));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fetcher.pulls_of("ghcr.io/example/a:v1").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "new file not picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(dir.path().join("a.yml")).unwrap();
    while !p.desired_images().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "removed file still desired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

fn record(ns: &str, name: &str, rv: &str, image: &str, extra: &str) -> PolicyRecord {
    let docs = registry_cache::sources::documents(&policy_yaml(ns, name, image, extra)).unwrap();
    let mut r = PolicyRecord::from_value(&docs[0]).unwrap();
    r.resource_version = rv.into();
    r
}

#[tokio::test]
async fn always_repulls_on_change_if_not_present_does_not() {
    let fetcher = Arc::new(CountingFetcher::default());
    let (p, _) = prefetcher(&fetcher, FileSecrets::default(), &["test"]);
    let always = "ghcr.io/example/edge"; // no tag: `:latest`, Always
    let pinned = "ghcr.io/example/pinned:v1";
    p.resync("test", vec![record("ns", "a", "1", always, ""), record("ns", "b", "1", pinned, "")]);
    p.wait_settled().await;
    p.wait_idle().await;
    p.upsert("test", record("ns", "a", "2", always, ""));
    p.upsert("test", record("ns", "b", "2", pinned, ""));
    p.wait_idle().await;
    // The same resourceVersion again (a re-list) is no change.
    p.upsert("test", record("ns", "a", "2", always, ""));
    p.wait_idle().await;
    assert_eq!(fetcher.pulls_of("ghcr.io/example/edge:latest").len(), 2);
    assert_eq!(fetcher.pulls_of(pinned).len(), 1);
    // The periodic refresh re-pulls Always images only.
    p.refresh_always();
    p.wait_idle().await;
    assert_eq!(fetcher.pulls_of("ghcr.io/example/edge:latest").len(), 3);
    assert_eq!(fetcher.pulls_of(pinned).len(), 1);
    // An image cached before (e.g. by `registry-cache pull`) is not pulled under IfNotPresent.
    fetcher.cached.lock().unwrap().insert("ghcr.io/example/warm:v1".into());
    p.upsert("test", record("ns", "c", "1", "ghcr.io/example/warm:v1", ""));
    p.wait_idle().await;
    assert!(fetcher.pulls_of("ghcr.io/example/warm:v1").is_empty());
    assert_eq!(p.desired().get(&target("ghcr.io/example/warm:v1", None)), Some(&TargetStatus::Ready));
}

fn target(image: &str, secret: Option<(&str, &str)>) -> registry_cache::sources::Target {
    registry_cache::sources::Target {
        image: image.into(),
        secret: secret.map(|(ns, name)| SecretRef { namespace: ns.into(), name: name.into() }),
    }
}

#[tokio::test]
async fn one_pull_per_image_and_credential() {
    let fetcher = Arc::new(CountingFetcher { delay: Some(Duration::from_millis(20)), ..Default::default() });
    let secrets = FileSecrets::default();
    let docs = |t: &str| registry_cache::sources::documents(t).unwrap();
    let mut map = std::collections::BTreeMap::new();
    for (ns, name, user) in [("a", "one", "alice"), ("a", "two", "alice"), ("b", "one", "bob")] {
        let d = docs(&secret_yaml(ns, name, "registry.example.com", user, "pw"));
        let cfg = base64::engine::general_purpose::STANDARD
            .decode(d[0]["data"][".dockerconfigjson"].as_str().unwrap())
            .unwrap();
        map.insert(SecretRef { namespace: ns.into(), name: name.into() }, cfg);
    }
    secrets.replace(map);
    let (p, _) = prefetcher(&fetcher, secrets, &["test"]);
    let s = |n: &str| format!("        pullSecretRef:\n          name: {n}\n");
    p.resync(
        "test",
        vec![
            // Anonymous, from three policies in two namespaces: one pull.
            record("a", "p1", "1", "ghcr.io/example/shared:v1", ""),
            record("a", "p2", "1", "ghcr.io/example/shared:v1", ""),
            record("b", "p3", "1", "ghcr.io/example/shared:v1", ""),
            // Two Secrets with the same credentials: one pull; another credential: another.
            record("a", "p4", "1", PRIVATE, &s("one")),
            record("a", "p5", "1", PRIVATE, &s("two")),
            record("b", "p6", "1", PRIVATE, &s("one")),
            // Cross-namespace pullSecretRef: needs a ReferenceGrant; not pre-pulled.
            record(
                "c",
                "p7",
                "1",
                "registry.example.com/team-c/x:v1",
                "        pullSecretRef:\n          name: one\n          namespace: a\n",
            ),
        ],
    );
    tokio::time::timeout(Duration::from_secs(10), p.wait_settled()).await.unwrap();
    p.wait_idle().await;
    assert_eq!(fetcher.pulls_of("ghcr.io/example/shared:v1"), vec![RegistryAuth::Anonymous]);
    let mut private = fetcher.pulls_of(PRIVATE);
    private.sort_by_key(|a| format!("{a:?}"));
    assert_eq!(
        private,
        vec![RegistryAuth::Basic("alice".into(), "pw".into()), RegistryAuth::Basic("bob".into(), "pw".into())]
    );
    assert!(fetcher.pulls_of("registry.example.com/team-c/x:v1").is_empty());
    assert!(!p.desired_images().contains("registry.example.com/team-c/x:v1"));
    assert_eq!(p.desired().len(), 4, "shared, and the private image with three secrets");
    assert!(p.desired().values().all(|s| *s == TargetStatus::Ready));
}

#[tokio::test]
async fn failures_are_retried_with_backoff_and_reported_and_the_initial_sync_settles() {
    let fetcher = Arc::new(CountingFetcher { fail_first: AtomicU32::new(2), ..Default::default() });
    let (p, _) = prefetcher(&fetcher, FileSecrets::default(), &["test"]);
    p.resync("test", vec![record("ns", "a", "1", "ghcr.io/example/flaky:v1", "")]);
    p.wait_settled().await;
    p.wait_idle().await;
    assert_eq!(fetcher.pulls_of("ghcr.io/example/flaky:v1").len(), 3, "two failures, then success");
    assert_eq!(p.desired().values().next(), Some(&TargetStatus::Ready));
    let report = p.report();
    assert_eq!((report.targets[0].failures, &report.targets[0].last_error), (0, &None), "a success clears failures");
    assert_eq!(report.targets[0].policies, vec!["ns/a".to_string()]);

    // Never succeeding: settled after `settle_attempts` failures, retries go on, and the
    // failures are reported for the image.
    let fetcher = Arc::new(CountingFetcher { fail_first: AtomicU32::new(u32::MAX), ..Default::default() });
    let (p, _) = prefetcher(&fetcher, FileSecrets::default(), &["test"]);
    p.resync("test", vec![record("ns", "a", "1", "ghcr.io/example/down:v1", "")]);
    tokio::time::timeout(Duration::from_secs(10), p.wait_settled()).await.unwrap();
    let after_settled = fetcher.total();
    assert!(after_settled >= 3);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fetcher.total() > after_settled, "still retrying in the background");
    assert!(matches!(p.desired().values().next(), Some(TargetStatus::Failed(_))));
    let report = p.report();
    assert!(report.initial_sync_settled);
    assert_eq!(report.targets.len(), 1);
    assert!(report.targets[0].failures >= 3, "{report:?}");
    assert_eq!(report.targets[0].last_error.as_deref(), Some("registry unavailable"));
    // Gone from the desired set: retries stop.
    p.resync("test", vec![]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopped = fetcher.total();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fetcher.total(), stopped);
}

#[tokio::test]
async fn denied_and_missing_secrets() {
    let fetcher = Arc::new(CountingFetcher::default());
    fetcher.denied.lock().unwrap().insert(PRIVATE.into());
    let secrets = FileSecrets::default();
    let (p, outcomes) = prefetcher(&fetcher, secrets.clone(), &["test"]);
    let mut map = std::collections::BTreeMap::new();
    map.insert(
        SecretRef { namespace: "a".into(), name: "regcred".into() },
        br#"{"auths":{"registry.example.com":{"username":"mallory","password":"x"}}}"#.to_vec(),
    );
    secrets.replace(map);
    p.resync(
        "test",
        vec![
            record("a", "p1", "1", PRIVATE, "        pullSecretRef:\n          name: regcred\n"),
            record("a", "p2", "1", "ghcr.io/example/other:v1", "        pullSecretRef:\n          name: missing\n"),
        ],
    );
    tokio::time::timeout(Duration::from_secs(10), p.wait_settled()).await.unwrap();
    // Denied: told to the permission layer, not retried.
    assert_eq!(fetcher.pulls_of(PRIVATE).len(), 1);
    let mallory = RegistryAuth::Basic("mallory".into(), "x".into());
    assert!(outcomes.lock().unwrap().contains(&(PRIVATE.to_string(), mallory, false)));
    // A missing Secret is retried (it may be created later) and never pulls anonymously.
    assert!(fetcher.pulls_of("ghcr.io/example/other:v1").is_empty());
    let status = p.desired().get(&target("ghcr.io/example/other:v1", Some(("a", "missing")))).cloned();
    assert!(matches!(status, Some(TargetStatus::Failed(ref e)) if e.contains("not found")), "{status:?}");
    p.resync("test", vec![]);
}

/// Which namespace may fetch which private module by URL follows the policies as they are now:
/// every namespace whose secret read the image, per repository, and nothing for a policy
/// deleted while its pull was running.
#[tokio::test]
async fn namespace_bindings_follow_policies_and_credentials() {
    use registry_cache::permissions::credential_hash;
    use registry_cache::sources::Bindings;
    let fetcher = Arc::new(CountingFetcher { delay: Some(Duration::from_millis(50)), ..Default::default() });
    let secrets = FileSecrets::default();
    let mut map = std::collections::BTreeMap::new();
    for ns in ["a", "b", "c", "d"] {
        let d = registry_cache::sources::documents(&secret_yaml(ns, "one", "registry.example.com", "alice", "pw"));
        let cfg = base64::engine::general_purpose::STANDARD
            .decode(d.unwrap()[0]["data"][".dockerconfigjson"].as_str().unwrap());
        map.insert(SecretRef { namespace: ns.into(), name: "one".into() }, cfg.unwrap());
    }
    secrets.replace(map);
    let bindings: Arc<Mutex<Bindings>> = Arc::default();
    let seen = Arc::clone(&bindings);
    let hook: AccessHook = Arc::new(move |event| {
        if let AccessEvent::Bindings(b) = event {
            *seen.lock().unwrap() = b.clone();
        }
    });
    let config = PrefetchConfig { always_refresh: Duration::ZERO, ..PrefetchConfig::default() };
    let p = Prefetcher::new(config, Arc::clone(&fetcher) as Arc<dyn ImageFetcher>, Arc::new(secrets), hook, &["t"]);
    let one = "        pullSecretRef:\n          name: one\n";
    let repo = "registry.example.com/team-a/auth".to_string();
    let alice = credential_hash(&RegistryAuth::Basic("alice".into(), "pw".into()));
    let bound = |ns: &str| {
        let hashes =
            bindings.lock().unwrap().get(&(ns.to_string(), repo.clone())).map(|c| c.iter().map(|c| c.hash()).collect());
        hashes == Some(vec![alice])
    };

    p.resync(
        "t",
        vec![
            record("a", "p1", "1", PRIVATE, one),
            record("a", "p2", "1", "registry.example.com/team-a/auth:v2", one),
            // The same credentials in another namespace share the pull, and still bind.
            record("b", "p3", "1", PRIVATE, one),
        ],
    );
    p.wait_settled().await;
    p.wait_idle().await;
    assert!(bound("a") && bound("b"), "{:?}", bindings.lock().unwrap());

    // One of two tags of the repository goes: the namespace keeps the repository.
    p.delete("t", "a", "p1");
    assert!(bound("a"), "a still has p2 for the same repository");
    p.delete("t", "a", "p2");
    assert!(!bound("a") && bound("b"));

    // Deleted while its pull runs: the late success binds nothing.
    p.upsert("t", record("c", "p4", "1", "registry.example.com/team-a/auth:v3", one));
    p.delete("t", "c", "p4");
    p.wait_idle().await;
    assert!(!bound("c"), "a deleted policy's namespace was bound");

    // Refused credentials bind nothing.
    fetcher.denied.lock().unwrap().insert("registry.example.com/team-a/auth:v4".into());
    p.upsert("t", record("d", "p5", "1", "registry.example.com/team-a/auth:v4", one));
    p.wait_idle().await;
    assert!(!bound("d"));
}

/// Directory mode: a namespace stays bound only while its policy and its pull Secret are on
/// disk. The Secret is read again while the policy stays: removed, the namespace is unbound;
/// changed, it is bound through the new credentials only; the policy removed, unbound.
#[tokio::test]
async fn a_removed_pull_secret_or_policy_file_unbinds_its_namespace() {
    use registry_cache::sources::Bindings;
    let dir = tempfile::tempdir().unwrap();
    let with_secret = "        pullSecretRef:\n          name: regcred\n";
    write(dir.path(), "policy.yaml", &policy_yaml("team-a", "auth", PRIVATE, with_secret));
    let secret = |user: &str| secret_yaml("team-a", "regcred", "registry.example.com", user, "pw");
    write(dir.path(), "secret.yaml", &secret("alice"));
    let fetcher = Arc::new(CountingFetcher::default());
    let secrets = FileSecrets::default();
    let bindings: Arc<Mutex<Bindings>> = Arc::default();
    let published = Arc::clone(&bindings);
    let hook: AccessHook = Arc::new(move |event| {
        if let AccessEvent::Bindings(b) = event {
            *published.lock().unwrap() = b.clone();
        }
    });
    let config = PrefetchConfig {
        always_refresh: Duration::ZERO,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        secret_recheck: Duration::from_millis(20),
        ..PrefetchConfig::default()
    };
    let p = Prefetcher::new(
        config,
        Arc::clone(&fetcher) as Arc<dyn ImageFetcher>,
        Arc::new(secrets.clone()),
        hook,
        &[files::SOURCE],
    );
    let task = tokio::spawn(files::run(vec![dir.path().to_path_buf()], Duration::from_millis(20), p.clone(), secrets));
    let repo = ("team-a".to_string(), "registry.example.com/team-a/auth".to_string());
    let users = || -> Vec<RegistryAuth> {
        bindings.lock().unwrap().get(&repo).map(|c| c.iter().map(|c| c.auth.clone()).collect()).unwrap_or_default()
    };
    let basic = |user: &str| RegistryAuth::Basic(user.into(), "pw".into());
    let wait_for = |want: Vec<RegistryAuth>, what: &'static str| {
        let users = &users;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while users() != want {
                assert!(tokio::time::Instant::now() < deadline, "{what}: bound through {:?}", users());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(vec![basic("alice")], "policy and secret on disk").await;

    std::fs::remove_file(dir.path().join("secret.yaml")).unwrap();
    wait_for(vec![], "secret removed").await;
    assert!(p.desired_images().contains(PRIVATE), "the policy is still there");
    write(dir.path(), "secret.yaml", &secret("alice"));
    wait_for(vec![basic("alice")], "secret back").await;

    write(dir.path(), "secret.yaml", &secret("bob"));
    wait_for(vec![basic("bob")], "secret rotated").await;

    std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
    wait_for(vec![], "policy removed").await;
    assert!(bindings.lock().unwrap().is_empty());
    assert_eq!(fetcher.pulls_of(PRIVATE), vec![basic("alice")], "the cached image is checked, not pulled again");
    task.abort();
}

#[tokio::test]
async fn the_cache_is_told_what_policies_use_and_what_it_dropped_is_pulled_again() {
    let fetcher = Arc::new(CountingFetcher::default());
    let (p, _) = prefetcher(&fetcher, FileSecrets::default(), &["a", "b"]);
    let (x, y) = ("ghcr.io/example/x:v1", "ghcr.io/example/y:v1");
    assert_eq!(fetcher.last_in_use(), Some(None), "nothing may be evicted before the sources synced");
    p.resync("a", vec![record("ns", "x", "1", x, "")]);
    assert_eq!(fetcher.last_in_use(), Some(None), "source b has not synced: its policies are unknown");
    p.resync("b", vec![record("ns", "y", "1", y, "")]);
    let both: BTreeSet<String> = [x.to_string(), y.to_string()].into();
    assert_eq!(fetcher.last_in_use(), Some(Some(both)));
    p.wait_settled().await;
    p.wait_idle().await;
    p.delete("b", "ns", "y");
    assert_eq!(fetcher.last_in_use(), Some(Some([x.to_string()].into())), "y is no longer in use");
    assert_eq!(fetcher.pulls_of(x).len(), 1);

    // The cache dropped x (a corrupt blob): IfNotPresent or not, it is pulled again.
    fetcher.cached.lock().unwrap().remove(x);
    let whole = registry_cache::pull::parse_reference(x).unwrap().whole();
    p.repull(&[whole, "ghcr.io/example/unrelated:v1".into()]);
    let repulled = harness::eventually(Duration::from_secs(10), || async { fetcher.pulls_of(x).len() == 2 }).await;
    assert!(repulled, "{:?}", fetcher.pulls_of(x));
    p.wait_idle().await;
    assert_eq!(fetcher.total(), 3, "x twice, y once: nothing else");
    assert_eq!(
        p.desired().get(&registry_cache::sources::Target { image: x.into(), secret: None }),
        Some(&TargetStatus::Ready)
    );
}
