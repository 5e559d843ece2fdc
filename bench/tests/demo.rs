//! The demo's pipeline, reduced (few pods, short lag): the filter reaches Envoy through
//! registry-cache from a private registry, and it cuts the failures of a rolling restart.
//! No timing assertions.

use churn_lab::demo::{run, DemoOptions};
use churn_lab::report::summarize;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_comes_from_the_cache_and_fails_fewer_requests_than_plain() -> anyhow::Result<()> {
    let options = DemoOptions { pods: 8, lag: Duration::from_secs(4), rate: 100 };
    let quiet = |_: &str| {};
    let outcome = run(&options, &quiet).await?;
    let module = harness::wasm_module()?;

    let d = &outcome.delivery;
    assert_eq!(d.module_sha256, harness::sha256_hex(&module), "the policy must pin the module that was built");
    assert!(
        d.configured.filter.source.url.starts_with(&format!(
            "https://localhost:{}/wasm/{}.wasm?",
            d.cache_addr.port(),
            d.module_sha256
        )),
        "Envoy must fetch the module from the cache, over TLS: {}",
        d.configured.filter.source.url
    );
    assert!(d.signature_verified, "the cached artifact must carry a valid signature");
    let schemas = harness::crds::schemas()?;
    for doc in harness::crds::yaml_docs_str(&d.rendered_policy)? {
        assert_eq!(harness::crds::validate(&schemas, &doc), Ok(true), "the rendered policy must validate");
    }
    assert!(outcome.modules_served >= 1, "Envoy never fetched the module from the cache");

    let [plain, guarded] = [&outcome.results[0], &outcome.results[1]].map(summarize);
    eprintln!(
        "plain: {} of {} failed; churn-guard: {} of {} failed",
        plain.failed, plain.sent, guarded.failed, guarded.sent
    );
    assert!(plain.sent > 500 && guarded.sent > 500, "too little load to say anything");
    assert!(plain.failed > 0, "the rollout did not hurt plain Envoy: the lab no longer reproduces the outage");
    assert!(guarded.failed < plain.failed, "churn-guard failed {} requests, plain {}", guarded.failed, plain.failed);
    Ok(())
}
