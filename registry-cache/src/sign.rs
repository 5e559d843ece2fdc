//! Cosign-compatible signatures: key-based "simple signing", as `cosign sign --key` writes them
//! and `cosign verify --key` checks them.
//!
//! For an image whose manifest has digest `sha256:<hex>`, the signature is an OCI image manifest
//! tagged `sha256-<hex>.sig` in the same repository. Each of its layers is a payload of media
//! type [`SIMPLE_SIGNING_MEDIA_TYPE`]:
//!
//! ```text
//! {"critical":{"identity":{"docker-reference":REPO},"image":{"docker-manifest-digest":DIGEST},"type":"cosign container image signature"},"optional":null}
//! ```
//!
//! with the annotation [`SIGNATURE_ANNOTATION`] holding the base64 of the DER ECDSA P-256
//! SHA-256 signature over those exact payload bytes. A signature counts for an image only when
//! its payload names that image's digest and it verifies with a trusted key; the
//! `docker-reference` is informational (mirrors and caches serve the same digest under other
//! names), as in `cosign verify`.
//!
//! Keys: PKCS#8 `PRIVATE KEY`, SEC1 `EC PRIVATE KEY`, or cosign's own `ENCRYPTED SIGSTORE PRIVATE
//! KEY` (scrypt + NaCl secretbox, as `cosign generate-key-pair` writes it), from a PEM file or a
//! Kubernetes Secret (YAML or JSON) with the keys `cosign.key`, `cosign.password` and
//! `cosign.pub`, as `cosign generate-key-pair k8s://ns/name` stores them. Public keys are SPKI
//! `PUBLIC KEY` PEM, from a file, a Secret or a ConfigMap (`cosign.pub`).

use crate::artifact::{self, digest_hex, sha256_hex, OCI_CONFIG, OCI_MANIFEST};
use crate::cache::{BlobStore, Cache, CacheError, Entry};
use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Where clients reach the cache in the cluster: the default prefix of the `docker-reference`
/// this cache signs for (`<prefix>/<repository>`).
pub const DEFAULT_IDENTITY_PREFIX: &str = "registry-cache.churn-guard-system.svc:5000";
/// Signature payloads larger than this are refused before they are read.
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 20;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Key(String),
    #[error("{0} is not in the cache")]
    NotCached(String),
    #[error("{0} has no signature in the cache")]
    NotSigned(String),
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// Why a signature does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no cosign signature for {digest}: {detail}")]
    NoSignature { digest: String, detail: String },
    #[error("malformed cosign signature: {0}")]
    Malformed(String),
    #[error("bad signature: payload does not match its digest {0}")]
    PayloadDigest(String),
    #[error("bad signature: it verifies with none of the {0} trusted public key(s) (tampered, or signed by an untrusted key)")]
    Untrusted(usize),
    #[error("cosign signature is for {signed}, not for {expected}")]
    OtherDigest { signed: String, expected: String },
}

fn key_error(what: impl std::fmt::Display) -> SignError {
    SignError::Key(what.to_string())
}

/// An ECDSA P-256 private key.
#[derive(Clone)]
pub struct SigningKey(p256::ecdsa::SigningKey);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SigningKey").field(&self.public_key()).finish()
    }
}

/// An ECDSA P-256 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(p256::ecdsa::VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let point = self.0.to_encoded_point(true);
        write!(f, "PublicKey({})", hex::encode(point.as_bytes()))
    }
}

/// The PEM blocks of a text: (label, whole block).
fn pem_blocks(text: &str) -> Vec<(&str, &str)> {
    let mut out = vec![];
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let Some(after) = rest.get(start + 11..) else { break };
        let Some(label_end) = after.find("-----") else { break };
        let label = after.get(..label_end).unwrap_or_default();
        let end_marker = format!("-----END {label}-----");
        let Some(end) = after.find(&end_marker) else { break };
        let block_end = start + 11 + end + end_marker.len();
        out.push((label, rest.get(start..block_end).unwrap_or_default()));
        rest = rest.get(block_end..).unwrap_or_default();
    }
    out
}

fn pem_body(block: &str) -> Result<Vec<u8>, SignError> {
    let body: String = block.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
    B64.decode(body).map_err(|e| key_error(format!("PEM body is not base64: {e}")))
}

/// cosign's encrypted key: JSON with scrypt parameters and a NaCl secretbox around PKCS#8 DER.
#[derive(Deserialize)]
struct EncryptedKey {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Deserialize)]
struct Kdf {
    name: String,
    params: KdfParams,
    salt: String,
}

#[derive(Deserialize)]
struct KdfParams {
    #[serde(rename = "N")]
    n: u32,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

fn decrypt_cosign_key(body: &[u8], password: &[u8]) -> Result<Vec<u8>, SignError> {
    use crypto_secretbox::aead::{Aead, KeyInit};
    let bad = |what: &str| key_error(format!("encrypted cosign key: {what}"));
    let key: EncryptedKey = serde_json::from_slice(body).map_err(|e| bad(&format!("not cosign's format ({e})")))?;
    if key.kdf.name != "scrypt" || key.cipher.name != "nacl/secretbox" {
        return Err(bad(&format!("unsupported kdf {:?} or cipher {:?}", key.kdf.name, key.cipher.name)));
    }
    // The parameters cosign writes, and no others: a key file must not make us spend gigabytes.
    let log_n = match (key.kdf.params.n, key.kdf.params.r, key.kdf.params.p) {
        (32768, 8, 1) => 15,
        (65536, 8, 1) => 16,
        (n, r, p) => return Err(bad(&format!("unexpected scrypt parameters N={n} r={r} p={p}"))),
    };
    let salt = B64.decode(&key.kdf.salt).map_err(|_| bad("salt is not base64"))?;
    let nonce = B64.decode(&key.cipher.nonce).map_err(|_| bad("nonce is not base64"))?;
    let ciphertext = B64.decode(&key.ciphertext).map_err(|_| bad("ciphertext is not base64"))?;
    if nonce.len() != 24 {
        return Err(bad("nonce is not 24 bytes"));
    }
    let params = scrypt::Params::new(log_n, 8, 1, 32).map_err(|e| bad(&e.to_string()))?;
    let mut secret = [0u8; 32];
    scrypt::scrypt(password, &salt, &params, &mut secret).map_err(|e| bad(&e.to_string()))?;
    let cipher = crypto_secretbox::XSalsa20Poly1305::new(&secret.into());
    cipher
        .decrypt(crypto_secretbox::Nonce::from_slice(&nonce), ciphertext.as_slice())
        .map_err(|_| bad("wrong password (set COSIGN_PASSWORD or cosign.password) or corrupt key"))
}

fn not_p256(e: impl std::fmt::Display) -> SignError {
    key_error(format!("not an ECDSA P-256 private key: {e}"))
}

impl SigningKey {
    /// Parses a PEM private key; `password` decrypts a cosign-encrypted key (empty if `None`).
    pub fn from_pem(text: &str, password: Option<&str>) -> Result<Self, SignError> {
        let blocks = pem_blocks(text);
        let Some((label, block)) = blocks.iter().find(|(l, _)| l.ends_with("PRIVATE KEY")) else {
            return Err(key_error(match blocks.first() {
                Some((label, _)) => format!("a {label}, not a private key"),
                None => "no PEM private key found".to_string(),
            }));
        };
        let secret = match *label {
            "PRIVATE KEY" => p256::SecretKey::from_pkcs8_pem(block).map_err(not_p256)?,
            "EC PRIVATE KEY" => p256::SecretKey::from_sec1_pem(block).map_err(not_p256)?,
            "ENCRYPTED SIGSTORE PRIVATE KEY" | "ENCRYPTED COSIGN PRIVATE KEY" => {
                let der = decrypt_cosign_key(&pem_body(block)?, password.unwrap_or_default().as_bytes())?;
                p256::SecretKey::from_pkcs8_der(&der).map_err(not_p256)?
            }
            other => return Err(key_error(format!("unsupported private key type {other:?}"))),
        };
        Ok(Self(secret.into()))
    }

    /// Reads a private key from a PEM file or a Kubernetes Secret (`cosign.key`, optional
    /// `cosign.password`, which takes precedence over `password`).
    pub fn load(path: &Path, password: Option<&str>) -> Result<Self, SignError> {
        let text = read_text(path)?;
        let context = |e: SignError| key_error(format!("{}: {e}", path.display()));
        if text.contains("-----BEGIN ") {
            return Self::from_pem(&text, password).map_err(context);
        }
        let pem = object_key(&text, "cosign.key").map_err(context)?;
        let secret_password = object_key(&text, "cosign.password").ok();
        Self::from_pem(&pem, secret_password.as_deref().or(password)).map_err(context)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(*self.0.verifying_key())
    }

    /// A fresh key from the operating system's randomness, e.g. for a demo or a first start.
    pub fn generate() -> Result<Self, SignError> {
        use std::io::Read as _;
        let mut bytes = [0u8; 32];
        let mut urandom = std::fs::File::open("/dev/urandom").map_err(|e| key_error(format!("/dev/urandom: {e}")))?;
        // A scalar of zero or beyond the group order is refused; that is all but impossible twice.
        for _ in 0..4 {
            urandom.read_exact(&mut bytes).map_err(|e| key_error(format!("/dev/urandom: {e}")))?;
            if let Ok(key) = p256::ecdsa::SigningKey::from_slice(&bytes) {
                return Ok(Self(key));
            }
        }
        Err(key_error("no valid P-256 scalar from /dev/urandom"))
    }

    /// The key as unencrypted PKCS#8 PEM, which `--signing-key` and openssl read.
    pub fn to_pkcs8_pem(&self) -> Result<String, SignError> {
        use p256::pkcs8::EncodePrivateKey as _;
        self.0
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| key_error(e.to_string()))
    }

    /// DER ECDSA-P256-SHA256 signature over `payload` (deterministic, RFC 6979).
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let signature: p256::ecdsa::Signature = self.0.sign(payload);
        signature.to_der().as_bytes().to_vec()
    }
}

impl PublicKey {
    /// sha256 of the uncompressed public point, hex: names the key in the cache index.
    pub fn fingerprint(&self) -> String {
        artifact::sha256_hex(self.0.to_encoded_point(false).as_bytes())
    }

    pub fn from_pem(text: &str) -> Result<Self, SignError> {
        match pem_blocks(text).first() {
            Some(("PUBLIC KEY", block)) => p256::ecdsa::VerifyingKey::from_public_key_pem(block)
                .map(Self)
                .map_err(|e| key_error(format!("not an ECDSA P-256 public key: {e}"))),
            Some((label, _)) => Err(key_error(format!("a {label}, not a PUBLIC KEY"))),
            None => Err(key_error("no PEM public key found")),
        }
    }

    /// Reads a public key from a PEM file, or a Secret or ConfigMap with `cosign.pub`.
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let text = read_text(path)?;
        let context = |e: SignError| key_error(format!("{}: {e}", path.display()));
        if text.contains("-----BEGIN ") && !text.contains("cosign.pub") {
            return Self::from_pem(&text).map_err(context);
        }
        Self::from_pem(&object_key(&text, "cosign.pub").map_err(context)?).map_err(context)
    }

    pub fn to_pem(&self) -> String {
        self.0.to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// Whether `signature` (DER) is this key's signature over `payload`.
    pub fn verifies(&self, payload: &[u8], signature: &[u8]) -> bool {
        p256::ecdsa::Signature::from_der(signature).is_ok_and(|s| self.0.verify(payload, &s).is_ok())
    }
}

fn read_text(path: &Path) -> Result<String, SignError> {
    std::fs::read_to_string(path).map_err(|source| SignError::Io { path: path.to_path_buf(), source })
}

/// `key` from a Secret (`data` base64, or `stringData`) or a ConfigMap (`data` plain text).
fn object_key(text: &str, key: &str) -> Result<String, SignError> {
    let value: serde_json::Value =
        serde_yaml_ng::from_str(text).map_err(|e| key_error(format!("neither PEM nor a Secret/ConfigMap: {e}")))?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("Secret");
    if let Some(v) = value.pointer(&format!("/stringData/{key}")).and_then(|v| v.as_str()) {
        return Ok(v.to_string());
    }
    let Some(v) = value.pointer(&format!("/data/{key}")).and_then(|v| v.as_str()) else {
        return Err(key_error(format!("{kind} has no {key:?} key")));
    };
    if kind == "ConfigMap" {
        return Ok(v.to_string());
    }
    let raw = B64.decode(v.trim()).map_err(|e| key_error(format!("{kind} key {key:?} is not base64: {e}")))?;
    String::from_utf8(raw).map_err(|_| key_error(format!("{kind} key {key:?} is not text")))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimpleSigning {
    pub critical: Critical,
    pub optional: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Critical {
    pub identity: Identity,
    pub image: Image,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

/// The payload bytes cosign signs for `digest` under the name `docker_reference`.
pub fn payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    let p = SimpleSigning {
        critical: Critical {
            identity: Identity { docker_reference: docker_reference.into() },
            image: Image { docker_manifest_digest: digest.into() },
            kind: SIGNATURE_TYPE.into(),
        },
        optional: None,
    };
    serde_json::to_vec(&p).unwrap_or_default()
}

/// The tag cosign stores the signature of `digest` under: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> Result<String, artifact::ArtifactError> {
    Ok(format!("sha256-{}.sig", digest_hex(digest)?))
}

/// `sha256-<hex>.sig` → `sha256:<hex>`.
pub fn digest_of_signature_tag(tag: &str) -> Option<String> {
    let digest = format!("sha256:{}", tag.strip_prefix("sha256-")?.strip_suffix(".sig")?);
    digest_hex(&digest).is_ok().then_some(digest)
}

/// A signature image: its blobs and manifest, as pushed under `sha256-<hex>.sig`.
#[derive(Debug, Clone)]
pub struct SignatureImage {
    pub payload: Vec<u8>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl SignatureImage {
    /// Signs `digest` as `docker_reference`.
    pub fn sign(key: &SigningKey, docker_reference: &str, digest: &str) -> Self {
        let payload = payload(docker_reference, digest);
        let signature = key.sign(&payload);
        Self::new(payload, &signature)
    }

    /// The image for a payload and its DER signature.
    pub fn new(payload: Vec<u8>, signature: &[u8]) -> Self {
        let payload_digest = format!("sha256:{}", sha256_hex(&payload));
        // The config go-containerregistry writes for cosign's signature images.
        let config = format!(
            r#"{{"architecture":"","created":"0001-01-01T00:00:00Z","history":[{{"created":"0001-01-01T00:00:00Z"}}],"os":"","rootfs":{{"type":"layers","diff_ids":["{payload_digest}"]}},"config":{{}}}}"#
        )
        .into_bytes();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": config.len(), "digest": format!("sha256:{}", sha256_hex(&config))},
            "layers": [{
                "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
                "size": payload.len(),
                "digest": payload_digest,
                "annotations": {SIGNATURE_ANNOTATION: B64.encode(signature)}
            }]
        }))
        .unwrap_or_default();
        Self { payload, config, manifest }
    }

    pub fn manifest_digest(&self) -> String {
        format!("sha256:{}", sha256_hex(&self.manifest))
    }
}

/// One simple-signing layer of a signature manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    pub digest: String,
    pub size: u64,
    /// Base64 DER signature, from the layer's annotation.
    pub signature: String,
}

/// The simple-signing layers of a signature manifest that carry a signature.
pub fn signature_layers(manifest: &[u8]) -> Result<Vec<SignatureLayer>, VerifyError> {
    let m = artifact::parse_manifest(manifest).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let layers: Vec<SignatureLayer> = m
        .layers
        .iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE)
        .filter_map(|l| {
            let signature = l.annotations.as_ref()?.get(SIGNATURE_ANNOTATION)?.clone();
            Some(SignatureLayer { digest: l.digest.clone(), size: u64::try_from(l.size).ok()?, signature })
        })
        .collect();
    if layers.is_empty() {
        return Err(VerifyError::Malformed(format!("no {SIMPLE_SIGNING_MEDIA_TYPE} layer with a signature")));
    }
    Ok(layers)
}

/// Checks one layer: its payload matches its digest, its signature verifies with one of `keys`,
/// and the payload names `expected` (the signed image's manifest digest).
pub fn verify_layer(
    layer: &SignatureLayer,
    payload: &[u8],
    expected: &str,
    keys: &[PublicKey],
) -> Result<SimpleSigning, VerifyError> {
    if artifact::verify_digest(payload, &layer.digest).is_err() {
        return Err(VerifyError::PayloadDigest(layer.digest.clone()));
    }
    let signature = B64
        .decode(layer.signature.trim())
        .map_err(|_| VerifyError::Malformed(format!("{SIGNATURE_ANNOTATION} is not base64")))?;
    // The signature first: nothing in an unauthenticated payload is believed.
    if !keys.iter().any(|k| k.verifies(payload, &signature)) {
        return Err(VerifyError::Untrusted(keys.len()));
    }
    let signed: SimpleSigning =
        serde_json::from_slice(payload).map_err(|e| VerifyError::Malformed(format!("payload: {e}")))?;
    if signed.critical.kind != SIGNATURE_TYPE {
        return Err(VerifyError::Malformed(format!("payload type {:?}", signed.critical.kind)));
    }
    if signed.critical.image.docker_manifest_digest != expected {
        return Err(VerifyError::OtherDigest {
            signed: signed.critical.image.docker_manifest_digest,
            expected: expected.into(),
        });
    }
    Ok(signed)
}

/// Whether any layer is a valid signature of `expected`; otherwise the first layer's reason.
pub fn verify_layers(
    layers: &[(SignatureLayer, Vec<u8>)],
    expected: &str,
    keys: &[PublicKey],
) -> Result<SimpleSigning, VerifyError> {
    let mut first = None;
    for (layer, payload) in layers {
        match verify_layer(layer, payload, expected, keys) {
            Ok(s) => return Ok(s),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or_else(|| VerifyError::Malformed("no signature layers".into())))
}

/// Signs cache entries for the name clients address the cache by.
#[derive(Debug, Clone)]
pub struct Signer {
    key: SigningKey,
    identity_prefix: String,
}

impl Signer {
    /// `identity_prefix` is the cache's address as clients use it (`host[:port]`, e.g.
    /// [`DEFAULT_IDENTITY_PREFIX`]); each signature's `docker-reference` is
    /// `<identity_prefix>/<repository>`, the name the cache serves the module under.
    pub fn new(key: SigningKey, identity_prefix: impl Into<String>) -> Self {
        Self { key, identity_prefix: identity_prefix.into().trim_end_matches('/').to_string() }
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// The `docker-reference` for a cached reference: the name the cache serves it under.
    pub fn docker_reference(&self, reference: &str) -> String {
        format!("{}/{}", self.identity_prefix, crate::publish::served_name(reference).unwrap_or_default())
    }

    /// Signs the manifest the cache serves for `reference`, stores the signature image's
    /// blobs, and records the signature with the entry.
    pub fn sign_entry(&self, cache: &Cache, reference: &str) -> Result<Entry, SignError> {
        let mut entry = cache.lookup(reference).ok_or_else(|| SignError::NotCached(reference.into()))?;
        // Pinned until recorded, so that no concurrent eviction deletes them in between.
        let staging = cache.stage();
        self.store_signature(&staging, &mut entry)?;
        cache
            .set_signature(&entry.reference, &entry.manifest, entry.signature, entry.extra_blobs)?
            .ok_or_else(|| SignError::NotCached(reference.into()))
    }

    /// Whether `entry` carries this signer's signature of its manifest, under the name it is
    /// served as.
    pub fn has_signed(&self, cache: &Cache, entry: &Entry) -> bool {
        signed_claims(cache, entry, &[self.public_key()])
            .is_ok_and(|claims| claims.critical.identity.docker_reference == self.docker_reference(&entry.reference))
    }

    /// Signs `entry`'s manifest and stores the signature image's blobs, setting `entry`'s
    /// signature fields; the index is left alone. Lets an entry be recorded already signed,
    /// so that no crash leaves it in the cache without its signature. Pass the
    /// [`crate::cache::Staging`] the entry will be recorded with, so that its blobs stay pinned.
    pub fn store_signature<B: BlobStore + ?Sized>(&self, cache: &B, entry: &mut Entry) -> Result<(), CacheError> {
        let image = SignatureImage::sign(&self.key, &self.docker_reference(&entry.reference), &entry.manifest);
        let payload = cache.put_blob(&image.payload)?;
        let config = cache.put_blob(&image.config)?;
        entry.signature = Some(cache.put_blob(&image.manifest)?);
        entry.extra_blobs = vec![payload, config];
        Ok(())
    }
}

impl Signer {
    /// Signs every entry that does not carry this signer's signature of its manifest under its
    /// served name: entries cached without a key, signed with a key since rotated out, or
    /// under another identity prefix. Returns the references signed.
    pub fn sign_stale(&self, cache: &Cache) -> Vec<String> {
        let mut signed = vec![];
        for entry in cache.entries().into_iter().filter(|e| !self.has_signed(cache, e)) {
            match self.sign_entry(cache, &entry.reference) {
                Ok(e) => signed.push(e.reference),
                // Evicted or re-published (and signed by the publish) meanwhile.
                Err(SignError::NotCached(_)) => {}
                Err(e) => tracing::warn!(reference = %entry.reference, error = %e, "signing failed"),
            }
        }
        signed
    }
}

/// The claims of `entry`'s cached signature, if it is a signature of its manifest by one of `keys`.
fn signed_claims(cache: &Cache, entry: &Entry, keys: &[PublicKey]) -> Result<SimpleSigning, SignError> {
    let not_signed = || SignError::NotSigned(entry.reference.clone());
    let signature = entry.signature.as_deref().ok_or_else(not_signed)?;
    let manifest = cache.get_blob(signature)?.ok_or_else(not_signed)?;
    let mut layers = vec![];
    for layer in signature_layers(&manifest)? {
        let payload = cache.get_blob(&layer.digest)?.unwrap_or_default();
        layers.push((layer, payload));
    }
    Ok(verify_layers(&layers, &entry.manifest, keys)?)
}

/// Verifies the cached signature of `reference` against `keys`.
pub fn verify_entry(cache: &Cache, reference: &str, keys: &[PublicKey]) -> Result<Entry, SignError> {
    let entry = cache.lookup(reference).ok_or_else(|| SignError::NotCached(reference.into()))?;
    signed_claims(cache, &entry, keys)?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const DIGEST: &str = "sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b";

    fn key(seed: u8) -> SigningKey {
        SigningKey(p256::ecdsa::SigningKey::from_bytes(&[seed; 32].into()).unwrap())
    }

    #[test]
    fn payload_is_laid_out_as_cosign_writes_it() {
        let p = payload("registry-testing.svc.lan/busybox", DIGEST);
        assert_eq!(
            String::from_utf8(p).unwrap(),
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"registry-testing.svc.lan/busybox"}},"image":{{"docker-manifest-digest":"{DIGEST}"}},"type":"cosign container image signature"}},"optional":null}}"#
            )
        );
        assert_eq!(signature_tag(DIGEST).unwrap(), format!("sha256-{}.sig", &DIGEST[7..]));
        assert_eq!(digest_of_signature_tag(&signature_tag(DIGEST).unwrap()).as_deref(), Some(DIGEST));
        assert_eq!(digest_of_signature_tag("sha256-../x.sig"), None);
        assert_eq!(digest_of_signature_tag("v1"), None);
    }

    fn layers_of(image: &SignatureImage) -> Vec<(SignatureLayer, Vec<u8>)> {
        signature_layers(&image.manifest).unwrap().into_iter().map(|l| (l, image.payload.clone())).collect()
    }

    #[test]
    fn signature_image_round_trips_and_refuses_forgeries() {
        let k = key(1);
        let image = SignatureImage::sign(&k, "cache:5000/filters/x", DIGEST);
        let m: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
        assert_eq!(m["layers"][0]["mediaType"], SIMPLE_SIGNING_MEDIA_TYPE);
        assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(m["config"]["digest"], format!("sha256:{}", sha256_hex(&image.config)));
        let signed = verify_layers(&layers_of(&image), DIGEST, &[k.public_key()]).unwrap();
        assert_eq!(signed.critical.identity.docker_reference, "cache:5000/filters/x");

        // Another key.
        assert_eq!(verify_layers(&layers_of(&image), DIGEST, &[key(2).public_key()]), Err(VerifyError::Untrusted(1)));
        // One of several trusted keys is enough.
        assert!(verify_layers(&layers_of(&image), DIGEST, &[key(2).public_key(), k.public_key()]).is_ok());
        // Another digest.
        let other = format!("sha256:{}", "1".repeat(64));
        assert!(matches!(
            verify_layers(&layers_of(&image), &other, &[k.public_key()]),
            Err(VerifyError::OtherDigest { signed, .. }) if signed == DIGEST
        ));
        // A tampered payload whose layer digest was updated to match.
        let signature = B64.decode(&signature_layers(&image.manifest).unwrap()[0].signature).unwrap();
        let forged = SignatureImage::new(payload("cache:5000/filters/x", &other), &signature);
        assert_eq!(verify_layers(&layers_of(&forged), &other, &[k.public_key()]), Err(VerifyError::Untrusted(1)));
        // A payload that does not match its layer digest.
        let mut layers = layers_of(&image);
        layers[0].1.push(b' ');
        assert!(matches!(verify_layers(&layers, DIGEST, &[k.public_key()]), Err(VerifyError::PayloadDigest(_))));
        // Not a signature manifest.
        assert!(matches!(signature_layers(b"{}"), Err(VerifyError::Malformed(_))));
    }

    /// What a restart after a key rotation (or a new `--identity-prefix`) must do: every entry
    /// not signed by the current key under its served name is signed again; current ones stay.
    #[test]
    fn sign_stale_re_signs_what_another_key_or_identity_signed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 30).unwrap();
        let publish = |reference: &str, signer: Option<&Signer>| {
            let pulled = crate::pull::Pulled {
                reference: reference.into(),
                upstream_digest: format!("sha256:{}", "2".repeat(64)),
                format: artifact::Format::SoloOci,
                module: format!("\0asm\x01\0\0\0{reference}").into_bytes(),
                verified_by: vec![],
            };
            crate::publish::publish_signed(&cache, &pulled, false, signer).unwrap()
        };
        let (old, current) = (Signer::new(key(1), "cache:5000"), Signer::new(key(2), "cache:5000"));
        publish("reg.example/unsigned:1", None);
        publish("reg.example/old-key:1", Some(&old));
        publish("reg.example/old-address:1", Some(&Signer::new(key(2), "old-address:5000")));
        let kept = publish("reg.example/current:1", Some(&current));

        let mut signed = current.sign_stale(&cache);
        signed.sort();
        assert_eq!(signed, ["reg.example/old-address:1", "reg.example/old-key:1", "reg.example/unsigned:1"]);
        for entry in cache.entries() {
            assert!(current.has_signed(&cache, &entry), "{}", entry.reference);
            assert!(verify_entry(&cache, &entry.reference, &[old.public_key()]).is_err(), "{}", entry.reference);
        }
        assert_eq!(cache.lookup("reg.example/current:1").unwrap().signature, kept.signature);
        assert!(current.sign_stale(&cache).is_empty(), "signed again what was already current");
    }

    #[test]
    fn key_parsing_errors_name_the_problem() {
        let err = |r: Result<SigningKey, SignError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(SigningKey::from_pem("hello", None)).contains("no PEM private key"));
        let public = key(3).public_key().to_pem();
        assert!(err(SigningKey::from_pem(&public, None)).contains("PUBLIC KEY, not a private key"));
        assert!(PublicKey::from_pem(&public).is_ok_and(|p| p == key(3).public_key()));
        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(err(SigningKey::from_pem(garbage, None)).contains("not an ECDSA P-256 private key"));
        let rsa = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(err(SigningKey::from_pem(rsa, None)).contains("unsupported private key type"));
        let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(PublicKey::from_pem(private).is_err_and(|e| e.to_string().contains("not a PUBLIC KEY")));
        let dir = tempfile::tempdir().unwrap();
        let missing = SigningKey::load(&dir.path().join("nope.key"), None).err().map(|e| e.to_string());
        assert!(missing.is_some_and(|e| e.contains("nope.key")));
        let secret = dir.path().join("secret.yaml");
        std::fs::write(&secret, "apiVersion: v1\nkind: Secret\ndata:\n  other: eA==\n").unwrap();
        let e = SigningKey::load(&secret, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("secret.yaml") && e.contains("cosign.key"), "{e}");
    }

    /// `cosign generate-key-pair` output with an empty password, from sigstore-rs's test data
    /// (tests/data/keys/cosign_generated_encrypted_empty_private.key, Apache-2.0).
    const COSIGN_GENERATED: &str = include_str!("../tests/data/cosign_generated_encrypted_empty_private.key");

    #[test]
    fn cosign_generated_encrypted_key_and_kubernetes_secret() {
        // (scrypt at cosign's cost is slow in debug builds: two decryptions only.)
        let wrong = SigningKey::from_pem(COSIGN_GENERATED, Some("not-the-password")).err().map(|e| e.to_string());
        assert!(wrong.is_some_and(|e| e.contains("wrong password")));
        // As `cosign generate-key-pair k8s://ns/name` stores it; the Secret's (empty) password wins.
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.json");
        let json = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "data": {
            "cosign.key": B64.encode(COSIGN_GENERATED), "cosign.password": ""}});
        std::fs::write(&secret, json.to_string()).unwrap();
        let k = SigningKey::load(&secret, Some("not-the-password")).unwrap();
        let image = SignatureImage::sign(&k, "r/x", DIGEST);
        assert!(verify_layers(&layers_of(&image), DIGEST, &[k.public_key()]).is_ok());
        let with_pub =
            serde_json::json!({"kind": "Secret", "data": {"cosign.pub": B64.encode(k.public_key().to_pem())}});
        std::fs::write(&secret, with_pub.to_string()).unwrap();
        assert_eq!(PublicKey::load(&secret).unwrap(), k.public_key());
        let configmap = dir.path().join("cm.yaml");
        let indented = k.public_key().to_pem().replace('\n', "\n    ");
        std::fs::write(
            &configmap,
            format!("apiVersion: v1\nkind: ConfigMap\ndata:\n  cosign.pub: |\n    {indented}\n"),
        )
        .unwrap();
        assert_eq!(PublicKey::load(&configmap).unwrap(), k.public_key());
    }

    fn openssl(args: &[&str]) -> std::process::Output {
        let out = Command::new("openssl").args(args).output().expect("openssl CLI");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    #[test]
    fn openssl_verifies_our_signatures_and_we_verify_openssls() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        // openssl makes the key, in both the SEC1 form it generates and PKCS#8.
        openssl(&["ecparam", "-genkey", "-name", "prime256v1", "-out", &path("sec1.pem")]);
        openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", &path("sec1.pem"), "-out", &path("pkcs8.pem")]);
        openssl(&["ec", "-in", &path("sec1.pem"), "-pubout", "-out", &path("pub.pem")]);
        let sec1 = SigningKey::load(dir.path().join("sec1.pem").as_path(), None).unwrap();
        let pkcs8 = SigningKey::load(dir.path().join("pkcs8.pem").as_path(), None).unwrap();
        let public = PublicKey::load(dir.path().join("pub.pem").as_path()).unwrap();
        assert_eq!(sec1.public_key(), public);
        assert_eq!(pkcs8.public_key(), public);

        // Our signature, openssl's verification.
        let p = payload("cache:5000/filters/x", DIGEST);
        std::fs::write(path("payload"), &p).unwrap();
        std::fs::write(path("ours.der"), pkcs8.sign(&p)).unwrap();
        let ok = openssl(&[
            "dgst",
            "-sha256",
            "-verify",
            &path("pub.pem"),
            "-signature",
            &path("ours.der"),
            &path("payload"),
        ]);
        assert!(String::from_utf8_lossy(&ok.stdout).contains("Verified OK"));
        std::fs::write(path("tampered"), payload("cache:5000/filters/y", DIGEST)).unwrap();
        let refused = Command::new("openssl")
            .args(["dgst", "-sha256", "-verify", &path("pub.pem"), "-signature", &path("ours.der"), &path("tampered")])
            .output()
            .unwrap();
        assert!(!refused.status.success(), "openssl accepted a signature over other bytes");

        // openssl's signatures (random k, either S), our verification, through a signature image.
        for _ in 0..8 {
            openssl(&["dgst", "-sha256", "-sign", &path("pkcs8.pem"), "-out", &path("theirs.der"), &path("payload")]);
            let theirs = std::fs::read(path("theirs.der")).unwrap();
            assert!(public.verifies(&p, &theirs));
            let image = SignatureImage::new(p.clone(), &theirs);
            assert!(verify_layers(&layers_of(&image), DIGEST, std::slice::from_ref(&public)).is_ok());
            assert!(!public.verifies(&payload("cache:5000/filters/y", DIGEST), &theirs));
        }
    }
}
