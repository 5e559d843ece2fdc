//! Shared by the fault, load and abuse tests: a real private registry (the harness's
//! `docker-registry`), Wasm modules of any size, the cache's server in-process, raw HTTP for
//! requests a URL library would normalise, and a fault-injecting proxy in front of the registry.

#![allow(dead_code)] // Each test crate uses part of it.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use harness::registry::DockerRegistry;
use oci_client::secrets::RegistryAuth;
use registry_cache::artifact::Format;
use registry_cache::cache::Cache;
use registry_cache::pull::{PullOptions, Puller};
use registry_cache::server::{self, AccessCheck, AppState, Permissions};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const USER: &str = "ci";
pub const PASSWORD: &str = "wasm-s3cret";

pub async fn registry() -> DockerRegistry {
    DockerRegistry::start(USER, PASSWORD).await.expect("docker-registry")
}

pub fn auth() -> RegistryAuth {
    RegistryAuth::Basic(USER.into(), PASSWORD.into())
}

/// A valid module of about `size` bytes: the header, then a custom section named after `tag`
/// holding filler, so that every tag gives other bytes.
pub fn wasm_module(tag: &str, size: usize) -> Vec<u8> {
    let name = format!("churn-guard-test-{tag}");
    let filler: Vec<u8> = tag.bytes().cycle().take(size.saturating_sub(name.len() + 16)).collect();
    let mut section = vec![];
    leb128(&mut section, name.len());
    section.extend_from_slice(name.as_bytes());
    section.extend_from_slice(&filler);
    let mut m = vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x00];
    leb128(&mut m, section.len());
    m.extend_from_slice(&section);
    m
}

fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Pushes `module` to `registry_addr` as `<repo>:v1` in the "oci" format (the blob is the module
/// itself, so a flipped byte in it is a flipped byte in the module); returns the reference.
pub async fn push(registry_addr: SocketAddr, repo: &str, module: &[u8]) -> String {
    let image = format!("{registry_addr}/{repo}:v1");
    registry_cache::package::push(&image, Format::SoloOci, module, &auth(), &[registry_addr.to_string()])
        .await
        .expect("push");
    image
}

/// A puller for `addr` over plain HTTP with `read_timeout`.
pub fn puller(addr: SocketAddr, read_timeout: Duration) -> Puller {
    Puller::new(PullOptions { insecure_registries: vec![addr.to_string()], read_timeout, ..PullOptions::default() })
}

/// Access checks asked of the upstream through `puller`, as `serve` does.
pub fn access_check(puller: Puller) -> AccessCheck {
    registry_cache::permissions::upstream_access_check(Arc::new(puller))
}

/// Serves `state` on a free loopback port, on the current runtime.
pub async fn serve(state: Arc<AppState>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve(listener, server::router(state), std::future::pending()));
    addr
}

/// The repository name the cache serves `entry` under.
pub fn served(entry: &registry_cache::cache::Entry) -> String {
    registry_cache::publish::served_name(&entry.reference).expect("a served name")
}

pub fn serve_state(cache: Arc<Cache>, permissions: Permissions) -> Arc<AppState> {
    AppState::new(cache, permissions)
}

/// Names of the files in `<cache>/<sub>`.
pub fn files_in(cache_dir: &Path, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache_dir.join(sub))
        .map(|d| d.flatten().map(|f| f.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Every blob file of the cache, `sha256:<hex>`.
pub fn blob_digests(cache_dir: &Path) -> Vec<String> {
    files_in(cache_dir, "blobs/sha256").into_iter().map(|f| format!("sha256:{f}")).collect()
}

/// The blobs the entries of a cache refer to.
pub fn referenced_blobs(cache: &Cache) -> Vec<String> {
    let mut all: Vec<String> = cache
        .entries()
        .into_iter()
        .flat_map(|e| [e.module, e.manifest, e.config].into_iter().chain(e.signature).chain(e.extra_blobs))
        .collect();
    all.sort();
    all.dedup();
    all
}

/// A response read off the wire as sent.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends one request exactly as written (no normalisation of `..`, `%2e` or `//`) and reads the
/// response to the end of the connection. Status 0: the server closed without answering.
pub async fn raw(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, String)]) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    // The server may answer and close before reading all of a huge request line.
    let _ = conn.write_all(request.as_bytes()).await;
    let mut out = vec![];
    let read = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "{method} {}: no answer within 20s", &target[..target.len().min(100)]);
    let split = out.windows(4).position(|w| w == b"\r\n\r\n");
    let Some(split) = split else { return RawResponse { status: 0, headers: String::new(), body: out } };
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = out[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    RawResponse { status, headers: head, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// What the proxy does to the traffic it forwards.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forwards faithfully.
    None,
    /// Blob bodies come `chunk` bytes at a time, `delay` apart.
    Slow { chunk: usize, delay: Duration },
    /// Blob bodies stop after `after` bytes, and the connection stays open.
    Stall { after: usize },
    /// Every request is answered 503.
    Unavailable,
    /// Blob bodies are cut after `after` bytes and the connection is dropped.
    ResetBlob { after: usize },
    /// One byte in the middle of every blob body is flipped.
    FlipBlob,
    /// Manifests name `fake` where the registry has `real`; a request for blob `fake` gets
    /// blob `real`. The registry's digest header is dropped from rewritten manifests, as a
    /// registry that lies would not send one that gives it away.
    ManifestLayerDigest { real: String, fake: String },
}

struct ProxyState {
    upstream: SocketAddr,
    fault: Mutex<Fault>,
    requests: AtomicUsize,
    http: reqwest::Client,
}

/// A fault-injecting HTTP proxy in front of a registry, on loopback.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let http =
            reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("reqwest client");
        let state =
            Arc::new(ProxyState { upstream, fault: Mutex::new(Fault::None), requests: AtomicUsize::new(0), http });
        let app = axum::Router::new().fallback(forward).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(server::serve(listener, app, std::future::pending()));
        Self { addr, state }
    }

    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

async fn forward(State(p): State<Arc<ProxyState>>, request: Request) -> Response {
    p.requests.fetch_add(1, Ordering::SeqCst);
    let fault = p.fault.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if fault == Fault::Unavailable {
        let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"injected outage"}]}"#;
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let (parts, body) = request.into_parts();
    let mut target = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    if let Fault::ManifestLayerDigest { real, fake } = &fault {
        if target.ends_with(&format!("/blobs/{fake}")) {
            target = target.replace(fake.as_str(), real);
        }
    }
    let is_blob = target.contains("/blobs/sha256:") && parts.method == axum::http::Method::GET;
    let is_manifest = target.contains("/manifests/") && parts.method == axum::http::Method::GET;
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let mut headers = parts.headers.clone();
    headers.remove(header::HOST);
    let upstream = p
        .http
        .request(parts.method.clone(), format!("http://{}{target}", p.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream = match upstream {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("upstream: {e}")).into_response(),
    };
    let status = upstream.status();
    let mut headers = HeaderMap::new();
    for (name, value) in upstream.headers() {
        if name != header::TRANSFER_ENCODING && name != header::CONNECTION {
            headers.append(name.clone(), value.clone());
        }
    }
    let respond = |headers: HeaderMap, body: Body| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        r
    };
    match fault {
        Fault::ManifestLayerDigest { real, fake } if is_manifest => {
            let text = upstream.text().await.unwrap_or_default();
            headers.remove(header::CONTENT_LENGTH);
            headers.remove("docker-content-digest");
            respond(headers, Body::from(text.replace(&real, &fake)))
        }
        Fault::FlipBlob if is_blob && status.is_success() => {
            let mut bytes = upstream.bytes().await.unwrap_or_default().to_vec();
            let middle = bytes.len() / 2;
            if let Some(b) = bytes.get_mut(middle) {
                *b ^= 0x20;
            }
            respond(headers, Body::from(bytes))
        }
        Fault::Slow { chunk, delay } if is_blob => {
            let bytes = upstream.bytes().await.unwrap_or_default();
            let chunk = chunk.max(1);
            let pieces: Vec<Bytes> =
                (0..bytes.len()).step_by(chunk).map(|i| bytes.slice(i..(i + chunk).min(bytes.len()))).collect();
            let stream = futures::stream::iter(pieces).then(move |piece| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::io::Error>(piece)
            });
            respond(headers, Body::from_stream(stream))
        }
        Fault::Stall { after } | Fault::ResetBlob { after } if is_blob => {
            let stall = matches!(fault, Fault::Stall { .. });
            let bytes = upstream.bytes().await.unwrap_or_default();
            let head = bytes.slice(..after.min(bytes.len()));
            let stream =
                futures::stream::iter([Ok::<_, std::io::Error>(head)]).chain(futures::stream::once(async move {
                    if stall {
                        std::future::pending::<()>().await;
                    }
                    Err::<Bytes, _>(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected reset"))
                }));
            respond(headers, Body::from_stream(stream))
        }
        _ => {
            let bytes = upstream.bytes().await.unwrap_or_default();
            respond(headers, Body::from(bytes))
        }
    }
}

use futures::StreamExt as _;

/// A Docker `config.json` with the test credentials for `addr` (e.g. the proxy's).
pub fn docker_config(addr: SocketAddr) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    serde_json::json!({"auths": {addr.to_string(): {"auth": encoded}}}).to_string()
}

pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// The `registry-cache` binary, as users run it.
pub fn bin() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_registry-cache"));
    cmd.env("RUST_LOG", "warn").env("RUST_BACKTRACE", "0").kill_on_drop(true);
    cmd
}

/// Runs `cmd` to completion, within a minute.
pub async fn run(cmd: &mut tokio::process::Command) -> Run {
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the command did not finish within a minute")
        .expect("run");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        elapsed: started.elapsed(),
    }
}

/// A minimal app (`GET /` answers "ok") behind `server::serve_with` and `limits`.
pub async fn serve_minimal(limits: server::ServerLimits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    tokio::spawn(server::serve_with(listener, app, std::future::pending(), limits));
    addr
}

/// Whether `GET /` at `addr` answers 200 within 5 s.
pub async fn answers(addr: SocketAddr) -> bool {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    client.get(format!("http://{addr}/")).send().await.is_ok_and(|r| r.status() == 200)
}

/// An EnvoyExtensionPolicy `namespace/name` naming `image`, with pull Secret `regcred` when
/// `secret` is set, as a manifest for a policies directory.
pub fn policy_yaml(namespace: &str, name: &str, image: &str, secret: bool) -> String {
    let pull_secret = if secret { "\n          pullSecretRef:\n            name: regcred" } else { "" };
    format!(
        "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: EnvoyExtensionPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  targetRefs:\n    - group: gateway.networking.k8s.io\n      kind: HTTPRoute\n      name: backend\n\
         \x20 wasm:\n    - name: {name}\n      code:\n        type: Image\n        image:\n          url: {image}{pull_secret}\n"
    )
}

/// `serve` in-process: the service, its address, and the server task (aborted on drop).
pub struct Serving {
    pub service: registry_cache::service::Service,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a service reading policies from `policies_dir` (scanned every second) with `options`
/// otherwise, and serves it on a free loopback port.
pub async fn serve_service(mut options: registry_cache::service::ServiceOptions, policies_dir: &Path) -> Serving {
    options.settings.sources.directories = vec![policies_dir.to_path_buf()];
    options.settings.sources.rescan_seconds = 1;
    let service = registry_cache::service::Service::start(options).await.expect("service");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = server::router(Arc::clone(&service.state));
    let task = tokio::spawn(async move {
        let _ = server::serve(listener, app, std::future::pending()).await;
    });
    Serving { service, addr, task }
}

/// `ServiceOptions` for a cache in `cache_dir` reaching `registries` over plain HTTP.
pub fn service_options(
    cache_dir: &Path,
    registries: &[SocketAddr],
    url_key: &[u8],
) -> registry_cache::service::ServiceOptions {
    registry_cache::service::ServiceOptions {
        cache_dir: cache_dir.to_path_buf(),
        max_cache_bytes: 1 << 30,
        permission_ttl: Duration::from_secs(300),
        pull: PullOptions {
            insecure_registries: registries.iter().map(ToString::to_string).collect(),
            ..PullOptions::default()
        },
        settings: registry_cache::sources::config::Settings::default(),
        signer: None,
        url_key: url_key.to_vec(),
    }
}

/// `GET /status` as JSON (Null when it does not answer with JSON).
pub async fn status(addr: SocketAddr) -> serde_json::Value {
    let Ok(r) = reqwest::get(format!("http://{addr}/status")).await else { return serde_json::Value::Null };
    let text = r.text().await.unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// The `/status` entry of `image`, if any.
pub async fn target_status(addr: SocketAddr, image: &str) -> Option<serde_json::Value> {
    status(addr).await["targets"].as_array()?.iter().find(|t| t["image"] == image).cloned()
}

/// The body of `GET path` (plain HTTP) when it answers 200.
pub async fn get_body(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let r = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.bytes().await.ok().map(|b| b.to_vec())
}

/// The `/wasm` URL path that lets `namespace` fetch `module` under `url_key`.
pub fn wasm_path(url_key: &[u8], namespace: &str, module: &str) -> String {
    let token = registry_cache::permissions::url_token(url_key, namespace, module).expect("url key long enough");
    format!("/wasm/{}.wasm?namespace={namespace}&token={token}", module.trim_start_matches("sha256:"))
}

/// Runs the openssl CLI, which makes the tests' certificates (an independent implementation).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("openssl CLI");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A certificate authority made with openssl, in a directory of its own.
pub struct TestCa {
    dir: std::path::PathBuf,
    /// The CA certificate, PEM: what clients trust, `ca.crt`.
    pub cert: Vec<u8>,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> Self {
        let dir = dir.join(format!("ca-{name}"));
        std::fs::create_dir_all(&dir).expect("CA dir");
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                &format!("/CN=test CA {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        let cert = std::fs::read(dir.join("ca.crt")).expect("ca.crt");
        Self { dir, cert }
    }

    /// A new server certificate for 127.0.0.1 and localhost, with a random serial:
    /// (`tls.crt`, `tls.key`), PEM.
    pub fn leaf(&self) -> (Vec<u8>, Vec<u8>) {
        let ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
                   keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n";
        std::fs::write(self.dir.join("leaf.ext"), ext).expect("ext");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "tls.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=registry-cache",
            ],
        );
        let serial: u64 = rand_serial();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-days",
                "2",
                "-set_serial",
                &serial.to_string(),
                "-extfile",
                "leaf.ext",
                "-out",
                "tls.crt",
            ],
        );
        (
            std::fs::read(self.dir.join("tls.crt")).expect("tls.crt"),
            std::fs::read(self.dir.join("tls.key")).expect("tls.key"),
        )
    }
}

fn rand_serial() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() >> 1
}

/// A directory laid out as the kubelet projects a Secret volume: each key a symlink through
/// `..data`, which points at a timestamped directory and is replaced atomically (a rename)
/// when the Secret changes.
pub struct SecretVolume {
    pub dir: std::path::PathBuf,
    generation: u32,
}

impl SecretVolume {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("volume dir");
        Self { dir: dir.to_path_buf(), generation: 0 }
    }

    /// Makes `files` (key, content) the volume's content, all at once.
    pub fn project(&mut self, files: &[(&str, &[u8])]) {
        use std::os::unix::fs::symlink;
        self.generation += 1;
        let data = format!("..gen_{}", self.generation);
        std::fs::create_dir(self.dir.join(&data)).expect("data dir");
        for (key, content) in files {
            std::fs::write(self.dir.join(&data).join(key), content).expect("secret file");
            let link = self.dir.join(key);
            if link.symlink_metadata().is_err() {
                symlink(format!("..data/{key}"), &link).expect("key symlink");
            }
        }
        symlink(&data, self.dir.join("..data_tmp")).expect("..data_tmp");
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).expect("swap ..data");
    }

    pub fn path(&self, key: &str) -> std::path::PathBuf {
        self.dir.join(key)
    }
}

/// An HTTPS client that trusts `ca` (PEM) and nothing else, on a new connection each time.
pub fn https_client(ca: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca).expect("CA PEM"))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Whether `GET url` through `client` answers 200.
pub async fn get_ok(client: &reqwest::Client, url: &str) -> bool {
    client.get(url).send().await.is_ok_and(|r| r.status() == 200)
}

/// A minimal app (`GET /` answers "ok") behind `server::serve_tls`, `limits` and `tls`.
pub async fn serve_minimal_tls(limits: server::ServerLimits, tls: &Arc<registry_cache::tls::ServerTls>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let tls = Arc::clone(tls);
    tokio::spawn(async move { server::serve_tls(listener, app, std::future::pending(), limits, &tls).await });
    addr
}
