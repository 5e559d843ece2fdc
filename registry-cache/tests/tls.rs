//! TLS as Envoy Gateway expects it: clients that trust only the cache's CA (skopeo,
//! oci-client, an HTTPS client) reach the cache, a certificate rotated in the Secret volume is
//! served to new connections without a restart, and a broken replacement is refused while the
//! old pair goes on serving.

mod common;

use common::{get_ok, https_client, SecretVolume, TestCa};
use registry_cache::artifact::{self, Format};
use registry_cache::cache::Cache;
use registry_cache::pull::{PullOptions, Puller};
use registry_cache::server::{self, Permissions, ServerLimits};
use registry_cache::tls::ServerTls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A cache holding one public module pulled from a real registry, served over TLS with a
/// leaf of `ca` from `volume`. Returns the address, the entry and the module.
async fn serve_cached_module(
    dir: &std::path::Path,
    volume: &SecretVolume,
) -> (SocketAddr, registry_cache::cache::Entry, Vec<u8>, harness::registry::DockerRegistry) {
    let registry = common::registry().await;
    let module = common::wasm_module("tls", 4096);
    let image = format!("{}/filters/tls:v1", registry.addr);
    // Published as public: clients need no credentials at the cache, only its CA.
    registry_cache::package::push(&image, Format::SoloOci, &module, &common::auth(), &[registry.addr.to_string()])
        .await
        .expect("push");
    let pulled =
        common::puller(registry.addr, Duration::from_secs(30)).pull(&image, &common::auth()).await.expect("pull");
    let cache = Arc::new(Cache::open(&dir.join("cache"), 1 << 30).expect("cache"));
    let entry = registry_cache::publish::publish(&cache, &pulled, false).expect("publish");
    let permissions = Permissions::new(
        Duration::from_secs(60),
        common::access_check(common::puller(registry.addr, Duration::from_secs(30))),
    );
    let state = common::serve_state(cache, permissions);
    let tls = ServerTls::load(volume.path("tls.crt"), volume.path("tls.key")).expect("TLS pair");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        server::serve_tls(listener, server::router(state), std::future::pending(), ServerLimits::default(), &tls).await
    });
    (addr, entry, module, registry)
}

fn tls_volume(dir: &std::path::Path, ca: &TestCa) -> SecretVolume {
    let (crt, key) = ca.leaf();
    let mut volume = SecretVolume::new(&dir.join("tls"));
    volume.project(&[("tls.crt", &crt), ("tls.key", &key), ("ca.crt", &ca.cert)]);
    volume
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_oci_client_pull_over_tls_trusting_only_the_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "cache");
    let volume = tls_volume(dir.path(), &ca);
    let (addr, entry, module, _registry) = serve_cached_module(dir.path(), &volume).await;
    let name = common::served(&entry);

    // skopeo verifies against the CA in --src-cert-dir, and nothing else is in it.
    let certs = dir.path().join("skopeo-certs");
    std::fs::create_dir(&certs).expect("cert dir");
    std::fs::write(certs.join("ca.crt"), &ca.cert).expect("ca.crt");
    let copy = |cert_dir: Option<&std::path::Path>, to: &str| {
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.args(["copy", "--src-no-creds"]);
        if let Some(d) = cert_dir {
            cmd.arg("--src-cert-dir").arg(d);
        }
        cmd.arg(format!("docker://{addr}/{name}:v1")).arg(format!("dir:{}", dir.path().join(to).display()));
        cmd.output()
    };
    let untrusted = copy(None, "untrusted").await.expect("skopeo (Debian package skopeo)");
    assert!(!untrusted.status.success(), "skopeo accepted the cache's certificate without its CA");
    let copied = copy(Some(&certs), "copy").await.expect("skopeo");
    assert!(copied.status.success(), "skopeo over TLS: {}", String::from_utf8_lossy(&copied.stderr));
    let layer = dir.path().join("copy").join(artifact::digest_hex(&entry.module).expect("hex"));
    assert_eq!(std::fs::read(layer).expect("layer in skopeo's copy"), module);

    // oci-client itself, with only the CA added to its roots.
    let image = format!("{addr}/{name}:v1");
    let anonymous = oci_client::secrets::RegistryAuth::Anonymous;
    let reference: oci_client::Reference = image.parse().expect("reference");
    let oci = |extra_root_certificates| {
        oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Https,
            extra_root_certificates,
            ..Default::default()
        })
    };
    let with_ca = vec![oci_client::client::Certificate {
        encoding: oci_client::client::CertificateEncoding::Pem,
        data: ca.cert.clone(),
    }];
    let layer_types = vec![artifact::SOLO_WASM_LAYER];
    let image_data = oci(with_ca).pull(&reference, &anonymous, layer_types.clone()).await.expect("oci-client over TLS");
    assert_eq!(image_data.layers.first().map(|l| l.data.as_slice()), Some(&module[..]));
    assert!(
        oci(vec![]).pull(&reference, &anonymous, layer_types).await.is_err(),
        "oci-client accepted the cache's certificate without its CA"
    );

    // The cache's own puller (digests and module verified), with only the CA added.
    let trusting = Puller::new(PullOptions { extra_ca_pem: vec![ca.cert.clone()], ..PullOptions::default() });
    let pulled = trusting.pull(&image, &anonymous).await.expect("pull over TLS");
    assert_eq!(pulled.module, module);
    let untrusting = Puller::new(PullOptions::default());
    assert!(untrusting.pull(&image, &anonymous).await.is_err(), "the puller accepted the cache without its CA");

    // The /wasm URL Envoy Gateway fetches, over HTTPS.
    let url =
        format!("https://localhost:{}/wasm/{}.wasm", addr.port(), artifact::digest_hex(&entry.module).expect("hex"));
    let r = https_client(&ca.cert).get(&url).send().await.expect("GET /wasm over https");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), &module[..]);

    // A plain HTTP request on the TLS port is told to use https, not left hanging.
    let plain = common::raw(addr, "GET", "/healthz", &[]).await;
    assert_eq!(plain.status, 400, "{plain:?}");
    assert!(String::from_utf8_lossy(&plain.body).contains("https"), "{plain:?}");
}

/// Polls `check` for up to a minute.
async fn eventually<F, Fut>(check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    harness::eventually(Duration::from_secs(60), check).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_ca, new_ca) = (TestCa::new(dir.path(), "old"), TestCa::new(dir.path(), "new"));
    let mut volume = tls_volume(dir.path(), &old_ca);
    let tls = ServerTls::load(volume.path("tls.crt"), volume.path("tls.key")).expect("TLS pair");
    let _reloader = tls.spawn_reloader(Duration::from_millis(100));
    // Idle kept-alive connections are not cut off while the test runs, however slowly.
    let limits = ServerLimits { header_read_timeout: Duration::from_secs(600), ..ServerLimits::default() };
    let addr = common::serve_minimal_tls(limits, &tls).await;
    let url = format!("https://localhost:{}/", addr.port());
    let (trusts_old, trusts_new) = (https_client(&old_ca.cert), https_client(&new_ca.cert));
    assert!(get_ok(&trusts_old, &url).await, "served with the first pair");
    assert!(!get_ok(&trusts_new, &url).await, "another CA's client must not accept it");

    // A connection opened before the rotation.
    let kept = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&old_ca.cert).expect("pem"))
        .build()
        .expect("client");
    assert!(get_ok(&kept, &url).await);

    // Broken replacements: not PEM at all, and a new certificate with the old key (a
    // half-written rotation). Each is refused and the first pair stays in use.
    let old_key = std::fs::read(volume.path("tls.key")).expect("key");
    let (new_crt, new_key) = new_ca.leaf();
    let broken: [(&[u8], &[u8]); 2] = [(b"-----BEGIN CERTIFICATE-----\nnot base64\n", &old_key), (&new_crt, &old_key)];
    for (n, (crt, key)) in broken.into_iter().enumerate() {
        volume.project(&[("tls.crt", crt), ("tls.key", key), ("ca.crt", &new_ca.cert)]);
        let refused = n as u64 + 1;
        assert!(eventually(|| async { tls.refusals() >= refused }).await, "replacement {n} was never looked at");
        assert_eq!(tls.reloads(), 0, "replacement {n} was taken up");
        assert!(get_ok(&trusts_old, &url).await, "after replacement {n}, the first pair must still be served");
        assert!(!get_ok(&trusts_new, &url).await);
    }

    // A good pair from the new CA: new connections get it, without a restart.
    volume.project(&[("tls.crt", &new_crt), ("tls.key", &new_key), ("ca.crt", &new_ca.cert)]);
    assert!(eventually(|| get_ok(&trusts_new, &url)).await, "the rotated certificate was never served");
    assert_eq!(tls.reloads(), 1);
    assert!(!get_ok(&trusts_old, &url).await, "new connections must not get the old certificate");
    // The connection made before the rotation keeps going on its handshake.
    assert!(get_ok(&kept, &url).await, "an established connection was dropped by the rotation");

    // A new leaf from the same CA (new serial, new key), as cert-manager renews it.
    let before = tls.certificate_chain();
    let (renewed_crt, renewed_key) = new_ca.leaf();
    volume.project(&[("tls.crt", &renewed_crt), ("tls.key", &renewed_key), ("ca.crt", &new_ca.cert)]);
    assert!(eventually(|| async { tls.reloads() == 2 }).await, "the renewed certificate was never taken up");
    assert_ne!(tls.certificate_chain(), before);
    assert!(get_ok(&trusts_new, &url).await);
}
