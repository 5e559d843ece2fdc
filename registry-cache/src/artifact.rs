//! Wasm OCI artifacts: recognise the formats in use and get the module out, refusing anything
//! malformed, oversized, or not Wasm.
//!
//! Formats, as Envoy Gateway's and Istio's image fetchers accept them:
//! - Docker/OCI "compat" image: one tar+gzip layer with `plugin.wasm` in it;
//! - solo.io "oci" variant: a layer of `application/vnd.module.wasm.content.layer.v1+wasm`;
//! - CNCF Wasm artifact: config `application/vnd.wasm.config.v0+json`, layer `application/wasm`.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::Read;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const SOLO_WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const SOLO_WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
pub const CNCF_WASM_LAYER: &str = "application/wasm";
pub const CNCF_WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
pub const OCI_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Manifests larger than this are refused before parsing.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
const WASM_MAGIC: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
/// The file a compat image must carry, as Istio and Envoy Gateway look for it.
pub const COMPAT_FILE: &str = "plugin.wasm";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    ManifestTooLarge(usize),
    #[error("malformed manifest: {0}")]
    MalformedManifest(String),
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedManifest(String),
    #[error("no Wasm layer: layer media types {0:?} are not a known Wasm image format")]
    UnknownFormat(Vec<String>),
    #[error("digest {0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{what} is larger than the {limit} bytes allowed")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("layer is not a valid tar+gzip: {0}")]
    BadArchive(String),
    #[error("unsafe path in archive: {0:?}")]
    UnsafePath(String),
    #[error("archive has no {COMPAT_FILE}")]
    NoModuleInArchive,
    #[error("not a Wasm module (bad magic number)")]
    NotWasm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Compat,
    SoloOci,
    CncfArtifact,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Compat => "compat",
            Format::SoloOci => "oci",
            Format::CncfArtifact => "cncf",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The Wasm layer of a manifest and the format it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmLayer {
    pub format: Format,
    pub layer: Descriptor,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256:<64 hex>` → the hex part; anything else is refused (no other algorithms, no path
/// tricks in digests used as file names).
pub fn digest_hex(digest: &str) -> Result<&str, ArtifactError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| ArtifactError::BadDigest(digest.into()))?;
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(hex)
    } else {
        Err(ArtifactError::BadDigest(digest.into()))
    }
}

pub fn verify_digest(bytes: &[u8], expected: &str) -> Result<(), ArtifactError> {
    let want = digest_hex(expected)?;
    let got = sha256_hex(bytes);
    if got == want {
        Ok(())
    } else {
        Err(ArtifactError::DigestMismatch { expected: expected.into(), actual: format!("sha256:{got}") })
    }
}

/// Parses an image manifest (OCI or Docker v2), refusing oversized or malformed ones.
pub fn parse_manifest(raw: &[u8]) -> Result<Manifest, ArtifactError> {
    if raw.len() > MAX_MANIFEST_BYTES {
        return Err(ArtifactError::ManifestTooLarge(raw.len()));
    }
    let m: Manifest = serde_json::from_slice(raw).map_err(|e| ArtifactError::MalformedManifest(e.to_string()))?;
    if m.schema_version != 2 {
        return Err(ArtifactError::MalformedManifest(format!("schemaVersion {}", m.schema_version)));
    }
    if let Some(mt) = &m.media_type {
        if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
            return Err(ArtifactError::UnsupportedManifest(mt.clone()));
        }
    }
    for d in std::iter::once(&m.config).chain(&m.layers) {
        digest_hex(&d.digest)?;
        if d.size < 0 {
            return Err(ArtifactError::MalformedManifest(format!("negative size for {}", d.digest)));
        }
    }
    Ok(m)
}

/// Finds the Wasm layer and the format of the artifact.
pub fn wasm_layer(m: &Manifest) -> Result<WasmLayer, ArtifactError> {
    let find = |mt: &str| m.layers.iter().find(|l| l.media_type == mt).cloned();
    if let Some(layer) = find(CNCF_WASM_LAYER) {
        return Ok(WasmLayer { format: Format::CncfArtifact, layer });
    }
    if let Some(layer) = find(SOLO_WASM_LAYER) {
        return Ok(WasmLayer { format: Format::SoloOci, layer });
    }
    // Compat images are ordinary images: one tar+gzip layer holding plugin.wasm.
    let tars: Vec<&Descriptor> =
        m.layers.iter().filter(|l| l.media_type == OCI_TAR_GZIP || l.media_type == DOCKER_TAR_GZIP).collect();
    if let [only] = tars.as_slice() {
        return Ok(WasmLayer { format: Format::Compat, layer: (*only).clone() });
    }
    Err(ArtifactError::UnknownFormat(m.layers.iter().map(|l| l.media_type.clone()).collect()))
}

/// Whether `bytes` start with the Wasm magic number and version 1.
pub fn is_wasm(bytes: &[u8]) -> bool {
    bytes.starts_with(&WASM_MAGIC)
}

fn check_wasm(module: &[u8]) -> Result<(), ArtifactError> {
    if is_wasm(module) {
        Ok(())
    } else {
        Err(ArtifactError::NotWasm)
    }
}

/// The module inside a verified layer blob, at most `limit` bytes.
pub fn extract_module(format: Format, layer: &[u8], limit: u64) -> Result<Vec<u8>, ArtifactError> {
    let module = match format {
        Format::SoloOci | Format::CncfArtifact => {
            if layer.len() as u64 > limit {
                return Err(ArtifactError::TooLarge { what: "module", limit });
            }
            layer.to_vec()
        }
        Format::Compat => extract_from_tar_gz(layer, limit)?,
    };
    check_wasm(&module)?;
    Ok(module)
}

/// As [`extract_module`], taking the layer: a layer that is the module is returned as is,
/// not copied, so a pull holds one copy of a large module rather than two.
pub fn into_module(format: Format, layer: Vec<u8>, limit: u64) -> Result<Vec<u8>, ArtifactError> {
    match format {
        Format::Compat => extract_module(format, &layer, limit),
        Format::SoloOci | Format::CncfArtifact => {
            if layer.len() as u64 > limit {
                return Err(ArtifactError::TooLarge { what: "module", limit });
            }
            check_wasm(&layer)?;
            Ok(layer)
        }
    }
}

/// Reads `plugin.wasm` out of a tar+gzip layer. Decompression is bounded, so a gzip bomb stops
/// at the limit; entries with absolute or `..` paths are refused outright.
fn extract_from_tar_gz(layer: &[u8], limit: u64) -> Result<Vec<u8>, ArtifactError> {
    // The whole decompressed archive may hold other files; bound it at a few times the module.
    let archive_limit = limit.saturating_mul(4).max(1 << 20);
    let gz = flate2::read::GzDecoder::new(layer).take(archive_limit + 1);
    let mut archive = tar::Archive::new(CountingReader { inner: gz, read: 0, limit: archive_limit });
    let entries = archive.entries().map_err(|e| ArtifactError::BadArchive(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_error(&e, archive_limit))?;
        let path = entry.path().map_err(|e| ArtifactError::BadArchive(e.to_string()))?.into_owned();
        let shown = path.to_string_lossy().to_string();
        if path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(ArtifactError::UnsafePath(shown));
        }
        let normal: Vec<_> = path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
        let is_module = normal.len() == 1 && normal.first().is_some_and(|c| c.as_os_str() == COMPAT_FILE);
        if !is_module {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Err(ArtifactError::UnsafePath(format!("{shown} is not a regular file")));
        }
        if entry.size() > limit {
            return Err(ArtifactError::TooLarge { what: "module", limit });
        }
        let mut module = Vec::with_capacity(entry.size() as usize);
        (&mut entry).take(limit + 1).read_to_end(&mut module).map_err(|e| archive_error(&e, archive_limit))?;
        if module.len() as u64 > limit {
            return Err(ArtifactError::TooLarge { what: "module", limit });
        }
        return Ok(module);
    }
    Err(ArtifactError::NoModuleInArchive)
}

fn archive_error(e: &std::io::Error, limit: u64) -> ArtifactError {
    if e.kind() == std::io::ErrorKind::FileTooLarge {
        ArtifactError::TooLarge { what: "decompressed layer", limit }
    } else {
        ArtifactError::BadArchive(e.to_string())
    }
}

/// Fails reads past `limit` bytes, so a decompression bomb is an error, not a truncation.
struct CountingReader<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, "decompressed layer too large"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn wasm() -> Vec<u8> {
        let mut m = WASM_MAGIC.to_vec();
        m.extend_from_slice(b"\x00\x05\x04name");
        m
    }

    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`; write the raw name to build hostile archives.
            let bytes = name.as_bytes();
            if let Some(field) = header.as_old_mut().name.get_mut(..bytes.len()) {
                field.copy_from_slice(bytes);
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap_or(());
        }
        builder.into_inner().and_then(|gz| gz.finish()).unwrap_or_default()
    }

    fn manifest(layers: &[(&str, &str)]) -> Vec<u8> {
        let d = format!("sha256:{}", "a".repeat(64));
        let layers: Vec<_> = layers
            .iter()
            .map(|(mt, digest)| serde_json::json!({"mediaType": mt, "digest": digest, "size": 10}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": d, "size": 2}, "layers": layers
        }))
        .unwrap_or_default()
    }

    #[test]
    fn recognises_all_three_formats() {
        let d = format!("sha256:{}", "b".repeat(64));
        for (mt, format) in [
            (CNCF_WASM_LAYER, Format::CncfArtifact),
            (SOLO_WASM_LAYER, Format::SoloOci),
            (OCI_TAR_GZIP, Format::Compat),
            (DOCKER_TAR_GZIP, Format::Compat),
        ] {
            let m = parse_manifest(&manifest(&[(mt, &d)])).unwrap();
            assert_eq!(wasm_layer(&m).unwrap().format, format);
        }
    }

    #[test]
    fn unknown_media_types_are_refused() {
        let d = format!("sha256:{}", "b".repeat(64));
        let m = parse_manifest(&manifest(&[("application/x-something", &d)])).unwrap();
        assert!(matches!(wasm_layer(&m), Err(ArtifactError::UnknownFormat(_))));
        let two_tars = parse_manifest(&manifest(&[(OCI_TAR_GZIP, &d), (OCI_TAR_GZIP, &d)])).unwrap();
        assert!(matches!(wasm_layer(&two_tars), Err(ArtifactError::UnknownFormat(_))));
    }

    #[test]
    fn malformed_manifests_are_refused() {
        assert!(matches!(parse_manifest(b"{"), Err(ArtifactError::MalformedManifest(_))));
        assert!(matches!(parse_manifest(b"{\"schemaVersion\":1}"), Err(ArtifactError::MalformedManifest(_))));
        assert!(matches!(
            parse_manifest(&manifest(&[(SOLO_WASM_LAYER, "sha256:../../etc")])),
            Err(ArtifactError::BadDigest(_))
        ));
        assert!(matches!(parse_manifest(&manifest(&[(SOLO_WASM_LAYER, "md5:abc")])), Err(ArtifactError::BadDigest(_))));
        assert!(matches!(parse_manifest(&vec![b' '; MAX_MANIFEST_BYTES + 1]), Err(ArtifactError::ManifestTooLarge(_))));
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "config": {"digest": format!("sha256:{}", "a".repeat(64)), "size": 1}, "layers": []});
        assert!(matches!(
            parse_manifest(&serde_json::to_vec(&index).unwrap()),
            Err(ArtifactError::UnsupportedManifest(_))
        ));
    }

    #[test]
    fn digests_are_checked() {
        let data = b"hello";
        let good = format!("sha256:{}", sha256_hex(data));
        assert!(verify_digest(data, &good).is_ok());
        assert!(matches!(verify_digest(b"hellO", &good), Err(ArtifactError::DigestMismatch { .. })));
        assert!(digest_hex("sha256:ABC").is_err());
    }

    #[test]
    fn compat_layer_yields_plugin_wasm() {
        let layer = tar_gz(&[("README", b"hi"), ("./plugin.wasm", &wasm())]);
        assert_eq!(extract_module(Format::Compat, &layer, 1 << 20).unwrap(), wasm());
    }

    #[test]
    fn compat_layer_without_module_or_with_traversal_is_refused() {
        assert_eq!(
            extract_module(Format::Compat, &tar_gz(&[("other.wasm", &wasm())]), 1 << 20),
            Err(ArtifactError::NoModuleInArchive)
        );
        assert!(matches!(
            extract_module(Format::Compat, &tar_gz(&[("../plugin.wasm", &wasm())]), 1 << 20),
            Err(ArtifactError::UnsafePath(_))
        ));
        assert!(matches!(
            extract_module(Format::Compat, &tar_gz(&[("/etc/plugin.wasm", &wasm())]), 1 << 20),
            Err(ArtifactError::UnsafePath(_))
        ));
        assert!(matches!(
            extract_module(Format::Compat, b"not gzip at all", 1 << 20),
            Err(ArtifactError::BadArchive(_))
        ));
    }

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        // A 64 MiB file of zeros before plugin.wasm: compresses to a few hundred KiB.
        let filler = vec![0u8; 64 << 20];
        let bomb = tar_gz(&[("filler", &filler), ("plugin.wasm", &wasm())]);
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let err = extract_module(Format::Compat, &bomb, 1 << 20).unwrap_err();
        assert!(matches!(err, ArtifactError::TooLarge { what: "decompressed layer", .. }), "{err:?}");
        // Zeros alone read as an empty archive: refused too.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&filler).unwrap();
        let zeros = enc.finish().unwrap();
        assert_eq!(extract_module(Format::Compat, &zeros, 1 << 20), Err(ArtifactError::NoModuleInArchive));
    }

    #[test]
    fn oversized_and_non_wasm_modules_are_refused() {
        assert!(matches!(extract_module(Format::SoloOci, &vec![0; 2048], 1024), Err(ArtifactError::TooLarge { .. })));
        assert_eq!(extract_module(Format::CncfArtifact, b"\x7fELF....", 1 << 20), Err(ArtifactError::NotWasm));
        // Taking the layer: the same answers, and a module layer is the module, not a copy.
        assert!(matches!(into_module(Format::SoloOci, vec![0; 2048], 1024), Err(ArtifactError::TooLarge { .. })));
        assert_eq!(into_module(Format::CncfArtifact, b"\x7fELF....".to_vec(), 1 << 20), Err(ArtifactError::NotWasm));
        let layer = wasm();
        let at = layer.as_ptr();
        assert_eq!(into_module(Format::SoloOci, layer, 1 << 20).map(|m| m.as_ptr()), Ok(at));
        assert_eq!(into_module(Format::Compat, tar_gz(&[("plugin.wasm", &wasm())]), 1 << 20), Ok(wasm()));
        let big = [WASM_MAGIC.to_vec(), vec![0; 4096]].concat();
        assert!(matches!(
            extract_module(Format::Compat, &tar_gz(&[("plugin.wasm", &big)]), 1024),
            Err(ArtifactError::TooLarge { .. })
        ));
    }
}
