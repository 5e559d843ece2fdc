//! Serving the cache: a read-only OCI distribution API, plain HTTP by sha256, health and
//! metrics.
//!
//! Authorization: an artifact pulled anonymously is public. One pulled with credentials is
//! private, and is served only to a client that presents credentials the upstream registry
//! accepts for that repository right now. The cache asks the upstream once and remembers the
//! answer for a while, so answers come from memory; a failure to ask again never turns a
//! known answer into an error.

use crate::artifact::{digest_hex, OCI_MANIFEST};
use crate::cache::{Cache, CacheError, Entry, BLOB_CHUNK_BYTES};
use crate::publish::served_name;
use crate::pull::parse_reference;
use crate::sources::{PrefetchReport, Prefetcher, TargetStatus};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use futures::StreamExt as _;
use oci_client::secrets::RegistryAuth;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use crate::permissions::{AccessCheck, Permissions};

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ServedLabels {
    kind: &'static str,
    outcome: &'static str,
}

pub struct AppState {
    pub cache: Arc<Cache>,
    pub permissions: Permissions,
    /// The pre-puller, once the service has one: `/status` and the metrics report it.
    prefetcher: Arc<OnceLock<Prefetcher>>,
    served: Family<ServedLabels, Counter>,
    registry: Registry,
}

impl AppState {
    pub fn new(cache: Arc<Cache>, permissions: Permissions) -> Arc<Self> {
        let mut registry = Registry::with_prefix("registry_cache");
        let served = Family::<ServedLabels, Counter>::default();
        registry.register("requests", "Requests served, by kind and outcome", served.clone());
        registry.register(
            "new_credentials_refused_unchecked",
            "Requests with credentials the cache had no answer for, refused without asking the registry: over the budget for such checks",
            permissions.refused_over_budget(),
        );
        let prefetcher = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(PrefetchCollector(Arc::clone(&prefetcher))));
        Arc::new(Self { cache, permissions, prefetcher, served, registry })
    }

    /// Reports `prefetcher` in `/status` and the metrics from now on (the first one set stays).
    pub fn report_prefetcher(&self, prefetcher: Prefetcher) {
        let _ = self.prefetcher.set(prefetcher);
    }

    fn prefetch_report(&self) -> Option<PrefetchReport> {
        self.prefetcher.get().map(Prefetcher::report)
    }

    /// Re-checks permission answers in the background for as long as the task runs.
    pub fn spawn_permission_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let state = Arc::clone(self);
        tokio::spawn(async move { state.permissions.refresh_forever().await })
    }

    fn count(&self, kind: &'static str, outcome: &'static str) {
        self.served.get_or_create(&ServedLabels { kind, outcome }).inc();
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/", get(api_root))
        .route("/v2/{*rest}", get(distribution).head(distribution))
        .route("/wasm/{file}", get(wasm_file))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The version check doubles as the auth challenge: clients send credentials only after a
/// 401 here. Clients without credentials go on anonymously and still get public artifacts.
async fn api_root(headers: HeaderMap) -> Response {
    let mut r = if headers.contains_key(header::AUTHORIZATION) {
        "{}".into_response()
    } else {
        oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "send credentials for private artifacts")
    };
    r.headers_mut().insert("Docker-Distribution-API-Version", axum::http::HeaderValue::from_static("registry/2.0"));
    r
}

/// Ready whenever the server answers: it starts only once the cache is open, and from then on
/// it serves everything cached. Images still being pulled, or failing, are reported by
/// `/status` and the metrics, not here: waiting for them would keep what is cached offline.
async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let Some(report) = s.prefetch_report() else { return "ready\n".into_response() };
    let count = |want: fn(&TargetStatus) -> bool| report.targets.iter().filter(|t| want(&t.status)).count();
    format!(
        "ready; pre-pulled {} of {} images, {} failing (see /status)\n",
        count(|s| *s == TargetStatus::Ready),
        report.targets.len(),
        report.targets.iter().filter(|t| t.failures > 0).count()
    )
    .into_response()
}

fn status_name(status: &TargetStatus) -> &'static str {
    match status {
        TargetStatus::Pending => "pending",
        TargetStatus::Ready => "ready",
        TargetStatus::Failed(_) => "failed",
    }
}

fn secret_label(target: &crate::sources::Target) -> String {
    target.secret.as_ref().map(|s| format!("{}/{}", s.namespace, s.name)).unwrap_or_default()
}

/// What the pre-puller is doing, image by image, as JSON. Names images, pull Secrets, policies
/// and errors, as the logs do; no credentials.
async fn status(State(s): State<Arc<AppState>>) -> Response {
    let Some(report) = s.prefetch_report() else {
        return axum::Json(serde_json::json!({"policySources": false, "initialSyncSettled": true, "targets": []}))
            .into_response();
    };
    let targets: Vec<_> = report
        .targets
        .iter()
        .map(|t| {
            serde_json::json!({
                "image": t.target.image,
                "pullSecret": t.target.secret.as_ref().map(|_| secret_label(&t.target)),
                "status": status_name(&t.status),
                "consecutiveFailures": t.failures,
                "lastError": t.last_error,
                "policies": t.policies,
            })
        })
        .collect();
    axum::Json(serde_json::json!({
        "policySources": true,
        "initialSyncSettled": report.initial_sync_settled,
        "targets": targets,
    }))
    .into_response()
}

/// The pre-puller's state, read at each scrape so that targets gone are gone from the metrics.
struct PrefetchCollector(Arc<OnceLock<Prefetcher>>);

impl std::fmt::Debug for PrefetchCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrefetchCollector")
    }
}

impl Collector for PrefetchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(report) = self.0.get().map(Prefetcher::report) else { return Ok(()) };
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, rows: Vec<(Vec<(&str, String)>, i64)>| {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, value) in rows {
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
            Ok::<_, std::fmt::Error>(())
        };
        ConstGauge::new(i64::from(report.initial_sync_settled)).encode(encoder.encode_descriptor(
            "prefetch_initial_sync_settled",
            "1 once every image of the sources' initial sync was pulled or failed settleAttempts times",
            None,
            MetricType::Gauge,
        )?)?;
        let by_status = ["pending", "ready", "failed"]
            .into_iter()
            .map(|name| {
                let n = report.targets.iter().filter(|t| status_name(&t.status) == name).count();
                (vec![("status", name.to_string())], n as i64)
            })
            .collect();
        gauge(
            &mut encoder,
            "prefetch_targets",
            "Images to pre-pull (one per image and pull secret), by status",
            by_status,
        )?;
        let labels = |t: &crate::sources::TargetReport| {
            vec![("image", t.target.image.clone()), ("pull_secret", secret_label(&t.target))]
        };
        gauge(
            &mut encoder,
            "prefetch_target_ready",
            "1 when the image is cached and, with a pull secret, confirmed readable with it",
            report.targets.iter().map(|t| (labels(t), i64::from(t.status == TargetStatus::Ready))).collect(),
        )?;
        gauge(
            &mut encoder,
            "prefetch_consecutive_failures",
            "Failed pulls or access checks of the image since its last success",
            report.targets.iter().map(|t| (labels(t), i64::from(t.failures))).collect(),
        )?;
        Ok(())
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    if encode(&mut out, &s.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], out).into_response()
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        if let Ok(v) = "Basic realm=\"registry-cache\"".parse() {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    r
}

fn basic_auth(headers: &HeaderMap) -> Option<RegistryAuth> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(RegistryAuth::Basic(u.to_string(), p.to_string()))
}

/// Repository names as the distribution spec allows them: no empty, dot-only or odd segments.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && seg.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && seg.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

/// The entries served under repository `name` (see `publish::served_name`), with their tags.
fn entries_for(cache: &Cache, name: &str) -> Vec<(Entry, Option<String>)> {
    cache
        .entries()
        .into_iter()
        .filter_map(|e| {
            let r = parse_reference(&e.reference).ok()?;
            (served_name(&e.reference)? == name).then(|| (e.clone(), r.tag().map(str::to_string)))
        })
        .collect()
}

async fn distribution(
    State(s): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(rest): Path<String>,
) -> Response {
    let auth = basic_auth(&headers);
    if let Some((name, tags)) = rest.rsplit_once("/tags/").filter(|(_, t)| *t == "list") {
        let _ = tags;
        if !valid_name(name) {
            return oci_error(StatusCode::NOT_FOUND, "NAME_INVALID", "invalid repository name");
        }
        let mut visible = vec![];
        for (e, tag) in entries_for(&s.cache, name) {
            // A signed entry's cosign signature is listed under `sha256-<hex>.sig`, as cosign stores it.
            let sig_tag = e.signature.as_ref().and_then(|_| crate::sign::signature_tag(&e.manifest).ok());
            if (tag.is_some() || sig_tag.is_some()) && s.permissions.allows(&e, auth.clone()).await {
                visible.extend(tag.into_iter().chain(sig_tag));
            }
        }
        visible.sort();
        visible.dedup();
        if visible.is_empty() {
            return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "repository not known");
        }
        return axum::Json(serde_json::json!({"name": name, "tags": visible})).into_response();
    }
    let (name, kind, reference) = if let Some((n, r)) = rest.rsplit_once("/manifests/") {
        (n, "manifest", r)
    } else if let Some((n, r)) = rest.rsplit_once("/blobs/") {
        (n, "blob", r)
    } else {
        return oci_error(StatusCode::NOT_FOUND, "UNSUPPORTED", "unknown endpoint");
    };
    if !valid_name(name) {
        return oci_error(StatusCode::NOT_FOUND, "NAME_INVALID", "invalid repository name");
    }
    let candidates = entries_for(&s.cache, name);
    let entry = match kind {
        "manifest" if reference.starts_with("sha256:") => candidates
            .into_iter()
            .map(|(e, _)| e)
            .find(|e| e.manifest == reference || e.signature.as_deref() == Some(reference)),
        "manifest" => match crate::sign::digest_of_signature_tag(reference) {
            Some(signed) => {
                candidates.into_iter().map(|(e, _)| e).find(|e| e.manifest == signed && e.signature.is_some())
            }
            None => candidates.into_iter().find(|(_, t)| t.as_deref() == Some(reference)).map(|(e, _)| e),
        },
        _ => candidates.into_iter().map(|(e, _)| e).find(|e| {
            e.module == reference
                || e.config == reference
                || e.manifest == reference
                || e.signature.as_deref() == Some(reference)
                || e.extra_blobs.iter().any(|b| b == reference)
        }),
    };
    let unknown = if kind == "manifest" { "MANIFEST_UNKNOWN" } else { "BLOB_UNKNOWN" };
    let Some(entry) = entry else {
        s.count(kind, "unknown");
        return oci_error(StatusCode::NOT_FOUND, unknown, "not in the cache");
    };
    if !s.permissions.allows(&entry, auth.clone()).await {
        s.count(kind, "denied");
        // Whether the artifact exists is itself private: answer as for an unknown one, except
        // to ask for credentials when none were given.
        return if auth.is_none() {
            oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "credentials required")
        } else {
            oci_error(StatusCode::NOT_FOUND, unknown, "not in the cache")
        };
    }
    let digest = if kind == "manifest" && crate::sign::digest_of_signature_tag(reference).is_some() {
        entry.signature.clone().unwrap_or_default()
    } else if kind == "manifest" && !reference.starts_with("sha256:") {
        entry.manifest.clone()
    } else {
        reference.to_string()
    };
    if digest_hex(&digest).is_err() {
        return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
    }
    let media_type = if kind == "manifest" { OCI_MANIFEST } else { "application/octet-stream" };
    match blob_response(&s, kind, &method, &digest, media_type).await {
        Ok(Some(response)) => {
            s.cache.touch(&entry.reference);
            response
        }
        Ok(None) => oci_error(StatusCode::NOT_FOUND, unknown, "not in the cache"),
        Err(e) => {
            tracing::error!(error = %e, %digest, "cannot serve a blob");
            oci_error(StatusCode::NOT_FOUND, unknown, "not in the cache")
        }
    }
}

#[derive(serde::Deserialize)]
struct WasmQuery {
    namespace: Option<String>,
    token: Option<String>,
}

/// Runs blocking file I/O (and hashing) off the async workers: a slow disk must not stall
/// every other request (or the health probes) on this worker.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Io { path: "blob".into(), source: std::io::Error::other(e) })
}

/// Answers with a blob streamed from disk and verified as it goes
/// ([`crate::cache::BlobReader`]): a request holds a chunk or two in memory, whatever the
/// blob's size. `None`: not stored.
///
/// The first chunk is read before answering, so a blob that fits in it (manifests, signatures,
/// small modules) is verified before the status line goes out, and a corrupt one is answered
/// 404. A larger blob found corrupt on the way ends its response before the last chunk: the
/// client gets fewer bytes than Content-Length announced (and no content that passes a digest
/// check), never the whole blob as if it were good. Either way the cache drops the entries
/// using it, as [`Cache::get_blob`] does, and `serve` pulls them again.
///
/// Verified as it goes, rather than trusted because it was verified when stored or at open:
/// a bit flipped on disk since then would otherwise be served as good until the next restart.
/// The price is hashing what is served, which serving paid before it streamed too.
async fn blob_response(
    s: &Arc<AppState>,
    kind: &'static str,
    method: &Method,
    digest: &str,
    media_type: &str,
) -> Result<Option<Response>, CacheError> {
    let (cache, wanted) = (Arc::clone(&s.cache), digest.to_string());
    let opened = blocking(move || {
        let Some(mut reader) = cache.open_blob(&wanted)? else { return Ok(None) };
        match reader.next_chunk(BLOB_CHUNK_BYTES) {
            Ok(first) => Ok(Some((reader, first.unwrap_or_default()))),
            Err(e) => {
                if matches!(e, CacheError::Corrupt(_)) {
                    cache.report_corrupt(&wanted);
                }
                Err(e)
            }
        }
    })
    .await?;
    let (reader, first) = match opened {
        Ok(Some(opened)) => opened,
        Ok(None) => return Ok(None),
        Err(e) => {
            if matches!(e, CacheError::Corrupt(_)) {
                s.count(kind, "corrupt");
            }
            return Err(e);
        }
    };
    s.count(kind, "served");
    let len = reader.len();
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        let state = Arc::clone(s);
        let rest = futures::stream::try_unfold(reader, move |mut reader| {
            let state = Arc::clone(&state);
            async move {
                let cache = Arc::clone(&state.cache);
                let (reader, chunk) = blocking(move || {
                    let chunk = reader.next_chunk(BLOB_CHUNK_BYTES);
                    if matches!(chunk, Err(CacheError::Corrupt(_))) {
                        cache.report_corrupt(reader.digest());
                    }
                    (reader, chunk)
                })
                .await
                .map_err(std::io::Error::other)?;
                match chunk {
                    Ok(Some(bytes)) => Ok(Some((bytes, reader))),
                    Ok(None) => Ok(None),
                    Err(e) => {
                        tracing::error!(error = %e, digest = reader.digest(), "blob found corrupt while being served; response cut short");
                        if matches!(e, CacheError::Corrupt(_)) {
                            state.count(kind, "corrupt");
                        }
                        Err(std::io::Error::other(e))
                    }
                }
            }
        });
        Body::from_stream(futures::stream::once(async move { Ok(first) }).chain(rest))
    };
    Ok(Some(
        Response::builder()
            .header(header::CONTENT_TYPE, media_type)
            .header(header::CONTENT_LENGTH, len)
            .header("Docker-Content-Digest", digest)
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
    ))
}

/// `GET /wasm/<sha256>.wasm`, for `type: HTTP` code sources pinned by sha256. Envoy fetches
/// these without credentials, so a private module needs `?namespace=N&token=T`: a token the
/// cache issued for N (see `render`), while N's pull secret still reads the image.
async fn wasm_file(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(file): Path<String>,
    Query(query): Query<WasmQuery>,
) -> Response {
    let Some(hex) = file.strip_suffix(".wasm") else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let digest = format!("sha256:{hex}");
    if digest_hex(&digest).is_err() {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let entries = s.cache.by_module(&digest);
    let by_token: Option<&str> = match (&query.namespace, &query.token) {
        (Some(ns), Some(token)) if s.permissions.token_valid(ns, &digest, token) => Some(ns),
        _ => None,
    };
    let auth = basic_auth(&headers);
    let mut allowed = None;
    for e in &entries {
        let granted = match by_token {
            Some(ns) => !e.private || s.permissions.namespace_allows(ns, &e.reference).await,
            None => s.permissions.allows(e, auth.clone()).await,
        };
        if granted {
            allowed = Some(e.clone());
            break;
        }
    }
    let Some(entry) = allowed else {
        s.count("wasm", if entries.is_empty() { "unknown" } else { "denied" });
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    match blob_response(&s, "wasm", &Method::GET, &digest, "application/wasm").await {
        Ok(Some(response)) => {
            s.cache.touch(&entry.reference);
            response
        }
        Ok(None) => (StatusCode::NOT_FOUND, "not found").into_response(),
        Err(e) => {
            tracing::error!(error = %e, %digest, "cannot serve a module");
            (StatusCode::NOT_FOUND, "not found").into_response()
        }
    }
}

/// What one client may hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A request's headers must arrive within this, counted from when the server starts
    /// waiting for them (also between requests on a kept-alive connection): a client that
    /// trickles bytes (slowloris) or idles is cut off.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(30), max_connections: 4096 }
    }
}

/// Serves `app` over plain HTTP/1.1 until `shutdown` completes, with the default limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, app, shutdown, ServerLimits::default()).await
}

/// Serves `app` over plain HTTP/1.1 until `shutdown` completes.
///
/// Docker-style clients try HTTPS first and fall back to HTTP only once the TLS handshake
/// fails; a plain HTTP server that just waits for a request line leaves them hanging until
/// their handshake times out. A connection that opens with a TLS record is closed at once.
///
/// An accept that fails (out of file descriptors, say) is retried after a pause: the server
/// never stops because of one, and connections left in the backlog are served once it can.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    limits: ServerLimits,
) -> std::io::Result<()> {
    serve_connections(listener, app, shutdown, limits, None).await
}

/// Serves `app` over HTTPS (HTTP/1.1 in TLS) until `shutdown` completes, with the
/// certificate `tls` holds at each handshake, and the same limits as [`serve_with`]. The
/// handshake counts against `header_read_timeout` too: a client that stalls it is cut off.
/// A plain HTTP request gets a 400 saying to use https, as a hint for a misconfigured client.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    limits: ServerLimits,
    tls: &Arc<crate::tls::ServerTls>,
) -> std::io::Result<()> {
    let acceptor = tls.acceptor().map_err(std::io::Error::other)?;
    serve_connections(listener, app, shutdown, limits, Some(acceptor)).await
}

const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What hyper buffers per connection, each way: the request head it reads (headers larger
/// than this are refused), and the response body it queues for a client that reads slowly.
/// hyper's default, 400 KiB, let a client that asks for a large blob and stops reading hold
/// over half a MiB of the server with TLS's buffer: with `max_connections` of them, gigabytes.
/// One blob chunk is enough to keep the socket busy.
const CONNECTION_BUFFER_BYTES: usize = BLOB_CHUNK_BYTES;

async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    const ACCEPT_RETRY: Duration = Duration::from_millis(100);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            () = &mut shutdown => return Ok(()),
        };
        let Ok(slot) = slot else { return Ok(()) };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let (app, tls) = (app.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper_util::service::TowerToHyperService::new(app);
            let http = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(CONNECTION_BUFFER_BYTES)
                .clone();
            let mut first = [0u8; 1];
            let Some(acceptor) = tls else {
                match tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)).await {
                    Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {}
                    _ => return,
                }
                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                return;
            };
            let handshake = async {
                match stream.peek(&mut first).await {
                    Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => acceptor.accept(stream).await.map(Some),
                    Ok(1) => {
                        refuse_plain_http(stream).await;
                        Ok(None)
                    }
                    Ok(_) => Ok(None),
                    Err(e) => Err(e),
                }
            };
            match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                Ok(Ok(Some(stream))) => {
                    let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
}

/// Answers a plain HTTP request on the TLS port and closes. What has arrived of the request
/// is read first (and dropped): closing with unread data would reset the connection, and the
/// client could lose the answer.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut request = [0u8; 4096];
    let _ = stream.read(&mut request).await;
    const BODY: &str = "this port speaks TLS: use https://\n";
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
