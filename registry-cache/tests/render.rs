//! `render` output is an EnvoyExtensionPolicy Envoy Gateway accepts (validated against its CRD),
//! loading the cached module from the cache with its sha256: over HTTP(S) by `/wasm` URL, or as
//! an image from the cache's OCI API; with https, naming the CA to verify the cache with.

use harness::crds::{schemas, validate, yaml_docs_str};
use registry_cache::artifact::Format;
use registry_cache::cache::Cache;
use registry_cache::publish;
use registry_cache::pull::Pulled;
use registry_cache::render::{render, render_with, CaRef, CodeSource, RenderError, RenderOptions};
use registry_cache::sources::{PolicyRecord, PullPolicy, SecretRef};

const POLICY: &str = r#"
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata:
  name: churn-guard
  namespace: shop
spec:
  targetRefs:
    - group: gateway.networking.k8s.io
      kind: HTTPRoute
      name: backend
  wasm:
    - name: churn-guard
      failOpen: true
      code:
        type: Image
        pullPolicy: Always
        image:
          url: registry.example:5000/filters/churn-guard:v1
          pullSecretRef:
            name: registry-credentials
      config:
        endpointOverride: {}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: untouched
data:
  key: value
"#;

fn module() -> Vec<u8> {
    b"\x00asm\x01\x00\x00\x00render-test".to_vec()
}

#[test]
fn rewrites_images_to_pinned_http_sources_that_validate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open(dir.path(), 1 << 30).expect("cache");
    let pulled = Pulled {
        reference: "registry.example:5000/filters/churn-guard:v1".into(),
        upstream_digest: format!("sha256:{}", "1".repeat(64)),
        format: Format::SoloOci,
        module: module(),
        verified_by: vec![],
    };
    let entry = publish::publish(&cache, &pulled, true).expect("publish");
    // A private module needs a URL token for the policy's namespace.
    let err = render(POLICY, "http://c:5000", |r| cache.lookup(r), |_, _| None).expect_err("no URL key");
    assert!(matches!(err, RenderError::NoUrlKey { .. }), "{err}");
    let token = |ns: &str, module: &str| Some(format!("t-{ns}-{}", &module[7..15]));
    let out = render(POLICY, "http://registry-cache.system.svc:5000", |r| cache.lookup(r), token).expect("render");
    let docs = yaml_docs_str(&out).expect("yaml");
    assert_eq!(docs.len(), 2);
    let code = &docs[0]["spec"]["wasm"][0]["code"];
    let sha = entry.module.trim_start_matches("sha256:");
    assert_eq!(code["type"], "HTTP");
    assert_eq!(code["http"]["sha256"], sha);
    assert_eq!(
        code["http"]["url"],
        format!("http://registry-cache.system.svc:5000/wasm/{sha}.wasm?namespace=shop&token=t-shop-{}", &sha[..8])
    );
    assert!(code.get("image").is_none() && code.get("pullPolicy").is_none());
    assert!(code["http"].get("tls").is_none(), "no CA for a plain http:// base URL");
    assert_eq!(docs[0]["spec"]["wasm"][0]["config"]["endpointOverride"], serde_json::json!({}));
    assert_eq!(docs[1]["data"]["key"], "value", "other documents pass through");
    let schemas = schemas().expect("CRDs");
    assert_eq!(validate(&schemas, &docs[0]), Ok(true), "rendered policy must validate against the CRD");
    // Applied as rendered, the policy still names its image, so the cache keeps it pre-pulled
    // and the namespace bound.
    let record = PolicyRecord::from_value(&docs[0]).expect("a policy");
    let image = &record.images[0];
    assert_eq!(image.image, "registry.example:5000/filters/churn-guard:v1");
    assert_eq!(image.pull_secret, Some(SecretRef { namespace: "shop".into(), name: "registry-credentials".into() }));
    assert_eq!(image.pull_policy, PullPolicy::Always);
}

#[test]
fn an_image_that_is_not_cached_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open(dir.path(), 1 << 30).expect("cache");
    let err = render(POLICY, "http://c:5000", |r| cache.lookup(r), |_, _| None).expect_err("nothing is cached");
    assert!(
        matches!(&err, RenderError::NotCached { image, .. } if image == "registry.example:5000/filters/churn-guard:v1")
    );
    assert!(err.to_string().contains("shop/churn-guard"), "{err}");
}

fn cached(cache: &Cache, reference: &str, private: bool) -> registry_cache::cache::Entry {
    let pulled = Pulled {
        reference: reference.into(),
        upstream_digest: format!("sha256:{}", "2".repeat(64)),
        format: Format::SoloOci,
        module: module(),
        verified_by: vec![],
    };
    publish::publish(cache, &pulled, private).expect("publish")
}

const BASE: &str = "https://registry-cache.churn-guard-system.svc.cluster.local:5000";

fn token(ns: &str, module: &str) -> Option<String> {
    Some(format!("t-{ns}-{}", &module[7..15]))
}

#[test]
fn https_sources_name_the_ca_and_a_reference_grant_allows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open(dir.path(), 1 << 30).expect("cache");
    let entry = cached(&cache, "registry.example:5000/filters/churn-guard:v1", true);
    let out = render_with(POLICY, &RenderOptions::new(BASE), |r| cache.lookup(r), token).expect("render");
    let docs = yaml_docs_str(&out).expect("yaml");
    assert_eq!(docs.len(), 3, "the policy, the ConfigMap passed through, a ReferenceGrant:\n{out}");
    let http = &docs[0]["spec"]["wasm"][0]["code"]["http"];
    let sha = entry.module.trim_start_matches("sha256:");
    assert_eq!(http["url"], format!("{BASE}/wasm/{sha}.wasm?namespace=shop&token=t-shop-{}", &sha[..8]));
    // Envoy Gateway reads `ca.crt` of this object to verify the cache; deploy/ provides it.
    assert_eq!(
        http["tls"]["caCertificateRef"],
        serde_json::json!({"group": "", "kind": "Secret", "name": "registry-cache-tls", "namespace": "churn-guard-system"})
    );
    // The reference crosses namespaces, so churn-guard-system must grant it to this policy's.
    let grant = &docs[2];
    assert_eq!(
        (grant["kind"].as_str(), grant["metadata"]["namespace"].as_str()),
        (Some("ReferenceGrant"), Some("churn-guard-system"))
    );
    assert_eq!(
        grant["spec"]["from"],
        serde_json::json!([{"group": "gateway.envoyproxy.io", "kind": "EnvoyExtensionPolicy", "namespace": "shop"}])
    );
    assert_eq!(grant["spec"]["to"], serde_json::json!([{"group": "", "kind": "Secret", "name": "registry-cache-tls"}]));
    let schemas = schemas().expect("CRDs");
    assert_eq!(validate(&schemas, &docs[0]), Ok(true), "the policy must validate against the CRD");
    assert_eq!(validate(&schemas, grant), Ok(true), "the ReferenceGrant must validate against Gateway API's CRD");

    // A CA ConfigMap in the policy's own namespace needs no namespace and no grant.
    let options = RenderOptions {
        ca: CaRef { kind: "ConfigMap".into(), name: "cache-ca".into(), namespace: "shop".into() },
        ..RenderOptions::new(BASE)
    };
    let docs =
        yaml_docs_str(&render_with(POLICY, &options, |r| cache.lookup(r), token).expect("render")).expect("yaml");
    assert_eq!(docs.len(), 2, "no ReferenceGrant");
    assert_eq!(
        docs[0]["spec"]["wasm"][0]["code"]["http"]["tls"]["caCertificateRef"],
        serde_json::json!({"group": "", "kind": "ConfigMap", "name": "cache-ca"})
    );
    assert_eq!(validate(&schemas, &docs[0]), Ok(true));
}

#[test]
fn image_sources_point_at_the_cache_by_digest_and_keep_the_original_for_pre_pulling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open(dir.path(), 1 << 30).expect("cache");
    let image_options = RenderOptions { code: CodeSource::Image, ..RenderOptions::new(BASE) };
    let lookup = |r: &str| cache.lookup(r);

    let entry = cached(&cache, "registry.example:5000/filters/churn-guard:v1", true);
    let err = render_with(POLICY, &image_options, lookup, token).expect_err("private");
    assert!(matches!(err, RenderError::PrivateImage { .. }), "{err}");
    assert!(err.to_string().contains("--code http"), "{err}");
    let plain = RenderOptions { code: CodeSource::Image, ..RenderOptions::new("http://cache:5000") };
    let err = render_with(POLICY, &plain, lookup, token).expect_err("image over plain http");
    assert!(matches!(err, RenderError::ImageNeedsTls(_)), "{err}");

    cache.remove(&entry.reference).expect("remove");
    let entry = cached(&cache, "registry.example:5000/filters/churn-guard:v1", false);
    let out = render_with(POLICY, &image_options, lookup, token).expect("render");
    let docs = yaml_docs_str(&out).expect("yaml");
    let code = &docs[0]["spec"]["wasm"][0]["code"];
    assert_eq!(code["type"], "Image");
    assert_eq!(
        code["image"]["url"],
        format!(
            "registry-cache.churn-guard-system.svc.cluster.local:5000/registry.example_5000/filters/churn-guard@{}",
            entry.manifest
        )
    );
    assert_eq!(code["image"]["sha256"], entry.manifest.trim_start_matches("sha256:"), "the image's digest");
    assert_eq!(code["image"]["tls"]["caCertificateRef"]["name"], "registry-cache-tls");
    assert!(code["image"].get("pullSecretRef").is_none(), "the cache serves it to anyone");
    assert!(code.get("http").is_none());
    let schemas = schemas().expect("CRDs");
    assert_eq!(validate(&schemas, &docs[0]), Ok(true), "rendered policy must validate against the CRD");
    assert_eq!(docs[2]["kind"], "ReferenceGrant");
    // The cache pre-pulls the original image, not itself.
    let record = PolicyRecord::from_value(&docs[0]).expect("a policy");
    assert_eq!(record.images.len(), 1);
    assert_eq!(record.images[0].image, "registry.example:5000/filters/churn-guard:v1");
}
