//! Authorization abuse against the cache's server, in-process, with real HTTP written byte for
//! byte (so `..`, `%2e` and `//` reach the server as sent) and access checked against a real
//! private registry (Debian's `docker-registry` on loopback):
//!
//! - a client without proof asking for a private artifact, by every route;
//! - forged, truncated, re-spelt, cross-namespace, cross-module and revoked `/wasm` tokens;
//! - path tricks aimed at files outside the cache's blobs, and writes to a read-only API;
//! - HEAD answering as GET does.
//!
//! Everything must be refused with a 4xx, and nothing private or outside the cache may appear
//! in any answer.

mod common;

use common::{auth, basic, raw, RawResponse, PASSWORD, USER};
use registry_cache::artifact::{digest_hex, sha256_hex};
use registry_cache::cache::{Cache, Entry};
use registry_cache::permissions::{url_token, Permissions};
use registry_cache::publish;
use registry_cache::sign::{self, Signer, SigningKey};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const URL_KEY: &[u8] = b"abuse-test-url-key-of-32-bytes!!";
const PRIVATE_MARK: &str = "private-marker-7f3a";
const OUTSIDE_SECRET: &str = "outside-the-blobs-secret-91c2";
const ORPHAN: &str = "an-orphan-blob-no-entry-names-55e1";

/// Refusals counted, and what no answer may contain.
struct Tally {
    addr: SocketAddr,
    tried: usize,
    refused: usize,
    forbidden: Vec<Vec<u8>>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

impl Tally {
    async fn send(&self, method: &str, target: &str, authorization: Option<&str>) -> RawResponse {
        let headers: Vec<(&str, String)> =
            authorization.map(|a| ("Authorization", a.to_string())).into_iter().collect();
        raw(self.addr, method, target, &headers).await
    }

    /// Sends an abusive request; it must be refused (4xx, or the connection closed unanswered)
    /// and leak nothing.
    async fn refused(&mut self, method: &str, target: &str, authorization: Option<&str>) -> RawResponse {
        let r = self.send(method, target, authorization).await;
        let shown = &target[..target.len().min(120)];
        self.tried += 1;
        assert!(r.status == 0 || (400..500).contains(&r.status), "{method} {shown} ({authorization:?}): {}", r.status);
        for f in &self.forbidden {
            assert!(!contains(&r.body, f), "{method} {shown}: the answer holds {}", String::from_utf8_lossy(f));
        }
        self.refused += 1;
        r
    }

    async fn served(&self, method: &str, target: &str, authorization: Option<&str>) -> RawResponse {
        let r = self.send(method, target, authorization).await;
        assert_eq!(r.status, 200, "{method} {target}: {}", String::from_utf8_lossy(&r.body));
        r
    }
}

struct Setup {
    _registry: harness::registry::DockerRegistry,
    dir: tempfile::TempDir,
    state: Arc<registry_cache::server::AppState>,
    private: Entry,
    public: Entry,
    tally: Tally,
    /// The registry part of the names the cache serves the artifacts under.
    reg: String,
}

async fn setup() -> Setup {
    let registry = common::registry().await;
    // The marker names the module's custom section: any answer holding it leaked the module.
    let private_module = common::wasm_module(&format!("private-{PRIVATE_MARK}"), 8 << 10);
    let public_module = common::wasm_module("public", 8 << 10);
    let private_image = common::push(registry.addr, "filters/private", &private_module).await;
    let public_image = common::push(registry.addr, "filters/public", &public_module).await;
    let puller = common::puller(registry.addr, Duration::from_secs(5));
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let signer = Signer::new(SigningKey::generate().expect("key"), "cache.test:5000");
    let pulled = puller.pull(&private_image, &auth()).await.expect("pull private");
    let private = publish::publish_signed(&cache, &pulled, true, Some(&signer)).expect("publish");
    let pulled = puller.pull(&public_image, &auth()).await.expect("pull public");
    let public = publish::publish_signed(&cache, &pulled, false, Some(&signer)).expect("publish");

    // Files a path trick would want: one outside the blobs named like a blob, and an orphan
    // blob no entry refers to.
    let outside_hex = sha256_hex(OUTSIDE_SECRET.as_bytes());
    std::fs::write(dir.path().join(&outside_hex), OUTSIDE_SECRET).expect("write");
    std::fs::write(dir.path().join("tmp").join(&outside_hex), OUTSIDE_SECRET).expect("write");
    std::fs::write(dir.path().join("blobs").join(&outside_hex), OUTSIDE_SECRET).expect("write");
    std::fs::write(dir.path().join("blobs/sha256").join(sha256_hex(ORPHAN.as_bytes())), ORPHAN).expect("write");

    let permissions = Permissions::with_url_key(
        Duration::from_secs(600),
        common::access_check(common::puller(registry.addr, Duration::from_secs(5))),
        URL_KEY.to_vec(),
    );
    for ns in ["team-a", "team-b"] {
        permissions.record(&private.reference, &auth(), true);
        permissions.bind_namespace(ns, &private.reference, &auth());
    }
    let state = common::serve_state(Arc::clone(&cache), permissions);
    let addr = common::serve(Arc::clone(&state)).await;
    let index = std::fs::read(dir.path().join("index.json")).expect("index");
    let forbidden = vec![
        PRIVATE_MARK.as_bytes().to_vec(),
        OUTSIDE_SECRET.as_bytes().to_vec(),
        ORPHAN.as_bytes().to_vec(),
        b"\"entries\"".to_vec(),
        b"root:x:0:0".to_vec(),
        index[..index.len().min(64)].to_vec(),
    ];
    let reg = registry.addr.to_string().replace(':', "_");
    Setup {
        _registry: registry,
        dir,
        state,
        private,
        public,
        tally: Tally { addr, tried: 0, refused: 0, forbidden },
        reg,
    }
}

fn wasm_path(module: &str) -> String {
    format!("/wasm/{}.wasm", digest_hex(module).expect("digest"))
}

fn signature_payload(cache: &Cache, e: &Entry) -> String {
    let manifest = cache.get_blob(e.signature.as_deref().unwrap_or_default()).expect("read").expect("signature");
    sign::signature_layers(&manifest).expect("layers")[0].digest.clone()
}

#[tokio::test]
async fn a_private_artifact_is_refused_to_every_client_without_proof_by_every_route() {
    let Setup { _registry, dir, state, private, tally: mut t, reg, .. } = setup().await;
    let sig_tag = sign::signature_tag(&private.manifest).expect("tag");
    let payload = signature_payload(&state.cache, &private);
    let signature = private.signature.clone().unwrap_or_default();
    // (route, the same route for an artifact that does not exist)
    let routes = [
        (format!("/v2/{reg}/filters/private/manifests/v1"), format!("/v2/{reg}/filters/nothere/manifests/v1")),
        (
            format!("/v2/{reg}/filters/private/manifests/{}", private.manifest),
            format!("/v2/{reg}/filters/nothere/manifests/{}", private.manifest),
        ),
        (
            format!("/v2/{reg}/filters/private/manifests/{sig_tag}"),
            format!("/v2/{reg}/filters/nothere/manifests/{sig_tag}"),
        ),
        (
            format!("/v2/{reg}/filters/private/manifests/{signature}"),
            format!("/v2/{reg}/filters/nothere/manifests/{signature}"),
        ),
        (
            format!("/v2/{reg}/filters/private/blobs/{}", private.module),
            format!("/v2/{reg}/filters/nothere/blobs/{}", private.module),
        ),
        (
            format!("/v2/{reg}/filters/private/blobs/{}", private.config),
            format!("/v2/{reg}/filters/nothere/blobs/{}", private.config),
        ),
        (
            format!("/v2/{reg}/filters/private/blobs/{}", private.manifest),
            format!("/v2/{reg}/filters/nothere/blobs/{}", private.manifest),
        ),
        (format!("/v2/{reg}/filters/private/blobs/{payload}"), format!("/v2/{reg}/filters/nothere/blobs/{payload}")),
        (format!("/v2/{reg}/filters/private/tags/list"), format!("/v2/{reg}/filters/nothere/tags/list")),
        (wasm_path(&private.module), format!("/wasm/{}.wasm", "0".repeat(64))),
        // The private module's blob asked for under the public repository's name.
        (
            format!("/v2/{reg}/filters/public/blobs/{}", private.module),
            format!("/v2/{reg}/filters/public/blobs/sha256:{}", "0".repeat(64)),
        ),
        (
            format!("/v2/{reg}/filters/public/manifests/{}", private.manifest),
            format!("/v2/{reg}/filters/public/manifests/sha256:{}", "0".repeat(64)),
        ),
    ];
    let no_colon = {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(USER))
    };
    let wrong: Vec<String> = vec![
        basic(USER, "guess"),
        basic(USER, ""),
        basic("someone", PASSWORD),
        basic(&USER.to_uppercase(), PASSWORD),
        basic(USER, &format!("{PASSWORD} ")),
    ];
    // Headers that carry no credentials the server can read: answered as anonymous requests.
    let malformed: Vec<String> = vec![
        no_colon,
        "Basic !!!not-base64!!!".to_string(),
        "Bearer eyJhbGciOiJub25lIn0.e30.".to_string(),
        format!("basic{}", &basic(USER, PASSWORD)[5..]),
        String::new(),
    ];
    for (route, unknown) in &routes {
        // The control: proof of access gets it.
        if !route.starts_with(&format!("/v2/{reg}/filters/public")) {
            t.served("GET", route, Some(&basic(USER, PASSWORD))).await;
        }
        for method in ["GET", "HEAD"] {
            let anonymous = t.refused(method, route, None).await;
            let unknown_anonymous = t.send(method, unknown, None).await;
            // Without credentials the OCI API asks for them, as for an unknown artifact; /wasm
            // and tags/list answer 404 either way (see server.rs).
            assert!(
                anonymous.status == unknown_anonymous.status
                    || (anonymous.status == 401 && route.starts_with(&format!("/v2/{reg}/filters/private/"))),
                "{method} {route}: {} anonymously, {} for an unknown artifact",
                anonymous.status,
                unknown_anonymous.status
            );
            for creds in &wrong {
                let r = t.refused(method, route, Some(creds)).await;
                // Wrong credentials cannot tell a private artifact from one that does not exist.
                let u = t.send(method, unknown, Some(creds)).await;
                assert_eq!(
                    (r.status, &r.body),
                    (u.status, &u.body),
                    "{method} {route} with {creds}: existence disclosed"
                );
            }
            for header in &malformed {
                let r = t.refused(method, route, Some(header)).await;
                assert_eq!(r.status, anonymous.status, "{method} {route} with {header:?}");
            }
        }
    }
    // Nothing was written.
    assert_eq!(state.cache.entries().len(), 2);
    eprintln!("abuse, private artifact without proof: {} requests, {} refused", t.tried, t.refused);
    assert_eq!(t.tried, t.refused);
    drop(dir);
}

#[tokio::test]
async fn forged_replayed_and_revoked_wasm_tokens_are_refused() {
    let Setup { _registry, dir, state, private, public, tally: mut t, reg: _ } = setup().await;
    let path = wasm_path(&private.module);
    let token = |ns: &str, module: &str| url_token(URL_KEY, ns, module).expect("token");
    let a = token("team-a", &private.module);
    let b = token("team-b", &private.module);
    let url = |ns: &str, tok: &str| format!("{path}?namespace={ns}&token={tok}");
    // The controls: each bound namespace with its own token.
    assert!(t
        .served("GET", &url("team-a", &a), None)
        .await
        .body
        .windows(PRIVATE_MARK.len())
        .any(|w| w == PRIVATE_MARK.as_bytes()));
    t.served("GET", &url("team-b", &b), None).await;

    let random = sha256_hex(b"not a mac");
    let other_key = url_token(&[9u8; 32], "team-a", &private.module).expect("token");
    let forged = [
        url("team-a", &random),
        url("team-a", &b),                                // team-b's token replayed as team-a
        url("team-b", &a),                                // team-a's token replayed as team-b
        url("team-c", &a),                                // an unbound namespace
        url("team-c", &token("team-c", &private.module)), // a genuine token for an unbound namespace
        url("team-a", &token("team-a", &public.module)),  // a token for another module
        url("team-a", &token("team-a", &format!("sha256:{}", "0".repeat(64)))),
        url("team-a", &a[..63]),
        url("team-a", &a[..32]),
        url("team-a", &a[..1]),
        url("team-a", &format!("{a}00")),
        url("team-a", &a.to_uppercase()),
        url("team-a", &format!("{}{}", &a[..32].to_uppercase(), &a[32..])),
        url("team-a", &format!("%20{a}")),
        url("team-a", &format!("{a}%00")),
        url("team-a", &other_key),
        url("team-a", ""),
        url("", &a),
        url("", &token("", &private.module)),
        url("team-a%00", &a),
        url("Team-A", &a),
        format!("{path}?token={a}"),
        format!("{path}?namespace=team-a"),
        format!("{path}?namespace=team-b&namespace=team-a&token={a}"),
        format!("{path}?namespace=team-a&token={b}&token={a}"),
        format!("{path}?Namespace=team-a&Token={a}"),
        format!("{path}?namespace=team-a&token={}", "0".repeat(64)),
        format!("{path}?namespace=team-a;token={a}"),
        format!("{path}#namespace=team-a&token={a}"),
        format!("{}?namespace=team-a&token={a}", path.replace(".wasm", ".WASM")),
    ];
    for target in &forged {
        for method in ["GET", "HEAD"] {
            t.refused(method, target, None).await;
        }
    }
    // The policy is gone: its namespace's token stops working, the other's does not.
    state.permissions.unbind_namespace("team-a", &private.reference);
    for method in ["GET", "HEAD"] {
        t.refused(method, &url("team-a", &a), None).await;
    }
    t.served("GET", &url("team-b", &b), None).await;
    eprintln!("abuse, /wasm tokens: {} requests, {} refused", t.tried, t.refused);
    assert_eq!(t.tried, t.refused);
    drop(dir);
}

#[tokio::test]
async fn path_tricks_and_writes_never_reach_a_file_outside_the_cache() {
    let Setup { _registry, dir, state, private, public, tally: mut t, reg } = setup().await;
    let index_before = std::fs::read(dir.path().join("index.json")).expect("index");
    let outside = format!("sha256:{}", sha256_hex(OUTSIDE_SECRET.as_bytes()));
    let orphan = format!("sha256:{}", sha256_hex(ORPHAN.as_bytes()));
    let hex = digest_hex(&public.module).expect("hex").to_string();
    let long = |n: usize| format!("/v2/{}/manifests/v1", "a/".repeat(n / 2).trim_end_matches('/'));
    let targets = vec![
        "/v2/../index.json".to_string(),
        "/v2/../../../../etc/passwd".to_string(),
        "/v2/%2e%2e/index.json".to_string(),
        "/v2/%2e%2e/%2e%2e/%2e%2e/etc/passwd".to_string(),
        format!("/v2/{reg}/filters/public/blobs/..%2f..%2findex.json"),
        format!("/v2/{reg}/filters/public/blobs/sha256:..%2f..%2findex.json"),
        format!("/v2/{reg}/filters/public/manifests/..%2f..%2f..%2fetc%2fpasswd"),
        format!("/v2/{reg}/filters/public/blobs/%2e%2e%2f%2e%2e%2findex.json"),
        format!("/v2/{reg}/filters/../filters/public/manifests/v1/../../../../index.json"),
        "//v2//filters//public//manifests//v1".to_string(),
        "/v2//filters/public/manifests/v1".to_string(),
        format!("/v2/{reg}/filters/public//manifests/v1"),
        format!("/v2/{reg}/filters//public/manifests/v1"),
        format!("/v2/{reg}/filters/public/manifests/v1/"),
        format!("/v2/{reg}/filters/public/manifests/v1%00"),
        format!("/v2/{reg}/filters/public/manifests/v1%2f.."),
        "/wasm/../index.json".to_string(),
        "/wasm/..%2findex.json".to_string(),
        "/wasm/%2e%2e%2findex.json".to_string(),
        "/wasm/..%2f..%2f..%2fetc%2fpasswd.wasm".to_string(),
        "/wasm/..%2fblobs%2fsha256%2f".to_string() + &hex + ".wasm",
        format!("/wasm/{hex}.wasm/.."),
        format!("/wasm/{hex}.wasm/../../index.json"),
        format!("/wasm/{hex}.wasm%2f..%2f..%2findex.json"),
        format!("/wasm/{}.wasm", hex.to_uppercase()),
        format!("/wasm/{hex}.WASM"),
        format!("/wasm/{hex}"),
        format!("/wasm/sha256:{hex}.wasm"),
        format!("/wasm/{}.wasm", &hex[..63]),
        format!("/wasm/{hex}0.wasm"),
        format!("/wasm/{}.wasm", "g".repeat(64)),
        format!("/wasm/{}.wasm", digest_hex(&outside).expect("hex")),
        format!("/wasm/{}.wasm", digest_hex(&orphan).expect("hex")),
        format!("/v2/{reg}/filters/public/blobs/{outside}"),
        format!("/v2/{reg}/filters/public/manifests/{outside}"),
        format!("/v2/{reg}/filters/public/blobs/{orphan}"),
        format!("/v2/{reg}/filters/public/manifests/{orphan}"),
        format!("/v2/{reg}/filters/public/blobs/sha512:{}", "a".repeat(128)),
        format!("/v2/{reg}/filters/public/blobs/md5:{}", "a".repeat(32)),
        format!("/v2/{reg}/filters/public/blobs/sha256:{}", &hex[..63]),
        format!("/v2/{reg}/filters/public/blobs/sha256:{hex}0"),
        format!("/v2/{reg}/filters/public/blobs/sha256:{}", hex.to_uppercase()),
        format!("/v2/{reg}/filters/public/blobs/SHA256:{hex}"),
        format!("/v2/{reg}/filters/public/blobs/sha256:{}", "g".repeat(64)),
        format!("/v2/{reg}/filters/public/blobs/sha256:{hex}%00"),
        format!(
            "/v2/{reg}/filters/public/manifests/sha256:{}",
            digest_hex(&public.manifest).expect("hex").to_uppercase()
        ),
        "/v2/Filters/Public/manifests/v1".to_string(),
        format!("/v2/{reg}/filters/PUBLIC/manifests/v1"),
        format!("/v2/{reg}/filters/pub%00lic/manifests/v1"),
        format!("/v2/{reg}/filters/pub$lic/manifests/v1"),
        format!("/v2/{reg}/filters/pub%20lic/manifests/v1"),
        "/v2/-filters/public/manifests/v1".to_string(),
        format!("/v2/{reg}/filters/public-/manifests/v1"),
        "/v2/./filters/public/manifests/v1".to_string(),
        format!("/v2/{reg}/filters/./public/manifests/v1"),
        format!("/v2/{reg}/filters/public/tags/list/.."),
        format!("/v2/{reg}/filters/public/tags/../../index.json"),
        "/v2/_catalog".to_string(),
        "/index.json".to_string(),
        "/blobs/sha256/".to_string() + &hex,
        "/tmp/".to_string(),
        long(300),
        long(16 << 10),
        long(256 << 10),
        format!("/wasm/{}.wasm", "a".repeat(64 << 10)),
        format!("/v2/{reg}/filters/public/blobs/sha256:{}", "a".repeat(64 << 10)),
    ];
    for target in &targets {
        for method in ["GET", "HEAD"] {
            for creds in [None, Some(basic(USER, PASSWORD))] {
                t.refused(method, target, creds.as_deref()).await;
            }
        }
    }
    // The API is read-only: no method writes, whatever the path.
    for target in [
        format!("/v2/{reg}/filters/public/blobs/uploads/"),
        format!("/v2/{reg}/filters/new/blobs/uploads/"),
        format!("/v2/{reg}/filters/public/manifests/v1"),
        format!("/v2/{reg}/filters/public/manifests/{}", public.manifest),
        format!("/v2/{reg}/filters/public/blobs/{}", public.module),
        wasm_path(&public.module),
        wasm_path(&private.module),
    ] {
        for method in ["POST", "PUT", "PATCH", "DELETE"] {
            t.refused(method, &target, Some(&basic(USER, PASSWORD))).await;
        }
    }
    // Still there, unchanged, and nothing new appeared in the cache.
    assert_eq!(std::fs::read(dir.path().join("index.json")).expect("index"), index_before);
    assert_eq!(state.cache.entries().len(), 2);
    t.served("GET", &format!("/v2/{reg}/filters/public/blobs/{}", public.module), None).await;
    eprintln!("abuse, path tricks and writes: {} requests, {} refused", t.tried, t.refused);
    assert_eq!(t.tried, t.refused);
}

#[tokio::test]
async fn head_answers_as_get_does() {
    let Setup { _registry, dir, state, private, public, tally: t, reg } = setup().await;
    let good = basic(USER, PASSWORD);
    let token = url_token(URL_KEY, "team-a", &private.module).expect("token");
    let cases: Vec<(String, Option<String>)> = vec![
        (format!("/v2/{reg}/filters/public/manifests/v1"), None),
        (format!("/v2/{reg}/filters/public/manifests/{}", public.manifest), None),
        (format!("/v2/{reg}/filters/public/blobs/{}", public.module), None),
        (format!("/v2/{reg}/filters/public/blobs/{}", public.config), None),
        (format!("/v2/{reg}/filters/public/manifests/{}", sign::signature_tag(&public.manifest).expect("tag")), None),
        (format!("/v2/{reg}/filters/public/tags/list"), None),
        (wasm_path(&public.module), None),
        (format!("/v2/{reg}/filters/private/manifests/v1"), Some(good.clone())),
        (format!("/v2/{reg}/filters/private/blobs/{}", private.module), Some(good.clone())),
        (
            format!("/v2/{reg}/filters/private/manifests/{}", sign::signature_tag(&private.manifest).expect("tag")),
            Some(good.clone()),
        ),
        (wasm_path(&private.module), Some(good.clone())),
        (format!("{}?namespace=team-a&token={token}", wasm_path(&private.module)), None),
        (format!("/v2/{reg}/filters/private/manifests/v1"), None),
        (format!("/v2/{reg}/filters/private/manifests/v1"), Some(basic(USER, "guess"))),
        (wasm_path(&private.module), None),
        (format!("/v2/{reg}/filters/nothere/manifests/v1"), None),
        (format!("/v2/{reg}/filters/public/blobs/sha256:{}", "0".repeat(64)), None),
        (format!("/v2/{reg}/filters/public/blobs/sha256:bad"), None),
        ("/v2/".into(), None),
        ("/v2/".into(), Some(good.clone())),
    ];
    let mut compared = 0;
    for (target, creds) in &cases {
        let get = t.send("GET", target, creds.as_deref()).await;
        let head = t.send("HEAD", target, creds.as_deref()).await;
        assert_eq!(head.status, get.status, "HEAD {target} ({creds:?})");
        assert!(head.body.is_empty(), "HEAD {target}: a body");
        for name in ["content-type", "docker-content-digest", "www-authenticate"] {
            assert_eq!(head.header(name), get.header(name), "HEAD {target}: {name}");
        }
        if get.status == 200 {
            assert_eq!(
                head.header("content-length"),
                Some(get.body.len().to_string()),
                "HEAD {target}: content-length"
            );
            if let Some(digest) = get.header("docker-content-digest") {
                assert_eq!(format!("sha256:{}", sha256_hex(&get.body)), digest, "GET {target}: body vs digest");
            }
        }
        compared += 1;
    }
    eprintln!("abuse, HEAD vs GET: {compared} routes compared");
    drop((dir, state));
}

/// The same repository path in two registries: a client naming one never gets the other, and
/// its credentials are checked only against the registry it named.
#[tokio::test]
async fn the_same_path_in_two_registries_never_shares_a_name() {
    use registry_cache::artifact::Format;
    use registry_cache::pull::Pulled;
    use registry_cache::server::AccessCheck;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let pulled = |reference: &str, tag: &str| Pulled {
        reference: reference.into(),
        upstream_digest: format!("sha256:{}", sha256_hex(reference.as_bytes())),
        format: Format::SoloOci,
        module: common::wasm_module(tag, 0),
        verified_by: vec![],
    };
    let victim = publish::publish(&cache, &pulled("ghcr.io/victim/filter:1.0", "victim"), true).expect("publish");
    let squatter = publish::publish(&cache, &pulled("a.example/victim/filter:1.0", "squat"), false).expect("publish");
    let asked = Arc::new(std::sync::Mutex::new(vec![]));
    let check: AccessCheck = {
        let asked = Arc::clone(&asked);
        Arc::new(move |reference, _| {
            asked.lock().expect("lock").push(reference);
            Box::pin(async { Ok(true) })
        })
    };
    let addr = common::serve(common::serve_state(cache, Permissions::new(Duration::from_secs(60), check))).await;
    let creds = Some(basic("victim-user", "victim-token"));
    let get = |path: String, creds: Option<String>| async move {
        let headers: Vec<(&str, String)> = creds.into_iter().map(|c| ("Authorization", c)).collect();
        raw(addr, "GET", &path, &headers).await
    };
    let r = get("/v2/ghcr.io/victim/filter/manifests/1.0".into(), creds.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Docker-Content-Digest"), Some(victim.manifest.clone()), "the victim's own artifact");
    let r = get("/v2/a.example/victim/filter/manifests/1.0".into(), None).await;
    assert_eq!(r.header("Docker-Content-Digest"), Some(squatter.manifest.clone()));
    assert_eq!(get("/v2/victim/filter/manifests/1.0".into(), creds).await.status, 404, "an ambiguous name");
    assert_eq!(
        *asked.lock().expect("lock"),
        vec!["ghcr.io/victim/filter:1.0".to_string()],
        "credentials went elsewhere"
    );
}
