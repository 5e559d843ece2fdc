//! Kubernetes mode: watch EnvoyExtensionPolicies in all namespaces and feed the [`Prefetcher`].
//!
//! `kube::runtime::watcher` lists, then watches from the list's resourceVersion with
//! `allowWatchBookmarks=true`, resumes from the newest bookmark when a watch ends, and re-lists
//! after `410 Gone`. A (re-)list reaches the prefetcher as one `resync`, so policies deleted
//! while the watch was down drop out of the desired set.
//!
//! Pull secrets are read when needed, and again every `PrefetchConfig::secret_recheck` (so a
//! deleted Secret unbinds its namespace), with `Api<Secret>::get` in the policy's namespace
//! (RBAC: `get` on `secrets`; `list`/`watch` on `envoyextensionpolicies.gateway.envoyproxy.io`).
//! Watching Secrets instead would need `list`/`watch` on every Secret in the cluster.

use super::{PolicyRecord, Prefetcher, SecretSource, EEP_GROUP, EEP_KIND};
use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use std::sync::Arc;

/// The name this source reports under.
pub const SOURCE: &str = "kubernetes";

/// `gateway.envoyproxy.io/v1alpha1` `EnvoyExtensionPolicy`, plural `envoyextensionpolicies`.
pub fn policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(EEP_GROUP, "v1alpha1", EEP_KIND), "envoyextensionpolicies")
}

fn record(obj: &DynamicObject) -> Option<PolicyRecord> {
    let mut value = serde_json::to_value(obj).ok()?;
    // A list's items carry no kind; the watcher asked for this one.
    if let Some(map) = value.as_object_mut() {
        map.insert("kind".into(), EEP_KIND.into());
        map.insert("apiVersion".into(), format!("{EEP_GROUP}/v1alpha1").into());
    }
    PolicyRecord::from_value(&value)
}

/// Watches until the stream ends (it does not, short of the process ending): errors are
/// logged and retried with kube's default backoff.
pub async fn run(client: Client, prefetcher: Prefetcher) {
    let api: Api<DynamicObject> = Api::all_with(client, &policy_resource());
    let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut listed: Vec<PolicyRecord> = vec![];
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(obj)) => listed.extend(record(&obj)),
            Ok(Event::InitDone) => {
                tracing::info!(policies = listed.len(), "EnvoyExtensionPolicies listed");
                prefetcher.resync(SOURCE, std::mem::take(&mut listed));
            }
            Ok(Event::Apply(obj)) => {
                if let Some(r) = record(&obj) {
                    prefetcher.upsert(SOURCE, r);
                }
            }
            Ok(Event::Delete(obj)) => {
                prefetcher.delete(SOURCE, &obj.namespace().unwrap_or_else(|| "default".into()), &obj.name_any());
            }
            Err(e) => tracing::warn!(error = %e, "watching EnvoyExtensionPolicies"),
        }
    }
}

/// Pull secrets from the API server (`kubernetes.io/dockerconfigjson`), falling back to
/// another source for a Secret the API does not have.
pub struct KubeSecrets {
    client: Client,
    fallback: Option<Arc<dyn SecretSource>>,
}

impl KubeSecrets {
    pub fn new(client: Client) -> Self {
        Self { client, fallback: None }
    }

    pub fn with_fallback(mut self, fallback: impl SecretSource) -> Self {
        self.fallback = Some(Arc::new(fallback));
        self
    }
}

impl SecretSource for KubeSecrets {
    fn docker_config<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            match api.get_opt(name).await.map_err(|e| e.to_string())? {
                Some(secret) => {
                    let data = secret.data.unwrap_or_default();
                    match data.get(".dockerconfigjson") {
                        Some(bytes) => Ok(Some(bytes.0.clone())),
                        None => Err(format!("Secret {namespace}/{name} has no .dockerconfigjson")),
                    }
                }
                None => match &self.fallback {
                    Some(f) => f.docker_config(namespace, name).await,
                    None => Ok(None),
                },
            }
        })
    }
}
