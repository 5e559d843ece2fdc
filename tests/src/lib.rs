//! Test harness: a real Envoy in front of real upstream servers on loopback, configured the way
//! Envoy Gateway configures it, with the churn-guard Wasm module served over HTTP and pinned by
//! sha256 like Envoy Gateway's Wasm code sources.

pub mod crds;
pub mod envoy;
pub mod gateway;
pub mod grpc;
pub mod lifecycle;
pub mod registry;
pub mod upstream;

use anyhow::Context as _;
use envoy::Envoy;
use gateway::{FilterSpec, GatewaySpec, WasmSource, XdsFiles, FALLBACK, PRIMARY};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use upstream::Upstream;

/// The built filter: `CHURN_GUARD_WASM`, or the release build in the workspace target dir.
pub fn wasm_path() -> PathBuf {
    std::env::var_os("CHURN_GUARD_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| envoy::workspace_root().join("target/wasm32-wasip1/release/churn_guard.wasm"))
}

pub fn wasm_module() -> anyhow::Result<Vec<u8>> {
    let path = wasm_path();
    std::fs::read(&path).with_context(|| format!("reading {} (run `make build` first)", path.display()))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Serves the module over HTTP under its sha256, as Envoy Gateway's Wasm HTTP server does.
pub async fn serve_wasm(module: Vec<u8>) -> anyhow::Result<(WasmSource, Upstream)> {
    let sha256 = sha256_hex(&module);
    let server = Upstream::serving("wasm-server", module).await?;
    let source =
        WasmSource { url: format!("http://{}/{sha256}.wasm", server.addr), sha256, server: server.addr, tls_ca: None };
    Ok((source, server))
}

/// One Envoy with its xDS files.
pub struct Lab {
    pub xds: XdsFiles,
    pub envoy: Envoy,
    pub port: u16,
    pub spec: GatewaySpec,
    _wasm_server: Option<Upstream>,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// Starts Envoy for `spec`; `filter_config` loads churn-guard with that plugin configuration.
    pub async fn start(
        spec: GatewaySpec,
        filter_config: Option<&str>,
        primary: &[SocketAddr],
        fallback: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        match filter_config {
            Some(config) => Self::start_inner(spec, Some((wasm_module()?, config)), primary, fallback).await,
            None => Self::start_inner(spec, None, primary, fallback).await,
        }
    }

    /// Starts Envoy for `spec` with another Wasm module in churn-guard's place.
    pub async fn start_with_module(
        spec: GatewaySpec,
        module: &[u8],
        config: &str,
        primary: &[SocketAddr],
        fallback: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        Self::start_inner(spec, Some((module.to_vec(), config)), primary, fallback).await
    }

    /// Starts Envoy for `spec` loading the filter from wherever `filter.source` says, e.g. a
    /// registry-cache serving it by sha256.
    pub async fn start_with_filter(
        mut spec: GatewaySpec,
        filter: FilterSpec,
        primary: &[SocketAddr],
        fallback: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        spec.filter = Some(filter);
        Self::start_inner(spec, None, primary, fallback).await
    }

    async fn start_inner(
        mut spec: GatewaySpec,
        filter: Option<(Vec<u8>, &str)>,
        primary: &[SocketAddr],
        fallback: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("churn-guard-lab").tempdir()?;
        let mut wasm_server = None;
        if let Some((module, config)) = filter {
            let (source, server) = serve_wasm(module).await?;
            spec.filter = Some(FilterSpec { source, config: config.to_string() });
            wasm_server = Some(server);
        }
        let mut xds = XdsFiles::new(dir.path());
        xds.write_endpoints(PRIMARY, primary)?;
        if spec.fallback.is_some() {
            xds.write_endpoints(FALLBACK, fallback)?;
        }
        xds.write_gateway(&spec)?;
        let bootstrap = xds.write_bootstrap()?;
        let envoy = Envoy::start(&bootstrap, dir.path()).await?;
        let mut port = None;
        for _ in 0..100 {
            if let Ok(p) = envoy.listener_port().await {
                port = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let port = port.with_context(|| format!("listener never became active:\n{}", envoy.log_tail(40)))?;
        Ok(Self { xds, envoy, port, spec, _wasm_server: wasm_server, _dir: dir })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Changes what EDS says about the primary cluster.
    pub fn set_endpoints(&mut self, addrs: &[SocketAddr]) -> anyhow::Result<()> {
        self.xds.write_endpoints(PRIMARY, addrs)
    }
}

/// A client that keeps connections alive (one worker per connection).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default()
}

/// A client that opens a new connection per request, so requests spread over Envoy's workers.
pub fn fresh_connection_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(0).build().unwrap_or_default()
}

/// The parsed `x-churn-guard` debug header.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DebugHeader {
    pub vm: String,
    pub cluster: String,
    pub ejected: Vec<String>,
    pub steered: Vec<String>,
    pub fallback: bool,
}

impl DebugHeader {
    pub fn parse(value: &str) -> Self {
        let mut h = DebugHeader::default();
        let list = |v: &str| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        for part in value.split(';') {
            let Some((k, v)) = part.trim().split_once('=') else { continue };
            match k {
                "vm" => h.vm = v.to_string(),
                "cluster" => h.cluster = v.to_string(),
                "ejected" => h.ejected = list(v),
                "steered" => h.steered = list(v),
                "fallback" => h.fallback = v == "true",
                _ => {}
            }
        }
        h
    }

    pub fn of(resp: &reqwest::Response) -> Option<Self> {
        resp.headers().get("x-churn-guard").and_then(|v| v.to_str().ok()).map(Self::parse)
    }
}

/// Polls `check` every 50 ms until it holds or `limit` passes; the limit only guards against a
/// hang, tests assert what happened, not how fast.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A guard against hangs in polling loops; not a timing assertion.
pub struct Deadline(tokio::time::Instant);

impl Deadline {
    pub fn after(limit: Duration) -> Self {
        Self(tokio::time::Instant::now() + limit)
    }

    pub fn passed(&self) -> bool {
        tokio::time::Instant::now() > self.0
    }
}
