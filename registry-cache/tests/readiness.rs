//! Readiness is "the cache is open and serving", never "every image is pulled": a restart with
//! one upstream hanging serves what is cached at once, and images that fail are reported one by
//! one in `/status` and the metrics, where an operator can see which and why.

mod common;

use common::{get_body, serve_service, service_options, status, target_status, wasm_module};
use registry_cache::artifact::sha256_hex;
use registry_cache::cache::Cache;
use std::time::Duration;

const URL_KEY: [u8; 32] = [9; 32];

async fn readyz(addr: std::net::SocketAddr) -> bool {
    reqwest::get(format!("http://{addr}/readyz")).await.is_ok_and(|r| r.status() == 200)
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_what_is_cached_while_another_upstream_hangs() {
    let registry = common::registry().await;
    let module = wasm_module("cached-before-restart", 32 << 10);
    let cached = common::push(registry.addr, "wasm/cached", &module).await;
    // Accepts connections (the kernel does) and never answers: a registry that hangs.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hanging = format!("{}/wasm/slow:v1", hole.local_addr().expect("addr"));

    let dir = tempfile::tempdir().expect("tempdir");
    let (cache_dir, policies) = (dir.path().join("cache"), dir.path().join("policies"));
    std::fs::create_dir_all(&policies).expect("policies dir");
    // What an earlier run cached, with the namespace's pull secret.
    {
        let cache = Cache::open(&cache_dir, 1 << 30).expect("cache");
        let pulled = common::puller(registry.addr, Duration::from_secs(30)).pull(&cached, &common::auth()).await;
        registry_cache::publish::publish(&cache, &pulled.expect("pull"), true).expect("publish");
    }
    std::fs::write(policies.join("secret.yaml"), registry.pull_secret("shop", "regcred")).expect("secret");
    std::fs::write(policies.join("cached.yaml"), common::policy_yaml("shop", "cached", &cached, true)).expect("p");
    std::fs::write(policies.join("slow.yaml"), common::policy_yaml("shop", "slow", &hanging, false)).expect("p");

    let mut options = service_options(&cache_dir, &[registry.addr, hole.local_addr().expect("addr")], &URL_KEY);
    // The hanging pull outlasts the test: the old readiness would wait for it to fail 3 times.
    options.pull.read_timeout = Duration::from_secs(3600);
    options.pull.pull_timeout = Duration::from_secs(3600);
    let s = serve_service(options, &policies).await;

    assert!(harness::eventually(Duration::from_secs(60), || readyz(s.addr)).await, "not ready while an upstream hangs");
    let path = common::wasm_path(&URL_KEY, "shop", &format!("sha256:{}", sha256_hex(&module)));
    let served = harness::eventually(Duration::from_secs(60), || async {
        get_body(s.addr, &path).await.is_some_and(|body| body == module)
    })
    .await;
    assert!(served, "the cached module is not served while another image hangs: {}", status(s.addr).await);

    let slow = target_status(s.addr, &hanging).await.expect("the hanging image in /status");
    assert_eq!((slow["status"].as_str(), slow["consecutiveFailures"].as_u64()), (Some("pending"), Some(0)), "{slow}");
    let ready = target_status(s.addr, &cached).await.expect("the cached image in /status");
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["pullSecret"], "shop/regcred");
    assert_eq!(ready["policies"], serde_json::json!(["shop/cached"]));
    assert_eq!(status(s.addr).await["initialSyncSettled"], false, "one image of the initial sync is still pending");

    let text = metrics(s.addr).await;
    assert_eq!(sample(&text, "registry_cache_prefetch_initial_sync_settled"), Some(0.0), "{text}");
    let labels = |image: &str, secret: &str| format!("{{image=\"{image}\",pull_secret=\"{secret}\"}}");
    let ready_metric = |image: &str, secret: &str| {
        sample(&text, &format!("registry_cache_prefetch_target_ready{}", labels(image, secret)))
    };
    assert_eq!(ready_metric(&cached, "shop/regcred"), Some(1.0), "{text}");
    assert_eq!(ready_metric(&hanging, ""), Some(0.0), "{text}");
    assert_eq!(sample(&text, "registry_cache_prefetch_targets{status=\"pending\"}"), Some(1.0), "{text}");
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_images_are_reported_per_image_in_status_and_metrics() {
    // A port nothing listens on: every pull is refused at once.
    let refused = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let image = format!("{refused}/wasm/gone:v1");
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("policies dir");
    std::fs::write(policies.join("gone.yaml"), common::policy_yaml("team-b", "gone", &image, false)).expect("p");

    let mut options = service_options(&dir.path().join("cache"), &[refused], &URL_KEY);
    options.settings.prefetch.initial_backoff_millis = 20;
    options.settings.prefetch.max_backoff_seconds = 1;
    let s = serve_service(options, &policies).await;

    let reported = harness::eventually(Duration::from_secs(60), || async {
        target_status(s.addr, &image).await.is_some_and(|t| t["consecutiveFailures"].as_u64() >= Some(3))
    })
    .await;
    assert!(reported, "failures not counted in /status: {}", status(s.addr).await);
    let t = target_status(s.addr, &image).await.expect("in /status");
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["pullSecret"], serde_json::Value::Null);
    assert_eq!(t["policies"], serde_json::json!(["team-b/gone"]));
    assert!(t["lastError"].as_str().is_some_and(|e| !e.is_empty()), "no error given: {t}");
    assert_eq!(status(s.addr).await["initialSyncSettled"], true, "settled after settleAttempts failures");
    assert!(readyz(s.addr).await, "a failing image must not take the cache out of service");

    let text = metrics(s.addr).await;
    let failures =
        sample(&text, &format!("registry_cache_prefetch_consecutive_failures{{image=\"{image}\",pull_secret=\"\"}}"));
    assert!(failures.is_some_and(|n| n >= 3.0), "{text}");
    assert_eq!(sample(&text, "registry_cache_prefetch_targets{status=\"failed\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "registry_cache_prefetch_initial_sync_settled"), Some(1.0), "{text}");

    // The policy goes: so does the image, from /status and the metrics.
    std::fs::remove_file(policies.join("gone.yaml")).expect("remove policy");
    let gone = harness::eventually(Duration::from_secs(60), || async {
        status(s.addr).await["targets"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert!(gone, "{}", status(s.addr).await);
    assert!(!metrics(s.addr).await.contains(&image), "a removed image is still in the metrics");
}
