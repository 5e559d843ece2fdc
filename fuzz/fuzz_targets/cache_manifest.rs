//! `parse_manifest` + `wasm_layer` on arbitrary bytes: never panic, and what they accept is a
//! schema-2 manifest whose digests are all sha256 and whose chosen layer is a known Wasm format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_cache::artifact::{self, digest_hex, parse_manifest, wasm_layer, Format};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = parse_manifest(data) else { return };
    assert_eq!(m.schema_version, 2);
    if let Some(mt) = &m.media_type {
        assert!(mt == artifact::OCI_MANIFEST || mt == artifact::DOCKER_MANIFEST);
    }
    for d in std::iter::once(&m.config).chain(&m.layers) {
        let hex = digest_hex(&d.digest).unwrap_or_else(|e| panic!("accepted digest {:?}: {e}", d.digest));
        assert!(hex.len() == 64 && !hex.contains('/') && !hex.contains('.'));
        assert!(d.size >= 0);
    }
    if let Ok(w) = wasm_layer(&m) {
        assert!(m.layers.contains(&w.layer));
        let mt = w.layer.media_type.as_str();
        match w.format {
            Format::CncfArtifact => assert_eq!(mt, artifact::CNCF_WASM_LAYER),
            Format::SoloOci => assert_eq!(mt, artifact::SOLO_WASM_LAYER),
            Format::Compat => assert!(mt == artifact::OCI_TAR_GZIP || mt == artifact::DOCKER_TAR_GZIP),
        }
    }
});
