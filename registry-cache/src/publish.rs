//! Re-publishes a verified module in one format every consumer accepts: the "oci" variant
//! (a single `application/vnd.module.wasm.content.layer.v1+wasm` layer), which Envoy Gateway's
//! and Istio's fetchers read. Its layer digest is the module's sha256, so the blob served under
//! `/v2/.../blobs/` and the file under `/wasm/<sha256>.wasm` are the same bytes.

use crate::artifact::{OCI_MANIFEST, SOLO_WASM_CONFIG, SOLO_WASM_LAYER};
use crate::cache::{now_secs, Cache, CacheError, Entry};
use crate::pull::{parse_reference, Pulled};
use crate::sign::Signer;
use serde_json::json;

pub const SOURCE_ANNOTATION: &str = "org.opencontainers.image.source";

/// The repository name the cache serves an artifact under: the upstream registry, then its
/// repository (`ghcr.io/team/filter`, `registry.local_5000/team/filter`). Images with the same
/// path in different registries must never share a name, or a client asking for one could be
/// given the other. A port's `:` becomes `_`, which names allow and host names cannot contain.
pub fn served_name(reference: &str) -> Option<String> {
    let r = parse_reference(reference).ok()?;
    Some(format!("{}/{}", r.registry().to_ascii_lowercase().replace(':', "_"), r.repository()))
}

/// Stores the module, a config and a manifest, and records the entry. Returns the entry as
/// recorded: merged with the one it replaces, if any (see [`Cache::record`]).
pub fn publish(cache: &Cache, pulled: &Pulled, private: bool) -> Result<Entry, CacheError> {
    publish_signed(cache, pulled, private, None)
}

/// As [`publish`], signing the entry with `signer` before it is recorded: the entry appears in
/// the index with its signature or not at all, whenever the process dies.
///
/// The blobs are stored through a [`crate::cache::Staging`]: a concurrent eviction cannot
/// delete them (a module or config another entry also used) before the entry is recorded.
pub fn publish_signed(
    cache: &Cache,
    pulled: &Pulled,
    private: bool,
    signer: Option<&Signer>,
) -> Result<Entry, CacheError> {
    let staging = cache.stage();
    let module = staging.put_blob(&pulled.module)?;
    let config_bytes = b"{}".to_vec();
    let config = staging.put_blob(&config_bytes)?;
    let manifest_bytes =
        manifest(&module, pulled.module.len() as u64, &config, config_bytes.len() as u64, &pulled.reference);
    let manifest = staging.put_blob(&manifest_bytes)?;
    let now = now_secs();
    let mut entry = Entry {
        reference: pulled.reference.clone(),
        upstream_digest: pulled.upstream_digest.clone(),
        module,
        size: pulled.module.len() as u64,
        format: pulled.format.name().into(),
        manifest,
        config,
        pulled_at: now,
        last_used: now,
        private,
        signature: None,
        extra_blobs: vec![],
        verified_by: pulled.verified_by.clone(),
    };
    if let Some(signer) = signer {
        signer.store_signature(&staging, &mut entry)?;
    }
    let (recorded, _evicted) = staging.record(entry)?;
    Ok(recorded)
}

/// Deterministic bytes: the same module always gets the same manifest digest.
pub fn manifest(module: &str, module_size: u64, config: &str, config_size: u64, source: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": SOLO_WASM_CONFIG, "digest": config, "size": config_size},
        "layers": [{"mediaType": SOLO_WASM_LAYER, "digest": module, "size": module_size}],
        "annotations": {SOURCE_ANNOTATION: source}
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::Format;
    use crate::sign::SigningKey;

    /// What deploy/README.md promises of replicas: pulling the same image, each with its own
    /// cache and the same key, they serve the same manifest and the same signature.
    #[test]
    fn two_caches_with_one_key_publish_identical_manifests_and_signatures() {
        let key_pem = SigningKey::generate().unwrap().to_pkcs8_pem().unwrap();
        let pulled = Pulled {
            reference: "reg.example/team/filter:v1".into(),
            upstream_digest: format!("sha256:{}", "2".repeat(64)),
            format: Format::Compat,
            module: b"\0asm\x01\0\0\0 replica".to_vec(),
            verified_by: vec![],
        };
        let publish_in_own_cache = || {
            let dir = tempfile::tempdir().unwrap();
            let cache = Cache::open(dir.path(), 1 << 30).unwrap();
            let signer = Signer::new(SigningKey::from_pem(&key_pem, None).unwrap(), "cache:5000");
            let entry = publish_signed(&cache, &pulled, true, Some(&signer)).unwrap();
            let blobs: Vec<Vec<u8>> = [&entry.manifest, entry.signature.as_ref().unwrap()]
                .into_iter()
                .chain(&entry.extra_blobs)
                .map(|d| cache.get_blob(d).unwrap().unwrap())
                .collect();
            (entry.manifest, entry.signature, entry.extra_blobs, blobs)
        };
        assert_eq!(publish_in_own_cache(), publish_in_own_cache());
    }

    #[test]
    fn served_names_keep_registries_apart() {
        assert_eq!(served_name("ghcr.io/team/filter:1.0").as_deref(), Some("ghcr.io/team/filter"));
        assert_eq!(served_name("127.0.0.1:5000/team/filter@sha256:"), None);
        assert_eq!(served_name("127.0.0.1:5000/team/filter:v1").as_deref(), Some("127.0.0.1_5000/team/filter"));
        assert_ne!(served_name("a.example/team/filter:1"), served_name("ghcr.io/team/filter:1"));
        assert_eq!(served_name("filter:1").as_deref(), Some("docker.io/library/filter"));
    }
}
