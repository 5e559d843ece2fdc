//! The shipped Envoy Gateway resources (`examples/envoy-gateway/`) read the way Envoy Gateway
//! reads them: the filter's policy, the `endpointOverride` header of the BackendTrafficPolicy
//! and the header match of the Service-routed fallback HTTPRoute.

use anyhow::Context as _;
use harness::gateway::{FallbackRoute, GatewaySpec};
use serde_json::Value;
use std::path::Path;

pub struct GatewayExamples {
    /// The EnvoyExtensionPolicy that loads churn-guard.
    pub policy: Value,
    pub endpoint_override_header: String,
    pub fallback: FallbackRoute,
}

impl GatewayExamples {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut docs = vec![];
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in files {
            docs.extend(harness::crds::yaml_docs(&f)?);
        }
        let policy = docs
            .iter()
            .find(|d| d["kind"] == "EnvoyExtensionPolicy")
            .cloned()
            .context("no EnvoyExtensionPolicy in the examples")?;
        let endpoint_override_header = docs
            .iter()
            .filter(|d| d["kind"] == "BackendTrafficPolicy")
            .find_map(|d| d.pointer("/spec/loadBalancer/endpointOverride/extractFrom/0/header")?.as_str())
            .context("no BackendTrafficPolicy with endpointOverride in the examples")?
            .to_string();
        let fallback = docs
            .iter()
            .filter(|d| d["kind"] == "HTTPRoute")
            .find_map(|d| {
                let m = d.pointer("/spec/rules/0/matches/0/headers/0")?;
                Some(FallbackRoute { header: m["name"].as_str()?.into(), value: m["value"].as_str()?.into() })
            })
            .context("no HTTPRoute matching a fallback header in the examples")?;
        Ok(Self { policy, endpoint_override_header, fallback })
    }

    /// The policy's first Wasm extension.
    pub fn wasm(&self) -> &Value {
        &self.policy["spec"]["wasm"][0]
    }

    /// The plugin configuration, as Envoy Gateway hands it to the filter.
    pub fn filter_config(&self) -> String {
        self.wasm()["config"].to_string()
    }

    /// The gateway these resources describe (its filter comes from where the policy says).
    pub fn gateway_spec(&self) -> GatewaySpec {
        GatewaySpec {
            endpoint_override_header: Some(self.endpoint_override_header.clone()),
            fallback: Some(self.fallback.clone()),
            expose_response_flags: true,
            ..GatewaySpec::default()
        }
    }
}
