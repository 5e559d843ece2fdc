//! The filter's way into Envoy, as in a cluster: built module → Wasm OCI image in a private
//! registry → registry-cache pulls, verifies, signs and serves it → the example
//! EnvoyExtensionPolicy, rendered by the cache, has Envoy fetch it over HTTP pinned by sha256.
//!
//! Everything runs on loopback: Debian's `docker-registry` with htpasswd auth, and the cache's
//! `serve` code in this process, pre-pulling from the policy on disk (its directory mode).

use crate::gateway_examples::GatewayExamples;
use crate::scenario::Configured;
use anyhow::Context as _;
use harness::gateway::{FilterSpec, WasmSource};
use harness::registry::DockerRegistry;
use oci_client::secrets::RegistryAuth;
use registry_cache::artifact::Format;
use registry_cache::pull::PullOptions;
use registry_cache::service::{Service, ServiceOptions};
use registry_cache::sign::{self, Signer, SigningKey};
use registry_cache::sources::config::Settings;
use registry_cache::{package, render};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Where the policy pulls from: the repository the examples name, in the local registry.
const REPOSITORY: &str = "churn-guard";
const TAG: &str = "0.1.0";
const PULL_SECRET: &str = "churn-guard-pull";

/// The running delivery chain; dropping it stops the registry and the cache.
pub struct Delivery {
    pub image: String,
    pub manifest_digest: String,
    pub module_sha256: String,
    /// The policy as the cache rendered it.
    pub rendered_policy: String,
    pub configured: Configured,
    pub cache_addr: SocketAddr,
    pub signature_verified: bool,
    _registry: DockerRegistry,
    _server: AbortOnDrop,
    _service: Arc<Service>,
    _dir: tempfile::TempDir,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut buf = vec![0; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Runs the chain for `module` and the policy in `examples`; `say` reports each step.
pub async fn deliver(
    module: &[u8],
    examples: &GatewayExamples,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Delivery> {
    let dir = tempfile::Builder::new().prefix("churn-guard-delivery").tempdir()?;
    let password = hex::encode(random_bytes(12)?);
    let registry = DockerRegistry::start("churn-guard-ci", &password).await?;
    let insecure = vec![registry.addr.to_string()];
    let image = format!("{}/{REPOSITORY}:{TAG}", registry.addr);
    let ci_auth = RegistryAuth::Basic(registry.user.clone(), registry.password.clone());
    package::push(&image, Format::Compat, module, &ci_auth, &insecure).await.context("pushing the filter image")?;
    say(&format!("pushed {image} to a private docker-registry (htpasswd auth)"));

    // The policy as a user applies it, pointing at the private image with a pull secret.
    let mut policy = examples.policy.clone();
    let namespace = policy["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
    policy["spec"]["wasm"][0]["code"] = serde_json::json!({
        "type": "Image",
        "image": {"url": image, "pullSecretRef": {"name": PULL_SECRET}}
    });
    let policy_yaml = serde_yaml_ng::to_string(&policy)?;
    let secret = registry.pull_secret(&namespace, PULL_SECRET);

    // What a user applies: the policy and its pull secret. The cache pre-pulls from them (its
    // directory mode; in a cluster it watches the API server instead).
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("envoyextensionpolicy.yaml"), &policy_yaml)?;
    std::fs::write(policies.join("pull-secret.yaml"), &secret)?;

    let cache_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cache_addr = cache_listener.local_addr()?;
    let signing_key = SigningKey::generate()?;
    let public_key = signing_key.public_key();
    let mut settings = Settings::default();
    settings.sources.directories = vec![policies];
    let service = Service::start(ServiceOptions {
        cache_dir: dir.path().join("cache"),
        max_cache_bytes: 1 << 30,
        permission_ttl: Duration::from_secs(300),
        pull: PullOptions { insecure_registries: insecure, ..PullOptions::default() },
        settings,
        signer: Some(Signer::new(signing_key, cache_addr.to_string())),
        url_key: random_bytes(32)?,
    })
    .await?;
    service.wait_settled().await;
    let entry =
        service.state.cache.lookup(&registry_cache::pull::parse_reference(&image)?.whole()).with_context(|| {
            format!("registry-cache did not pre-pull {image}: {:?}", service.prefetcher.as_ref().map(|p| p.desired()))
        })?;
    say(&format!(
        "registry-cache pre-pulled it for policy {namespace}/{} with pull secret {namespace}/{PULL_SECRET}: \
         manifest {}, module sha256 {} ({} bytes, every digest verified)",
        policy["metadata"]["name"].as_str().unwrap_or_default(),
        entry.upstream_digest,
        entry.module.trim_start_matches("sha256:"),
        entry.size
    ));
    let signature_verified = service.verify(&entry.reference, &[public_key]).is_ok();
    say(&format!(
        "it signed it as it cached it (cosign simple signing, tag {}); signature verified: {signature_verified}",
        sign::signature_tag(&entry.manifest)?
    ));
    let service = Arc::new(service);
    let server = tokio::spawn({
        let service = Arc::clone(&service);
        async move {
            let _ = service.serve(cache_listener, std::future::pending()).await;
        }
    });

    let base_url = format!("http://{cache_addr}");
    let rendered_policy = render::render(
        &policy_yaml,
        &base_url,
        |r| service.state.cache.lookup(r),
        |ns, module| service.state.permissions.url_token(ns, module),
    )?;
    let rendered: serde_json::Value = serde_yaml_ng::from_str(rendered_policy.trim_start_matches("---\n"))?;
    let http = &rendered["spec"]["wasm"][0]["code"]["http"];
    let url = http["url"].as_str().context("rendered policy has no code.http.url")?.to_string();
    let sha256 = http["sha256"].as_str().context("rendered policy has no code.http.sha256")?.to_string();
    say(&format!("rendered the example EnvoyExtensionPolicy: code.http.url {url}, sha256 {sha256}"));

    let configured = Configured {
        spec: examples.gateway_spec(),
        filter: FilterSpec {
            source: WasmSource { url, sha256: sha256.clone(), server: cache_addr },
            config: rendered["spec"]["wasm"][0]["config"].to_string(),
        },
    };
    Ok(Delivery {
        image,
        manifest_digest: entry.upstream_digest,
        module_sha256: sha256,
        rendered_policy,
        configured,
        cache_addr,
        signature_verified,
        _registry: registry,
        _server: AbortOnDrop(server),
        _service: service,
        _dir: dir,
    })
}

impl Delivery {
    /// How many times the cache served the module to Envoy (its `/metrics`).
    pub async fn modules_served(&self) -> anyhow::Result<u64> {
        let text = reqwest::get(format!("http://{}/metrics", self.cache_addr)).await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("registry_cache_requests_total{") && l.contains("kind=\"wasm\""))
            .filter(|l| l.contains("outcome=\"served\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }
}
