//! A manifest delta as an agent receives it (Prepare with a base release): decode, apply to a
//! release the host keeps, validate the result. Nothing may panic, whatever the delta says.
#![no_main]
use ferry_proto::{manifest, v1};
use prost::Message;

fn entry(path: &str, kind: v1::EntryKind, data: &[u8], target: &str) -> v1::Entry {
    let hash = if kind == v1::EntryKind::File { blake3::hash(data).as_bytes().to_vec() } else { vec![] };
    let chunks = if kind == v1::EntryKind::File && !data.is_empty() {
        vec![v1::Chunk { hash: hash.clone(), length: data.len() as u64 }]
    } else {
        vec![]
    };
    v1::Entry {
        path: path.into(),
        kind: kind as i32,
        mode: if kind == v1::EntryKind::Dir { 0o755 } else { 0o644 },
        size: if kind == v1::EntryKind::File { data.len() as u64 } else { 0 },
        hash,
        chunks,
        link_target: target.into(),
    }
}

fn base() -> v1::Manifest {
    use v1::EntryKind::*;
    v1::Manifest {
        entries: vec![
            entry("VERSION", File, b"1\n", ""),
            entry("bin", Dir, b"", ""),
            entry("bin/app", File, b"\x7fELF", ""),
            entry("current", Symlink, b"", "bin/app"),
            entry("lib", Dir, b"", ""),
            entry("lib/up", Symlink, b"", ".."),
        ],
        ..Default::default()
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(delta) = v1::ManifestDelta::decode(data) else { return };
    let base = base();
    debug_assert!(manifest::validate(&base).is_ok());
    if let Ok(m) = manifest::apply_delta(&base, &delta) {
        if manifest::validate(&m).is_ok() {
            let back =
                manifest::apply_delta(&base, &manifest::diff(&base, &m)).expect("diff of a valid manifest applies");
            assert_eq!(back, m);
        }
    }
});
