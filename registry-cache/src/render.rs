//! `render`: rewrites EnvoyExtensionPolicies so Envoy loads each Wasm image from the cache over
//! HTTP, pinned by sha256. Envoy Gateway then has nothing to fetch or check at a registry while
//! it translates: the module is already local and its digest is in the policy.

use crate::cache::Entry;
use crate::pull::parse_reference;
use serde_json::{json, Value};

/// On a rendered policy: the image sources it had, by `spec.wasm` index, as JSON. The cache
/// keeps pre-pulling them and keeps the namespace bound, so a policy applied as rendered
/// goes on working.
pub const SOURCE_ANNOTATION: &str = "registry-cache.churn-guard.io/image-sources";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("not YAML: {0}")]
    Yaml(String),
    #[error("{policy}: wasm[{index}] image {image} is not in the cache (run `registry-cache pull {image}` first)")]
    NotCached { policy: String, index: usize, image: String },
    #[error("{policy}: wasm[{index}] image {image} is private and no URL signing key is configured (--url-key)")]
    NoUrlKey { policy: String, index: usize, image: String },
    #[error("{policy}: wasm[{index}] image {image:?} is not a valid reference: {reason}")]
    BadReference { policy: String, index: usize, image: String, reason: String },
}

fn policy_name(doc: &Value) -> String {
    format!(
        "EnvoyExtensionPolicy {}/{}",
        doc["metadata"]["namespace"].as_str().unwrap_or("default"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Rewrites every `code.type: Image` of every EnvoyExtensionPolicy in `yaml`; other documents
/// pass through. `base_url` is where Envoy reaches the cache, e.g.
/// `http://registry-cache.churn-guard-system.svc:5000`. A private module's URL carries the
/// policy's namespace and `url_token(namespace, module digest)`, without which the cache does
/// not serve it to Envoy.
pub fn render(
    yaml: &str,
    base_url: &str,
    lookup: impl Fn(&str) -> Option<Entry>,
    url_token: impl Fn(&str, &str) -> Option<String>,
) -> Result<String, RenderError> {
    let mut out = String::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let mut doc: Value = serde::Deserialize::deserialize(doc).map_err(|e| RenderError::Yaml(e.to_string()))?;
        if doc.is_null() {
            continue;
        }
        if doc["kind"] == "EnvoyExtensionPolicy" {
            let policy = policy_name(&doc);
            let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
            let mut sources = serde_json::Map::new();
            if let Some(wasms) = doc.pointer_mut("/spec/wasm").and_then(Value::as_array_mut) {
                for (index, wasm) in wasms.iter_mut().enumerate() {
                    if wasm["code"]["type"] != "Image" {
                        continue;
                    }
                    let image = wasm["code"]["image"]["url"].as_str().unwrap_or_default().to_string();
                    let reference =
                        parse_reference(image.trim_start_matches("oci://")).map_err(|e| RenderError::BadReference {
                            policy: policy.clone(),
                            index,
                            image: image.clone(),
                            reason: e.to_string(),
                        })?;
                    let entry = lookup(&reference.whole()).ok_or_else(|| RenderError::NotCached {
                        policy: policy.clone(),
                        index,
                        image: image.clone(),
                    })?;
                    let sha256 = entry.module.trim_start_matches("sha256:").to_string();
                    let mut url = format!("{}/wasm/{sha256}.wasm", base_url.trim_end_matches('/'));
                    if entry.private {
                        let token = url_token(&namespace, &entry.module).ok_or_else(|| RenderError::NoUrlKey {
                            policy: policy.clone(),
                            index,
                            image: image.clone(),
                        })?;
                        url.push_str(&format!("?namespace={namespace}&token={token}"));
                    }
                    sources.insert(index.to_string(), wasm["code"].take());
                    wasm["code"] = json!({"type": "HTTP", "http": {"url": url, "sha256": sha256}});
                }
            }
            if !sources.is_empty() {
                let text = Value::Object(sources).to_string();
                if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
                    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
                    if let Some(a) = annotations.as_object_mut() {
                        a.insert(SOURCE_ANNOTATION.to_string(), Value::String(text));
                    }
                }
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&doc).map_err(|e| RenderError::Yaml(e.to_string()))?);
    }
    Ok(out)
}
