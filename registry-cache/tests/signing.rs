//! Cosign-compatible signing against a real private registry: Debian's `docker-registry` on
//! loopback with htpasswd auth, the `registry-cache` binary as users run it, `skopeo` as an
//! independent client of the cache's OCI API and `openssl` as an independent verifier.

mod common;

use base64::Engine as _;
use harness::registry::DockerRegistry as Registry;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use registry_cache::artifact::{self, sha256_hex};
use registry_cache::cache::Cache;
use registry_cache::publish;
use registry_cache::pull::{PullOptions, Puller};
use registry_cache::server::Permissions;
use registry_cache::sign::{self, SignatureImage, Signer, SigningKey};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const USER: &str = "ci";
const PASSWORD: &str = "wasm-s3cret";

/// The harness's registry: `docker-registry` with htpasswd auth for `USER`/`PASSWORD`.
async fn start_registry() -> Registry {
    Registry::start(USER, PASSWORD).await.expect("docker-registry")
}

fn wasm_module(tag: &str) -> Vec<u8> {
    let name = format!("churn-guard-test-{tag}");
    let mut m = vec![0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x00];
    m.push((name.len() + 1) as u8);
    m.push(name.len() as u8);
    m.extend_from_slice(name.as_bytes());
    m
}

fn client() -> Client {
    Client::new(ClientConfig { protocol: ClientProtocol::Http, ..ClientConfig::default() })
}

fn auth() -> RegistryAuth {
    RegistryAuth::Basic(USER.into(), PASSWORD.into())
}

/// Pushes a Wasm artifact; returns the reference and its manifest digest.
async fn push_module(registry: &Registry, repo: &str) -> (String, String) {
    let image = format!("{}/{repo}:v1", registry.addr);
    let reference: Reference = image.parse().expect("reference");
    let layer = ImageLayer::new(wasm_module(repo), artifact::SOLO_WASM_LAYER.into(), None);
    let config = Config::new(b"{}".to_vec(), artifact::SOLO_WASM_CONFIG.into(), None);
    let c = client();
    c.push(&reference, &[layer], config, &auth(), None).await.expect("push");
    let digest = c.fetch_manifest_digest(&reference, &auth()).await.expect("digest");
    (image, digest)
}

/// Pushes a signature image the way cosign does: its blobs, then its manifest under
/// `sha256-<hex>.sig` for `digest`.
async fn push_signature(registry: &Registry, repo: &str, digest: &str, image: &SignatureImage) {
    let tag = sign::signature_tag(digest).expect("tag");
    let reference: Reference = format!("{}/{repo}:{tag}", registry.addr).parse().expect("reference");
    let c = client();
    c.auth(&reference, &auth(), RegistryOperation::Push).await.expect("auth");
    for blob in [&image.payload, &image.config] {
        c.push_blob(&reference, blob, &format!("sha256:{}", sha256_hex(blob))).await.expect("push blob");
    }
    let content_type = reqwest::header::HeaderValue::from_static(artifact::OCI_MANIFEST);
    c.push_manifest_raw(&reference, image.manifest.clone(), content_type).await.expect("push signature manifest");
}

fn openssl(args: &[&str]) -> std::process::Output {
    let out = Command::new("openssl").args(args).output().expect("openssl CLI");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// An openssl-generated P-256 key pair: (PKCS#8 private key file, SPKI public key file).
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (sec1, private, public) =
        (dir.join(format!("{name}.ec.pem")), dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    openssl(&["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", &s(&sec1)]);
    openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", &s(&sec1), "-out", &s(&private)]);
    openssl(&["ec", "-in", &s(&sec1), "-pubout", "-out", &s(&public)]);
    (private, public)
}

fn bin() -> tokio::process::Command {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_registry-cache"))
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(cmd: &mut tokio::process::Command) -> Run {
    let out = cmd.output().await.expect("run");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn blob_files(cache_dir: &Path) -> Vec<String> {
    std::fs::read_dir(cache_dir.join("blobs/sha256"))
        .map(|d| d.flatten().map(|f| f.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn require_signature_caches_only_artifacts_signed_for_their_digest_by_a_trusted_key() {
    let registry = start_registry().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let (trusted_key, trusted_pub) = key_pair(keys.path(), "trusted");
    let (other_key, other_pub) = key_pair(keys.path(), "other");
    let trusted = SigningKey::load(&trusted_key, None).expect("trusted key");
    let other = SigningKey::load(&other_key, None).expect("other key");
    let docker_config = keys.path().join("config.json");
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    std::fs::write(&docker_config, format!(r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#, registry.addr))
        .expect("config.json");

    let (signed, signed_digest) = push_module(&registry, "wasm/signed").await;
    let signed_ref = format!("{}/wasm/signed", registry.addr);
    push_signature(
        &registry,
        "wasm/signed",
        &signed_digest,
        &SignatureImage::sign(&trusted, &signed_ref, &signed_digest),
    )
    .await;
    let (unsigned, _) = push_module(&registry, "wasm/unsigned").await;
    let (other_key_image, d) = push_module(&registry, "wasm/other-key").await;
    push_signature(&registry, "wasm/other-key", &d, &SignatureImage::sign(&other, "x/wasm/other-key", &d)).await;
    // A valid signature, but of another artifact, stored under this one's tag.
    let (other_digest, d) = push_module(&registry, "wasm/other-digest").await;
    push_signature(&registry, "wasm/other-digest", &d, &SignatureImage::sign(&trusted, &signed_ref, &signed_digest))
        .await;
    // Someone else's payload claiming this digest, carrying the trusted key's signature of another payload.
    let (tampered, d) = push_module(&registry, "wasm/tampered").await;
    let genuine = sign::payload(&signed_ref, &signed_digest);
    let forged = SignatureImage::new(sign::payload("x/wasm/tampered", &d), &trusted.sign(&genuine));
    push_signature(&registry, "wasm/tampered", &d, &forged).await;

    let pull = |image: &str, cache_dir: &Path, extra: &[&str]| {
        let mut cmd = bin();
        cmd.arg("pull").arg(image).arg("--cache-dir").arg(cache_dir);
        cmd.args(["--insecure-registry", &registry.addr.to_string()]).arg("--auth").arg(&docker_config);
        cmd.arg("--require-signature").arg(&trusted_pub).args(extra);
        cmd
    };
    for (image, reason) in [
        (&unsigned, "no cosign signature"),
        (&other_key_image, "bad signature"),
        (&other_digest, "is for"),
        (&tampered, "bad signature"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = run(&mut pull(image, dir.path(), &[])).await;
        assert!(!r.ok, "{image} was accepted: {}", r.stdout);
        assert!(r.stderr.contains(reason) && r.stderr.contains(image.as_str()), "{image}: {}", r.stderr);
        let cache = Cache::open(dir.path(), 1 << 30).expect("cache");
        assert!(cache.entries().is_empty(), "{image} was cached");
        assert!(blob_files(dir.path()).is_empty(), "{image} left blobs: {:?}", blob_files(dir.path()));
    }
    // Another trusted key makes the other key's signature acceptable.
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run(pull(&other_key_image, dir.path(), &[]).arg("--require-signature").arg(&other_pub)).await;
    assert!(r.ok, "{}", r.stderr);

    // The signed artifact is cached, and re-signed by the cache with its own key.
    let (cache_key, cache_pub) = key_pair(keys.path(), "cache");
    let dir = tempfile::tempdir().expect("tempdir");
    let signing = ["--signing-key", &cache_key.to_string_lossy(), "--identity-prefix", "cache.test:5000"];
    let r = run(&mut pull(&signed, dir.path(), &signing)).await;
    assert!(r.ok, "{}", r.stderr);
    let verify = |key: &Path| {
        let mut cmd = bin();
        cmd.arg("verify").arg("--cache-dir").arg(dir.path()).arg("--key").arg(key);
        cmd
    };
    let ok = run(&mut verify(&cache_pub)).await;
    assert!(ok.ok && ok.stdout.contains(&signed), "{}{}", ok.stdout, ok.stderr);
    let wrong = run(&mut verify(&trusted_pub)).await;
    assert!(!wrong.ok, "verified with a key that did not sign the cache's manifest");
    assert!(wrong.stderr.contains(&signed) && wrong.stderr.contains("bad signature"), "{}", wrong.stderr);
    let cache = Cache::open(dir.path(), 1 << 30).expect("cache");
    let entry = cache.lookup(&signed).expect("cached");
    let manifest = cache.get_blob(entry.signature.as_deref().unwrap_or_default()).expect("read").expect("sig");
    let layers = sign::signature_layers(&manifest).expect("layers");
    let payload = cache.get_blob(&layers[0].digest).expect("read").expect("payload");
    let claims: sign::SimpleSigning = serde_json::from_slice(&payload).expect("payload json");
    assert_eq!(claims.critical.identity.docker_reference, format!("cache.test:5000/{}", common::served(&entry)));
    assert_eq!(claims.critical.image.docker_manifest_digest, entry.manifest);

    // `sign` with no reference signs every entry; an entry the cache does not hold is an error.
    let r = run(bin().arg("sign").arg("--cache-dir").arg(dir.path()).arg("--key").arg(&trusted_key)).await;
    assert!(r.ok && r.stdout.contains(&signed), "{}", r.stderr);
    assert!(run(&mut verify(&trusted_pub)).await.ok);
    let r =
        run(bin().args(["sign", "--cache-dir"]).arg(dir.path()).arg("--key").arg(&trusted_key).arg(&unsigned)).await;
    assert!(!r.ok && r.stderr.contains("not in the cache"), "{}", r.stderr);
}

async fn serve(cache: Arc<Cache>, puller: Puller) -> SocketAddr {
    let permissions = Permissions::new(Duration::from_secs(60), common::access_check(puller));
    common::serve(common::serve_state(cache, permissions)).await
}

#[tokio::test]
async fn signed_entries_are_served_under_the_cosign_tag_and_openssl_verifies_them() {
    let registry = start_registry().await;
    let (image, _) = push_module(&registry, "filters/signed").await;
    let puller =
        || Puller::new(PullOptions { insecure_registries: vec![registry.addr.to_string()], ..PullOptions::default() });
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(Cache::open(dir.path(), 1 << 30).expect("cache"));
    let pulled = puller().pull(&image, &auth()).await.expect("pull");
    let entry = publish::publish(&cache, &pulled, true).expect("publish");
    let keys = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_pair(keys.path(), "cache");
    let signer = Signer::new(SigningKey::load(&key, None).expect("key"), "cache.test:5000");
    let entry = signer.sign_entry(&cache, &entry.reference).expect("sign");
    let addr = serve(Arc::clone(&cache), puller()).await;
    let tag = sign::signature_tag(&entry.manifest).expect("tag");

    // tags/list names the signature, to clients that prove access only.
    let http = reqwest::Client::new();
    let name = common::served(&entry);
    let tags_url = format!("http://{addr}/v2/{name}/tags/list");
    let listed = http.get(&tags_url).basic_auth(USER, Some(PASSWORD)).send().await.expect("tags");
    assert_eq!(listed.status(), 200);
    let tags: serde_json::Value = listed.json().await.expect("json");
    assert_eq!(tags["tags"], serde_json::json!(["sha256-".to_string() + &entry.manifest[7..] + ".sig", "v1"]));
    assert_ne!(http.get(&tags_url).send().await.expect("tags").status(), 200);

    let skopeo = |args: &[&str], creds: bool| {
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.arg(args[0]);
        if creds {
            cmd.args([if args[0] == "copy" { "--src-creds" } else { "--creds" }, &format!("{USER}:{PASSWORD}")]);
        } else {
            cmd.arg(if args[0] == "copy" { "--src-no-creds" } else { "--no-creds" });
        }
        cmd.arg(if args[0] == "copy" { "--src-tls-verify=false" } else { "--tls-verify=false" });
        cmd.args(&args[1..]);
        cmd
    };
    let sig_image = format!("docker://{addr}/{name}:{tag}");
    let denied = run(&mut skopeo(&["inspect", "--raw", &sig_image], false)).await;
    assert!(!denied.ok, "a private artifact's signature was served without credentials");
    let raw = run(&mut skopeo(&["inspect", "--raw", &sig_image], true)).await;
    assert!(raw.ok, "skopeo inspect: {}", raw.stderr);
    assert_eq!(format!("sha256:{}", sha256_hex(raw.stdout.as_bytes())), entry.signature.clone().unwrap_or_default());
    let served_manifest = run(&mut skopeo(&["inspect", "--raw", &format!("docker://{addr}/{name}:v1")], true)).await;
    assert_eq!(format!("sha256:{}", sha256_hex(served_manifest.stdout.as_bytes())), entry.manifest);

    let out = tempfile::tempdir().expect("tempdir");
    let copied = run(&mut skopeo(&["copy", &sig_image, &format!("dir:{}", out.path().display())], true)).await;
    assert!(copied.ok, "skopeo copy: {}", copied.stderr);
    let manifest: serde_json::Value = serde_json::from_str(&raw.stdout).expect("manifest json");
    let layer = &manifest["layers"][0];
    assert_eq!(layer["mediaType"], sign::SIMPLE_SIGNING_MEDIA_TYPE);
    let payload_path =
        out.path().join(artifact::digest_hex(layer["digest"].as_str().unwrap_or_default()).expect("digest"));
    let signature = base64::engine::general_purpose::STANDARD
        .decode(layer["annotations"][sign::SIGNATURE_ANNOTATION].as_str().unwrap_or_default())
        .expect("base64 signature");
    std::fs::write(out.path().join("sig.der"), signature).expect("write");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let verified = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &s(&public),
        "-signature",
        &s(&out.path().join("sig.der")),
        &s(&payload_path),
    ]);
    assert!(String::from_utf8_lossy(&verified.stdout).contains("Verified OK"));
    let claims: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&payload_path).expect("payload")).expect("json");
    assert_eq!(claims["critical"]["image"]["docker-manifest-digest"], entry.manifest.as_str());
    assert_eq!(claims["critical"]["identity"]["docker-reference"], format!("cache.test:5000/{name}"));
}
