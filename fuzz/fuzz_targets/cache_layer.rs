//! `extract_module` on arbitrary layer bytes, in every format, with a small limit: never panics,
//! never returns more than the limit, and only ever returns a Wasm module.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_cache::artifact::{extract_module, is_wasm, Format};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, layer)) = data.split_first() else { return };
    // Limits from a few bytes to 64 KiB: the compat path bounds decompression at max(4 x limit, 1 MiB).
    let limit = 1u64 << (selector % 17);
    for format in [Format::Compat, Format::SoloOci, Format::CncfArtifact] {
        if let Ok(module) = extract_module(format, layer, limit) {
            assert!(module.len() as u64 <= limit, "{} bytes over a limit of {limit}", module.len());
            assert!(is_wasm(&module));
            if format != Format::Compat {
                assert_eq!(module, layer);
            }
        }
    }
});
