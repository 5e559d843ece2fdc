//! The registry-cache's HTTP API (`server::router`) under arbitrary method, path, query and
//! headers, over a cache seeded with one public and one private (signed) artifact, with an
//! upstream that denies every credential. Never panics, and never serves the private
//! artifact's module, manifest, signature or tag list: no 200 response carries a private
//! digest, the private module's bytes or the private repository's name.
#![no_main]

use arbitrary::Arbitrary;
use axum::body::Body;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use registry_cache::artifact::{digest_hex, Format};
use registry_cache::cache::Cache;
use registry_cache::permissions::{AccessCheck, Permissions};
use registry_cache::pull::{parse_reference, Pulled};
use registry_cache::server::{router, AppState};
use registry_cache::sign::{signature_tag, Signer, SigningKey};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceExt as _;

const PUBLIC: &str = "ghcr.io/acme/public:v1";
const PRIVATE: &str = "ghcr.io/acme/secret:v1";
const PRIVATE_REPO: &str = "acme/secret";
const URL_KEY: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

struct World {
    runtime: tokio::runtime::Runtime,
    cache: Arc<Cache>,
    _dir: tempfile::TempDir,
    /// Every digest the cache holds, public and private, for the fuzzer to pick by index.
    digests: Vec<String>,
    /// Tags that exist: `v1` and the signature tags.
    tags: Vec<String>,
    /// Digests only the private artifact uses.
    private_digests: Vec<String>,
    private_module: Vec<u8>,
    /// A valid URL token for namespace `team-a` and the private module.
    token: String,
    private_module_digest: String,
}

fn module(name: &str) -> Vec<u8> {
    let mut m = vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x00];
    m.push(name.len() as u8 + 1);
    m.push(name.len() as u8);
    m.extend_from_slice(name.as_bytes());
    m
}

fn deny_all() -> AccessCheck {
    Arc::new(|_, _| Box::pin(async { Ok(false) }))
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
        let signer = Signer::new(SigningKey::generate().expect("key"), "cache:5000");
        let mut entries = vec![];
        for (image, private) in [(PUBLIC, false), (PRIVATE, true)] {
            let reference = parse_reference(image).expect("reference").whole();
            let pulled = Pulled {
                reference: reference.clone(),
                upstream_digest: format!("sha256:{}", "ab".repeat(32)),
                format: Format::SoloOci,
                module: module(image),
                verified_by: vec![],
            };
            registry_cache::publish::publish(&cache, &pulled, private).expect("publish");
            entries.push(signer.sign_entry(&cache, &reference).expect("sign"));
        }
        let all = |e: &registry_cache::cache::Entry| {
            let mut d = vec![e.module.clone(), e.manifest.clone(), e.config.clone()];
            d.extend(e.signature.clone());
            d.extend(e.extra_blobs.iter().cloned());
            d
        };
        let (public, private) = (&entries[0], &entries[1]);
        let public_digests = all(public);
        let private_digests: Vec<String> = all(private).into_iter().filter(|d| !public_digests.contains(d)).collect();
        let mut digests = public_digests.clone();
        digests.extend(all(private));
        let mut tags = vec!["v1".to_string()];
        tags.extend(entries.iter().filter_map(|e| signature_tag(&e.manifest).ok()));
        let permissions = Permissions::with_url_key(Duration::from_secs(60), deny_all(), URL_KEY.to_vec());
        let token = permissions.url_token("team-a", &private.module).expect("token");
        World {
            runtime: tokio::runtime::Builder::new_current_thread().build().expect("runtime"),
            cache,
            _dir: dir,
            digests,
            tags,
            private_digests,
            private_module: module(PRIVATE),
            token,
            private_module_digest: private.module.clone(),
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Head,
    Post,
    Delete,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Repo {
    Public,
    Private,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Reference {
    Digest(u8),
    Tag(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Query {
    None,
    /// The valid token for team-a and the private module, with a namespace of choice.
    Token(Option<String>),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Path {
    Raw(String),
    Manifest(Repo, Reference),
    Blob(Repo, Reference),
    Tags(Repo),
    Wasm(Reference, Query),
    Fixed(u8),
}

#[derive(Arbitrary, Debug)]
enum Auth {
    None,
    Basic(String, String),
    Bearer(String),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: Method,
    path: Path,
    auth: Auth,
    headers: Vec<(String, Vec<u8>)>,
}

fn repo(r: &Repo) -> String {
    match r {
        Repo::Public => "acme/public".into(),
        Repo::Private => PRIVATE_REPO.into(),
        Repo::Raw(s) => s.clone(),
    }
}

fn reference(w: &World, r: &Reference) -> String {
    match r {
        Reference::Digest(i) => w.digests[usize::from(*i) % w.digests.len()].clone(),
        Reference::Tag(i) => w.tags[usize::from(*i) % w.tags.len()].clone(),
        Reference::Raw(s) => s.clone(),
    }
}

fn path(w: &World, p: &Path) -> String {
    match p {
        Path::Raw(s) => s.clone(),
        Path::Manifest(r, x) => format!("/v2/{}/manifests/{}", repo(r), reference(w, x)),
        Path::Blob(r, x) => format!("/v2/{}/blobs/{}", repo(r), reference(w, x)),
        Path::Tags(r) => format!("/v2/{}/tags/list", repo(r)),
        Path::Wasm(x, q) => {
            let digest = reference(w, x);
            let file = format!("/wasm/{}.wasm", digest_hex(&digest).unwrap_or(&digest));
            match q {
                Query::None => file,
                Query::Token(ns) => format!("{file}?namespace={}&token={}", ns.as_deref().unwrap_or("team-a"), w.token),
                Query::Raw(q) => format!("{file}?{q}"),
            }
        }
        Path::Fixed(i) => ["/v2/", "/healthz", "/readyz", "/metrics", "/", "/v2"][usize::from(*i) % 6].into(),
    }
}

fuzz_target!(|input: Input| {
    let w = world();
    let method = match &input.method {
        Method::Get => http::Method::GET,
        Method::Head => http::Method::HEAD,
        Method::Post => http::Method::POST,
        Method::Delete => http::Method::DELETE,
        Method::Other(m) => match http::Method::from_bytes(m.as_bytes()) {
            Ok(m) => m,
            Err(_) => return,
        },
    };
    let mut builder = http::Request::builder().method(method).uri(path(w, &input.path));
    let authorization = match &input.auth {
        Auth::None => None,
        Auth::Basic(u, p) => {
            Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))).into_bytes())
        }
        Auth::Bearer(t) => Some(format!("Bearer {t}").into_bytes()),
        Auth::Raw(b) => Some(b.clone()),
    };
    if let Some(a) = authorization {
        builder = builder.header(http::header::AUTHORIZATION, a);
    }
    for (name, value) in input.headers.iter().take(8) {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let Ok(request) = builder.body(Body::empty()) else { return };

    // A fresh state per input: the permission cache remembers every credential it was shown.
    let permissions = Permissions::with_url_key(Duration::from_secs(60), deny_all(), URL_KEY.to_vec());
    let state = AppState::new(Arc::clone(&w.cache), permissions);
    let app = router(state);
    w.runtime.block_on(async {
        let response = app.oneshot(request).await.unwrap_or_else(|e| match e {});
        let status = response.status();
        let digest_header =
            response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = axum::body::to_bytes(response.into_body(), 16 << 20).await.expect("body");
        if status.is_success() {
            if let Some(d) = &digest_header {
                assert!(!w.private_digests.contains(d), "private blob {d} served: {input:?}");
            }
            assert!(
                body.as_ref() != w.private_module.as_slice(),
                "private module ({}) served: {input:?}",
                w.private_module_digest
            );
            let text = String::from_utf8_lossy(&body);
            assert!(!text.contains(PRIVATE_REPO), "private repository named in a 200: {text} for {input:?}");
        }
    });
});
