//! `render`: rewrites EnvoyExtensionPolicies so Envoy Gateway loads each Wasm image from the
//! cache, pinned by sha256: as an HTTP code source (`/wasm/<sha256>.wasm`) or an image source
//! naming the cache's OCI API. Envoy Gateway then has nothing to fetch or check at a registry
//! while it translates: the module is already local and its digest is in the policy.
//!
//! With an `https://` base URL the code source carries `tls.caCertificateRef`, the CA Envoy
//! Gateway verifies the cache's certificate with (it reads key `ca.crt`). When that object is
//! in another namespace than the policy, a ReferenceGrant there allows the reference, and
//! `render` writes it too.

use crate::cache::Entry;
use crate::publish::served_name;
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
    #[error(
        "{policy}: wasm[{index}] image {image} is private: an image source has no way to prove the namespace's \
         access to the cache; render it as an HTTP source (--code http), whose URL carries a token"
    )]
    PrivateImage { policy: String, index: usize, image: String },
    #[error("image code sources need an https:// base URL: Envoy Gateway fetches images over TLS only (got {0})")]
    ImageNeedsTls(String),
    #[error("base URL {0:?}: expected http://HOST[:PORT] or https://HOST[:PORT]")]
    BadBaseUrl(String),
}

/// Which code source a rendered policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CodeSource {
    /// `type: HTTP`, `/wasm/<sha256>.wasm`; private modules get a namespace token in the URL.
    #[default]
    Http,
    /// `type: Image`, the module as the cache re-publishes it, by manifest digest. Public
    /// images only.
    Image,
}

/// The Secret or ConfigMap holding the CA (`ca.crt`) that signed the cache's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRef {
    /// `Secret` or `ConfigMap`.
    pub kind: String,
    pub name: String,
    pub namespace: String,
}

impl Default for CaRef {
    /// What `deploy/` provides: the cache's own `kubernetes.io/tls` Secret, whose `ca.crt`
    /// cert-manager fills in.
    fn default() -> Self {
        Self { kind: "Secret".into(), name: "registry-cache-tls".into(), namespace: "churn-guard-system".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Where Envoy Gateway reaches the cache, e.g. `https://registry-cache.churn-guard-system.svc:5000`.
    pub base_url: String,
    pub code: CodeSource,
    /// Referenced when `base_url` is `https://`.
    pub ca: CaRef,
}

impl RenderOptions {
    pub fn new(base_url: &str) -> Self {
        Self { base_url: base_url.to_string(), code: CodeSource::Http, ca: CaRef::default() }
    }

    fn tls(&self) -> bool {
        self.base_url.starts_with("https://")
    }

    /// `host[:port]` of the base URL, as an image reference names a registry: an image source
    /// cannot sit under a path.
    fn host(&self) -> Result<&str, RenderError> {
        let bad = || RenderError::BadBaseUrl(self.base_url.clone());
        let rest =
            self.base_url.strip_prefix("https://").or_else(|| self.base_url.strip_prefix("http://")).ok_or_else(bad)?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(host)
    }

    fn ca_certificate_ref(&self, policy_namespace: &str) -> Value {
        let mut r = json!({"group": "", "kind": self.ca.kind, "name": self.ca.name});
        if self.ca.namespace != policy_namespace {
            r["namespace"] = Value::String(self.ca.namespace.clone());
        }
        r
    }

    /// Lets policies in `namespace` reference the CA object, as Envoy Gateway requires for a
    /// reference into another namespace.
    fn reference_grant(&self, namespace: &str) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": format!("registry-cache-ca-{namespace}"), "namespace": self.ca.namespace},
            "spec": {
                "from": [{"group": "gateway.envoyproxy.io", "kind": "EnvoyExtensionPolicy", "namespace": namespace}],
                "to": [{"group": "", "kind": self.ca.kind, "name": self.ca.name}],
            },
        })
    }
}

fn policy_name(doc: &Value) -> String {
    format!(
        "EnvoyExtensionPolicy {}/{}",
        doc["metadata"]["namespace"].as_str().unwrap_or("default"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Rewrites every `code.type: Image` of every EnvoyExtensionPolicy in `yaml` to an HTTP
/// source at `base_url` (see [`render_with`]); other documents pass through.
pub fn render(
    yaml: &str,
    base_url: &str,
    lookup: impl Fn(&str) -> Option<Entry>,
    url_token: impl Fn(&str, &str) -> Option<String>,
) -> Result<String, RenderError> {
    render_with(yaml, &RenderOptions::new(base_url), lookup, url_token)
}

/// Rewrites every `code.type: Image` of every EnvoyExtensionPolicy in `yaml` to load from the
/// cache as `options` say; other documents pass through. A private module's `/wasm` URL
/// carries the policy's namespace and `url_token(namespace, module digest)`, without which
/// the cache does not serve it.
pub fn render_with(
    yaml: &str,
    options: &RenderOptions,
    lookup: impl Fn(&str) -> Option<Entry>,
    url_token: impl Fn(&str, &str) -> Option<String>,
) -> Result<String, RenderError> {
    let base_url = options.base_url.trim_end_matches('/');
    let host = match options.code {
        CodeSource::Image if !options.tls() => return Err(RenderError::ImageNeedsTls(options.base_url.clone())),
        CodeSource::Image => options.host()?,
        CodeSource::Http => "",
    };
    let mut grants = std::collections::BTreeSet::new();
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
                    let mut code = match options.code {
                        CodeSource::Http => {
                            let sha256 = entry.module.trim_start_matches("sha256:").to_string();
                            let mut url = format!("{base_url}/wasm/{sha256}.wasm");
                            if entry.private {
                                let token = url_token(&namespace, &entry.module).ok_or_else(|| {
                                    RenderError::NoUrlKey { policy: policy.clone(), index, image: image.clone() }
                                })?;
                                url.push_str(&format!("?namespace={namespace}&token={token}"));
                            }
                            json!({"type": "HTTP", "http": {"url": url, "sha256": sha256}})
                        }
                        CodeSource::Image => {
                            if entry.private {
                                return Err(RenderError::PrivateImage { policy, index, image });
                            }
                            let name = served_name(&entry.reference).ok_or_else(|| RenderError::BadReference {
                                policy: policy.clone(),
                                index,
                                image: image.clone(),
                                reason: "no name to serve it under".into(),
                            })?;
                            let sha256 = entry.manifest.trim_start_matches("sha256:").to_string();
                            let url = format!("{host}/{name}@{}", entry.manifest);
                            json!({"type": "Image", "image": {"url": url, "sha256": sha256}})
                        }
                    };
                    if options.tls() {
                        let source = if options.code == CodeSource::Http { "http" } else { "image" };
                        code[source]["tls"] = json!({"caCertificateRef": options.ca_certificate_ref(&namespace)});
                        if options.ca.namespace != namespace {
                            grants.insert(namespace.clone());
                        }
                    }
                    sources.insert(index.to_string(), wasm["code"].take());
                    wasm["code"] = code;
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
    for namespace in grants {
        out.push_str("---\n");
        let grant = options.reference_grant(&namespace);
        out.push_str(&serde_yaml_ng::to_string(&grant).map_err(|e| RenderError::Yaml(e.to_string()))?);
    }
    Ok(out)
}
