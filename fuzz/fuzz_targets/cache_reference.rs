//! Image references: `parse_reference` on arbitrary text never panics, and what it accepts
//! survives the round trip the cache relies on (the index stores `whole()`, the server and the
//! permission checks parse it again). `render` never panics on an arbitrary image URL in a
//! policy, nor on arbitrary YAML, and points every rewritten policy at `/wasm/<sha256>.wasm`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_cache::cache::Entry;
use registry_cache::permissions::repository_of;
use registry_cache::pull::parse_reference;
use registry_cache::render::render;

const MODULE: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn entry(reference: &str, private: bool) -> Entry {
    Entry {
        reference: reference.into(),
        upstream_digest: MODULE.into(),
        module: MODULE.into(),
        size: 1,
        format: "oci".into(),
        manifest: MODULE.into(),
        config: MODULE.into(),
        pulled_at: 0,
        last_used: 0,
        private,
        signature: None,
        extra_blobs: vec![],
        verified_by: vec![],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };

    if let Ok(r) = parse_reference(text) {
        let whole = r.whole();
        let again = parse_reference(&whole).unwrap_or_else(|e| panic!("{text:?} -> {whole:?} does not parse: {e}"));
        assert_eq!(again.whole(), whole, "{text:?}");
        assert_eq!(again.registry(), r.registry(), "{text:?}");
        assert_eq!(again.repository(), r.repository(), "{text:?}");
        assert_eq!(again.tag(), r.tag(), "{text:?}");
        assert_eq!(again.digest(), r.digest(), "{text:?}");
        assert_eq!(repository_of(&whole), format!("{}/{}", r.registry(), r.repository()));
    }

    let private = mode & 1 == 1;
    let token = |_: &str, _: &str| (mode & 2 == 0).then(|| "00ff".to_string());
    if mode & 4 == 0 {
        // The text as the image URL of an otherwise valid policy.
        let url = serde_json::to_string(text).unwrap_or_default();
        let yaml = format!(
            "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: EnvoyExtensionPolicy\nmetadata:\n  name: p\n  namespace: team-a\nspec:\n  wasm:\n  - name: w\n    code:\n      type: Image\n      image:\n        url: {url}\n"
        );
        let result = render(&yaml, "http://cache:5000/", |r| Some(entry(r, private)), token);
        if let Ok(out) = &result {
            assert!(out.contains("http://cache:5000/wasm/0123456789abcdef"), "{out}");
            assert!(!out.contains("type: Image"), "{out}");
            assert!(parse_reference(text.trim_start_matches("oci://")).is_ok());
        }
    } else {
        // Arbitrary YAML: anything goes in, nothing panics.
        let _ = render(text, "http://cache:5000", |r| Some(entry(r, private)), token);
    }
});
