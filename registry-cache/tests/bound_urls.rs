//! A namespace's `/wasm` URL for a private module, end to end: `Service` as `serve` runs it
//! (directory source, pre-puller, permissions, HTTP server) on loopback, a real private
//! registry (Debian's `docker-registry`, htpasswd) behind a proxy that counts what reaches it,
//! and real HTTP requests.
//!
//! - A flood of made-up credentials must neither take the URL away nor turn into a flood of
//!   registry requests.
//! - The URL must stop working when its pull Secret is deleted or stops granting access, and
//!   when its policy is deleted.

mod common;

use common::{Proxy, PASSWORD, USER};
use futures::StreamExt as _;
use registry_cache::cache::Entry;
use registry_cache::permissions::{url_token, NEW_CREDENTIAL_CHECKS_PER_SECOND, NEW_CREDENTIAL_CHECK_BURST};
use registry_cache::pull::{PullOptions, MAX_UPSTREAM_REQUESTS_PER_CHECK};
use registry_cache::service::{Service, ServiceOptions};
use registry_cache::sources::config::{Prefetch, Settings, Sources};
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const URL_KEY: &[u8] = b"bound-urls-test-key-of-32-bytes!";

struct Setup {
    _registry: harness::registry::DockerRegistry,
    proxy: Proxy,
    _cache_dir: tempfile::TempDir,
    policies: tempfile::TempDir,
    _service: Service,
    addr: SocketAddr,
    entry: Entry,
    http: reqwest::Client,
}

fn policy_yaml(image: &str) -> String {
    format!(
        "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: EnvoyExtensionPolicy\nmetadata:\n  name: filter\n  namespace: team-a\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}}]\n  wasm:\n  - name: filter\n    code:\n      type: Image\n      image:\n        url: {image}\n        pullSecretRef:\n          name: regcred\n"
    )
}

/// The pull Secret team-a/regcred with `password` for the proxy.
fn secret_yaml(proxy: SocketAddr, password: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = serde_json::json!({"auths": {proxy.to_string(): {"auth": b64(&format!("{USER}:{password}"))}}});
    format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/dockerconfigjson\nmetadata:\n  name: regcred\n  namespace: team-a\ndata:\n  .dockerconfigjson: {}\n",
        b64(&config.to_string())
    )
}

/// A private image on the registry, named through the proxy; a policy in team-a and its pull
/// Secret on disk; the service started on them, ready, and serving.
async fn setup() -> Setup {
    let registry = common::registry().await;
    let proxy = Proxy::start(registry.addr).await;
    common::push(registry.addr, "filters/private", &common::wasm_module("bound-url", 4 << 10)).await;
    let image = format!("{}/filters/private:v1", proxy.addr);
    let policies = tempfile::tempdir().expect("tempdir");
    std::fs::write(policies.path().join("policy.yaml"), policy_yaml(&image)).expect("write");
    std::fs::write(policies.path().join("secret.yaml"), secret_yaml(proxy.addr, PASSWORD)).expect("write");
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        sources: Sources { directories: vec![policies.path().to_path_buf()], rescan_seconds: 1, ..Sources::default() },
        prefetch: Prefetch { secret_recheck_seconds: 1, ..Prefetch::default() },
    };
    let service = Service::start(ServiceOptions {
        cache_dir: cache_dir.path().to_path_buf(),
        max_cache_bytes: 1 << 30,
        permission_ttl: Duration::from_secs(300),
        pull: PullOptions {
            insecure_registries: vec![proxy.addr.to_string()],
            read_timeout: Duration::from_secs(10),
            ..PullOptions::default()
        },
        settings,
        signer: None,
        url_key: URL_KEY.to_vec(),
    })
    .await
    .expect("start");
    tokio::time::timeout(Duration::from_secs(120), service.wait_settled())
        .await
        .expect("initial sync settled within two minutes");
    let entry = service.state.cache.lookup(&image).expect("pre-pulled");
    assert!(entry.private, "pulled with the pull secret");
    let addr = common::serve(std::sync::Arc::clone(&service.state)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    Setup { _registry: registry, proxy, _cache_dir: cache_dir, policies, _service: service, addr, entry, http }
}

impl Setup {
    /// The URL `render` gives team-a for the module.
    fn bound_url(&self) -> String {
        let token = url_token(URL_KEY, "team-a", &self.entry.module).expect("token");
        format!("http://{}/wasm/{}.wasm?namespace=team-a&token={token}", self.addr, &self.entry.module[7..])
    }

    async fn status(&self, url: &str, credentials: Option<(&str, &str)>) -> u16 {
        let mut request = self.http.get(url);
        if let Some((user, password)) = credentials {
            request = request.basic_auth(user, Some(password));
        }
        request.send().await.expect("request").status().as_u16()
    }

    /// Waits (up to a minute) until the bound URL answers `want`.
    async fn wait_for_url(&self, want: u16, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.status(&self.bound_url(), None).await;
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: the bound URL still answers {got}, not {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn write(&self, name: &str, text: &str) {
        // Renamed into place, so that a scan never reads half a file.
        let staged = self.policies.path().join(format!(".{name}.tmp"));
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, self.policies.path().join(name)).expect("rename");
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.policies.path().join(name)).expect("remove");
    }

    fn path(&self) -> &Path {
        self.policies.path()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_credentials_neither_takes_a_bound_url_away_nor_floods_the_registry() {
    const FLOOD: usize = 20_000;
    let s = setup().await;
    assert_eq!(s.status(&s.bound_url(), None).await, 200, "the bound URL, before");
    let reg = format!("{}", s.proxy.addr).replace(':', "_");
    let manifest = format!("http://{}/v2/{reg}/filters/private/manifests/v1", s.addr);
    let module = format!("http://{}/wasm/{}.wasm", s.addr, &s.entry.module[7..]);
    let salt = std::collections::hash_map::RandomState::new().build_hasher().finish();

    let before = s.proxy.requests();
    let started = Instant::now();
    // Sixteen clients at once, each request with credentials nobody has used, against both
    // routes that take credentials.
    let served = futures::stream::iter(0..FLOOD)
        .map(|i| {
            let (s, manifest, module) = (&s, &manifest, &module);
            async move {
                let user = format!("flood-{salt:x}-{i}");
                let password = format!("{:x}", salt.rotate_left(i as u32 % 64) ^ i as u64);
                let url = if i % 2 == 0 { manifest } else { module };
                s.status(url, Some((&user, &password))).await
            }
        })
        .buffer_unordered(16)
        .filter(|status| std::future::ready(*status == 200))
        .count()
        .await;
    let elapsed = started.elapsed();
    let upstream = s.proxy.requests() - before;
    assert_eq!(served, 0, "made-up credentials were served");

    // The bound: NEW_CREDENTIAL_CHECK_BURST checks, NEW_CREDENTIAL_CHECKS_PER_SECOND more each
    // second the flood lasted, MAX_UPSTREAM_REQUESTS_PER_CHECK requests each.
    let checks = NEW_CREDENTIAL_CHECK_BURST as usize
        + (elapsed.as_secs_f64() * f64::from(NEW_CREDENTIAL_CHECKS_PER_SECOND)).ceil() as usize;
    let bound = checks * MAX_UPSTREAM_REQUESTS_PER_CHECK;
    eprintln!(
        "flood: {FLOOD} requests with made-up credentials in {:.1} s; {upstream} reached the registry (bound {bound})",
        elapsed.as_secs_f64()
    );
    assert!(upstream <= bound, "{upstream} registry requests for {FLOOD} made-up credentials; the bound is {bound}");

    let metrics = s.http.get(format!("http://{}/metrics", s.addr)).send().await.expect("metrics");
    let metrics = metrics.text().await.expect("metrics");
    let refused: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("registry_cache_new_credentials_refused_unchecked_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count of refused checks in {metrics}"));
    assert!(refused >= FLOOD - checks, "{refused} refused unchecked");

    assert_eq!(s.status(&s.bound_url(), None).await, 200, "the bound URL, after the flood");
    assert_eq!(s.status(&manifest, Some((USER, PASSWORD))).await, 200, "the pull secret's credentials, after");
}

#[tokio::test]
async fn a_bound_url_stops_when_its_pull_secret_or_its_policy_is_deleted() {
    let s = setup().await;
    assert_eq!(s.status(&s.bound_url(), None).await, 200);

    // The registry still accepts the credentials; the Secret that held them is gone.
    s.remove("secret.yaml");
    s.wait_for_url(404, "pull Secret deleted").await;
    s.write("secret.yaml", &secret_yaml(s.proxy.addr, PASSWORD));
    s.wait_for_url(200, "pull Secret created again").await;

    // The Secret now holds credentials the registry refuses.
    s.write("secret.yaml", &secret_yaml(s.proxy.addr, "not-the-password"));
    s.wait_for_url(404, "pull Secret no longer grants access").await;
    s.write("secret.yaml", &secret_yaml(s.proxy.addr, PASSWORD));
    s.wait_for_url(200, "pull Secret fixed").await;

    s.remove("policy.yaml");
    s.wait_for_url(404, "policy deleted").await;
    assert!(s.path().join("secret.yaml").exists(), "the Secret stayed");
}
