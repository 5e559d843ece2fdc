//! `extract_module(Compat, ..)` on real tar+gzip archives built from arbitrary entries (names,
//! types, sizes, contents, raw header bytes), so the fuzzer gets past gzip's checksum and tar's
//! header checksum. Never panics; returns only a regular `plugin.wasm` at the top level, within
//! the limit; refuses traversal.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use registry_cache::artifact::{extract_module, ArtifactError, Format};
use std::io::Write;

const WASM_MAGIC: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

#[derive(Arbitrary, Debug)]
enum Name {
    Plugin,
    DotPlugin,
    Nested,
    Parent,
    Absolute,
    DotDot,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    name: Name,
    /// 0 regular, 1 directory, 2 symlink, 3 hard link, 4 GNU long name, 5 PAX header, other raw.
    kind: u8,
    wasm_magic: bool,
    body: Vec<u8>,
    /// Lie about the size in the header.
    size_delta: Option<i16>,
    /// Overwrite some header bytes (after the checksum is set, or before).
    patch: Option<(u16, u8, bool)>,
    /// Repeat the body to make large files cheaply.
    repeat: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    limit_shift: u8,
    entries: Vec<Entry>,
    /// Append raw bytes after the archive, inside the gzip stream.
    trailer: Vec<u8>,
    /// Truncate the gzip output.
    truncate: Option<u16>,
    gnu: bool,
}

fn name_bytes(name: &Name) -> Vec<u8> {
    match name {
        Name::Plugin => b"plugin.wasm".to_vec(),
        Name::DotPlugin => b"./plugin.wasm".to_vec(),
        Name::Nested => b"dir/plugin.wasm".to_vec(),
        Name::Parent => b"../plugin.wasm".to_vec(),
        Name::Absolute => b"/plugin.wasm".to_vec(),
        Name::DotDot => b"./../../plugin.wasm".to_vec(),
        Name::Raw(b) => b.iter().copied().take(99).collect(),
    }
}

fuzz_target!(|input: Input| {
    let limit = 1u64 << (input.limit_shift % 17);
    let mut tar = Vec::new();
    for e in input.entries.iter().take(16) {
        let mut body = Vec::new();
        if e.wasm_magic {
            body.extend_from_slice(&WASM_MAGIC);
        }
        for _ in 0..=(e.repeat % 64) {
            body.extend_from_slice(&e.body);
        }
        let mut header = if input.gnu { tar::Header::new_gnu() } else { tar::Header::new_ustar() };
        let size = (body.len() as i64 + i64::from(e.size_delta.unwrap_or(0))).max(0) as u64;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_entry_type(match e.kind {
            0 => tar::EntryType::Regular,
            1 => tar::EntryType::Directory,
            2 => tar::EntryType::Symlink,
            3 => tar::EntryType::Link,
            4 => tar::EntryType::GNULongName,
            5 => tar::EntryType::XHeader,
            other => tar::EntryType::new(other),
        });
        // Raw name bytes: set_path refuses `..` and absolute paths, which are what we want to test.
        let name = name_bytes(&e.name);
        if let Some(field) = header.as_old_mut().name.get_mut(..name.len()) {
            field.copy_from_slice(&name);
        }
        if let Some((at, byte, before_cksum)) = e.patch {
            let at = usize::from(at) % 512;
            if before_cksum {
                header.as_mut_bytes()[at] = byte;
                header.set_cksum();
            } else {
                header.set_cksum();
                header.as_mut_bytes()[at] = byte;
            }
        } else {
            header.set_cksum();
        }
        tar.extend_from_slice(header.as_bytes());
        tar.extend_from_slice(&body);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.extend_from_slice(&[0; 1024]);
    tar.extend_from_slice(&input.trailer);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if gz.write_all(&tar).is_err() {
        return;
    }
    let Ok(mut layer) = gz.finish() else { return };
    if let Some(n) = input.truncate {
        layer.truncate(usize::from(n));
    }
    let result = extract_module(Format::Compat, &layer, limit);
    if let Ok(module) = &result {
        assert!(module.len() as u64 <= limit, "{} bytes over a limit of {limit}", module.len());
        assert!(module.starts_with(&WASM_MAGIC));
    }
    // A plain archive (regular files, honest headers, known names, nothing odd): the answer is
    // known exactly.
    let plain = input.trailer.is_empty()
        && input.truncate.is_none()
        && tar.len() as u64 <= limit.saturating_mul(4).max(1 << 20)
        && input.entries.len() <= 16
        && input
            .entries
            .iter()
            .all(|e| e.kind == 0 && e.patch.is_none() && e.size_delta.is_none() && !matches!(e.name, Name::Raw(_)));
    if plain {
        assert_eq!(result, expected(&input.entries, limit), "{input:?}");
    }
});

fn expected(entries: &[Entry], limit: u64) -> Result<Vec<u8>, ArtifactError> {
    for e in entries {
        match e.name {
            Name::Parent | Name::Absolute | Name::DotDot => {
                return Err(ArtifactError::UnsafePath(String::from_utf8_lossy(&name_bytes(&e.name)).into_owned()))
            }
            Name::Nested | Name::Raw(_) => continue,
            Name::Plugin | Name::DotPlugin => {
                let mut body = Vec::new();
                if e.wasm_magic {
                    body.extend_from_slice(&WASM_MAGIC);
                }
                for _ in 0..=(e.repeat % 64) {
                    body.extend_from_slice(&e.body);
                }
                if body.len() as u64 > limit {
                    return Err(ArtifactError::TooLarge { what: "module", limit });
                }
                return if body.starts_with(&WASM_MAGIC) { Ok(body) } else { Err(ArtifactError::NotWasm) };
            }
        }
    }
    Err(ArtifactError::NoModuleInArchive)
}
