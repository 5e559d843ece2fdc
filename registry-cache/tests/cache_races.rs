//! Publishes racing evictions through the real `publish_signed`, signed and unsigned.

use registry_cache::artifact::Format;
use registry_cache::cache::{Cache, Entry};
use registry_cache::publish::publish_signed;
use registry_cache::pull::Pulled;
use registry_cache::sign::{verify_entry, Signer, SigningKey};
use std::sync::Arc;

fn pulled(reference: &str, module: &[u8]) -> Pulled {
    Pulled {
        reference: reference.into(),
        upstream_digest: format!("sha256:{}", "0".repeat(64)),
        format: Format::SoloOci,
        module: module.to_vec(),
        verified_by: vec![],
    }
}

fn whole(cache: &Cache, e: &Entry) -> bool {
    [&e.module, &e.manifest, &e.config]
        .into_iter()
        .chain(&e.signature)
        .chain(&e.extra_blobs)
        .all(|d| matches!(cache.get_blob(d), Ok(Some(_))))
}

#[test]
fn concurrent_signed_and_unsigned_publishes_under_a_tiny_bound_leave_every_entry_whole() {
    let dir = tempfile::tempdir().unwrap();
    // Modules are 64 bytes: the bound holds two.
    let cache = Arc::new(Cache::open(dir.path(), 150).unwrap());
    let signer = Arc::new(Signer::new(SigningKey::generate().unwrap(), "cache.test"));
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            let (cache, signer) = (Arc::clone(&cache), Arc::clone(&signer));
            std::thread::spawn(move || {
                for i in 0..60usize {
                    // Four modules shared by eight references; every other publish is unsigned,
                    // as by a process without the key.
                    let module = vec![((t + i) % 4) as u8; 64];
                    let reference = format!("registry.test/team/f{}:v{}", (t * 3 + i) % 4, i % 2);
                    let signer = (i % 2 == 0).then_some(&*signer);
                    let entry = publish_signed(&cache, &pulled(&reference, &module), t % 2 == 0, signer)
                        .expect("a publish racing evictions succeeds");
                    assert_eq!(entry.reference, reference);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let entries = cache.entries();
    assert!(!entries.is_empty());
    for e in &entries {
        assert!(whole(&cache, e), "{} names a missing blob", e.reference);
        assert!(cache.has_entry_intact(&e.reference));
        if e.signature.is_some() {
            verify_entry(&cache, &e.reference, &[signer.public_key()]).expect("a kept signature still verifies");
        }
    }
    drop(cache);
    let reopened = Cache::open(dir.path(), 150).unwrap();
    assert_eq!(reopened.entries(), entries, "the reopen dropped entries with missing blobs");
}

#[test]
fn an_unsigned_repull_keeps_the_signature_and_privacy_follows_the_latest_pull() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path(), 1 << 30).unwrap();
    let signer = Signer::new(SigningKey::generate().unwrap(), "cache.test");
    let image = pulled("registry.test/team/filter:1", b"\0asm module");

    let signed = publish_signed(&cache, &image, false, Some(&signer)).unwrap();
    assert!(signed.signature.is_some() && !signed.private);
    let repulled = publish_signed(&cache, &image, true, None).unwrap();
    assert_eq!(repulled.signature, signed.signature, "the returned entry is the one recorded");
    assert!(repulled.private, "pulled with a secret now: private, whatever an earlier pull found");
    assert_eq!(cache.lookup(&image.reference).unwrap(), repulled);
    verify_entry(&cache, &image.reference, &[signer.public_key()]).unwrap();
}
