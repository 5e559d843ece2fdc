//! `registry-cache`: pull Wasm artifacts into the cache, and serve it.

use clap::{Parser, Subcommand};
use oci_client::secrets::RegistryAuth;
use registry_cache::cache::Cache;
use registry_cache::pull::{parse_reference, PullOptions, Puller};
use registry_cache::server::{self, AccessCheck, AppState, Permissions};
use registry_cache::{auth, publish, render};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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
}

impl Upstream {
    fn puller(&self) -> anyhow::Result<Puller> {
        let extra_ca_pem = self.ca_certs.iter().map(std::fs::read).collect::<Result<Vec<_>, _>>()?;
        Ok(Puller::new(PullOptions {
            insecure_registries: self.insecure_registries.clone(),
            extra_ca_pem,
            max_module_bytes: self.max_module_bytes,
        }))
    }

    fn auth_for(&self, image: &str) -> anyhow::Result<RegistryAuth> {
        let Some(path) = &self.auth else { return Ok(RegistryAuth::Anonymous) };
        let auths = auth::parse_docker_config(&std::fs::read(path)?)?;
        Ok(auth::for_registry(&auths, parse_reference(image)?.resolve_registry()))
    }
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
    },
    /// Rewrite EnvoyExtensionPolicies to load their Wasm images from the cache over HTTP, pinned by sha256.
    Render {
        policy: PathBuf,
        #[arg(long)]
        cache_dir: PathBuf,
        /// Where Envoy reaches the cache.
        #[arg(long, default_value = "http://registry-cache.churn-guard-system.svc.cluster.local:5000")]
        base_url: String,
    },
    /// Serve the cache: OCI distribution API (read-only), /wasm/<sha256>.wasm, /metrics, /healthz, /readyz.
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
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Pull { image, cache_dir, max_cache_bytes, upstream } => {
            let cache = Cache::open(&cache_dir, max_cache_bytes)?;
            let auth = upstream.auth_for(&image)?;
            let private = !matches!(auth, RegistryAuth::Anonymous);
            let pulled = upstream.puller()?.pull(&image, &auth).await?;
            let entry = publish::publish(&cache, &pulled, private)?;
            println!(
                "{} manifest {} module {} ({} bytes, {} format)",
                entry.reference, entry.upstream_digest, entry.module, entry.size, entry.format
            );
            Ok(())
        }
        Command::Render { policy, cache_dir, base_url } => {
            let cache = Cache::open(&cache_dir, u64::MAX)?;
            let yaml = std::fs::read_to_string(&policy)?;
            print!("{}", render::render(&yaml, &base_url, |r| cache.lookup(r))?);
            Ok(())
        }
        Command::Serve { cache_dir, listen, max_cache_bytes, permission_ttl_seconds, upstream } => {
            let cache = Arc::new(Cache::open(&cache_dir, max_cache_bytes)?);
            let puller = Arc::new(upstream.puller()?);
            let check: AccessCheck = Arc::new(move |reference, auth| {
                let puller = Arc::clone(&puller);
                Box::pin(async move { puller.can_read(&reference, &auth).await })
            });
            let permissions = Permissions::new(Duration::from_secs(permission_ttl_seconds), check);
            let state = AppState::new(cache, permissions);
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(addr = %listener.local_addr()?, "serving");
            server::serve(listener, server::router(state), async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            Ok(())
        }
    }
}
