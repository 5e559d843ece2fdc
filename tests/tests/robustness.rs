//! Fault and abuse tests against real Envoy 1.40 (`--concurrency 2`), loopback only: hot plugin
//! reconfiguration and Wasm VM replacement under traffic, thousands of distinct endpoints,
//! property values of every odd shape Envoy hands the filter, huge and numerous headers, and the
//! retry budget under a full outage. Every test asserts that nothing was lost; figures are
//! printed (`--nocapture`) and recorded in `docs/reliability.md`.
//!
//! Run: `cargo test -p churn-guard-tests --test robustness -- --test-threads 1 --nocapture`

use bytes::Bytes;
use harness::gateway::{self, FallbackRoute, GatewaySpec, PRIMARY};
use harness::upstream::{refusing_addr, Mode, Upstream};
use harness::{client, eventually, fresh_connection_client, Deadline, DebugHeader, Lab};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(60);
const OVERRIDE_HEADER: &str = "x-gateway-destination-endpoint";
const FALLBACK_HEADER: &str = "x-churn-guard-fallback";
/// Envoy's worker threads (`--concurrency 2` in the harness): one filter VM, and one retry
/// budget, per worker.
const WORKERS: u64 = 2;
const V8_CREATED: &str = "wasm.envoy.wasm.runtime.v8.created";
const V8_ACTIVE: &str = "wasm.envoy.wasm.runtime.v8.active";

// ---------------------------------------------------------------------------------------------
// xDS beyond what the harness writes: the same documents, edited.

static XDS_VERSION: AtomicU64 = AtomicU64::new(1_000_000);

fn write_xds(dir: &Path, file: &str, type_url: &str, resources: Vec<Value>) -> anyhow::Result<()> {
    let doc = gateway::discovery_response(type_url, XDS_VERSION.fetch_add(1, Ordering::SeqCst), resources);
    let tmp = dir.join(format!(".{file}.robustness.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

/// Rewrites the listener (LDS) for `spec`, with `edit` applied to the Wasm filter's `config`
/// (`envoy.extensions.wasm.v3.PluginConfig`).
fn write_listener(lab: &Lab, spec: &GatewaySpec, edit: impl FnOnce(&mut Value)) -> anyhow::Result<()> {
    let mut listener = gateway::listener(&lab.xds.dir, spec);
    let config = listener
        .pointer_mut("/defaultFilterChain/filters/0/typedConfig/httpFilters/0/typedConfig/config")
        .ok_or_else(|| anyhow::anyhow!("no Wasm filter in the listener"))?;
    edit(config);
    write_xds(&lab.xds.dir, "lds.json", "type.googleapis.com/envoy.config.listener.v3.Listener", vec![listener])
}

fn static_cluster(name: &str, endpoints: Vec<Value>) -> Value {
    let lb_endpoints: Vec<Value> =
        endpoints.into_iter().map(|address| json!({"endpoint": {"address": address}})).collect();
    json!({
        "name": name,
        "type": "STATIC",
        "connectTimeout": "2s",
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": lb_endpoints}]}
    })
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}})
}

fn enabled(mut route: Value) -> Value {
    route["typedPerFilterConfig"] = json!({gateway::FILTER:
        {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}});
    route
}

// ---------------------------------------------------------------------------------------------
// Upstreams the harness does not have: unix sockets, ones that never answer, and ones that
// answer with huge or numerous headers.

/// Aborts the server's tasks when dropped.
struct Server {
    accept: JoinHandle<()>,
    hits: Arc<AtomicU64>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Answers by path: `/resp-many-headers` with 80 extra headers, `/resp-huge-header` with one
/// 50 KiB header, `/resp-too-big-header` with one 70 KiB header (over Envoy's 60 KiB limit),
/// anything else with 200 `ok`. Accepts requests of up to 1000 headers and 1 MiB of them, so
/// that Envoy's limits, not the upstream's, decide.
async fn abusive_response(
    req: hyper::Request<hyper::body::Incoming>,
    hits: Arc<AtomicU64>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let _ = req.into_body().collect().await;
    hits.fetch_add(1, Ordering::SeqCst);
    let mut builder = hyper::Response::builder().status(200);
    match path.as_str() {
        "/resp-many-headers" => {
            for i in 0..80 {
                builder = builder.header(format!("x-many-{i}"), format!("value-{i}"));
            }
        }
        "/resp-huge-header" => builder = builder.header("x-huge", "h".repeat(50 * 1024)),
        "/resp-too-big-header" => builder = builder.header("x-huge", "h".repeat(100 * 1024)),
        _ => {}
    }
    Ok(builder.body(Full::new(Bytes::from_static(b"ok"))).unwrap_or_default())
}

fn serve_connection<S>(stream: S, hits: Arc<AtomicU64>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| abusive_response(req, Arc::clone(&hits)));
        let _ = hyper::server::conn::http1::Builder::new()
            .max_headers(1000)
            .max_buf_size(1 << 20)
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    });
}

async fn abusive_tcp_upstream(addr: &str) -> anyhow::Result<(SocketAddr, Server)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let hits = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&hits);
    let accept = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            serve_connection(stream, Arc::clone(&counter));
        }
    });
    Ok((local, Server { accept, hits }))
}

async fn unix_upstream(path: &Path) -> anyhow::Result<Server> {
    let listener = tokio::net::UnixListener::bind(path)?;
    let hits = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&hits);
    let accept = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            serve_connection(stream, Arc::clone(&counter));
        }
    });
    Ok(Server { accept, hits })
}

/// Accepts connections and reads requests, but never answers.
async fn silent_upstream() -> anyhow::Result<(SocketAddr, Server)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?;
    let hits = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&hits);
    let accept = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok((local, Server { accept, hits }))
}

async fn refusing_v6_addr() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("[::1]:0").await?;
    Ok(listener.local_addr()?)
}

// ---------------------------------------------------------------------------------------------
// Background traffic that counts every request that did not come back 200.

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Counts {
    async fn record_response(&self, result: Result<reqwest::Response, reqwest::Error>) {
        match result {
            Ok(r) if r.status() != 200 => {
                let flags =
                    format!("{:?} {:?}", r.headers().get("x-envoy-response-flags"), r.headers().get("x-churn-guard"));
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                self.record(Err(format!("status {status} {flags} {body}")));
            }
            other => self.record(other.map(|r| r.status()).map_err(|e| format!("error {e:?}"))),
        }
    }

    fn record(&self, result: Result<reqwest::StatusCode, String>) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        let failure = match result {
            Ok(status) if status == 200 => return,
            Ok(status) => format!("status {status}"),
            Err(e) => e,
        };
        self.failed.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut first) = self.first_failures.lock() {
            if first.len() < 5 {
                first.push(failure);
            }
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    fn failures(&self) -> Vec<String> {
        self.first_failures.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// GET loops, one on a keep-alive connection and one opening a connection per request, until
/// stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    loops: Vec<JoinHandle<()>>,
    counts: Arc<Counts>,
}

impl Traffic {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let loops = [client(), fresh_connection_client()]
            .into_iter()
            .map(|c| {
                let (stop, counts, url) = (Arc::clone(&stop), Arc::clone(&counts), url.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        counts.record_response(c.get(&url).send().await).await;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Self { stop, loops, counts }
    }

    async fn stop(self) -> Arc<Counts> {
        self.stop.store(true, Ordering::SeqCst);
        for l in self.loops {
            let _ = l.await;
        }
        self.counts
    }
}

/// A debug header from a request on a fresh connection (so it may land on either worker).
async fn fresh_debug_header(lab: &Lab, counts: &Counts) -> Option<DebugHeader> {
    let result = fresh_connection_client().get(lab.url("/")).send().await;
    let header = result.as_ref().ok().and_then(DebugHeader::of);
    counts.record_response(result).await;
    header
}

fn vm_number(h: &DebugHeader) -> u64 {
    h.vm.parse().unwrap_or(0)
}

/// Log lines that show a VM failing: a Rust panic (the filter's hook logs it), a Wasm trap, or
/// Envoy giving up on the plugin.
fn vm_failures(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains("panicked") || l.contains("Uncaught") || l.contains("wasm trap") || l.contains("VM failed")
        })
        .map(str::to_string)
        .collect()
}

async fn stat(lab: &Lab, name: &str) -> u64 {
    lab.envoy.stat(name).await.unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// 1. Hot reload of the plugin configuration.

fn reconfigure(lab: &mut Lab, config: &str) -> anyhow::Result<()> {
    let mut spec = lab.spec.clone();
    if let Some(f) = spec.filter.as_mut() {
        f.config = config.to_string();
    }
    lab.xds.write_gateway(&spec)
}

/// The plugin configuration is rewritten four times while GETs flow, with a refusing endpoint
/// in the cluster throughout: debug header off, an invalid configuration (Envoy must reject it
/// and keep the previous one), debug header back on with other retry and ejection settings.
/// No request fails, and each accepted configuration is what answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_config_reload_loses_no_request() -> anyhow::Result<()> {
    let (a, b, dead) = (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?, refusing_addr().await?);
    let spec = GatewaySpec { expose_response_flags: true, ..GatewaySpec::default() };
    let mut lab = Lab::start(spec, Some(r#"{"debugHeader":true}"#), &[a.addr, b.addr, dead], &[]).await?;
    let traffic = Traffic::start(lab.url("/"));
    let counts = Arc::clone(&traffic.counts);
    let created_before = stat(&lab, V8_CREATED).await;
    let active_before = stat(&lab, V8_ACTIVE).await;

    // The current configuration answers: the debug header is there, from the VMs' first roots.
    let first = eventually(LIMIT, || async { fresh_debug_header(&lab, &counts).await.is_some() }).await;
    assert!(first, "no debug header with debugHeader on");
    let mut newest_root = 0;
    for _ in 0..20 {
        if let Some(h) = fresh_debug_header(&lab, &counts).await {
            newest_root = newest_root.max(vm_number(&h));
        }
    }

    // 1: debug header off. Fresh connections land on either worker: 20 in a row without the
    // header means both serve the new configuration.
    reconfigure(&mut lab, r#"{"debugHeader":false}"#)?;
    let (mut quiet, deadline) = (0, Deadline::after(LIMIT));
    while quiet < 20 {
        assert!(!deadline.passed(), "the debug header never went away");
        quiet = if fresh_debug_header(&lab, &counts).await.is_none() { quiet + 1 } else { 0 };
    }

    // 2: invalid; rejected, and the previous configuration stays.
    let rejected_before = stat(&lab, "listener_manager.lds.update_rejected").await;
    reconfigure(&mut lab, r#"{"debugHeader":true,"retry":{"maxRetries":"ten"}}"#)?;
    let rejected = eventually(LIMIT, || async {
        stat(&lab, "listener_manager.lds.update_rejected").await > rejected_before
            && lab.envoy.log().contains("field `retry.maxRetries`")
    })
    .await;
    assert!(rejected, "Envoy did not reject the invalid configuration:\n{}", lab.envoy.log_tail(20));
    for _ in 0..20 {
        assert!(fresh_debug_header(&lab, &counts).await.is_none(), "the rejected configuration took effect");
    }

    // 3 and 4: valid again, debug header on, other retry and ejection settings (at least ten
    // retries: without steering Envoy may pick the refusing endpoint for every attempt, and the
    // odds of that are what `maxRetries` buys down); each answers from
    // root contexts newer than any before it, on both workers.
    for config in [
        r#"{"debugHeader":true,"retry":{"maxRetries":12,"budget":{"ratio":2}},"ejection":{"baseEjectionMs":2000}}"#,
        r#"{"debugHeader":true,"retry":{"retriableStatusCodes":[503],"perTryTimeoutMs":5000},"ejection":{"maxEndpointsPerCluster":64}}"#,
    ] {
        reconfigure(&mut lab, config)?;
        let (mut roots, deadline) = (HashSet::new(), Deadline::after(LIMIT));
        while roots.len() < WORKERS as usize {
            assert!(!deadline.passed(), "the new configuration did not reach both workers: {roots:?}");
            if let Some(h) = fresh_debug_header(&lab, &counts).await {
                if vm_number(&h) > newest_root {
                    roots.insert(vm_number(&h));
                }
            }
        }
        newest_root = roots.iter().copied().max().unwrap_or(newest_root);
    }

    let reloads = 4;
    let created_after = stat(&lab, V8_CREATED).await;
    let active_after = stat(&lab, V8_ACTIVE).await;
    let counts = traffic.stop().await;
    let retries = lab.envoy.metric("retries_performed").await?;
    eprintln!(
        "hot reload: {reloads} configuration writes (1 rejected); {} requests, {} failed; \
         {retries} retries hid the refusing endpoint; VMs created during reloads: {}, active: {active_before} before, {active_after} after",
        counts.sent(),
        counts.failed(),
        created_after - created_before
    );
    assert_eq!(counts.failed(), 0, "requests failed during reloads: {:?}", counts.failures());
    assert!(counts.sent() >= 100, "too little traffic to show anything: {}", counts.sent());
    assert!(retries > 0, "the refusing endpoint was never picked");
    // Envoy logs the rejection of the invalid configuration as a failed VM; nothing else may.
    let failures: Vec<String> = vm_failures(&lab.envoy.log())
        .into_iter()
        .filter(|l| !l.contains("Failed to configure base Wasm plugin"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Wasm VM replacement.

/// Sends requests on fresh connections until VMs newer than `floor` on both workers report `addr`
/// as ejected; returns the roots seen, or `None` on timeout.
async fn newer_vms_report_ejected(lab: &Lab, counts: &Counts, floor: u64, addr: &str) -> Option<HashSet<u64>> {
    let mut seen = HashSet::new();
    let deadline = Deadline::after(LIMIT);
    while seen.len() < WORKERS as usize {
        if deadline.passed() {
            return None;
        }
        if let Some(h) = fresh_debug_header(lab, counts).await {
            if vm_number(&h) > floor && h.ejected.iter().any(|e| e == addr) {
                seen.insert(vm_number(&h));
            }
        }
    }
    Some(seen)
}

/// Envoy builds new VMs when the VM's key changes (vm_id, VM configuration or code): here the
/// VM configuration, then the vm_id. Traffic flows throughout, with one endpoint answering 503.
/// With the same vm_id the new VMs find the ejection in shared data and never send the sick
/// endpoint a request; with a new vm_id shared data starts empty, the endpoint is found out
/// again, and clients see nothing of either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_restart_keeps_traffic_and_the_ejection_table() -> anyhow::Result<()> {
    let (a, b, sick) =
        (Upstream::start("pod-a").await?, Upstream::start("pod-b").await?, Upstream::start("pod-sick").await?);
    let spec = GatewaySpec { endpoint_override_header: Some(OVERRIDE_HEADER.into()), ..GatewaySpec::default() };
    let config = r#"{"debugHeader":true,"endpointOverride":{"exploreRatio":0},"ejection":{"baseEjectionMs":120000}}"#;
    let lab = Lab::start(spec, Some(config), &[a.addr, b.addr, sick.addr], &[]).await?;
    let traffic = Traffic::start(lab.url("/"));
    let counts = Arc::clone(&traffic.counts);
    assert!(eventually(LIMIT, || async { sick.hits() > 0 }).await, "pod-sick never got traffic before it turned sick");
    sick.set_mode(Mode::Unavailable);
    let sick_addr = sick.addr.to_string();
    let roots = newer_vms_report_ejected(&lab, &counts, 0, &sick_addr).await;
    assert!(roots.is_some(), "pod-sick was never ejected on both workers");
    let floor = roots.iter().flatten().copied().max().unwrap_or(0);
    // Let requests in flight at the ejection finish, then nothing may reach pod-sick.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sick_hits = sick.hits();

    // Same vm_id, new VM configuration: new VMs, same shared data.
    let created = stat(&lab, V8_CREATED).await;
    write_listener(&lab, &lab.spec, |c| {
        c["vmConfig"]["configuration"] =
            json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "restart-1"});
    })?;
    let restarted = eventually(LIMIT, || async { stat(&lab, V8_CREATED).await >= created + WORKERS }).await;
    assert!(restarted, "no new VMs after the VM configuration changed:\n{}", lab.envoy.log_tail(20));
    let created_1 = stat(&lab, V8_CREATED).await - created;
    let roots = newer_vms_report_ejected(&lab, &counts, floor, &sick_addr).await;
    assert!(roots.is_some(), "the new VMs did not find pod-sick ejected in shared data");
    for _ in 0..100 {
        assert!(fresh_debug_header(&lab, &counts).await.is_some(), "a request skipped the filter");
    }
    assert_eq!(sick.hits(), sick_hits, "the new VMs sent requests to the ejected endpoint");

    // New vm_id: new VMs and an empty shared-data namespace. Debug header off too, so that its
    // absence shows when the new filter chain serves on both workers.
    let created = stat(&lab, V8_CREATED).await;
    let mut spec = lab.spec.clone();
    if let Some(f) = spec.filter.as_mut() {
        f.config = r#"{"endpointOverride":{"exploreRatio":0},"ejection":{"baseEjectionMs":120000}}"#.into();
    }
    let hits_at_restart_2 = sick.hits();
    write_listener(&lab, &spec, |c| {
        c["vmConfig"]["vmId"] = json!(format!("{}-restart-2", gateway::VM_ID));
    })?;
    let restarted = eventually(LIMIT, || async { stat(&lab, V8_CREATED).await >= created + WORKERS }).await;
    assert!(restarted, "no new VMs after the vm_id changed:\n{}", lab.envoy.log_tail(20));
    let created_2 = stat(&lab, V8_CREATED).await - created;
    let (mut quiet, deadline) = (0, Deadline::after(LIMIT));
    while quiet < 20 {
        assert!(!deadline.passed(), "the new vm_id's filter chain never served both workers");
        quiet = if fresh_debug_header(&lab, &counts).await.is_none() { quiet + 1 } else { 0 };
    }
    // The new VMs know nothing; pod-sick is avoided again once they have learnt enough: 200
    // requests in a row leave it alone.
    let deadline = Deadline::after(LIMIT);
    let relearnt_at = loop {
        assert!(!deadline.passed(), "pod-sick kept getting requests under the new vm_id");
        let before = sick.hits();
        for _ in 0..200 {
            let _ = fresh_debug_header(&lab, &counts).await;
        }
        if sick.hits() == before {
            break before;
        }
    };
    let relearning_hits = relearnt_at - hits_at_restart_2;

    let counts = traffic.stop().await;
    eprintln!(
        "vm restart: VMs created: {created_1} (new VM configuration), {created_2} (new vm_id); \
         {} requests, {} failed; pod-sick hits after the ejection with the same vm_id: {}; \
         hits before it was avoided again under the new vm_id: {relearning_hits}",
        counts.sent(),
        counts.failed(),
        hits_at_restart_2 - sick_hits,
    );
    assert_eq!(counts.failed(), 0, "requests failed across VM restarts: {:?}", counts.failures());
    assert!(vm_failures(&lab.envoy.log()).is_empty(), "{:?}", vm_failures(&lab.envoy.log()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Thousands of distinct endpoints.

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes Envoy has allocated right now (admin `/memory`; the `server.memory_allocated` stat is
/// only refreshed at each stats flush).
async fn allocated(lab: &Lab) -> u64 {
    let body = lab.envoy.get("/memory").await.unwrap_or_default();
    serde_json::from_str::<Value>(&body).ok().and_then(|v| v["allocated"].as_str()?.parse().ok()).unwrap_or(0)
}

/// A loopback address nothing listens on, on `ip`.
async fn refusing_on(ip: &str) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    Ok(listener.local_addr()?)
}

/// Min and max of a churn-guard gauge over a second (every VM ticks once a second).
async fn gauge_over_a_second(lab: &Lab, name: &str) -> (u64, u64) {
    let (mut min, mut max) = (u64::MAX, 0);
    for _ in 0..5 {
        let v = lab.envoy.metric(name).await.unwrap_or(0);
        (min, max) = (min.min(v), max.max(v));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (min, max)
}

const PODS: usize = 64;
const CAP: u64 = 256;

/// Generations of pods run by `churn_endpoints`: `ROBUSTNESS_GENERATIONS`, 32 by default.
fn generations() -> usize {
    std::env::var("ROBUSTNESS_GENERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

struct Churn {
    lab: Lab,
    distinct: usize,
    sent: u64,
    failed: u64,
    /// Per generation: (distinct endpoints so far, bytes allocated, RSS KiB).
    samples: Vec<(usize, u64, u64)>,
    /// Every fourth generation: (distinct endpoints so far, known_endpoints min, max over a second).
    gauges: Vec<(usize, u64, u64)>,
}

/// Pods come and go 64 at a time, each generation on new loopback IPs (127.0.g.i), with two
/// refusing addresses (127.1.g.1-2) per generation; every pod serves at least once before the
/// next generation replaces it in EDS.
async fn churn_endpoints(filter_config: Option<&str>, generations: usize) -> anyhow::Result<Churn> {
    async fn generation(g: usize) -> anyhow::Result<(Vec<Upstream>, Vec<SocketAddr>)> {
        let mut pods = Vec::new();
        for i in 0..PODS {
            let addr = format!("127.0.{}.{}:0", g + 1, i + 1).parse()?;
            pods.push(Upstream::start_on(&format!("pod-{g}-{i}"), addr).await?);
        }
        let dead =
            [refusing_on(&format!("127.1.{}.1", g + 1)).await?, refusing_on(&format!("127.1.{}.2", g + 1)).await?];
        let eds = pods.iter().map(|p| p.addr).chain(dead).collect();
        Ok((pods, eds))
    }
    let (mut pods, mut eds) = generation(0).await?;
    let mut lab = Lab::start(GatewaySpec::default(), filter_config, &eds, &[]).await?;
    let clients: Vec<reqwest::Client> = (0..4).map(|_| client()).collect();
    let eds_updates = format!("cluster.{PRIMARY}.update_success");

    let mut distinct = HashSet::new();
    let (mut sent, mut failed) = (0u64, 0u64);
    let (mut samples, mut gauges) = (Vec::new(), Vec::new());
    let mut previous: Vec<Upstream> = Vec::new();
    for g in 0..generations {
        // Every pod of this generation serves at least once: the filter has seen its address.
        let deadline = Deadline::after(LIMIT);
        while pods.iter().any(|p| p.hits() == 0) {
            assert!(!deadline.passed(), "generation {g}: some pods never got a request");
            let round = clients.iter().map(|c| {
                let req = c.get(lab.url("/")).send();
                async move { req.await.map(|r| r.status()) }
            });
            for result in futures_join(round).await {
                sent += 1;
                if !matches!(result, Ok(s) if s == 200) {
                    failed += 1;
                }
            }
        }
        distinct.extend(eds.iter().copied());
        samples.push((distinct.len(), allocated(&lab).await, rss_kib(lab.envoy.pid())));
        if g % 4 == 3 || g + 1 == generations {
            // Gauges are refreshed on the filter's one-second tick.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let (min, max) = gauge_over_a_second(&lab, "known_endpoints").await;
            gauges.push((distinct.len(), min, max));
        }
        if g + 1 == generations {
            break;
        }

        // The next generation; the previous one goes once Envoy has moved on (one generation of
        // grace, as Kubernetes terminates pods after EDS has changed).
        let (next, next_eds) = generation(g + 1).await?;
        let updates = stat(&lab, &eds_updates).await;
        lab.set_endpoints(&next_eds)?;
        let applied = eventually(LIMIT, || async { stat(&lab, &eds_updates).await > updates }).await;
        assert!(applied, "EDS update {g} was not applied");
        eds = next_eds;
        // Assigning drops the generation before the previous one.
        previous = std::mem::replace(&mut pods, next);
    }
    drop(previous);
    for (i, (d, alloc, rss)) in samples.iter().enumerate() {
        eprintln!("endpoints: generation {i:2}: distinct {d:5}, allocated {alloc:10}, rss {rss:7} KiB");
    }
    for (d, min, max) in &gauges {
        eprintln!("endpoints: {d:5} distinct seen: known_endpoints gauge between {min} and {max} over a second");
    }
    Ok(Churn { lab, distinct: distinct.len(), sent, failed, samples, gauges })
}

/// 2 000+ distinct endpoints through one cluster: the shared table never holds more than
/// `maxEndpointsPerCluster` (and every VM reports the same count), Envoy's memory stops growing
/// once the table is full, and every request succeeds although two endpoints per generation
/// refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_endpoints_keep_memory_bounded() -> anyhow::Result<()> {
    let config = format!(r#"{{"ejection":{{"maxEndpointsPerCluster":{CAP}}}}}"#);
    let churn = churn_endpoints(Some(&config), generations()).await?;
    let samples = &churn.samples;
    // The table is full, or nearly (successes are sampled), once 2 × CAP distinct endpoints
    // have been seen (generation 7).
    let full = samples.iter().position(|s| s.0 as u64 >= 2 * CAP).unwrap_or(samples.len());
    let at_full = samples.get(full).map_or(0, |s| s.1);
    let end = samples.last().map_or(0, |s| s.1);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let (rss_full, rss_end) = (samples.get(full).map_or(0, |s| s.2), samples.last().map_or(0, |s| s.2));
    eprintln!(
        "endpoints: {} distinct, {} requests, {} failed; allocated {at_full} at generation {full}, \
         {end} at the end, peak {peak}; rss {rss_full} KiB -> {rss_end} KiB",
        churn.distinct, churn.sent, churn.failed
    );
    assert!(churn.distinct >= 2_000, "only {} distinct endpoints", churn.distinct);
    assert_eq!(churn.failed, 0, "requests failed while endpoints churned");
    for (d, min, max) in &churn.gauges {
        assert!(*max <= CAP, "the table holds {max} endpoints, over its bound of {CAP}");
        if *d as u64 >= 2 * CAP {
            // Without steering, a plain success is read where it was served once per 10 ms per
            // worker while nothing recovers, so not every pod that served once is known and the
            // table fills later; but every VM reports the same table.
            assert_eq!(min, max, "with {d} endpoints seen the gauge read {min}..{max}: a VM reports otherwise");
        }
        if *d as u64 >= 4 * CAP {
            assert_eq!(*min, CAP, "with {d} endpoints seen the table is still not full");
        }
    }
    // Once the table is full, more distinct endpoints cost no more memory: the allocator's
    // figure moves within ±0.5 MiB from then on, and Envoy alone creeps by a few KiB of RSS per
    // generation (see the baseline below).
    assert!(end.saturating_sub(at_full) < 4 << 20, "Envoy's memory kept growing: {at_full} -> {end}");
    assert!(rss_end.saturating_sub(rss_full) < 16 << 10, "Envoy's RSS kept growing: {rss_full} -> {rss_end} KiB");
    assert!(peak < 256 << 20, "Envoy allocated {peak} bytes");
    let failures = vm_failures(&churn.lab.envoy.log());
    assert!(failures.is_empty(), "{failures:?}");
    Ok(())
}

/// Baseline for the figures in docs/reliability.md: the same churn through Envoy alone.
/// `cargo test -p churn-guard-tests --test robustness -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a baseline for measurements, not a check"]
async fn thousands_of_endpoints_without_the_filter() -> anyhow::Result<()> {
    let churn = churn_endpoints(None, generations()).await?;
    let (first, last) =
        (churn.samples.first().copied().unwrap_or_default(), churn.samples.last().copied().unwrap_or_default());
    eprintln!(
        "endpoints without the filter: {} distinct, {} requests, {} failed; allocated {} -> {}, rss {} KiB -> {} KiB",
        churn.distinct, churn.sent, churn.failed, first.1, last.1, first.2, last.2
    );
    assert!(churn.failed > 0, "Envoy alone hid the refusing endpoints: the baseline has changed");
    Ok(())
}

async fn futures_join<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<JoinHandle<T>> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 4. Odd property values.

/// Every shape of `upstream.address` / `response.flags` Envoy hands the filter at the end of a
/// stream, one route each: no upstream at all (direct response, unknown cluster, a cluster with
/// no endpoint), IPv6 endpoints, unix-socket endpoints, an upstream timeout and a client that
/// gives up. Each is classified as documented and no VM fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_property_values_are_classified_and_no_vm_fails() -> anyhow::Result<()> {
    let primary = Upstream::start("pod-a").await?;
    let v6 = Upstream::start_on("pod-v6", "[::1]:0".parse()?).await?;
    let v6_dead = refusing_v6_addr().await?;
    let sockets = tempfile::tempdir()?;
    let pipe_path = sockets.path().join("pod.sock");
    let pipe = unix_upstream(&pipe_path).await?;
    let (silent_addr, silent) = silent_upstream().await?;
    let config = r#"{"debugHeader":true,"retry":{"maxRetries":2}}"#;
    let lab = Lab::start(GatewaySpec::default(), Some(config), &[primary.addr], &[]).await?;

    let mut clusters = gateway::clusters(&lab.xds.dir, &lab.spec);
    clusters.push(static_cluster("v6", vec![socket_address(v6.addr)]));
    clusters.push(static_cluster("v6-dead", vec![socket_address(v6_dead)]));
    clusters.push(static_cluster("pipe", vec![json!({"pipe": {"path": pipe_path.to_string_lossy()}})]));
    clusters.push(static_cluster(
        "pipe-dead",
        vec![json!({"pipe": {"path": sockets.path().join("nobody.sock").to_string_lossy()}})],
    ));
    clusters.push(static_cluster("silent", vec![socket_address(silent_addr)]));
    clusters.push(static_cluster("empty", vec![]));
    write_xds(&lab.xds.dir, "cds.json", "type.googleapis.com/envoy.config.cluster.v3.Cluster", clusters)?;
    let to = |prefix: &str, cluster: &str| enabled(json!({"match": {"prefix": prefix}, "route": {"cluster": cluster}}));
    let mut routes = vec![
        enabled(
            json!({"match": {"prefix": "/direct"}, "directResponse": {"status": 200, "body": {"inlineString": "direct"}}}),
        ),
        to("/nocluster", "no-such-cluster"),
        to("/v6-dead", "v6-dead"),
        to("/v6", "v6"),
        to("/pipe-dead", "pipe-dead"),
        to("/pipe", "pipe"),
        to("/empty", "empty"),
        enabled(json!({"match": {"prefix": "/silent"}, "route": {"cluster": "silent", "timeout": "1s"}})),
    ];
    let mut rds = gateway::route_config(&lab.spec);
    if let Some(existing) = rds["virtualHosts"][0]["routes"].as_array() {
        routes.extend(existing.iter().cloned());
    }
    rds["virtualHosts"][0]["routes"] = Value::Array(routes);
    write_xds(&lab.xds.dir, "rds.json", "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", vec![rds])?;
    let c = client();
    let ready = eventually(LIMIT, || async {
        matches!(c.get(lab.url("/empty")).send().await, Ok(r) if r.status() == 503)
            && matches!(c.get(lab.url("/v6")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    assert!(ready, "the extra routes never became active:\n{}", lab.envoy.log_tail(20));
    let created = stat(&lab, V8_CREATED).await;
    let metric = |name: &'static str| {
        let lab = &lab;
        async move { lab.envoy.metric(name).await.unwrap_or(0) }
    };
    let get = |path: &'static str| {
        let req = c.get(lab.url(path)).send();
        async move {
            let resp = req.await?;
            let (status, header) = (resp.status().as_u16(), DebugHeader::of(&resp));
            let body = resp.text().await?;
            anyhow::Ok((status, header, body))
        }
    };

    // No upstream: a direct response and an unknown cluster carry no address to learn from.
    let (status, header, body) = get("/direct").await?;
    assert_eq!((status, body.as_str()), (200, "direct"));
    assert!(header.is_none(), "a direct response has no cluster to report on: {header:?}");
    let (status, header, _) = get("/nocluster").await?;
    assert_eq!(status, 503);
    assert!(header.is_none(), "an unknown cluster has no table to report on: {header:?}");

    // A cluster with no endpoint: Envoy answers itself (UH), counted as no healthy upstream.
    let no_upstream = metric("no_healthy_upstream").await;
    for _ in 0..3 {
        assert_eq!(get("/empty").await?.0, 503);
    }
    let counted = eventually(LIMIT, || async { metric("no_healthy_upstream").await >= no_upstream + 3 }).await;
    assert!(counted, "no-healthy-upstream replies were not counted");

    // IPv6: `[::1]:port` is tracked like any address, and ejected when it refuses.
    let (status, header, _) = get("/v6").await?;
    assert_eq!(status, 200);
    assert_eq!(header.map(|h| h.cluster), Some("v6".to_string()));
    let ejections = metric("ejections").await;
    assert_eq!(get("/v6-dead").await?.0, 503);
    assert!(eventually(LIMIT, || async { metric("ejections").await > ejections }).await, "[::1] never ejected");
    let (_, header, _) = get("/v6-dead").await?;
    assert_eq!(header.map(|h| h.ejected), Some(vec![v6_dead.to_string()]), "expected [::1]:port ejected");

    // Unix sockets: served, and not tracked (a path is no endpoint address), even when refusing.
    let (status, header, _) = get("/pipe").await?;
    assert_eq!(status, 200);
    assert!(pipe.hits.load(Ordering::SeqCst) >= 1);
    assert_eq!(header.map(|h| (h.cluster, h.ejected)), Some(("pipe".to_string(), vec![])));
    let (ejections, connect_failures) = (metric("ejections").await, metric("failures.connect_failure").await);
    for _ in 0..3 {
        assert_eq!(get("/pipe-dead").await?.0, 503);
    }
    let (_, header, _) = get("/pipe-dead").await?;
    assert_eq!(header.map(|h| h.ejected), Some(vec![]), "a unix socket path was tracked");
    assert_eq!((metric("ejections").await, metric("failures.connect_failure").await), (ejections, connect_failures));

    // An upstream that never answers: the route timeout (UT) is a timeout failure of that endpoint.
    let timeouts = metric("failures.timeout").await;
    assert_eq!(get("/silent").await?.0, 504);
    assert!(eventually(LIMIT, || async { metric("failures.timeout").await > timeouts }).await, "UT not counted");
    // A client that gives up first (DC) is nobody's failure.
    let timeouts = metric("failures.timeout").await;
    let resets_stat = "http.http-10080.downstream_cx_destroy_remote_active_rq";
    let resets = stat(&lab, resets_stat).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build()?;
    assert!(impatient.get(lab.url("/silent")).send().await.is_err());
    assert!(eventually(LIMIT, || async { stat(&lab, resets_stat).await > resets }).await);
    assert_eq!(get("/").await?.0, 200);
    assert_eq!(metric("failures.timeout").await, timeouts, "a client giving up counted against the endpoint");
    assert!(silent.hits.load(Ordering::SeqCst) >= 2);

    // The VMs are the ones from the start, and still in the request path.
    let (status, header, _) = get("/").await?;
    assert_eq!(status, 200);
    assert!(header.is_some(), "the filter no longer answers");
    assert_eq!(stat(&lab, V8_CREATED).await, created, "a VM was replaced");
    assert_eq!(stat(&lab, V8_ACTIVE).await, stat(&lab, "wasm.wasm_vm_count").await);
    assert!(vm_failures(&lab.envoy.log()).is_empty(), "{:?}", vm_failures(&lab.envoy.log()));
    eprintln!("odd properties: direct 200, unknown cluster 503, empty 503 (UH counted), [::1] tracked and ejected, unix sockets untracked, UT counted as timeout, DC ignored; VMs created: {created}, none since");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Huge and numerous headers.

type Case = (&'static str, fn(&reqwest::Client, &str) -> reqwest::RequestBuilder);

fn header_cases() -> Vec<Case> {
    vec![
        ("one 50 KiB header", |c, u| c.get(u).header("x-big", "b".repeat(50 * 1024))),
        ("one 70 KiB header (over the 60 KiB limit)", |c, u| c.get(u).header("x-big", "b".repeat(70 * 1024))),
        ("90 headers", |c, u| (0..90).fold(c.get(u), |r, i| r.header(format!("x-h-{i}"), "v"))),
        ("150 headers (over the 100 limit)", |c, u| (0..150).fold(c.get(u), |r, i| r.header(format!("x-h-{i}"), "v"))),
        ("50 KiB path", |c, u| c.get(format!("{u}{}", "p".repeat(50 * 1024)))),
        ("override header: garbage", |c, u| c.get(u).header(OVERRIDE_HEADER, "not an address;;[::")),
        ("override header: 40 KiB", |c, u| c.get(u).header(OVERRIDE_HEADER, "9".repeat(40 * 1024))),
        ("override header: 2 000 addresses", |c, u| {
            let list: Vec<String> = (0..2000).map(|i| format!("10.{}.{}.1:80", i / 256, i % 256)).collect();
            c.get(u).header(OVERRIDE_HEADER, list.join(","))
        }),
        ("fallback header: 40 KiB", |c, u| c.get(u).header(FALLBACK_HEADER, "t".repeat(40 * 1024))),
        ("x-envoy-max-retries: garbage", |c, u| c.get(u).header("x-envoy-max-retries", "ten")),
        ("x-envoy-max-retries: huge", |c, u| c.get(u).header("x-envoy-max-retries", "99999999999999999999")),
        ("x-envoy-retry-on: 10 KiB", |c, u| c.get(u).header("x-envoy-retry-on", "5xx,".repeat(2500))),
        ("extension method", |c, u| c.request(reqwest::Method::from_bytes(b"BREW").unwrap_or_default(), u)),
        ("response with 80 headers", |c, u| c.get(format!("{u}resp-many-headers"))),
        ("response with a 50 KiB header", |c, u| c.get(format!("{u}resp-huge-header"))),
        ("response with a 100 KiB header", |c, u| c.get(format!("{u}resp-too-big-header"))),
    ]
}

async fn status_of(c: &reqwest::Client, url: &str, case: &Case) -> String {
    match (case.1)(c, url).send().await {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) => format!("no response ({})", if e.is_timeout() { "timeout" } else { "error" }),
    }
}

/// Requests with huge and numerous headers, garbage in the headers the filter reads, and
/// responses with huge and numerous headers: with the filter, Envoy answers exactly what it
/// answers without it, and the VMs stay healthy and in the request path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_many_headers_get_what_envoy_alone_gives() -> anyhow::Result<()> {
    let (pod, server) = abusive_tcp_upstream("127.0.0.1:0").await?;
    let spec = GatewaySpec {
        endpoint_override_header: Some(OVERRIDE_HEADER.into()),
        fallback: Some(FallbackRoute { header: FALLBACK_HEADER.into(), value: "true".into() }),
        ..GatewaySpec::default()
    };
    let config = r#"{"debugHeader":true,"endpointOverride":{},"fallback":{}}"#;
    let with = Lab::start(spec.clone(), Some(config), &[pod], &[pod]).await?;
    let without = Lab::start(spec, None, &[pod], &[pod]).await?;
    let created = stat(&with, V8_CREATED).await;
    let c = client();
    let mut table = Vec::new();
    let hits = || server.hits.load(Ordering::SeqCst);
    for case in header_cases() {
        let before = hits();
        let alone = status_of(&c, &without.url("/"), &case).await;
        let (between, filtered) = (hits(), status_of(&c, &with.url("/"), &case).await);
        let (alone_hits, filtered_hits) = (between - before, hits() - between);
        eprintln!(
            "headers: {:36} Envoy alone: {alone:3} ({alone_hits} upstream attempts), \
             with churn-guard: {filtered:3} ({filtered_hits})",
            case.0
        );
        table.push((case.0, alone, filtered));
    }
    for (name, alone, filtered) in &table {
        assert_eq!(alone, filtered, "{name}: Envoy alone answered {alone}, with the filter {filtered}");
    }
    let answered: Vec<&str> = table.iter().map(|t| t.2.as_str()).collect();
    assert!(answered.contains(&"431"), "no case hit Envoy's header limits: {answered:?}");

    // The VMs are the same ones, still in the request path, and counting.
    let added = with.envoy.settled_metric("retries_added").await?;
    for _ in 0..20 {
        let resp = fresh_connection_client().get(with.url("/")).send().await?;
        assert_eq!(resp.status(), 200);
        assert!(DebugHeader::of(&resp).is_some(), "the filter no longer answers");
    }
    assert_eq!(with.envoy.settled_metric("retries_added").await?, added + 20);
    assert_eq!(stat(&with, V8_CREATED).await, created, "a VM was replaced");
    assert!(vm_failures(&with.envoy.log()).is_empty(), "{:?}", vm_failures(&with.envoy.log()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Retry budget under a full outage.

struct Outage {
    requests: u64,
    answered_503: u64,
    attempts: u64,
    seconds: f64,
    denied: u64,
}

/// Every endpoint answers 503. Sends `n` GETs at `rate` per second from `concurrency` clients
/// and counts the attempts that reached an endpoint.
async fn full_outage(config: &str, n: u64, rate: u64, concurrency: u64) -> anyhow::Result<Outage> {
    let pods = [Upstream::start("pod-a").await?, Upstream::start("pod-b").await?, Upstream::start("pod-c").await?];
    for p in &pods {
        p.set_mode(Mode::Unavailable);
    }
    let addrs: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
    let lab = Lab::start(GatewaySpec::default(), Some(config), &addrs, &[]).await?;
    let answered_503 = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let loops: Vec<JoinHandle<()>> = (0..concurrency)
        .map(|i| {
            let url = lab.url("/");
            let answered_503 = Arc::clone(&answered_503);
            let per_loop = n / concurrency + u64::from(i < n % concurrency);
            let period = Duration::from_secs_f64(concurrency as f64 / rate as f64);
            tokio::spawn(async move {
                let c = fresh_connection_client();
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for _ in 0..per_loop {
                    tick.tick().await;
                    if matches!(c.get(&url).send().await, Ok(r) if r.status() == 503) {
                        answered_503.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for l in loops {
        l.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let attempts: u64 = pods.iter().map(Upstream::hits).sum();
    let rq_total = format!("cluster.{PRIMARY}.upstream_rq_total");
    assert_eq!(stat(&lab, &rq_total).await, attempts, "Envoy and the pods disagree on attempts");
    Ok(Outage {
        requests: n,
        answered_503: answered_503.load(Ordering::SeqCst),
        attempts,
        seconds,
        denied: lab.envoy.metric("retries_denied_budget").await.unwrap_or(0),
    })
}

/// During a full outage (every endpoint answers 503) the filter's retries add at most what the
/// budget allows: `ratio` per request plus `minRetriesPerSecond` per window and worker, plus the
/// retries granted to requests in flight before earlier ones were charged. A control run with a
/// budget that allows everything shows the same traffic would otherwise multiply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_holds_under_a_full_outage() -> anyhow::Result<()> {
    const N: u64 = 300;
    const RATE: u64 = 100;
    const CONCURRENCY: u64 = 4;
    const MAX_RETRIES: u64 = 3;
    const RATIO: f64 = 0.2;
    const MIN_PER_SECOND: u64 = 1;
    const WINDOW: u64 = 10;
    let budgeted = format!(
        r#"{{"retry":{{"maxRetries":{MAX_RETRIES},"budget":{{"ratio":{RATIO},"minRetriesPerSecond":{MIN_PER_SECOND},"windowSeconds":{WINDOW}}}}}}}"#
    );
    let outage = full_outage(&budgeted, N, RATE, CONCURRENCY).await?;
    // Each worker's budget allows ratio × its requests + min × window per window; the run spans
    // ceil(seconds / window) + 1 windows at most (buckets are whole seconds); every request in
    // flight may hold up to maxRetries granted before earlier retries were charged.
    let windows = (outage.seconds / WINDOW as f64).ceil() as u64 + 1;
    let allowed_retries =
        (RATIO * N as f64).ceil() as u64 + WORKERS * MIN_PER_SECOND * WINDOW * windows + CONCURRENCY * MAX_RETRIES;
    let bound = N + allowed_retries;
    eprintln!(
        "budget: {} requests in {:.1} s, {} answered 503; {} upstream attempts (bound {bound} = {N} + {allowed_retries}); \
         {} requests denied retries",
        outage.requests, outage.seconds, outage.answered_503, outage.attempts, outage.denied
    );
    assert_eq!(outage.answered_503, N, "requests were lost: every one should get Envoy's 503");
    assert!(outage.attempts <= bound, "retry storm: {} attempts, budget allows {bound}", outage.attempts);
    assert!(outage.denied > 0, "the budget never denied a retry");

    // Control: a budget that never binds; every request makes maxRetries + 1 attempts.
    let unbounded = format!(
        r#"{{"retry":{{"maxRetries":{MAX_RETRIES},"budget":{{"ratio":10,"minRetriesPerSecond":100000,"windowSeconds":{WINDOW}}}}}}}"#
    );
    let control = full_outage(&unbounded, N, RATE, CONCURRENCY).await?;
    eprintln!(
        "budget control (ratio 10): {} requests in {:.1} s, {} upstream attempts, {} denied",
        control.requests, control.seconds, control.attempts, control.denied
    );
    assert_eq!(control.answered_503, N);
    assert_eq!(control.attempts, N * (MAX_RETRIES + 1), "the control run should retry every request fully");
    assert!(control.attempts > bound, "the control run stays within the bound: the test cannot fail");
    Ok(())
}
