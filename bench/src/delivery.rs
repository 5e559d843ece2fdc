//! The filter's way into Envoy, as in a cluster: built module → Wasm OCI image in a private
//! registry → registry-cache pulls, verifies, signs and serves it over HTTPS → the example
//! EnvoyExtensionPolicy, rendered by the cache, has Envoy fetch it over TLS, trusting only the
//! CA the rendered policy names, pinned by sha256.
//!
//! Everything runs on loopback: Debian's `docker-registry` with htpasswd auth, and the cache's
//! `serve` code in this process, pre-pulling from the policy on disk (its directory mode), with
//! a certificate from a CA of the demo's own (made with the openssl CLI, as cert-manager makes
//! the `registry-cache-tls` Secret in a cluster).

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
use std::path::{Path, PathBuf};
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
    /// The CA (PEM) the cache's certificate chains to.
    pub ca_pem: String,
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

/// A CA of the demo's own and a certificate for `localhost` signed by it, made with the openssl
/// CLI in `dir`: (the CA's PEM, `tls.crt`, `tls.key`).
fn make_tls(dir: &Path) -> anyhow::Result<(String, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .context("running openssl to make the demo's certificates (scripts/setup.sh installs it)")?;
        anyhow::ensure!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = ["-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=churn-guard demo CA"];
    let ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"];
    openssl(&[&["req", "-x509"], &ec[..], &ca[..], &ca_ext[..]].concat())?;
    openssl(&[&["req"], &ec[..], &["-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=localhost"]].concat())?;
    std::fs::write(
        dir.join("tls.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    let serial = hex::encode(random_bytes(8)?);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-days",
        "1",
        "-set_serial",
        &format!("0x{serial}"),
        "-extfile",
        "tls.ext",
        "-out",
        "tls.crt",
    ])?;
    Ok((std::fs::read_to_string(dir.join("ca.crt"))?, dir.join("tls.crt"), dir.join("tls.key")))
}

/// A client that trusts only `ca_pem`, as Envoy Gateway trusts only the CA a policy names.
fn https_client(ca_pem: &str) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .timeout(Duration::from_secs(30))
        .build()?)
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
    // HTTPS, as deploy/ serves it (`serve --tls-cert --tls-key`).
    let (ca_pem, cert, key) = make_tls(&dir.path().join("tls"))?;
    let tls = registry_cache::tls::ServerTls::load(cert, key).context("loading the demo's certificate")?;
    let service = Arc::new(service);
    let server = tokio::spawn({
        let service = Arc::clone(&service);
        async move {
            let _ = service.serve_tls(cache_listener, &tls, std::future::pending()).await;
        }
    });

    let base_url = format!("https://localhost:{}", cache_addr.port());
    let rendered_policy = render::render(
        &policy_yaml,
        &base_url,
        |r| service.state.cache.lookup(r),
        |ns, module| service.state.permissions.url_token(ns, module),
    )?;
    let rendered = harness::crds::yaml_docs_str(&rendered_policy)?
        .into_iter()
        .find(|d| d["kind"] == "EnvoyExtensionPolicy")
        .context("render returned no EnvoyExtensionPolicy")?;
    let http = &rendered["spec"]["wasm"][0]["code"]["http"];
    let url = http["url"].as_str().context("rendered policy has no code.http.url")?.to_string();
    let sha256 = http["sha256"].as_str().context("rendered policy has no code.http.sha256")?.to_string();
    let ca_ref = &http["tls"]["caCertificateRef"];
    let ca_name = ca_ref["name"].as_str().context("rendered policy names no CA (tls.caCertificateRef)")?;
    say(&format!(
        "rendered the example EnvoyExtensionPolicy: code.http.url {url}, sha256 {sha256}, \
         tls.caCertificateRef {} {}/{ca_name} (here holding the demo's CA)",
        ca_ref["kind"].as_str().unwrap_or_default(),
        ca_ref["namespace"].as_str().unwrap_or(&namespace),
    ));

    let configured = Configured {
        spec: examples.gateway_spec(),
        filter: FilterSpec {
            // Envoy stands in for Envoy Gateway's fetch: it trusts that CA, and only that.
            source: WasmSource { url, sha256: sha256.clone(), server: cache_addr, tls_ca: Some(ca_pem.clone()) },
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
        ca_pem,
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
        let url = format!("https://localhost:{}/metrics", self.cache_addr.port());
        let text = https_client(&self.ca_pem)?.get(url).send().await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("registry_cache_requests_total{") && l.contains("kind=\"wasm\""))
            .filter(|l| l.contains("outcome=\"served\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }
}
