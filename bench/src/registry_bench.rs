//! registry-cache benchmarks: how fast permission answers come, how fast blobs are served next
//! to Debian's `docker-registry` serving the same blob, and how long pre-pulling 50 artifacts
//! named by policies takes. All on loopback, against a real private registry.

use anyhow::Context as _;
use harness::registry::DockerRegistry;
use hdrhistogram::Histogram;
use oci_client::secrets::RegistryAuth;
use registry_cache::artifact::{self, Format};
use registry_cache::cache::Cache;
use registry_cache::permissions::{upstream_access_check, Permissions};
use registry_cache::pull::{PullOptions, Puller};
use registry_cache::server::{self, AppState};
use registry_cache::{package, publish};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

const USER: &str = "bench";
const PASSWORD: &str = "bench-s3cret";

/// A valid module of about `size` bytes: the header, then one custom section of filler.
pub fn module_of_size(name: &str, size: usize) -> Vec<u8> {
    let filler = size.saturating_sub(name.len() + 16);
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name.as_bytes());
    payload.extend((0..filler).map(|i| (i * 31 % 251) as u8));
    let mut m = vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x00];
    let mut len = payload.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            m.push(byte);
            break;
        }
        m.push(byte | 0x80);
    }
    m.extend(payload);
    m
}

fn percentiles(h: &Histogram<u64>, unit: &str) -> String {
    format!(
        "p50 {} {unit}, p99 {} {unit}, p99.9 {} {unit}, max {} {unit} ({} samples)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        h.len()
    )
}

pub struct PermissionFigures {
    pub first_answer_ms: f64,
    pub cached_ns: Histogram<u64>,
    pub grants: usize,
}

/// "May these credentials read this image?" with the answers known: the in-memory path every
/// request after the first takes. The first answer asks the upstream and is reported apart.
pub async fn permission_latency(registry: &DockerRegistry, puller: &Arc<Puller>) -> anyhow::Result<PermissionFigures> {
    let image = format!("{}/bench/permission:v1", registry.addr);
    let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
    package::push(&image, Format::SoloOci, &module_of_size("permission", 1024), &auth, &[registry.addr.to_string()])
        .await?;
    let permissions = Permissions::new(Duration::from_secs(300), upstream_access_check(Arc::clone(puller)));
    let started = Instant::now();
    anyhow::ensure!(permissions.allows_reference(&image, Some(auth.clone())).await, "the upstream refused");
    let first_answer_ms = started.elapsed().as_secs_f64() * 1e3;
    // A realistic table: a thousand namespaces' credentials for a hundred repositories.
    let grants = 1000;
    for i in 0..grants {
        let other = format!("{}/team-{}/filter:v1", registry.addr, i % 100);
        permissions.record(&other, &RegistryAuth::Basic(format!("user-{i}"), "pw".into()), i % 7 != 0);
    }
    let mut cached_ns = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    for i in 0..200_000u32 {
        let (reference, auth) = if i % 2 == 0 {
            (image.clone(), Some(auth.clone()))
        } else {
            let n = i as usize % grants;
            (
                format!("{}/team-{}/filter:v1", registry.addr, n % 100),
                Some(RegistryAuth::Basic(format!("user-{n}"), "pw".into())),
            )
        };
        let t = Instant::now();
        let _ = std::hint::black_box(permissions.allows_reference(&reference, auth).await);
        cached_ns.record(t.elapsed().as_nanos() as u64)?;
    }
    Ok(PermissionFigures { first_answer_ms, cached_ns, grants })
}

pub struct WrkResult {
    pub requests_per_s: f64,
    pub mb_per_s: f64,
    pub errors: u64,
}

/// `wrk` against `url` with basic auth; parses its summary.
async fn wrk(url: &str, seconds: u64, connections: u32) -> anyhow::Result<WrkResult> {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let out = tokio::process::Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"])
        .args(["-H", &format!("Authorization: Basic {auth}")])
        .arg(url)
        .output()
        .await
        .context("wrk (Debian package wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string())).unwrap_or_default()
    };
    let requests_per_s: f64 = field("Requests/sec:").parse().context(format!("wrk output: {text}"))?;
    let transfer = field("Transfer/sec:");
    let mb_per_s = if let Some(v) = transfer.strip_suffix("GB") {
        v.parse::<f64>().unwrap_or(0.0) * 1024.0
    } else if let Some(v) = transfer.strip_suffix("MB") {
        v.parse::<f64>().unwrap_or(0.0)
    } else if let Some(v) = transfer.strip_suffix("KB") {
        v.parse::<f64>().unwrap_or(0.0) / 1024.0
    } else {
        0.0
    };
    let non_2xx: u64 = field("Non-2xx or 3xx responses:").parse().unwrap_or(0);
    let socket_errors: u64 = text
        .lines()
        .find(|l| l.trim().starts_with("Socket errors:"))
        .map(|l| l.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok(WrkResult { requests_per_s, mb_per_s, errors: non_2xx + socket_errors })
}

pub struct BlobFigures {
    pub size: usize,
    pub cache: WrkResult,
    pub registry: WrkResult,
}

/// The same blob, fetched with credentials, from the cache and from docker-registry.
pub async fn blob_throughput(
    registry: &DockerRegistry,
    puller: &Arc<Puller>,
    size: usize,
    seconds: u64,
) -> anyhow::Result<BlobFigures> {
    let image = format!("{}/bench/blob:v1", registry.addr);
    let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
    let module = module_of_size("blob", size);
    package::push(&image, Format::SoloOci, &module, &auth, &[registry.addr.to_string()]).await?;
    let dir = tempfile::tempdir()?;
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30)?);
    let entry = publish::publish(&cache, &puller.pull(&image, &auth).await?, true)?;
    let state =
        AppState::new(cache, Permissions::new(Duration::from_secs(300), upstream_access_check(Arc::clone(puller))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = server::router(state);
    let server = tokio::spawn(async move { server::serve(listener, app, std::future::pending()).await });
    // The module is the solo layer in both: the same digest, the same bytes.
    anyhow::ensure!(entry.module == format!("sha256:{}", artifact::sha256_hex(&module)));
    let served = registry_cache::publish::served_name(&entry.reference).context("served name")?;
    let from_cache = wrk(&format!("http://{addr}/v2/{served}/blobs/{}", entry.module), seconds, 16).await?;
    let from_registry =
        wrk(&format!("http://{}/v2/bench/blob/blobs/{}", registry.addr, entry.module), seconds, 16).await?;
    server.abort();
    Ok(BlobFigures { size: module.len(), cache: from_cache, registry: from_registry })
}

pub struct PrepullFigures {
    pub artifacts: usize,
    pub module_bytes: usize,
    pub concurrency: usize,
    pub wall: Duration,
    pub cached: usize,
}

/// Wall time from `serve` starting on a directory of `artifacts` policies (one private image
/// each, with their namespace's pull secret) until its initial sync has settled: every image
/// pulled, verified, signed.
pub async fn prepull(
    registry: &DockerRegistry,
    artifacts: usize,
    module_bytes: usize,
    concurrency: usize,
) -> anyhow::Result<PrepullFigures> {
    let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
    let insecure = vec![registry.addr.to_string()];
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    let mut images = vec![];
    for i in 0..artifacts {
        let image = format!("{}/prepull/filter-{i}:v1", registry.addr);
        package::push(&image, Format::Compat, &module_of_size(&format!("prepull-{i}"), module_bytes), &auth, &insecure)
            .await?;
        let namespace = format!("team-{}", i % 10);
        let policy = serde_json::json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyExtensionPolicy",
            "metadata": {"name": format!("filter-{i}"), "namespace": namespace},
            "spec": {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "backend"}],
                "wasm": [{"name": "filter", "code": {"type": "Image", "image": {"url": image, "pullSecretRef": {"name": "regcred"}}}}]
            }
        });
        std::fs::write(policies.join(format!("policy-{i}.yaml")), serde_yaml_ng::to_string(&policy)?)?;
        images.push(image);
    }
    for ns in 0..artifacts.min(10) {
        std::fs::write(
            policies.join(format!("secret-{ns}.yaml")),
            registry.pull_secret(&format!("team-{ns}"), "regcred"),
        )?;
    }
    let mut settings = registry_cache::sources::config::Settings::default();
    settings.sources.directories = vec![policies];
    settings.prefetch.concurrency = concurrency;
    let started = Instant::now();
    let service = registry_cache::service::Service::start(registry_cache::service::ServiceOptions {
        cache_dir: dir.path().join("cache"),
        max_cache_bytes: 1 << 32,
        permission_ttl: Duration::from_secs(300),
        pull: PullOptions { insecure_registries: insecure, ..PullOptions::default() },
        settings,
        signer: Some(registry_cache::sign::Signer::new(registry_cache::sign::SigningKey::generate()?, "cache:5000")),
        url_key: vec![],
    })
    .await?;
    service.wait_settled().await;
    let wall = started.elapsed();
    let cached = service.state.cache.entries().iter().filter(|e| e.signature.is_some()).count();
    anyhow::ensure!(cached == artifacts, "{cached} of {artifacts} artifacts were cached and signed");
    Ok(PrepullFigures { artifacts, module_bytes, concurrency, wall, cached })
}

/// Runs the benchmarks and returns the Markdown report.
pub async fn run(blob_seconds: u64) -> anyhow::Result<String> {
    let registry = DockerRegistry::start(USER, PASSWORD).await?;
    let puller = Arc::new(Puller::new(PullOptions {
        insecure_registries: vec![registry.addr.to_string()],
        ..PullOptions::default()
    }));
    let mut md = String::from("# registry-cache benchmarks\n\n");
    let p = permission_latency(&registry, &puller).await?;
    let _ = writeln!(
        md,
        "## Permission answers\n\nFirst answer (asks the upstream registry): {:.2} ms. Known answers, from memory, \
         with {} other grants in the table: {}.\n\nTarget: under 1 ms at p99: **{}**.\n",
        p.first_answer_ms,
        p.grants,
        percentiles(&p.cached_ns, "ns"),
        if p.cached_ns.value_at_quantile(0.99) < 1_000_000 { "met" } else { "missed" }
    );
    md.push_str("## Blob serving\n\n| blob | server | requests/s | MB/s | errors | cache / registry |\n|---|---|---:|---:|---:|---:|\n");
    for size in [256 << 10, 4 << 20] {
        let b = blob_throughput(&registry, &puller, size, blob_seconds).await?;
        let ratio = b.cache.requests_per_s / b.registry.requests_per_s.max(f64::MIN_POSITIVE);
        for (name, r) in [("registry-cache", &b.cache), ("docker-registry", &b.registry)] {
            let _ = writeln!(
                md,
                "| {} KiB | {name} | {:.0} | {:.1} | {} | {} |",
                b.size / 1024,
                r.requests_per_s,
                r.mb_per_s,
                r.errors,
                if name == "registry-cache" { format!("{ratio:.2}") } else { String::new() }
            );
        }
    }
    md.push_str(&format!(
        "\nBoth servers answer `GET /v2/<name>/blobs/<digest>` for the same blob with HTTP basic credentials; `wrk -t2 -c16 -d{blob_seconds}s`, \
         sharing the machine's cores with the server under test.\n"
    ));
    md.push_str("\n## Pre-pulling policies' images\n\n| artifacts | module size | concurrent pulls | wall time | per artifact |\n|---:|---:|---:|---:|---:|\n");
    for concurrency in [4, 16] {
        let f = prepull(&registry, 50, 256 << 10, concurrency).await?;
        let _ = writeln!(
            md,
            "| {} | {} KiB | {} | {:.2} s | {:.0} ms |",
            f.artifacts,
            f.module_bytes / 1024,
            f.concurrency,
            f.wall.as_secs_f64(),
            f.wall.as_secs_f64() * 1e3 / f.cached.max(1) as f64
        );
    }
    md.push_str(
        "\nFrom `serve` starting on a directory of 50 EnvoyExtensionPolicies (10 namespaces, each with its \
         pull secret) to the initial sync settled: every image pulled from the private docker-registry, digests verified, \
         re-published, signed. Images are compat (tar+gzip) images; 4 concurrent pulls is the default.\n",
    );
    Ok(md)
}
