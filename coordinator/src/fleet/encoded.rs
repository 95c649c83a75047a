//! Compress once: within one deployment, each chunk of the release is read, checked against its
//! hash and compressed once, then sent as it is to every host that lacks it. Kept up to
//! [`BUDGET`] bytes of encoded data per deployment; past it a chunk is encoded for each host as
//! it is sent (memory stays bounded whatever the release's size).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_proto::v1;

/// Encoded bytes one deployment keeps.
pub const BUDGET: u64 = 256 << 20;

/// One chunk as it goes on the wire when sent whole.
#[derive(Debug)]
pub struct Encoded {
    pub compression: v1::Compression,
    pub data: Vec<u8>,
    pub raw_length: u64,
}

impl Encoded {
    /// `raw` compressed with `zstd` when that is smaller, as it is otherwise (random or already
    /// compressed content gains nothing, and the host then has nothing to decompress).
    pub fn of(raw: Vec<u8>, zstd: &mut zstd::bulk::Compressor<'_>) -> Result<Encoded, String> {
        let raw_length = raw.len() as u64;
        let compressed = zstd.compress(&raw).map_err(|e| format!("zstd: {e}"))?;
        Ok(if compressed.len() < raw.len() {
            Encoded { compression: v1::Compression::Zstd, data: compressed, raw_length }
        } else {
            Encoded { compression: v1::Compression::None, data: raw, raw_length }
        })
    }
}

/// The chunks of one deployment encoded so far.
#[derive(Debug)]
pub struct EncodedChunks {
    budget: u64,
    kept: AtomicU64,
    chunks: Mutex<HashMap<Vec<u8>, Arc<Encoded>>>,
}

impl Default for EncodedChunks {
    fn default() -> Self {
        EncodedChunks::with_budget(BUDGET)
    }
}

impl EncodedChunks {
    pub fn with_budget(budget: u64) -> EncodedChunks {
        EncodedChunks { budget, kept: AtomicU64::new(0), chunks: Mutex::new(HashMap::new()) }
    }

    /// The chunk `hash` encoded: kept from an earlier host, or made by `encode` now (and kept
    /// while the budget allows). Two hosts asking at once may both encode it; one is kept.
    pub fn get_or_encode(
        &self,
        hash: &[u8],
        encode: impl FnOnce() -> Result<Encoded, String>,
    ) -> Result<Arc<Encoded>, String> {
        if let Some(e) = self.chunks.lock().ok().and_then(|m| m.get(hash).cloned()) {
            return Ok(e);
        }
        let e = Arc::new(encode()?);
        let size = e.data.len() as u64;
        if self.kept.load(Ordering::Relaxed) + size <= self.budget
            && let Ok(mut m) = self.chunks.lock()
            && !m.contains_key(hash)
        {
            self.kept.fetch_add(size, Ordering::Relaxed);
            m.insert(hash.to_vec(), e.clone());
        }
        Ok(e)
    }

    /// Encoded bytes kept.
    pub fn kept_bytes(&self) -> u64 {
        self.kept.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(n: usize) -> Result<Encoded, String> {
        Ok(Encoded { compression: v1::Compression::None, data: vec![7; n], raw_length: n as u64 })
    }

    #[test]
    fn a_chunk_is_encoded_once_and_the_budget_bounds_what_is_kept() {
        let cache = EncodedChunks::with_budget(100);
        let mut calls = 0;
        for _ in 0..3 {
            let e = cache
                .get_or_encode(b"a", || {
                    calls += 1;
                    encoded(60)
                })
                .expect("encoded");
            assert_eq!(e.data.len(), 60);
        }
        assert_eq!(calls, 1);
        // Past the budget: encoded for each ask, not kept.
        let mut calls = 0;
        for _ in 0..2 {
            cache
                .get_or_encode(b"b", || {
                    calls += 1;
                    encoded(60)
                })
                .expect("encoded");
        }
        assert_eq!(calls, 2);
        assert_eq!(cache.kept_bytes(), 60);
        // A failure is said, and nothing is kept.
        let err = cache.get_or_encode(b"c", || Err("the file changed".into())).expect_err("fails");
        assert_eq!(err, "the file changed");
        assert_eq!(cache.kept_bytes(), 60);
    }

    #[test]
    fn incompressible_chunks_go_as_they_are() {
        let mut zstd = zstd::bulk::Compressor::new(3).expect("zstd");
        let text = Encoded::of(b"abcabcabc".repeat(1000), &mut zstd).expect("encoded");
        assert_eq!(text.compression, v1::Compression::Zstd);
        assert!(text.data.len() < 9000);
        let mut noise = vec![0u8; 4096];
        blake3::Hasher::new().update(b"noise").finalize_xof().fill(&mut noise);
        let same = Encoded::of(noise.clone(), &mut zstd).expect("encoded");
        assert_eq!((same.compression, same.data, same.raw_length), (v1::Compression::None, noise, 4096));
    }
}
