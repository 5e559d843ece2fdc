//! The cache's signatures checked by an independent implementation of `cosign verify --key`:
//! sigstore-rs's cosign client (the `sigstore` crate, none of this crate's code) resolves the
//! image's digest, pulls its `sha256-<hex>.sig` manifest and simple-signing layers through the
//! cache's OCI API over TLS (the test CA added to its trusted roots), with the registry
//! credentials a user has, and verifies them with a public key, as cosign does with
//! `--insecure-ignore-tlog=true`.
//! It accepts what the cache signed and refuses another key's signature, a tampered payload and
//! a signature of other bytes. After a key rotation, a restarted `serve` re-signs what the old
//! key signed.

mod common;

use common::{SecretVolume, TestCa, PASSWORD, USER};
use registry_cache::cache::{Cache, Entry};
use registry_cache::server::{self, Permissions, ServerLimits};
use registry_cache::sign::{self, SignatureImage, Signer, SigningKey};
use registry_cache::tls::ServerTls;
use sigstore::cosign::payload::SimpleSigning;
use sigstore::cosign::verification_constraint::{PublicKeyVerifier, VerificationConstraintVec};
use sigstore::cosign::{ClientBuilder, CosignCapabilities as _};
use sigstore::crypto::SigningScheme;
use sigstore::registry::{Auth, Certificate, CertificateEncoding, ClientConfig, ClientProtocol, OciReference};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};

const IDENTITY: &str = "cache.test:5000";

/// `cosign verify --key PUB --insecure-ignore-tlog=true --registry-cacert CA IMAGE`, by
/// sigstore-rs: the image's manifest digest from the cache, the signature manifest under
/// `sha256-<hex>.sig`, each simple-signing layer whose payload matches its digest and names
/// that manifest digest, and at least one of them verified with `public_pem`. Returns those
/// layers' payloads, or why verification failed.
async fn cosign_verify(image: &str, ca: &[u8], public_pem: &str) -> Result<Vec<SimpleSigning>, String> {
    let config = ClientConfig {
        protocol: ClientProtocol::Https,
        extra_root_certificates: vec![Certificate { encoding: CertificateEncoding::Pem, data: ca.to_vec() }],
        ..ClientConfig::default()
    };
    let mut client = ClientBuilder::default().with_oci_client_config(config).build().map_err(|e| e.to_string())?;
    let image: OciReference = image.parse().map_err(|e| format!("{image}: {e}"))?;
    let auth = Auth::Basic(USER.into(), PASSWORD.into());
    let (signature_image, digest) = client.triangulate(&image, &auth).await.map_err(|e| format!("digest: {e}"))?;
    let layers = client
        .trusted_signature_layers(&auth, &digest, &signature_image)
        .await
        .map_err(|e| format!("signature of {digest}: {e}"))?;
    let key = PublicKeyVerifier::new(public_pem.as_bytes(), &SigningScheme::default()).map_err(|e| e.to_string())?;
    let constraints: VerificationConstraintVec = vec![Box::new(key)];
    sigstore::cosign::verify_constraints(&layers, constraints.iter())
        .map_err(|_| format!("no signature of {digest} verifies with the key"))?;
    Ok(layers.into_iter().map(|l| l.simple_signing).collect())
}

/// Whether `cosign_verify` accepts `image` with `public_pem`, and its payload names `manifest`
/// under the cache's identity for `name`.
async fn verifies(image: &str, ca: &[u8], public_pem: &str, manifest: &str, name: &str) -> Result<(), String> {
    let payloads = cosign_verify(image, ca, public_pem).await?;
    let expected = format!("{IDENTITY}/{name}");
    let named = payloads.iter().any(|p| {
        p.critical.image.docker_manifest_digest == manifest && p.critical.identity.docker_reference == expected
    });
    named.then_some(()).ok_or_else(|| format!("verified, but not as {manifest} of {expected}: {payloads:?}"))
}

fn tls_volume(dir: &Path, ca: &TestCa) -> SecretVolume {
    let (crt, key) = ca.leaf();
    let mut volume = SecretVolume::new(&dir.join("tls"));
    volume.project(&[("tls.crt", &crt), ("tls.key", &key), ("ca.crt", &ca.cert)]);
    volume
}

/// Stores `image`'s blobs and records it as `entry`'s signature, as the cache serves it.
fn replace_signature(cache: &Cache, entry: &Entry, image: &SignatureImage) {
    let staging = cache.stage();
    let extra =
        vec![staging.put_blob(&image.payload).expect("payload"), staging.put_blob(&image.config).expect("config")];
    let signature = staging.put_blob(&image.manifest).expect("manifest");
    let recorded = cache.set_signature(&entry.reference, &entry.manifest, Some(signature), extra).expect("record");
    assert!(recorded.is_some(), "the entry is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstore_verifies_the_caches_signatures_over_tls_and_refuses_other_keys_and_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = common::registry().await;
    let image = common::push(registry.addr, "filters/cosign", &common::wasm_module("cosign", 4096)).await;
    let puller = || common::puller(registry.addr, Duration::from_secs(30));
    let pulled = puller().pull(&image, &common::auth()).await.expect("pull");
    let cache = Arc::new(Cache::open(&dir.path().join("cache"), 1 << 30).expect("cache"));
    let (key, other_key) = (SigningKey::generate().expect("key"), SigningKey::generate().expect("key"));
    let signer = Signer::new(key.clone(), IDENTITY);
    // Pulled with credentials: private, served only to clients the registry lets read it.
    let entry = registry_cache::publish::publish_signed(&cache, &pulled, true, Some(&signer)).expect("publish");

    let ca = TestCa::new(dir.path(), "cosign");
    let volume = tls_volume(dir.path(), &ca);
    let tls = ServerTls::load(volume.path("tls.crt"), volume.path("tls.key")).expect("TLS pair");
    let permissions = Permissions::new(Duration::from_secs(60), common::access_check(puller()));
    let state = common::serve_state(Arc::clone(&cache), permissions);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        server::serve_tls(listener, server::router(state), std::future::pending(), ServerLimits::default(), &tls).await
    });

    let name = common::served(&entry);
    let by_tag = format!("localhost:{port}/{name}:v1");
    let by_digest = format!("localhost:{port}/{name}@{}", entry.manifest);
    let (public, other_public) = (key.public_key().to_pem(), other_key.public_key().to_pem());
    for image in [&by_tag, &by_digest] {
        let verified = verifies(image, &ca.cert, &public, &entry.manifest, &name).await;
        assert_eq!(verified, Ok(()), "{image}");
    }
    assert!(cosign_verify(&by_tag, &ca.cert, &other_public).await.is_err(), "verified with a key that did not sign");
    let other_ca = TestCa::new(dir.path(), "other");
    assert!(cosign_verify(&by_tag, &other_ca.cert, &public).await.is_err(), "the client did not check the TLS chain");

    // Forgeries, served by the cache under the image's signature tag.
    let genuine = sign::payload(&format!("{IDENTITY}/{name}"), &entry.manifest);
    let other_bytes = format!("sha256:{}", "1".repeat(64));
    let forgeries = [
        ("signed by another key", SignatureImage::sign(&other_key, &format!("{IDENTITY}/{name}"), &entry.manifest)),
        // The layer digest matches the edited payload; the signature is the one of the original.
        (
            "a tampered payload",
            SignatureImage::new(sign::payload("evil.example/x", &entry.manifest), &key.sign(&genuine)),
        ),
        ("a signature of other bytes", SignatureImage::sign(&key, &format!("{IDENTITY}/{name}"), &other_bytes)),
    ];
    for (what, forgery) in &forgeries {
        replace_signature(&cache, &entry, forgery);
        let verified = cosign_verify(&by_tag, &ca.cert, &public).await;
        assert!(verified.is_err(), "{what} verified: {verified:?}");
    }
    // The first forgery is a well-formed signature: only the key was wrong.
    replace_signature(&cache, &entry, &forgeries[0].1);
    assert_eq!(verifies(&by_tag, &ca.cert, &other_public, &entry.manifest, &name).await, Ok(()));
    // Signed again by the cache, it verifies again.
    signer.sign_entry(&cache, &entry.reference).expect("sign");
    assert_eq!(verifies(&by_tag, &ca.cert, &public, &entry.manifest, &name).await, Ok(()));
}

/// `registry-cache serve` as deploy/ runs it, over HTTPS with the pair in `tls`, signing with
/// the key in `key_file` and pre-pulling what the policies `config` names; its log goes to
/// `log`. Returns the process and its port.
fn serve(cache: &Path, config: &Path, key_file: &Path, tls: &SecretVolume, registry: &str, log: &Path) -> (Child, u16) {
    let listen = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let child = Command::new(env!("CARGO_BIN_EXE_registry-cache"))
        .args([
            "serve",
            "--listen",
            &listen.to_string(),
            "--identity-prefix",
            IDENTITY,
            "--insecure-registry",
            registry,
        ])
        .arg("--cache-dir")
        .arg(cache)
        .arg("--config")
        .arg(config)
        .arg("--signing-key")
        .arg(key_file)
        .arg("--tls-cert")
        .arg(tls.path("tls.crt"))
        .arg("--tls-key")
        .arg(tls.path("tls.key"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("serve");
    (child, listen.port())
}

/// Stops `serve` as a rollout restart does: SIGTERM, then waits for it to exit.
async fn stop(mut child: Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: signals our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let exited = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    assert!(exited.is_ok(), "serve ignored SIGTERM");
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_rotation_serve_re_signs_what_the_old_key_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = common::registry().await;
    let image = common::push(registry.addr, "filters/rotation", &common::wasm_module("rotation", 4096)).await;
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("policies dir");
    std::fs::write(policies.join("policy.yaml"), common::policy_yaml("shop", "rotation", &image, true))
        .expect("policy");
    std::fs::write(policies.join("secret.yaml"), registry.pull_secret("shop", "regcred")).expect("secret");
    let config = dir.path().join("config.yaml");
    let directories = format!("sources:\n  directories: [{}]\n  rescanSeconds: 1\n", policies.display());
    std::fs::write(&config, directories).expect("config");
    let (old_key, new_key) = (SigningKey::generate().expect("key"), SigningKey::generate().expect("key"));
    let (old_file, new_file) = (dir.path().join("old.key"), dir.path().join("new.key"));
    std::fs::write(&old_file, old_key.to_pkcs8_pem().expect("pem")).expect("old key");
    std::fs::write(&new_file, new_key.to_pkcs8_pem().expect("pem")).expect("new key");
    let (old_public, new_public) = (old_key.public_key().to_pem(), new_key.public_key().to_pem());
    let ca = TestCa::new(dir.path(), "rotation");
    let tls = tls_volume(dir.path(), &ca);
    let cache_dir = dir.path().join("cache");
    let name = registry_cache::publish::served_name(&image).expect("served name");
    let at = |port: u16| format!("localhost:{port}/{name}:v1");
    let registry_addr = registry.addr.to_string();

    // The first key: the image is pre-pulled and signed with it.
    let first_log = dir.path().join("first.log");
    let (first, port) = serve(&cache_dir, &config, &old_file, &tls, &registry_addr, &first_log);
    let minute = Duration::from_secs(60);
    let signed =
        harness::eventually(minute, || async { cosign_verify(&at(port), &ca.cert, &old_public).await.is_ok() });
    assert!(signed.await, "never served signed with the first key:\n{}", log_of(&first_log));
    assert!(cosign_verify(&at(port), &ca.cert, &new_public).await.is_err());
    stop(first).await;
    let before = Cache::open_read_only(&cache_dir).expect("cache").lookup(&image).expect("cached");

    // Restarted on the same cache with the new key, the image cached before is signed with it.
    let second_log = dir.path().join("second.log");
    let (second, port) = serve(&cache_dir, &config, &new_file, &tls, &registry_addr, &second_log);
    let re_signed =
        harness::eventually(minute, || async { cosign_verify(&at(port), &ca.cert, &new_public).await.is_ok() });
    assert!(re_signed.await, "never re-signed with the new key:\n{}", log_of(&second_log));
    assert_eq!(verifies(&at(port), &ca.cert, &new_public, &before.manifest, &name).await, Ok(()));
    let old = cosign_verify(&at(port), &ca.cert, &old_public).await;
    assert!(old.is_err(), "the old key's signature is still served: {old:?}");
    let after = Cache::open_read_only(&cache_dir).expect("cache").lookup(&image).expect("cached");
    assert_eq!((&after.manifest, after.pulled_at), (&before.manifest, before.pulled_at), "re-signed, not pulled again");
    let log = log_of(&second_log);
    assert!(
        log.lines().any(|l| l.contains("signed with the current key") && l.contains(image.as_str())),
        "no log of the re-signing:\n{log}"
    );
    stop(second).await;
}
