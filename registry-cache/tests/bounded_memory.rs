//! Memory stays bounded whatever a registry or a client does:
//!
//! - a hostile registry on loopback answers with bodies of 256 MiB (manifests, a signature
//!   manifest, a token answer, an error answer, a layer larger than its manifest says): each is
//!   refused with a clear error after the cache read little of it (the registry counts what it
//!   sent), and nothing is cached;
//! - blobs are streamed from disk: a module of many chunks still passes skopeo's digest check,
//!   and one corrupted on disk is never delivered whole; it is dropped to be pulled again.
//!
//! The resident-memory figures (a 1 GiB manifest, 64 clients of a 64 MiB module) are measured
//! by `rss_figures` in this file, which is ignored by default (see README.md, Benchmarks).

mod common;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::{bin, blob_digests, files_in, run, wasm_module};
use registry_cache::artifact::{sha256_hex, Format, OCI_MANIFEST, SOLO_WASM_CONFIG, SOLO_WASM_LAYER};
use registry_cache::cache::{Cache, Entry};
use registry_cache::pull::{PullOptions, Pulled, Puller};
use registry_cache::server::{AccessCheck, Permissions};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the hostile registry sends where it floods.
const FLOOD_BYTES: u64 = 256 << 20;
/// What the cache may have taken in of a flood before it stops: its cap (4 MiB for manifests)
/// plus what loopback socket buffers and HTTP buffers hold. Far below `FLOOD_BYTES`.
const READ_AT_MOST: u64 = 64 << 20;

struct Hostile {
    addr: SocketAddr,
    /// Bytes of flood handed to the HTTP server to send.
    sent: AtomicU64,
    /// Flood bodies not yet dropped: the server drops one once its connection is closed.
    open_floods: AtomicUsize,
    /// `/v2/` challenges to a token service that floods.
    token_flood: AtomicBool,
    /// A small, valid manifest (`hostile/signed`, `hostile/liar`) and the layer digest it names.
    manifest: Vec<u8>,
    layer: String,
}

/// Counts a flood body as open until it is dropped.
struct OpenFlood(Arc<Hostile>);

impl Drop for OpenFlood {
    fn drop(&mut self) {
        self.0.open_floods.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Hostile {
    async fn start() -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let module = wasm_module("hostile", 4096);
        let layer = format!("sha256:{}", sha256_hex(&module));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": SOLO_WASM_CONFIG, "digest": format!("sha256:{}", sha256_hex(b"{}")), "size": 2},
            "layers": [{"mediaType": SOLO_WASM_LAYER, "digest": layer, "size": module.len()}],
        }))
        .expect("manifest");
        let hostile = Arc::new(Self {
            addr,
            sent: AtomicU64::new(0),
            open_floods: AtomicUsize::new(0),
            token_flood: AtomicBool::new(false),
            manifest,
            layer,
        });
        let app = axum::Router::new().fallback(answer).with_state(Arc::clone(&hostile));
        tokio::spawn(async move { axum::serve(listener, app).await });
        hostile
    }

    /// `FLOOD_BYTES` of JSON whitespace, 64 KiB at a time, counted as the server takes them.
    fn flood(self: &Arc<Self>) -> Body {
        self.open_floods.fetch_add(1, Ordering::SeqCst);
        let open = OpenFlood(Arc::clone(self));
        let chunk = Bytes::from(vec![b' '; 64 << 10]);
        Body::from_stream(futures::stream::unfold((0u64, open), move |(sent, open)| {
            let chunk = chunk.clone();
            async move {
                if sent >= FLOOD_BYTES {
                    return None;
                }
                open.0.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                Some((Ok::<_, std::convert::Infallible>(chunk.clone()), (sent + chunk.len() as u64, open)))
            }
        }))
    }

    fn manifest_digest(&self) -> String {
        format!("sha256:{}", sha256_hex(&self.manifest))
    }

    /// Runs `refusal` (which must end in an error) and returns what it said and how many
    /// bytes of flood the server had sent by the time the cache dropped the connection.
    async fn refused<T: std::fmt::Debug, E: std::fmt::Display>(
        &self,
        refusal: impl std::future::Future<Output = Result<T, E>>,
    ) -> (String, u64) {
        self.sent.store(0, Ordering::SeqCst);
        let err = match refusal.await {
            Ok(accepted) => panic!("accepted: {accepted:?}"),
            Err(e) => e.to_string(),
        };
        let closed =
            harness::eventually(Duration::from_secs(60), || async { self.open_floods.load(Ordering::SeqCst) == 0 })
                .await;
        let sent = self.sent.load(Ordering::SeqCst);
        assert!(closed, "the cache kept the flood's connection open ({sent} bytes sent so far): {err}");
        (err, sent)
    }
}

async fn answer(State(h): State<Arc<Hostile>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let sig_tag = format!("/v2/hostile/signed/manifests/{}.sig", h.manifest_digest().replace(':', "-"));
    let small_manifest = || ([(header::CONTENT_TYPE, OCI_MANIFEST)], h.manifest.clone()).into_response();
    match path.as_str() {
        "/v2/" if h.token_flood.load(Ordering::SeqCst) => {
            let challenge = format!(r#"Bearer realm="http://{}/token",service="hostile""#, h.addr);
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)]).into_response()
        }
        "/v2/" => "{}".into_response(),
        "/token" | "/v2/hostile/manifest/manifests/v1" => h.flood().into_response(),
        // The size announced: refused before a byte of it is read.
        "/v2/hostile/declared/manifests/v1" => {
            ([(header::CONTENT_LENGTH, FLOOD_BYTES.to_string())], h.flood()).into_response()
        }
        "/v2/hostile/error/manifests/v1" => (StatusCode::INTERNAL_SERVER_ERROR, h.flood()).into_response(),
        "/v2/hostile/signed/manifests/v1" | "/v2/hostile/liar/manifests/v1" => small_manifest(),
        p if p == sig_tag => h.flood().into_response(),
        // The manifest says 4 KiB; the blob does not end.
        p if p == format!("/v2/hostile/liar/blobs/{}", h.layer) => h.flood().into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn puller(h: &Hostile, options: PullOptions) -> Puller {
    Puller::new(PullOptions { insecure_registries: vec![h.addr.to_string()], ..options })
}

#[tokio::test]
async fn a_manifest_over_the_cap_is_refused_after_reading_little_of_it_and_nothing_is_cached() {
    let h = Hostile::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    for repo in ["manifest", "declared"] {
        let image = format!("{}/hostile/{repo}:v1", h.addr);
        let (err, sent) = h
            .refused(async {
                let r = run(bin()
                    .args(["pull", &image, "--insecure-registry", &h.addr.to_string(), "--cache-dir"])
                    .arg(dir.path()))
                .await;
                if r.ok {
                    Ok(r.stdout)
                } else {
                    Err(r.stderr)
                }
            })
            .await;
        eprintln!("{repo}: refused after the registry sent {sent} of {FLOOD_BYTES} bytes: {}", err.trim());
        assert!(sent < READ_AT_MOST, "{repo}: the cache read on to {sent} bytes of a manifest capped at 4 MiB");
        assert!(err.contains("manifest is larger than the 4194304 bytes allowed"), "{repo}: no clear error: {err}");
        assert!(blob_digests(dir.path()).is_empty() && files_in(dir.path(), "tmp").is_empty(), "{repo}: cached");
        assert!(Cache::open(dir.path(), 1 << 30).expect("cache").entries().is_empty(), "{repo}: recorded");
    }
}

#[tokio::test]
async fn oversized_signature_manifests_token_answers_error_answers_and_layers_are_refused_early() {
    let h = Hostile::start().await;
    let image = |repo: &str| format!("{}/hostile/{repo}:v1", h.addr);
    let key = registry_cache::sign::SigningKey::generate().expect("key").public_key();
    let signed = puller(&h, PullOptions { require_signature: vec![key], ..PullOptions::default() });
    let plain = puller(&h, PullOptions { max_module_bytes: 1 << 20, ..PullOptions::default() });

    let (err, sent) = h.refused(signed.pull(&image("signed"), &RegistryAuth::Anonymous)).await;
    assert!(err.contains("signature manifest is larger than the 4194304 bytes allowed"), "{err}");
    assert!(sent < READ_AT_MOST, "signature manifest: read on to {sent} bytes");

    let (err, sent) = h.refused(plain.pull(&image("error"), &RegistryAuth::Anonymous)).await;
    assert!(err.contains("HTTP 500"), "{err}");
    assert!(err.len() < 8 << 10, "the error quotes at most the start of the answer: {} bytes", err.len());
    assert!(sent < READ_AT_MOST, "error answer: read on to {sent} bytes");

    let (err, sent) = h.refused(plain.pull(&image("liar"), &RegistryAuth::Anonymous)).await;
    assert!(err.contains("layer is larger than the 1048576 bytes allowed"), "{err}");
    assert!(sent < READ_AT_MOST, "layer: read on to {sent} bytes");

    h.token_flood.store(true, Ordering::SeqCst);
    let auth = RegistryAuth::Basic("user".into(), "password".into());
    let (err, sent) = h.refused(plain.pull(&image("signed"), &auth)).await;
    assert!(err.contains("token service") && err.contains("answer over 65536 bytes"), "{err}");
    assert!(sent < READ_AT_MOST, "token answer: read on to {sent} bytes");
    // The access check reads token answers the same way: an error, not a refusal.
    let (err, sent) = h.refused(plain.can_read(&image("signed"), &auth)).await;
    assert!(err.contains("answer over 65536 bytes"), "{err}");
    assert!(sent < READ_AT_MOST, "token answer to an access check: read on to {sent} bytes");
}

use oci_client::secrets::RegistryAuth;

/// A public entry for `module` in `cache`, as a pull would publish it.
fn publish(cache: &Cache, module: &[u8]) -> Entry {
    let pulled = Pulled {
        reference: "registry.example/team/large:v1".into(),
        upstream_digest: format!("sha256:{}", "1".repeat(64)),
        format: Format::SoloOci,
        module: module.to_vec(),
        verified_by: vec![],
    };
    registry_cache::publish::publish(cache, &pulled, false).expect("publish")
}

fn no_upstream() -> AccessCheck {
    Arc::new(|_: String, _: RegistryAuth| Box::pin(async { Err::<bool, String>("no upstream here".into()) }))
}

async fn skopeo_copy(addr: SocketAddr, entry: &Entry, out: &std::path::Path) -> common::Run {
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args(["copy", "--src-tls-verify=false", "--src-no-creds"])
        .arg(format!("docker://{addr}/{}:v1", common::served(entry)))
        .arg(format!("dir:{}", out.display()));
    run(&mut cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_of_many_chunks_is_streamed_and_passes_skopeos_digest_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    // 5 MiB and a bit: 81 chunks, the last one partial.
    let module = wasm_module("streamed", (5 << 20) + 12345);
    let entry = publish(&cache, &module);
    let addr =
        common::serve(common::serve_state(cache, Permissions::new(Duration::from_secs(60), no_upstream()))).await;

    let out = tempfile::tempdir().expect("tempdir");
    let copied = skopeo_copy(addr, &entry, out.path()).await;
    assert!(copied.ok, "skopeo: {}", copied.stderr);
    let layer = out.path().join(entry.module.trim_start_matches("sha256:"));
    assert_eq!(std::fs::read(layer).expect("layer in skopeo's copy"), module);

    let wasm = reqwest::get(format!("http://{addr}/wasm/{}.wasm", entry.module.trim_start_matches("sha256:")))
        .await
        .expect("GET /wasm");
    assert_eq!(wasm.content_length(), Some(module.len() as u64));
    assert_eq!(wasm.bytes().await.expect("body").as_ref(), &module[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_of_many_chunks_corrupted_on_disk_is_never_delivered_whole_and_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let dropped: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let sink = Arc::clone(&dropped);
    cache.on_corrupt(move |references| sink.lock().expect("lock").extend(references));
    let module = wasm_module("rotting", 5 << 20);
    let entry = publish(&cache, &module);
    let state = common::serve_state(Arc::clone(&cache), Permissions::new(Duration::from_secs(60), no_upstream()));
    let addr = common::serve(state).await;

    // The disk flips one bit near the start: every chunk but the last would pass unnoticed.
    let file = dir.path().join("blobs/sha256").join(entry.module.trim_start_matches("sha256:"));
    let rot = || {
        let mut rotten = module.clone();
        rotten[1000] ^= 0x01;
        std::fs::write(&file, &rotten).expect("corrupt it");
    };

    // skopeo, checking the digest of what it copies.
    rot();
    let out = tempfile::tempdir().expect("tempdir");
    let copied = skopeo_copy(addr, &entry, out.path()).await;
    assert!(!copied.ok, "skopeo copied a corrupt module");
    eprintln!("skopeo: {}", copied.stderr.trim());
    assert!(!file.exists(), "the corrupt file was not removed");
    assert_eq!(*dropped.lock().expect("lock"), vec![entry.reference.clone()], "the entry was not dropped");
    assert!(cache.lookup(&entry.reference).is_none());

    // Pulled again (here: published again), then rotting again, fetched by a plain client.
    assert_eq!(publish(&cache, &module).module, entry.module);
    rot();
    let url = format!("http://{addr}/v2/{}/blobs/{}", common::served(&entry), entry.module);
    let response = reqwest::get(&url).await.expect("GET blob");
    let status = response.status();
    match response.bytes().await {
        Ok(bytes) => assert!(
            status != 200 || bytes.len() < module.len(),
            "a corrupt blob was delivered whole: HTTP {status}, {} bytes",
            bytes.len()
        ),
        Err(e) => eprintln!("HTTP {status}, then the body was cut short: {e}"),
    }
    assert!(!file.exists() && cache.lookup(&entry.reference).is_none(), "not dropped the second time");
    assert_eq!(dropped.lock().expect("lock").len(), 2);
    let metrics = reqwest::get(format!("http://{addr}/metrics")).await.expect("metrics").text().await;
    assert!(
        metrics.expect("metrics").contains("registry_cache_requests_total{kind=\"blob\",outcome=\"corrupt\"} 2"),
        "the corrupt reads are counted"
    );
}
