//! The cache's size bound against what policies use, with `serve` in-process on a policies
//! directory and a real private registry: filling the cache evicts modules no policy names, never
//! one a policy names; a module corrupted on disk is never served, and is pulled again.

mod common;

use common::{get_body, push, serve_service, service_options, status, target_status, wasm_module, wasm_path};
use registry_cache::artifact::sha256_hex;
use registry_cache::pull::parse_reference;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const URL_KEY: [u8; 32] = [3; 32];
const MODULE_BYTES: usize = 64 << 10;

async fn wait_ready(addr: SocketAddr, image: &str) {
    let ready = harness::eventually(Duration::from_secs(60), || async {
        target_status(addr, image).await.is_some_and(|t| t["status"] == "ready")
    })
    .await;
    assert!(ready, "{image} not pre-pulled: {}", status(addr).await);
}

fn write_policy(dir: &Path, name: &str, image: &str) {
    std::fs::write(dir.join(format!("{name}.yaml")), common::policy_yaml("shop", name, image, true)).expect("policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_cache_never_evicts_a_module_a_policy_names() {
    let registry = common::registry().await;
    // The module in use is the least recently used one, and its reference sorts first: plain
    // LRU would evict it.
    let (a, b, c) = (
        wasm_module("a-in-use", MODULE_BYTES),
        wasm_module("b-no-longer-named", MODULE_BYTES),
        wasm_module("c-new", MODULE_BYTES),
    );
    let (image_a, image_b, image_c) = (
        push(registry.addr, "wasm/a-in-use", &a).await,
        push(registry.addr, "wasm/b-no-longer-named", &b).await,
        push(registry.addr, "wasm/c-new", &c).await,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (cache_dir, policies) = (dir.path().join("cache"), dir.path().join("policies"));
    std::fs::create_dir_all(&policies).expect("policies dir");
    std::fs::write(policies.join("secret.yaml"), registry.pull_secret("shop", "regcred")).expect("secret");
    let mut options = service_options(&cache_dir, &[registry.addr], &URL_KEY);
    // Two modules fit, three do not.
    options.max_cache_bytes = (2 * MODULE_BYTES + MODULE_BYTES / 2) as u64;
    let s = serve_service(options, &policies).await;

    write_policy(&policies, "a", &image_a);
    wait_ready(s.addr, &image_a).await;
    write_policy(&policies, "b", &image_b);
    wait_ready(s.addr, &image_b).await;
    // b's policy goes and c's comes: c fits only if something is evicted.
    std::fs::remove_file(policies.join("b.yaml")).expect("remove b");
    write_policy(&policies, "c", &image_c);
    wait_ready(s.addr, &image_c).await;

    let cache = &s.service.state.cache;
    let whole = |image: &str| parse_reference(image).expect("reference").whole();
    assert!(cache.lookup(&whole(&image_b)).is_none(), "the module no policy names was evicted");
    assert!(cache.has_entry_intact(&whole(&image_a)) && cache.has_entry_intact(&whole(&image_c)));
    for (module, name) in [(&a, "a"), (&c, "c")] {
        let path = wasm_path(&URL_KEY, "shop", &format!("sha256:{}", sha256_hex(module)));
        assert_eq!(get_body(s.addr, &path).await.as_ref(), Some(module), "the module of policy {name} is not served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_corrupted_on_disk_is_never_served_and_is_pulled_again() {
    let registry = common::registry().await;
    let module = wasm_module("bit-rot", MODULE_BYTES);
    let image = push(registry.addr, "wasm/bit-rot", &module).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cache_dir, policies) = (dir.path().join("cache"), dir.path().join("policies"));
    std::fs::create_dir_all(&policies).expect("policies dir");
    std::fs::write(policies.join("secret.yaml"), registry.pull_secret("shop", "regcred")).expect("secret");
    write_policy(&policies, "filter", &image);
    let s = serve_service(service_options(&cache_dir, &[registry.addr], &URL_KEY), &policies).await;
    wait_ready(s.addr, &image).await;
    let path = wasm_path(&URL_KEY, "shop", &format!("sha256:{}", sha256_hex(&module)));
    assert_eq!(get_body(s.addr, &path).await.as_ref(), Some(&module));

    // The disk flips bits in the cached module.
    let file = cache_dir.join("blobs/sha256").join(sha256_hex(&module));
    let mut rotten = std::fs::read(&file).expect("cached module");
    let middle = rotten.len() / 2;
    rotten[middle] ^= 0x40;
    std::fs::write(&file, &rotten).expect("corrupt it");

    let first = reqwest::get(format!("http://{}{path}", s.addr)).await.expect("request");
    assert_eq!(first.status(), 404, "a corrupt module must not be served");
    let repulled = harness::eventually(Duration::from_secs(60), || async {
        get_body(s.addr, &path).await.is_some_and(|body| body == module)
    })
    .await;
    assert!(repulled, "the corrupt module was not pulled again: {}", status(s.addr).await);
    assert_eq!(std::fs::read(&file).expect("cached module"), module, "the file on disk is whole again");
    let metrics = reqwest::get(format!("http://{}/metrics", s.addr)).await.expect("metrics").text().await;
    assert!(
        metrics.expect("metrics").contains("registry_cache_requests_total{kind=\"wasm\",outcome=\"corrupt\"} 1"),
        "the corrupt read is counted"
    );
}
