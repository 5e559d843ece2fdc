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
    /// How long each flood is.
    flood_bytes: u64,
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
    async fn start(flood_bytes: u64) -> Arc<Self> {
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
            flood_bytes,
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

    /// `flood_bytes` of JSON whitespace, 64 KiB at a time, counted as the server takes them.
    fn flood(self: &Arc<Self>) -> Body {
        self.open_floods.fetch_add(1, Ordering::SeqCst);
        let open = OpenFlood(Arc::clone(self));
        let (chunk, total) = (Bytes::from(vec![b' '; 64 << 10]), self.flood_bytes);
        Body::from_stream(futures::stream::unfold((0u64, open), move |(sent, open)| {
            let chunk = chunk.clone();
            async move {
                if sent >= total {
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
            ([(header::CONTENT_LENGTH, h.flood_bytes.to_string())], h.flood()).into_response()
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
    let h = Hostile::start(FLOOD_BYTES).await;
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
    let h = Hostile::start(FLOOD_BYTES).await;
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

/// The `registry-cache` binary to measure: `REGISTRY_CACHE_BIN` (a release build, as deployed;
/// relative to the workspace) when set, else this test build's.
fn measured_bin() -> (tokio::process::Command, String) {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = std::env::var("REGISTRY_CACHE_BIN")
        .map(|p| workspace.join(p).display().to_string())
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_registry-cache").into());
    let mut cmd = tokio::process::Command::new(&path);
    cmd.env("RUST_LOG", "warn").kill_on_drop(true);
    (cmd, path)
}

/// `VmRSS`, `VmHWM`... of process `pid`, in bytes.
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The memory limit of the registry-cache container in deploy/statefulset.yaml, in bytes.
fn deployment_memory_limit() -> u64 {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/statefulset.yaml"))
        .expect("deploy/statefulset.yaml");
    let limits = yaml.split_once("limits:").expect("resources.limits").1;
    let memory = limits.lines().find_map(|l| l.trim().strip_prefix("memory:")).expect("limits.memory").trim();
    let mi: u64 = memory.strip_suffix("Mi").expect("a limit in Mi").parse().expect("a number");
    mi << 20
}

/// `serve` over TLS (as deployed) on a free loopback port, with `args`; returns it with its
/// base URL once `/healthz` answers.
async fn start_serve(
    dir: &std::path::Path,
    ca: &common::TestCa,
    args: &[&str],
    client: &reqwest::Client,
) -> (tokio::process::Child, String) {
    let (crt, key) = ca.leaf();
    std::fs::write(dir.join("tls.crt"), crt).expect("tls.crt");
    std::fs::write(dir.join("tls.key"), key).expect("tls.key");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let (mut cmd, _) = measured_bin();
    cmd.arg("serve").arg("--tls-cert").arg(dir.join("tls.crt")).arg("--tls-key").arg(dir.join("tls.key"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")]).args(args);
    let child = cmd.spawn().expect("registry-cache serve");
    let base = format!("https://127.0.0.1:{port}");
    let health = format!("{base}/healthz");
    let up = harness::eventually(Duration::from_secs(60), || common::get_ok(client, &health)).await;
    assert!(up, "serve did not answer /healthz");
    (child, base)
}

/// Samples the resident memory of `pid` every 10 ms until `stop` is set; returns the most seen.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut most = 0;
        while !stop.load(Ordering::SeqCst) {
            most = most.max(proc_status(pid, "VmRSS"));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Clients in figure (c): as many as `serve` serves at once (`ServerLimits::max_connections`).
const STALLED_CLIENTS: usize = 4096;

/// Resident memory of `registry-cache serve` (a) while a hostile registry serves a 1 GiB
/// manifest to its pre-puller, (b) while 64 clients download a 64 MiB module at once, (c) while
/// 4,096 clients ask for it and stop reading, all over TLS as deployed. Compared with the
/// StatefulSet's memory limit. Run as in README.md:
///
/// ```sh
/// cargo build --release -p registry-cache
/// REGISTRY_CACHE_BIN=target/release/registry-cache \
///   cargo test -p registry-cache --test bounded_memory -- --ignored --nocapture rss_figures
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures (minutes in a debug build)"]
async fn rss_figures() {
    let limit = deployment_memory_limit();
    let (_, binary) = measured_bin();
    println!("measuring {binary}; the StatefulSet's memory limit is {}", mib(limit));
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = common::TestCa::new(dir.path(), "rss");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca.cert).expect("CA PEM"))
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");

    // (a) The pre-puller meets a 1 GiB manifest.
    let h = Hostile::start(1 << 30).await;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("policies");
    let image = format!("{}/hostile/manifest:v1", h.addr);
    std::fs::write(policies.join("policy.yaml"), common::policy_yaml("default", "hostile", &image, false))
        .expect("policy");
    let cache_a = dir.path().join("cache-a");
    let (mut serve, base) = start_serve(
        dir.path(),
        &ca,
        &[
            "--cache-dir",
            &cache_a.display().to_string(),
            "--policies-dir",
            &policies.display().to_string(),
            "--insecure-registry",
            &h.addr.to_string(),
        ],
        &client,
    )
    .await;
    let pid = serve.id().expect("pid");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, Arc::clone(&stop));
    let refused = harness::eventually(Duration::from_secs(120), || async {
        let Ok(r) = client.get(format!("{base}/status")).send().await else { return false };
        let status: serde_json::Value = r.json().await.unwrap_or_default();
        status["targets"][0]["lastError"].as_str().is_some_and(|e| e.contains("larger than"))
    })
    .await;
    assert!(refused, "the 1 GiB manifest was not refused");
    let _ = harness::eventually(Duration::from_secs(60), || async { h.open_floods.load(Ordering::SeqCst) == 0 }).await;
    stop.store(true, Ordering::SeqCst);
    let sampled = sampler.await.expect("sampler");
    let (hwm_a, sent) = (proc_status(pid, "VmHWM"), h.sent.load(Ordering::SeqCst));
    let _ = serve.kill().await;
    println!(
        "(a) 1 GiB manifest: refused; the registry had sent {} of it (every attempt so far); serve's peak RSS \
         {} (VmHWM; sampled VmRSS peak {})",
        mib(sent),
        mib(hwm_a),
        mib(sampled)
    );

    // (b) 64 clients download a 64 MiB module at once.
    let cache_b = dir.path().join("cache-b");
    let module = wasm_module("rss", 64 << 20);
    let entry = publish(&Cache::open(&cache_b, 1 << 30).expect("cache"), &module);
    drop(module);
    let (mut serve, base) =
        start_serve(dir.path(), &ca, &["--cache-dir", &cache_b.display().to_string()], &client).await;
    let pid = serve.id().expect("pid");
    let idle = proc_status(pid, "VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, Arc::clone(&stop));
    let url = format!("{base}/wasm/{}.wasm", entry.module.trim_start_matches("sha256:"));
    let started = std::time::Instant::now();
    let downloads: Vec<_> = (0..64)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                use sha2::Digest as _;
                let mut response = client.get(&url).send().await.expect("GET");
                assert_eq!(response.status(), 200);
                let (mut hasher, mut len) = (sha2::Sha256::new(), 0u64);
                while let Some(chunk) = response.chunk().await.expect("body") {
                    hasher.update(&chunk);
                    len += chunk.len() as u64;
                }
                (format!("sha256:{}", hex::encode(hasher.finalize())), len)
            })
        })
        .collect();
    for d in downloads {
        let (digest, len) = d.await.expect("download");
        assert_eq!((digest.as_str(), len), (entry.module.as_str(), entry.size), "a download was not the module");
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let sampled = sampler.await.expect("sampler");
    let hwm_b = proc_status(pid, "VmHWM");

    // (c) Clients that ask for the module and stop reading: whatever the server buffers for
    // them stays until they go.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, Arc::clone(&stop));
    let mut stalled = vec![];
    for batch in (0..STALLED_CLIENTS).collect::<Vec<_>>().chunks(128) {
        let batch: Vec<_> = batch.iter().map(|_| client.get(&url).send()).collect();
        for response in futures::future::join_all(batch).await {
            stalled.push(response.expect("GET"));
        }
    }
    // Until the server's memory stops growing: every stalled response's buffers are full.
    let mut last = 0;
    let settled = harness::eventually(Duration::from_secs(120), || {
        let now = proc_status(pid, "VmRSS");
        let same = now == last;
        last = now;
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            same
        }
    })
    .await;
    assert!(settled, "serve's memory kept growing");
    stop.store(true, Ordering::SeqCst);
    let sampled_c = sampler.await.expect("sampler");
    let hwm_c = proc_status(pid, "VmHWM");
    drop(stalled);
    let _ = serve.kill().await;
    println!(
        "(b) 64 concurrent downloads of a 64 MiB module (4 GiB served in {:.1} s, every one verified): serve's \
         RSS {} idle, peak {} (VmHWM; sampled VmRSS peak {})",
        elapsed.as_secs_f64(),
        mib(idle),
        mib(hwm_b),
        mib(sampled)
    );
    println!(
        "(c) {STALLED_CLIENTS} clients that ask for the 64 MiB module and stop reading: serve's peak RSS {} \
         (VmHWM; sampled VmRSS peak {})",
        mib(hwm_c),
        mib(sampled_c)
    );
    assert!(hwm_a.max(hwm_b).max(hwm_c) < limit, "over the StatefulSet's memory limit of {}", mib(limit));
}
