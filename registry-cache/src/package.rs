//! Packaging a Wasm module as an OCI image and pushing it, in each of the formats the cache
//! reads: what a CI job does before a policy names the image.

use crate::artifact::{self, ArtifactError, Format};
use crate::pull::{parse_reference, PullError};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

/// The layer and config of an image holding `module` in `format`. A compat image carries the
/// module as `plugin.wasm` in a tar+gzip layer, as `docker build` of `FROM scratch` makes it.
pub fn image_parts(format: Format, module: &[u8]) -> Result<(ImageLayer, Config), ArtifactError> {
    Ok(match format {
        Format::CncfArtifact => (
            ImageLayer::new(module.to_vec(), artifact::CNCF_WASM_LAYER.into(), None),
            Config::new(b"{}".to_vec(), artifact::CNCF_WASM_CONFIG.into(), None),
        ),
        Format::SoloOci => (
            ImageLayer::new(module.to_vec(), artifact::SOLO_WASM_LAYER.into(), None),
            Config::new(b"{}".to_vec(), artifact::SOLO_WASM_CONFIG.into(), None),
        ),
        Format::Compat => (
            ImageLayer::new(tar_gz(artifact::COMPAT_FILE, module)?, artifact::OCI_TAR_GZIP.into(), None),
            Config::new(
                br#"{"architecture":"wasm","os":"wasip1","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec(),
                artifact::OCI_CONFIG.into(),
                None,
            ),
        ),
    })
}

fn tar_gz(name: &str, data: &[u8]) -> Result<Vec<u8>, ArtifactError> {
    let bad = |e: std::io::Error| ArtifactError::BadArchive(e.to_string());
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, name, data).map_err(bad)?;
    builder.into_inner().and_then(|gz| gz.finish()).map_err(bad)
}

/// Pushes `module` as `image` in `format`; returns the manifest URL the registry reports.
/// `insecure` lists registries spoken to over plain HTTP. Only Wasm modules are pushed.
pub async fn push(
    image: &str,
    format: Format,
    module: &[u8],
    auth: &RegistryAuth,
    insecure: &[String],
) -> Result<String, PullError> {
    if !artifact::is_wasm(module) {
        return Err(ArtifactError::NotWasm.into());
    }
    push_unchecked(image, format, module, auth, insecure).await
}

/// `push` without the Wasm check: for tests that need a registry to hold bad artifacts.
pub async fn push_unchecked(
    image: &str,
    format: Format,
    module: &[u8],
    auth: &RegistryAuth,
    insecure: &[String],
) -> Result<String, PullError> {
    let reference = parse_reference(image)?;
    let (layer, config) = image_parts(format, module)?;
    let protocol =
        if insecure.is_empty() { ClientProtocol::Https } else { ClientProtocol::HttpsExcept(insecure.to_vec()) };
    let client = Client::new(ClientConfig { protocol, ..ClientConfig::default() });
    let pushed =
        client.push(&reference, &[layer], config, auth, None).await.map_err(|e| PullError::Registry(e.to_string()))?;
    Ok(pushed.manifest_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_wasm_is_pushed() {
        let err = push("127.0.0.1:9/a:v1", Format::SoloOci, b"MZ not wasm", &RegistryAuth::Anonymous, &[]).await;
        assert!(matches!(err, Err(PullError::Artifact(ArtifactError::NotWasm))), "{err:?}");
    }

    #[test]
    fn every_format_round_trips_through_the_extractor() {
        let module = b"\0asm\x01\0\0\0\0\x05\x04name".to_vec();
        for format in [Format::Compat, Format::SoloOci, Format::CncfArtifact] {
            let (layer, _) = image_parts(format, &module).unwrap();
            assert_eq!(artifact::extract_module(format, &layer.data, 1 << 20).unwrap(), module, "{format:?}");
        }
    }
}
