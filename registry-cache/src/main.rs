//! `registry-cache`: pull Wasm artifacts into the cache, and serve it.

use clap::{Parser, Subcommand};
use oci_client::secrets::RegistryAuth;
use registry_cache::artifact::Format;
use registry_cache::cache::Cache;
use registry_cache::pull::{parse_reference, PullOptions, Puller};
use registry_cache::service::{Service, ServiceOptions};
use registry_cache::sign::{self, PublicKey, Signer, SigningKey};
use registry_cache::tls::ServerTls;
use registry_cache::{auth, package, publish, render, sources};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Pre-pulls, verifies and serves Wasm OCI artifacts for Envoy Gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Upstream {
    /// Docker config.json or kubernetes.io/dockerconfigjson Secret with registry credentials.
    #[arg(long)]
    auth: Option<PathBuf>,
    /// Registries to reach over plain HTTP (host:port), e.g. a local test registry.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Extra CA certificate (PEM) to trust for registries.
    #[arg(long = "ca-cert")]
    ca_certs: Vec<PathBuf>,
    /// Largest module accepted, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_module_bytes: u64,
    /// Refuse artifacts without a cosign signature (the upstream's `sha256-<hex>.sig` tag)
    /// that verifies with this public key (PEM, or Secret/ConfigMap with cosign.pub). Repeatable.
    #[arg(long = "require-signature", value_name = "PUB")]
    require_signature: Vec<PathBuf>,
    /// Fail a pull when the registry sends nothing (no connection, no next bytes) for this long.
    #[arg(long, default_value_t = 30)]
    read_timeout_seconds: u64,
    /// Fail a pull that takes longer than this in all, however steadily bytes come.
    #[arg(long, default_value_t = 300)]
    pull_timeout_seconds: u64,
}

#[derive(clap::Args, Clone)]
struct Signing {
    /// Sign each artifact as it is cached, cosign-style, with this private key (PEM: PKCS#8,
    /// SEC1 or cosign's encrypted key with COSIGN_PASSWORD; or a Secret with cosign.key).
    /// `serve` also signs again, at start, every cached artifact this key has not signed under
    /// its served name (after a key rotation, say).
    #[arg(long, value_name = "KEY")]
    signing_key: Option<PathBuf>,
    /// The cache's address as clients use it: signatures name `<prefix>/<repository>`.
    #[arg(long, default_value = sign::DEFAULT_IDENTITY_PREFIX)]
    identity_prefix: String,
}

impl Signing {
    fn signer(&self) -> anyhow::Result<Option<Signer>> {
        let Some(path) = &self.signing_key else { return Ok(None) };
        Ok(Some(Signer::new(load_signing_key(path)?, self.identity_prefix.clone())))
    }
}

fn load_signing_key(path: &std::path::Path) -> anyhow::Result<SigningKey> {
    let password = std::env::var("COSIGN_PASSWORD").ok();
    Ok(SigningKey::load(path, password.as_deref())?)
}

fn load_public_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<PublicKey>> {
    Ok(paths.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?)
}

/// References as given, normalised as the cache records them; none means every entry.
fn cached_references(cache: &Cache, given: &[String]) -> anyhow::Result<Vec<String>> {
    if given.is_empty() {
        return Ok(cache.entries().into_iter().map(|e| e.reference).collect());
    }
    Ok(given.iter().map(|r| parse_reference(r).map(|r| r.whole())).collect::<Result<Vec<_>, _>>()?)
}

impl Upstream {
    fn pull_options(&self) -> anyhow::Result<PullOptions> {
        let extra_ca_pem = self
            .ca_certs
            .iter()
            .map(|p| {
                std::fs::read(p)
                    .map_err(|e| anyhow::anyhow!("--ca-cert {}: {e} (expected a PEM CA certificate)", p.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PullOptions {
            insecure_registries: self.insecure_registries.clone(),
            extra_ca_pem,
            max_module_bytes: self.max_module_bytes,
            require_signature: load_public_keys(&self.require_signature)?,
            read_timeout: Duration::from_secs(self.read_timeout_seconds.max(1)),
            pull_timeout: Duration::from_secs(self.pull_timeout_seconds.max(1)),
        })
    }

    fn puller(&self) -> anyhow::Result<Puller> {
        Ok(Puller::new(self.pull_options()?))
    }

    fn auth_for(&self, image: &str) -> anyhow::Result<RegistryAuth> {
        let Some(path) = &self.auth else { return Ok(RegistryAuth::Anonymous) };
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!("--auth {}: {e} (expected a Docker config.json or dockerconfigjson Secret)", path.display())
        })?;
        let auths = auth::parse_docker_config(&bytes).map_err(|e| anyhow::anyhow!("--auth {}: {e}", path.display()))?;
        Ok(auth::for_registry(&auths, parse_reference(image)?.resolve_registry()))
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ImageFormat {
    /// One tar+gzip layer holding plugin.wasm, as `docker build` makes it.
    Compat,
    /// solo.io's single `application/vnd.module.wasm.content.layer.v1+wasm` layer.
    Oci,
    /// The CNCF Wasm artifact: an `application/wasm` layer.
    Cncf,
}

#[derive(Subcommand)]
enum Command {
    /// Pull one image by tag or digest into the cache; prints the manifest digest and the module's sha256.
    Pull {
        image: String,
        #[arg(long)]
        cache_dir: PathBuf,
        #[arg(long, default_value_t = 1 << 30)]
        max_cache_bytes: u64,
        #[command(flatten)]
        upstream: Upstream,
        #[command(flatten)]
        signing: Signing,
    },
    /// Package a Wasm module as an image and push it (what a CI job does before a policy names it).
    Push {
        module: PathBuf,
        image: String,
        #[arg(long, value_enum, default_value_t = ImageFormat::Compat)]
        format: ImageFormat,
        #[command(flatten)]
        upstream: Upstream,
    },
    /// Sign cached artifacts cosign-style (every entry when no reference is given); the OCI API
    /// serves each signature under `sha256-<hex>.sig`. Run it while no `serve` uses the cache
    /// (`serve --signing-key` signs as it caches).
    Sign {
        #[arg(long)]
        cache_dir: PathBuf,
        /// Private key: PEM (PKCS#8, SEC1, or cosign's encrypted key with COSIGN_PASSWORD) or a Secret with cosign.key.
        #[arg(long)]
        key: PathBuf,
        /// The cache's address as clients use it: signatures name `<prefix>/<repository>`.
        #[arg(long, default_value = sign::DEFAULT_IDENTITY_PREFIX)]
        identity_prefix: String,
        references: Vec<String>,
    },
    /// Verify cached artifacts' cosign signatures (every entry when no reference is given); fails naming each that does not verify.
    Verify {
        #[arg(long)]
        cache_dir: PathBuf,
        /// Public key: PEM, or a Secret/ConfigMap with cosign.pub. Repeatable: any one suffices.
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        references: Vec<String>,
    },
    /// Rewrite EnvoyExtensionPolicies to load their Wasm images from the cache, pinned by sha256.
    Render {
        policy: PathBuf,
        #[arg(long)]
        cache_dir: PathBuf,
        /// Where Envoy Gateway reaches the cache. With https://, the code source names the CA
        /// to verify it with (--ca-certificate-ref).
        #[arg(long, default_value = "https://registry-cache.churn-guard-system.svc.cluster.local:5000")]
        base_url: String,
        /// The key (at least 32 bytes) the serving cache signs private modules' URLs with.
        #[arg(long)]
        url_key: Option<PathBuf>,
        /// `http`: a /wasm/<sha256>.wasm URL. `image`: the cache's OCI API, by digest (public
        /// images only; needs https).
        #[arg(long, value_enum, default_value_t = Code::Http)]
        code: Code,
        /// The Secret or ConfigMap with the CA (key `ca.crt`) that signed the cache's
        /// certificate, as KIND/NAME.
        #[arg(long, default_value = "Secret/registry-cache-tls")]
        ca_certificate_ref: String,
        /// Its namespace; policies elsewhere get a ReferenceGrant in it, written with them.
        #[arg(long, default_value = "churn-guard-system")]
        ca_certificate_namespace: String,
    },
    /// Serve the cache: OCI distribution API (read-only), /wasm/<sha256>.wasm, /metrics, /status, /healthz, /readyz.
    Serve {
        #[arg(long)]
        cache_dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:5000")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1 << 30)]
        max_cache_bytes: u64,
        /// How long an answer of the upstream registry about a client's access is reused.
        #[arg(long, default_value = "300")]
        permission_ttl_seconds: u64,
        #[command(flatten)]
        upstream: Upstream,
        #[command(flatten)]
        signing: Signing,
        /// YAML config: policy sources (Kubernetes, directories) and pre-pull tuning.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Watch EnvoyExtensionPolicies in all namespaces and pre-pull their images.
        #[arg(long)]
        watch_kubernetes: bool,
        /// Pre-pull the images of EnvoyExtensionPolicies in manifests in DIR (re-scanned).
        #[arg(long = "policies-dir", value_name = "DIR")]
        policies_dirs: Vec<PathBuf>,
        /// Key (at least 32 bytes) for `/wasm` URLs of private modules; `render --url-key` with
        /// the same key issues them.
        #[arg(long)]
        url_key: Option<PathBuf>,
        #[command(flatten)]
        transport: Transport,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Code {
    Http,
    Image,
}

/// TLS, or plain HTTP when asked for by name.
#[derive(clap::Args, Clone)]
struct Transport {
    /// Serve HTTPS with this certificate chain (PEM, leaf first): `tls.crt` of a
    /// kubernetes.io/tls Secret. Re-read when it changes.
    #[arg(long, requires = "tls_key", conflicts_with = "plain_http")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM): `tls.key` of the same Secret.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for a rotation.
    #[arg(long, default_value_t = 10)]
    tls_reload_seconds: u64,
    /// Serve plain HTTP instead: module URLs and their tokens travel in clear text, and Envoy
    /// Gateway does not accept an image source at an insecure registry.
    #[arg(long)]
    plain_http: bool,
}

impl Transport {
    /// The pair to serve, loaded now so that a bad one stops `serve` before it starts.
    fn load(&self) -> anyhow::Result<Option<std::sync::Arc<ServerTls>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTls::load(cert, key)?)),
            _ if self.plain_http => Ok(None),
            _ => anyhow::bail!(
                "serve needs --tls-cert and --tls-key (tls.crt and tls.key of a kubernetes.io/tls Secret), \
                 or --plain-http to serve without TLS"
            ),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Pull { image, cache_dir, max_cache_bytes, upstream, signing } => {
            let signer = signing.signer()?;
            let cache = Cache::open(&cache_dir, max_cache_bytes)?;
            let auth = upstream.auth_for(&image)?;
            let private = !matches!(auth, RegistryAuth::Anonymous);
            let pulled = upstream.puller()?.pull(&image, &auth).await?;
            let entry = publish::publish_signed(&cache, &pulled, private, signer.as_ref())?;
            println!(
                "{} manifest {} module {} ({} bytes, {} format)",
                entry.reference, entry.upstream_digest, entry.module, entry.size, entry.format
            );
            Ok(())
        }
        Command::Push { module, image, format, upstream } => {
            let bytes = std::fs::read(&module).map_err(|e| anyhow::anyhow!("{}: {e}", module.display()))?;
            let format = match format {
                ImageFormat::Compat => Format::Compat,
                ImageFormat::Oci => Format::SoloOci,
                ImageFormat::Cncf => Format::CncfArtifact,
            };
            let auth = upstream.auth_for(&image)?;
            let url = package::push(&image, format, &bytes, &auth, &upstream.insecure_registries).await?;
            println!("{image} pushed ({} format): {url}", format.name());
            Ok(())
        }
        Command::Sign { cache_dir, key, identity_prefix, references } => {
            let signer = Signer::new(load_signing_key(&key)?, identity_prefix);
            let cache = Cache::open(&cache_dir, u64::MAX)?;
            for reference in cached_references(&cache, &references)? {
                let entry = signer.sign_entry(&cache, &reference)?;
                let tag = sign::signature_tag(&entry.manifest)?;
                println!("{} signed: {tag} {}", entry.reference, entry.signature.unwrap_or_default());
            }
            Ok(())
        }
        Command::Verify { cache_dir, key, references } => {
            let keys = load_public_keys(&key)?;
            let cache = Cache::open_read_only(&cache_dir)?;
            let references = cached_references(&cache, &references)?;
            let mut failed = vec![];
            for reference in &references {
                match sign::verify_entry(&cache, reference, &keys) {
                    Ok(entry) => println!("{reference} verified: {}", entry.manifest),
                    Err(e) => {
                        eprintln!("{reference}: {e}");
                        failed.push(reference.as_str());
                    }
                }
            }
            anyhow::ensure!(
                failed.is_empty(),
                "{} of {} did not verify: {}",
                failed.len(),
                references.len(),
                failed.join(", ")
            );
            Ok(())
        }
        Command::Render {
            policy,
            cache_dir,
            base_url,
            url_key,
            code,
            ca_certificate_ref,
            ca_certificate_namespace,
        } => {
            let (kind, name) = ca_certificate_ref
                .split_once('/')
                .filter(|(k, n)| matches!(*k, "Secret" | "ConfigMap") && !n.is_empty() && !n.contains('/'))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--ca-certificate-ref {ca_certificate_ref:?}: expected Secret/NAME or ConfigMap/NAME"
                    )
                })?;
            let options = render::RenderOptions {
                base_url,
                code: match code {
                    Code::Http => render::CodeSource::Http,
                    Code::Image => render::CodeSource::Image,
                },
                ca: render::CaRef { kind: kind.into(), name: name.into(), namespace: ca_certificate_namespace },
            };
            let yaml = std::fs::read_to_string(&policy)
                .map_err(|e| anyhow::anyhow!("{}: {e} (expected EnvoyExtensionPolicy YAML)", policy.display()))?;
            let cache = Cache::open_read_only(&cache_dir)
                .map_err(|e| anyhow::anyhow!("{e} (expected a cache that `serve` or `pull` wrote)"))?;
            let key = read_url_key(url_key.as_deref())?;
            let token = |ns: &str, module: &str| registry_cache::permissions::url_token(&key, ns, module);
            print!("{}", render::render_with(&yaml, &options, |r| cache.lookup(r), token)?);
            Ok(())
        }
        Command::Serve {
            cache_dir,
            listen,
            max_cache_bytes,
            permission_ttl_seconds,
            upstream,
            config,
            watch_kubernetes,
            policies_dirs,
            signing,
            url_key,
            transport,
        } => {
            let tls = transport.load()?;
            let service = Service::start(ServiceOptions {
                cache_dir,
                max_cache_bytes,
                permission_ttl: Duration::from_secs(permission_ttl_seconds),
                pull: upstream.pull_options()?,
                settings: sources::config::load(config.as_deref(), watch_kubernetes, &policies_dirs)?,
                signer: signing.signer()?,
                url_key: read_url_key(url_key.as_deref())?,
            })
            .await?;
            let listener = tokio::net::TcpListener::bind(listen).await?;
            match tls {
                Some(tls) => {
                    tls.spawn_reloader(Duration::from_secs(transport.tls_reload_seconds.max(1)));
                    tracing::info!(addr = %listener.local_addr()?, "serving HTTPS");
                    service.serve_tls(listener, &tls, shutdown_signal()).await?;
                }
                None => {
                    tracing::warn!(addr = %listener.local_addr()?, "serving plain HTTP (--plain-http)");
                    service.serve(listener, shutdown_signal()).await?;
                }
            }
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Ctrl-C, or SIGTERM as Kubernetes sends it before killing the pod.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// The URL signing key from a file (e.g. a mounted Secret); none given means no private URLs.
fn read_url_key(path: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    let Some(path) = path else { return Ok(Vec::new()) };
    let key = std::fs::read(path).map_err(|e| anyhow::anyhow!("--url-key {}: {e}", path.display()))?;
    anyhow::ensure!(
        key.len() >= registry_cache::permissions::MIN_URL_KEY_BYTES,
        "--url-key {}: {} bytes; at least {} are needed",
        path.display(),
        key.len(),
        registry_cache::permissions::MIN_URL_KEY_BYTES
    );
    // The example Secret's placeholder is long enough, and public: tokens signed with it could
    // be forged by anyone who read deploy/.
    anyhow::ensure!(
        !key.windows(PLACEHOLDER.len()).any(|w| w == PLACEHOLDER),
        "--url-key {}: still the placeholder of deploy/signing-key-secret.example.yaml; \
         create the key with `head -c 32 /dev/urandom > url.key`",
        path.display()
    );
    Ok(key)
}

/// What the example manifests put where a secret belongs.
const PLACEHOLDER: &[u8] = b"REPLACE-ME";
