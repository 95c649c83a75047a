//! Writes the fuzzers' seed corpus (`fuzz/corpus/<target>/`) from real encodings: manifests and
//! deltas of scanned builds, chunks sent as piece deltas, tar archives (plain, gzip, zstd) and the
//! README's agent.toml and fleet.toml. `scripts/fuzz.sh --seeds` runs it; the output is committed.
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_coordinator::artifact::Artifact;
use ferry_proto::{delta, manifest, v1};
use ferry_tests::pseudo_random;
use prost::Message;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    std::fs::write(dir.join(name), bytes).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()));
}

/// A build: files, a directory, symlinks (one through another), and `bin/app` of `big` bytes.
fn build(root: &Path, version: u8, big: usize) -> PathBuf {
    let dir = root.join(format!("build-{version}-{big}"));
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::create_dir_all(dir.join("lib/sub")).expect("mkdir");
    std::fs::write(dir.join("VERSION"), [b'0' + version, b'\n']).expect("write");
    let mut content = pseudo_random(big, 7);
    content[big / 2] = version;
    std::fs::write(dir.join("bin/app"), content).expect("write");
    std::fs::write(dir.join("lib/sub/empty"), b"").expect("write");
    std::os::unix::fs::symlink("bin/app", dir.join("current")).expect("symlink");
    std::os::unix::fs::symlink("..", dir.join("lib/up")).expect("symlink");
    std::os::unix::fs::symlink("lib/up/VERSION", dir.join("version-link")).expect("symlink");
    dir
}

/// The fenced ```toml block after `heading` in README.md.
fn readme_toml(readme: &str, heading: &str) -> String {
    let after = readme.split(heading).nth(1).unwrap_or_default();
    let block = after.split("```toml\n").nth(1).unwrap_or_default();
    block.split("```").next().unwrap_or_default().to_string()
}

fn main() {
    let repo = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let corpus = repo.join("fuzz/corpus");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (b1, b2) = (build(tmp.path(), 1, 300_000), build(tmp.path(), 2, 300_000));
    // Archives stay small: the fuzzer mutates every byte of a seed.
    let small = build(tmp.path(), 1, 2_000);
    let (a1, a2) = (Artifact::scan(&b1, None).expect("scan"), Artifact::scan(&b2, None).expect("scan"));

    let dir = corpus.join("manifest");
    write(&dir, "build-1", &a1.manifest.encode_to_vec());
    write(&dir, "build-2", &a2.manifest.encode_to_vec());
    write(&dir, "empty", &v1::Manifest::default().encode_to_vec());

    let dir = corpus.join("manifest_delta");
    write(&dir, "1-to-2", &manifest::diff(&a1.manifest, &a2.manifest).encode_to_vec());
    write(&dir, "none-to-1", &manifest::diff(&v1::Manifest::default(), &a1.manifest).encode_to_vec());
    write(&dir, "1-to-none", &manifest::diff(&a1.manifest, &v1::Manifest::default()).encode_to_vec());

    let dir = corpus.join("piece_delta");
    let basis = pseudo_random(96 * 1024, 11);
    let mut new = basis[1000..50_000].to_vec();
    new.splice(20_000..20_000, b"a change in the middle".iter().copied());
    let (hashes, lengths) = delta::signature(&basis);
    let (ops, literal) = delta::encode(&new, &hashes, &lengths);
    let chunk = v1::ContentChunk { raw_length: new.len() as u64, data: literal, ops, ..Default::default() };
    write(&dir, "chunk-as-delta", &[[0u8].as_slice(), &chunk.encode_to_vec()].concat());
    write(&dir, "roundtrip", b"\x01inserted bytes");

    let dir = corpus.join("tar_scan");
    for (name, flag) in [("build.tar", "-cf"), ("build.tar.gz", "-czf")] {
        let out = tmp.path().join(name);
        let ok =
            Command::new("tar").arg("-C").arg(&small).arg(flag).arg(&out).arg(".").status().is_ok_and(|s| s.success());
        assert!(ok, "tar {flag} {name}");
        write(&dir, name, &std::fs::read(&out).expect("read archive"));
    }
    let plain = std::fs::read(tmp.path().join("build.tar")).expect("read archive");
    write(&dir, "build.tar.zst", &zstd::bulk::compress(&plain, 3).expect("zstd"));

    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README.md");
    write(&corpus.join("agent_config"), "readme.toml", readme_toml(&readme, "### `agent.toml`").as_bytes());
    write(&corpus.join("fleet_config"), "readme.toml", readme_toml(&readme, "### `fleet.toml`").as_bytes());
    println!("seeds written under {}", corpus.display());
}
