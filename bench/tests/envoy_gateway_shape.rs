//! The lab and the tests claim to run Envoy as Envoy Gateway configures it. This holds them to
//! it: every field the harness writes, for every configuration the bench compares, must be a
//! field Envoy Gateway's translator writes in its own golden outputs
//! (`tests/fixtures/envoy-gateway/xds-samples/`), and the settings the filter depends on must
//! have Envoy Gateway's values.

use churn_lab::variants::Variant;
use harness::crds::{envoy_gateway_fixtures, yaml_docs};
use harness::gateway::{self, FilterSpec, WasmSource, WASM_CLUSTER};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// Fields the harness writes that Envoy Gateway's samples do not show, each with the reason.
const NOT_IN_SAMPLES: &[(&str, &str)] = &[
    // The harness serves xDS from watched files instead of Envoy Gateway's gRPC ADS.
    ("edsClusterConfig.edsConfig.pathConfigSource", "file-based xDS"),
    ("rds.configSource.pathConfigSource", "file-based xDS"),
    // Benchmarks only, the same for every configuration: lets the load tool tell failures apart.
    ("responseHeadersToAdd", "bench response flags"),
    // BackendTrafficPolicy `healthCheck.panicThreshold` (in the CRD), which no golden sample sets.
    ("commonLbConfig.healthyPanicThreshold", "panicThreshold"),
    // BackendTrafficPolicy `retry.perRetry.timeout` (in the CRD), which no golden sample sets.
    ("retryPolicy.perTryTimeout", "perRetry.timeout"),
    // The fallback rule's HTTPRoute header match (`headers[].name`, `stringMatch.exact`); the
    // samples carried here have path matches only.
    ("routes.match.headers", "HTTPRoute header match"),
];

/// Every path of `value`, object keys joined with `.`, array indices dropped, `@type` values
/// kept (a field under another type is another field); keys of maps keyed by filter name
/// become `*`.
fn paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.ends_with("typedPerFilterConfig") { "*" } else { k.as_str() };
                let path = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
                if k == "@type" {
                    out.insert(format!("{path}={}", v.as_str().unwrap_or_default()));
                } else {
                    out.insert(path.clone());
                    paths(v, &path, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| paths(v, prefix, out)),
        _ => {}
    }
}

fn sample_paths(suffix: &str) -> anyhow::Result<BTreeSet<String>> {
    let dir = envoy_gateway_fixtures().join("xds-samples");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(suffix) {
            for doc in yaml_docs(&path)? {
                paths(&doc, "", &mut out);
            }
        }
    }
    assert!(!out.is_empty(), "no {suffix} samples in {}", dir.display());
    Ok(out)
}

fn unexplained(generated: &[Value], samples: &BTreeSet<String>) -> Vec<String> {
    let mut mine = BTreeSet::new();
    for v in generated {
        paths(v, "", &mut mine);
    }
    mine.into_iter()
        .filter(|p| !samples.contains(p))
        .filter(|p| !NOT_IN_SAMPLES.iter().any(|(allowed, _)| p.contains(allowed)))
        .collect()
}

fn filter() -> FilterSpec {
    FilterSpec {
        source: WasmSource {
            url: "http://127.0.0.1:1/0.wasm".into(),
            sha256: "0".repeat(64),
            server: "127.0.0.1:1".parse().unwrap(),
            tls_ca: None,
        },
        config: "{}".into(),
    }
}

/// Every configuration the bench compares, with and without a per-try timeout and a connect
/// timeout, as the scenarios run them.
fn specs() -> Vec<gateway::GatewaySpec> {
    let mut out = vec![];
    for variant in Variant::ALL.into_iter().chain([Variant::BuiltinTunedTimeouts]) {
        for timeout in [None, Some(Duration::from_secs(2))] {
            let mut spec = variant.spec(timeout);
            spec.connect_timeout = timeout;
            if variant.filter_config(timeout).is_some() {
                spec.filter = Some(filter());
            }
            out.push(spec);
        }
    }
    out
}

#[test]
fn the_harness_writes_only_fields_envoy_gateway_writes() -> anyhow::Result<()> {
    let dir = Path::new("/xds");
    let (clusters, listeners, routes, endpoints) = (
        sample_paths(".clusters.yaml")?,
        sample_paths(".listeners.yaml")?,
        sample_paths(".routes.yaml")?,
        sample_paths(".endpoints.yaml")?,
    );
    for spec in specs() {
        let c = unexplained(&gateway::clusters(dir, &spec), &clusters);
        let l = unexplained(&[gateway::listener(dir, &spec)], &listeners);
        let r = unexplained(&[gateway::route_config(&spec)], &routes);
        let e = unexplained(&[gateway::endpoints("c", &["127.0.0.1:1".parse()?])], &endpoints);
        assert!(
            c.is_empty() && l.is_empty() && r.is_empty() && e.is_empty(),
            "fields Envoy Gateway does not generate, for {spec:?}:\nclusters {c:#?}\nlisteners {l:#?}\nroutes {r:#?}\nendpoints {e:#?}"
        );
    }
    Ok(())
}

#[test]
fn every_cluster_allows_envoy_gateways_1024_concurrent_retries() -> anyhow::Result<()> {
    // The filter's retries depend on this circuit breaker; Envoy's default is 3.
    let dir = envoy_gateway_fixtures().join("xds-samples");
    let sample = yaml_docs(&dir.join("retry.clusters.yaml"))?;
    let eg: Vec<&Value> = sample
        .iter()
        .flat_map(|d| d.as_array().into_iter().flatten())
        .filter(|c| c["type"] == "EDS")
        .map(|c| &c["circuitBreakers"])
        .collect();
    assert!(!eg.is_empty());
    assert!(eg.iter().all(|cb| cb["thresholds"][0]["maxRetries"] == 1024), "{eg:?}");
    for spec in specs() {
        for cluster in gateway::clusters(Path::new("/xds"), &spec).iter().filter(|c| c["name"] != WASM_CLUSTER) {
            assert_eq!(&&cluster["circuitBreakers"], eg.first().unwrap(), "{}", cluster["name"]);
        }
    }
    Ok(())
}

#[test]
fn the_wasm_filter_is_disabled_on_the_listener_and_enabled_per_route_as_envoy_gateway_does() -> anyhow::Result<()> {
    let dir = envoy_gateway_fixtures().join("xds-samples");
    let listeners = yaml_docs(&dir.join("wasm.listeners.yaml"))?;
    let text = serde_json::to_string(&listeners)?;
    assert!(text.contains(r#""disabled":true,"name":"envoy.filters.http.wasm/envoyextensionpolicy/"#));
    let spec = gateway::GatewaySpec { filter: Some(filter()), ..Default::default() };
    let listener = gateway::listener(Path::new("/xds"), &spec);
    let chain = &listener["defaultFilterChain"]["filters"][0]["typedConfig"]["httpFilters"];
    assert_eq!(chain[0]["name"], gateway::FILTER);
    assert_eq!(chain[0]["disabled"], true);
    assert_eq!(chain[1]["name"], "envoy.filters.http.router", "the Wasm filter runs before the router");
    let routes = gateway::route_config(&spec);
    let per_route = &routes["virtualHosts"][0]["routes"][0]["typedPerFilterConfig"][gateway::FILTER];
    assert_eq!(per_route["@type"], "type.googleapis.com/envoy.config.route.v3.FilterConfig");
    Ok(())
}
