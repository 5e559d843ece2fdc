//! `render` output is an EnvoyExtensionPolicy Envoy Gateway accepts (validated against its CRD),
//! loading the cached module over HTTP with its sha256.

use harness::crds::{schemas, validate, yaml_docs_str};
use registry_cache::artifact::Format;
use registry_cache::cache::Cache;
use registry_cache::publish;
use registry_cache::pull::Pulled;
use registry_cache::render::{render, RenderError};
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
