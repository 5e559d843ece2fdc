//! Against a real private registry: Debian's `docker-registry` (CNCF distribution) on loopback
//! with htpasswd auth, seeded by pushing with `oci-client`; `skopeo` as an independent client
//! of the cache's OCI API.

mod common;

use common::{auth, PASSWORD, USER};
use harness::registry::DockerRegistry as Registry;
use oci_client::secrets::RegistryAuth;
use registry_cache::artifact::{self, Format};
use registry_cache::cache::Cache;
use registry_cache::publish;
use registry_cache::pull::{PullOptions, Puller};
use registry_cache::server::Permissions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

async fn start_registry() -> Registry {
    common::registry().await
}

fn wasm_module(tag: &str) -> Vec<u8> {
    common::wasm_module(tag, 0)
}

/// Pushes `module` as an image of `format`; returns the reference.
async fn push(registry: &Registry, repo: &str, format: Format, module: &[u8]) -> String {
    let image = format!("{}/{repo}:v1", registry.addr);
    // Unchecked: some tests need the registry to hold what the cache must refuse.
    registry_cache::package::push_unchecked(&image, format, module, &auth(), &[registry.addr.to_string()])
        .await
        .expect("push");
    image
}

fn puller(registry: &Registry) -> Puller {
    Puller::new(PullOptions { insecure_registries: vec![registry.addr.to_string()], ..PullOptions::default() })
}

#[tokio::test]
async fn pulls_all_three_formats_from_a_private_registry_and_refuses_bad_input() {
    let registry = start_registry().await;
    let puller = puller(&registry);
    for (repo, format) in
        [("wasm/cncf", Format::CncfArtifact), ("wasm/solo", Format::SoloOci), ("wasm/compat", Format::Compat)]
    {
        let module = wasm_module(repo);
        let image = push(&registry, repo, format, &module).await;
        let pulled = puller.pull(&image, &auth()).await.unwrap_or_else(|e| panic!("{image}: {e}"));
        assert_eq!(pulled.format, format);
        assert_eq!(pulled.module, module, "{image}: the module must come out byte for byte");
        assert!(puller.pull(&image, &RegistryAuth::Anonymous).await.is_err(), "anonymous pull of a private image");
        let wrong = RegistryAuth::Basic(USER.into(), "wrong".into());
        assert!(puller.pull(&image, &wrong).await.is_err());
        // Pinned by digest: the right digest pulls, a wrong one is refused.
        let pinned = format!("{}/{repo}@{}", registry.addr, pulled.upstream_digest);
        assert_eq!(puller.pull(&pinned, &auth()).await.map(|p| p.module).ok(), Some(module));
        let wrong_digest = format!("{}/{repo}@sha256:{}", registry.addr, "0".repeat(64));
        assert!(puller.pull(&wrong_digest, &auth()).await.is_err());
    }
    // A layer that is not Wasm.
    let not_wasm = push(&registry, "wasm/elf", Format::SoloOci, b"\x7fELF not wasm").await;
    let err = puller.pull(&not_wasm, &auth()).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("not a Wasm module"), "{err}");
    // Bigger than allowed.
    let small = Puller::new(PullOptions {
        insecure_registries: vec![registry.addr.to_string()],
        max_module_bytes: 8,
        ..PullOptions::default()
    });
    let big = push(&registry, "wasm/big", Format::SoloOci, &wasm_module("a-rather-long-name")).await;
    let err = small.pull(&big, &auth()).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("larger than"), "{err}");
}

async fn serve(cache: Arc<Cache>, puller: Puller) -> SocketAddr {
    let permissions = Permissions::new(Duration::from_secs(60), common::access_check(puller));
    common::serve(common::serve_state(cache, permissions)).await
}

#[tokio::test]
async fn serves_private_artifacts_only_to_clients_that_prove_access_and_skopeo_copies_them() {
    let registry = start_registry().await;
    let module = wasm_module("served");
    let image = push(&registry, "filters/churn-guard", Format::Compat, &module).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let pulled = puller(&registry).pull(&image, &auth()).await.expect("pull");
    let entry = publish::publish(&cache, &pulled, true).expect("publish");
    assert_eq!(entry.module, format!("sha256:{}", artifact::sha256_hex(&module)));
    let addr = serve(Arc::clone(&cache), puller(&registry)).await;
    let http = reqwest::Client::new();
    let wasm_url = format!("http://{addr}/wasm/{}.wasm", artifact::digest_hex(&entry.module).unwrap_or_default());

    let anonymous = http.get(&wasm_url).send().await.expect("request");
    assert_eq!(anonymous.status(), 404, "a private module was served without proof of access");
    let wrong = http.get(&wasm_url).basic_auth(USER, Some("guess")).send().await.expect("request");
    assert_eq!(wrong.status(), 404, "a private module was served to wrong credentials");
    let proven = http.get(&wasm_url).basic_auth(USER, Some(PASSWORD)).send().await.expect("request");
    assert_eq!(proven.status(), 200);
    assert_eq!(proven.bytes().await.expect("body").as_ref(), &module[..]);

    // The registry goes away: what is cached is still served, and known answers still hold.
    drop(registry);
    let again = http.get(&wasm_url).basic_auth(USER, Some(PASSWORD)).send().await.expect("request");
    assert_eq!(again.status(), 200, "cached artifacts must survive the upstream being down");

    // skopeo, an independent OCI client, copies the re-published artifact from the cache.
    let out = tempfile::tempdir().expect("tempdir");
    // Async: the cache's server runs on this test's runtime.
    let copy = |creds: Option<String>| {
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.args(["copy", "--src-tls-verify=false"]);
        match creds {
            Some(c) => cmd.args(["--src-creds", &c]),
            None => cmd.arg("--src-no-creds"),
        };
        cmd.arg(format!("docker://{addr}/{}:v1", common::served(&entry))).arg(format!("dir:{}", out.path().display()));
        cmd.output()
    };
    let denied = copy(None).await.expect("skopeo (Debian package skopeo)");
    assert!(!denied.status.success(), "skopeo copied a private artifact without credentials");
    let copied = copy(Some(format!("{USER}:{PASSWORD}"))).await.expect("skopeo");
    assert!(copied.status.success(), "skopeo: {}", String::from_utf8_lossy(&copied.stderr));
    let layer = out.path().join(artifact::digest_hex(&entry.module).unwrap_or_default());
    assert_eq!(std::fs::read(layer).expect("layer in skopeo's copy"), module);
}

#[tokio::test]
async fn a_tls_handshake_on_the_plain_http_port_is_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let addr = serve(cache, Puller::new(PullOptions::default())).await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The start of a TLS ClientHello record.
    conn.write_all(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1]).await.expect("write");
    let mut buf = [0u8; 16];
    // The guard only keeps a broken server from hanging the suite.
    let read = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf))
        .await
        .expect("the server left the handshake hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "the connection should be closed, got {read:?}");
    // Plain HTTP still works.
    let r = reqwest::get(format!("http://{addr}/healthz")).await.expect("healthz");
    assert_eq!(r.status(), 200);
}
