//! The shipped examples are what users apply: every Envoy Gateway and Gateway API manifest must
//! validate against the CRD schemas Envoy Gateway ships (`tests/fixtures/envoy-gateway/crds/`), the
//! pieces must agree with each other, and the local Envoy config must load.

use churn_guard::config::Config;
use harness::crds::{schemas, validate, yaml_docs};
use harness::envoy::{envoy_bin, workspace_root};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

fn example_manifests() -> anyhow::Result<Vec<(PathBuf, Value)>> {
    let dir = workspace_root().join("examples/envoy-gateway");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let mut out = vec![];
    for f in files.into_iter().filter(|f| f.extension().and_then(|e| e.to_str()) == Some("yaml")) {
        for doc in yaml_docs(&f)? {
            out.push((f.clone(), doc));
        }
    }
    Ok(out)
}

#[test]
fn gateway_manifests_validate_against_the_crds() -> anyhow::Result<()> {
    let schemas = schemas()?;
    assert!(schemas.contains_key(&("gateway.envoyproxy.io/v1alpha1".into(), "EnvoyExtensionPolicy".into())));
    assert!(schemas.contains_key(&("gateway.networking.k8s.io/v1".into(), "HTTPRoute".into())));
    let mut checked = HashMap::<String, usize>::new();
    for (file, doc) in example_manifests()? {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match validate(&schemas, &doc) {
            Ok(true) => *checked.entry(kind).or_default() += 1,
            // Core Kubernetes kinds have no CRD; they only need to parse.
            Ok(false) => assert!(matches!(kind.as_str(), "Deployment" | "Service"), "no schema for {kind}"),
            Err(errors) => panic!("{} ({kind}) is invalid:\n{}", file.display(), errors.join("\n")),
        }
    }
    assert_eq!(checked.get("EnvoyExtensionPolicy"), Some(&1));
    assert_eq!(checked.get("BackendTrafficPolicy"), Some(&2));
    assert_eq!(checked.get("HTTPRoute"), Some(&2));
    Ok(())
}

#[test]
fn validation_catches_mistakes() -> anyhow::Result<()> {
    let schemas = schemas()?;
    let (_, mut eep) =
        example_manifests()?.into_iter().find(|(_, d)| d["kind"] == "EnvoyExtensionPolicy").unwrap_or_default();
    eep["spec"]["wasm"][0]["failopen"] = Value::Bool(true);
    assert!(validate(&schemas, &eep).is_err(), "a misspelled field passed");
    let (_, mut btp) =
        example_manifests()?.into_iter().find(|(_, d)| d["kind"] == "BackendTrafficPolicy").unwrap_or_default();
    btp["spec"]["loadBalancer"]["endpointOverride"]["extractFrom"] = serde_json::json!([]);
    assert!(validate(&schemas, &btp).is_err(), "an empty extractFrom passed (minItems: 1)");
    Ok(())
}

/// The filter's configuration in the policy parses, and its headers are the ones the
/// BackendTrafficPolicy and the fallback HTTPRoute use.
#[test]
fn policy_config_agrees_with_routes_and_traffic_policy() -> anyhow::Result<()> {
    let docs: Vec<Value> = example_manifests()?.into_iter().map(|(_, d)| d).collect();
    let eep = docs.iter().find(|d| d["kind"] == "EnvoyExtensionPolicy").cloned().unwrap_or_default();
    let config = Config::parse(serde_json::to_string(&eep["spec"]["wasm"][0]["config"])?.as_bytes())?;

    let override_header = config.endpoint_override.map(|o| o.header).unwrap_or_default();
    let btp_headers: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "BackendTrafficPolicy")
        .flat_map(|d| d["spec"]["loadBalancer"]["endpointOverride"]["extractFrom"].as_array().into_iter().flatten())
        .filter_map(|e| e["header"].as_str())
        .collect();
    assert_eq!(btp_headers, vec![override_header.as_str()]);

    let fallback = config.fallback.unwrap_or_default();
    let route_header_matches: Vec<(String, String)> = docs
        .iter()
        .filter(|d| d["kind"] == "HTTPRoute")
        .flat_map(|d| d["spec"]["rules"].as_array().cloned().unwrap_or_default())
        .flat_map(|r| r["matches"].as_array().cloned().unwrap_or_default())
        .flat_map(|m| m["headers"].as_array().cloned().unwrap_or_default())
        .map(|h| {
            (h["name"].as_str().unwrap_or_default().to_string(), h["value"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert_eq!(route_header_matches, vec![(fallback.header.clone(), fallback.value.clone())]);

    let targets: Vec<&str> =
        eep["spec"]["targetRefs"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(targets, vec!["backend", "backend-fallback"], "the filter must see fallback traffic too");
    Ok(())
}

/// `examples/envoy/envoy.yaml` is a configuration Envoy 1.40 accepts, with the built module.
#[test]
fn local_envoy_example_loads() -> anyhow::Result<()> {
    let out = std::process::Command::new(envoy_bin()?)
        .current_dir(workspace_root())
        .args(["--mode", "validate", "--disable-hot-restart", "-c", "examples/envoy/envoy.yaml"])
        .output()?;
    let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("OK"), "{log}");
    Ok(())
}

/// The project carries Envoy Gateway's reference data (nothing is read from outside the
/// repository): the CRDs must accept the translator's own Wasm policy inputs, so a refresh that
/// brings CRDs and samples from different releases is caught here.
#[test]
fn carried_envoy_gateway_samples_validate_against_the_carried_crds() -> anyhow::Result<()> {
    let fixtures = harness::crds::envoy_gateway_fixtures();
    assert!(fixtures.starts_with(workspace_root()), "{} is outside the repository", fixtures.display());
    assert!(fixtures.join("LICENSE").is_file() && fixtures.join("README.md").is_file(), "license and provenance");
    let schemas = schemas()?;
    let mut policies = 0;
    for name in
        ["envoyextensionpolicy-with-wasm.in.yaml", "envoyextensionpolicy-with-wasm-invalid-configuration.in.yaml"]
    {
        let path = fixtures.join("policy-samples").join(name);
        for input in yaml_docs(&path)? {
            for doc in input
                .as_object()
                .into_iter()
                .flat_map(|o| o.values())
                .flat_map(|v| v.as_array().cloned().unwrap_or_default())
            {
                let kind = doc["kind"].as_str().unwrap_or_default().to_string();
                match validate(&schemas, &doc) {
                    Ok(_) => policies += usize::from(kind == "EnvoyExtensionPolicy"),
                    Err(errors) => panic!("{} ({kind}) is invalid:\n{}", path.display(), errors.join("\n")),
                }
            }
        }
    }
    assert!(policies >= 4, "found only {policies} EnvoyExtensionPolicies in the samples");
    Ok(())
}

/// A missing CRD directory is reported with its path, not as a bare "No such file".
#[test]
fn a_missing_crd_directory_is_named_in_the_error() {
    let dir = workspace_root().join("target/no-such-crd-dir");
    let err = harness::crds::schemas_in(&dir).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(err.contains(&dir.display().to_string()) && err.contains("CRD"), "{err}");
}
